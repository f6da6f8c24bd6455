"""`dsmoe generate --checkpoint DIR --prompt TEXT` (or `--model HF_FOLDER`): sample from a model (KV cache,
top-k / top-p)."""

from __future__ import annotations

import argparse

from dsmoe.checkpoint import load_checkpoint
from dsmoe.cli.format import check_at_least
from dsmoe.generate import generate_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True, metavar="DIR",
                   help="a dsmoe checkpoint or run directory, or a HuggingFace DeepSeek-V2/V3 folder")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max-tokens", type=int, default=200, help="new tokens to sample (capped by max_seq_len)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 disables)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def run(args: argparse.Namespace) -> int:
    check_at_least(args, 1, "max_tokens", "top_k")
    check_at_least(args, 0, "temperature", "seed")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p} is invalid: must be in (0, 1] (1 disables nucleus sampling)")
    model, _, _, tokenizer = load_checkpoint(args.checkpoint, args.device)
    text = generate_text(model, tokenizer, args.prompt, args.max_tokens, args.temperature, args.top_k,
                         args.top_p, args.seed, args.device)
    print(args.prompt + text)
    return 0
