"""`dsmoe export RUN OUT`: a dsmoe checkpoint as a HuggingFace DeepSeek-V2/V3 folder (transformers loads it)."""

from __future__ import annotations

import argparse

from dsmoe.checkpoint import load_checkpoint
from dsmoe.pretrained import save_pretrained


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a dsmoe checkpoint or run directory (an MLA + MoE model)")
    p.add_argument("out", metavar="OUT", help="the folder to write (config.json, safetensors, tokenizer)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, in GiB")


def run(args: argparse.Namespace) -> int:
    model, _, _, tokenizer = load_checkpoint(args.run)
    path = save_pretrained(model, args.out, max_shard_size=int(args.max_shard_gb * 2**30), eos_id=tokenizer.eos_id)
    tokenizer.save(path)
    print(f"wrote {path} (config.json, safetensors, tokenizer)")
    return 0
