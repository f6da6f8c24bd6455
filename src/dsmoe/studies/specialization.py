"""The specialization study's measurements of one trained run (dsmoe.analysis holds the analysis itself):
token-kind routing over random validation batches and the redundancy test."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dsmoe.analysis import KINDS, add_kind_counts, capture_routing, mutual_information, redundancy
from dsmoe.checkpoint import load_checkpoint
from dsmoe.data import load_corpus


def routing_by_kind(model, corpus, tokenizer, batch_size, seq_len, batches, seed=0) -> list[list[list[int]]]:
    """Counts [layer][kind][expert] of the assignments of random validation batches."""
    L, E = len(model.moe_layers()), model.moe_layers()[0].cfg.n_routed_experts
    kinds_LKE = torch.zeros(L, len(KINDS), E, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad(), capture_routing(model) as ids:
        for _ in range(batches):
            x_BS, _ = corpus.batch("val", batch_size, seq_len, gen)
            model(x_BS.to(device))
            add_kind_counts(kinds_LKE, ids, x_BS, tokenizer)
    return kinds_LKE.tolist()


def examine(run_dir: Path, batches: int) -> dict:
    """Token-kind routing and the redundancy test for one trained run."""
    model, model_cfg, train_cfg, tokenizer = load_checkpoint(run_dir, "cpu")
    train_cfg = dataclasses.replace(train_cfg, device="cpu", seq_len=train_cfg.seq_len or model_cfg.max_seq_len)
    corpus = load_corpus(train_cfg.data, tokenizer)
    counts = routing_by_kind(model, corpus, tokenizer, train_cfg.batch_size, train_cfg.seq_len, batches)
    mi = [mutual_information(c) for c in counts]
    return {"kind_counts": counts, "mi_bits": [m[0] for m in mi], "mi_fraction": [m[1] for m in mi],
            "redundancy": redundancy(model, corpus, batches, train_cfg.batch_size, train_cfg.seq_len)}
