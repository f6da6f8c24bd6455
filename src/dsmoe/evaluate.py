"""Evaluation: validation loss, perplexity and MaxVio_global (Loss-Free Balancing §4.1) of a model on a corpus."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch

from dsmoe.data import Corpus
from dsmoe.metrics import max_violation
from dsmoe.model import MoETransformer
from dsmoe.parallel.context import Context, SingleProcess


def autocast(device: str):
    """bf16 autocast on CUDA; fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()


@torch.no_grad()
def evaluate(model: MoETransformer, corpus: Corpus, batch_size: int, seq_len: int, batches: int,
             device: str = "cpu", split: str = "val", ctx: Context | None = None, doc_mask: bool = False) -> dict:
    """Loss (the mean over every trained target), perplexity, per-layer MaxVio_global and load [L, E] from the
    load summed over the whole pass.

    Windows are spread evenly over the split (no RNG, so evaluating never shifts training). The model runs
    in eval mode under no_grad, so the balancing counts are untouched. Under a distributed context each
    rank evaluates its share of every batch and the sums are all-reduced. doc_mask: documents masked apart, as
    a run with TrainConfig.doc_mask trains.
    """
    ctx = ctx or SingleProcess()
    was_training = model.training
    model.eval()
    n = batches * batch_size
    starts = corpus.spread(split, n, seq_len)
    total_loss = torch.zeros((), device=device)
    total_targets = torch.zeros((), dtype=torch.long)
    load_LE = None
    for i in range(0, n, batch_size):
        (local,) = ctx.local_batch(starts[i:i + batch_size])
        x, y, docs = corpus.windows_with_docs(split, local, seq_len) if doc_mask else (
            *corpus.windows(split, local, seq_len), None)
        docs = None if docs is None else docs.to(device)
        loss_sum, targets = ctx.forward_loss(model, x.to(device), y.to(device), docs, lambda: autocast(device))
        total_loss += loss_sum.to(total_loss.device)
        total_targets += targets.cpu()
        stats = ctx.routing_stats(model)
        if stats:
            load_LE = stats["tokens_per_expert"] if load_LE is None else load_LE + stats["tokens_per_expert"]
    model.train(was_training)
    ctx.all_reduce_(total_loss)
    loss = (total_loss / ctx.all_reduce_(total_targets.to(total_loss.device)).clamp(min=1)).item()
    out: dict[str, Any] = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "maxvio_global": [], "load": []}
    if load_LE is not None:
        ctx.all_reduce_(load_LE)
        out["maxvio_global"] = max_violation(load_LE).tolist()
        out["load"] = load_LE.tolist()
    return out


def load_table(load_LE: list[list[int]], blocks: list[int] | None = None) -> str:
    """Tokens per expert as a layer x expert table, each cell a share of the layer's mean load; rows named by their
    block index (`blocks`, ModelConfig.moe_blocks), else counted from 0."""
    if not load_LE:
        return "(dense model: no routed experts)"
    E = len(load_LE[0])
    lines = ["load / mean load per expert (1.00 = perfectly balanced)",
             "layer " + " ".join(f"{e:>5d}" for e in range(E))]
    for i, row in enumerate(load_LE):
        mean = max(sum(row) / E, 1e-12)
        lines.append(f"{blocks[i] if blocks else i:>5d} " + " ".join(f"{v / mean:5.2f}" for v in row))
    return "\n".join(lines)
