"""`dsmoe generate --checkpoint DIR --prompt TEXT`: sample from a trained model (KV cache, top-k / top-p)."""

from __future__ import annotations

import argparse

from dsmoe.checkpoint import load_checkpoint
from dsmoe.generate import generate_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint or run directory")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max-tokens", type=int, default=200, help="new tokens to sample (capped by max_seq_len)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 disables)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def run(args: argparse.Namespace) -> int:
    if args.max_tokens <= 0 or args.temperature < 0 or not (args.top_p is None or 0 < args.top_p <= 1):
        raise ValueError("need --max-tokens > 0, --temperature >= 0 and 0 < --top-p <= 1")
    model, _, _, tokenizer = load_checkpoint(args.checkpoint, args.device)
    text = generate_text(model, tokenizer, args.prompt, args.max_tokens, args.temperature, args.top_k,
                         args.top_p, args.seed, args.device)
    print(args.prompt + text)
    return 0
