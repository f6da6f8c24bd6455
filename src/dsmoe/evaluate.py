"""`dsmoe eval --checkpoint DIR`: validation loss, perplexity, per-layer MaxVio_global and the expert load table."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint or run directory")
    p.add_argument("--data", help="text file or folder to evaluate on (default: the run's corpus)")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's eval_batches)")
    p.add_argument("--split", choices=["val", "train"], default="val",
                   help="evaluate on the held-out files (default) or on windows of the training split")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def load_table(load_LE: list[list[int]], first_layer: int = 0) -> str:
    """Tokens per expert as a layer x expert table, each cell a share of the layer's mean load."""
    if not load_LE:
        return "(dense model: no routed experts)"
    E = len(load_LE[0])
    lines = ["load / mean load per expert (1.00 = perfectly balanced)",
             "layer " + " ".join(f"{e:>5d}" for e in range(E))]
    for i, row in enumerate(load_LE):
        mean = max(sum(row) / E, 1e-12)
        lines.append(f"{first_layer + i:>5d} " + " ".join(f"{v / mean:5.2f}" for v in row))
    return "\n".join(lines)


def run(args) -> int:
    from dsmoe.checkpoint import CheckpointError
    from dsmoe.data import load_corpus
    from dsmoe.train import evaluate, load_checkpoint

    try:
        model, model_cfg, train_cfg, tokenizer = load_checkpoint(args.checkpoint, args.device)
        corpus = load_corpus(args.data if args.data else train_cfg.data, tokenizer)
        seq_len = train_cfg.seq_len or model_cfg.max_seq_len
        corpus.check(seq_len)
        ev = evaluate(model, corpus, train_cfg.batch_size, seq_len, args.batches or train_cfg.eval_batches,
                      args.device, args.split)
    except (CheckpointError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"dsmoe eval: error: {e}")
        return 1
    mv = ev["maxvio_global"]
    print(f"{'validation' if args.split == 'val' else 'training-split'} loss {ev['loss']:.4f}, "
          f"perplexity {ev['ppl']:.2f}")
    if mv:
        print(f"MaxVio_global per MoE layer: {', '.join(f'{v:.3f}' for v in mv)} (mean {sum(mv) / len(mv):.3f})")
    print(load_table(ev["load"], model_cfg.first_k_dense if model_cfg.moe else 0))
    return 0
