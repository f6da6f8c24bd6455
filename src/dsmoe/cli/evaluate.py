"""`dsmoe eval --checkpoint DIR`: validation loss, perplexity, per-layer MaxVio_global and the expert load table."""

from __future__ import annotations

import argparse

from dsmoe.checkpoint import load_checkpoint
from dsmoe.cli.format import check_at_least
from dsmoe.data import load_corpus
from dsmoe.evaluate import evaluate, load_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True, metavar="DIR",
                   help="a dsmoe checkpoint or run directory, or a HuggingFace DeepSeek-V2/V3 folder")
    p.add_argument("--data", help="a prepared folder (dsmoe prepare), a text file or folder, or a mixture "
                                   "a=0.7,b=0.3 to evaluate on (default: the run's corpus)")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's eval_batches)")
    p.add_argument("--split", choices=["val", "train"], default="val",
                   help="evaluate on the held-out files or on windows of the training split")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def run(args: argparse.Namespace) -> int:
    check_at_least(args, 1, "batches")
    model, model_cfg, train_cfg, tokenizer = load_checkpoint(args.checkpoint, args.device)
    corpus = load_corpus(args.data if args.data else train_cfg.data, tokenizer)
    seq_len = train_cfg.seq_len or model_cfg.max_seq_len
    corpus.check(seq_len, model_cfg.vocab_size)
    ev = evaluate(model, corpus, train_cfg.batch_size, seq_len, args.batches or train_cfg.eval_batches,
                  args.device, args.split, doc_mask=train_cfg.doc_mask)
    mv = ev["maxvio_global"]
    print(f"{'validation' if args.split == 'val' else 'training-split'} loss {ev['loss']:.4f}, "
          f"perplexity {ev['ppl']:.2f}")
    if mv:
        print(f"MaxVio_global per MoE layer: {', '.join(f'{v:.3f}' for v in mv)} (mean {sum(mv) / len(mv):.3f})")
    print(load_table(ev["load"], model_cfg.moe_blocks))
    return 0
