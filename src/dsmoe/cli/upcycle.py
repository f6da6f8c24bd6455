"""`dsmoe upcycle DENSE_DIR --out DIR --experts E --top-k K --granularity m [--shared S] [--drop r]`: a dense
Llama/Qwen2/Qwen3 folder as a DeepSeekMoE folder (GLM-4.5's glm4_moe format) that computes the same function
(dsmoe.upcycle)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from dsmoe.paths import folder_file
from dsmoe.pretrained import from_pretrained, read_json, save_pretrained
from dsmoe.upcycle import DENSE_FAMILIES, UpcycleConfig, max_logit_difference, upcycle

# the files besides the weights and config.json that go along: the tokenizer and chat template
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "tiktoken.model",
                   "chat_template.jinja", "chat_template.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dense", metavar="DENSE_DIR", help="a dense HuggingFace folder: model_type "
                   + ", ".join(DENSE_FAMILIES))
    p.add_argument("--out", required=True, metavar="DIR", help="the MoE folder to write (new or empty)")
    p.add_argument("--experts", type=int, required=True, metavar="E",
                   help="routed experts: a multiple of granularity - shared (each routed slice copied E/(m-S) times)")
    p.add_argument("--top-k", type=int, required=True, metavar="K",
                   help="routed experts per token: granularity - shared (one copy of each routed slice)")
    p.add_argument("--granularity", type=int, required=True, metavar="m",
                   help="slices of each FFN along its hidden width (each expert's width is intermediate_size/m)")
    p.add_argument("--shared", type=int, default=0, metavar="S", help="slices that become the shared experts")
    p.add_argument("--drop", type=float, default=0.0, metavar="r",
                   help="Drop-Upcycling: share of each routed expert's hidden units drawn anew (0.5 in the paper); "
                        "0 keeps the dense model's function exactly")
    p.add_argument("--seed", type=int, default=0, help="seed of the router rows and the re-drawn units")
    p.add_argument("--router-std", type=float, default=0.02,
                   help="std of the router's rows (one per copy of the slices); 0: a zero router, every token on "
                        "the first copy")
    p.add_argument("--first-dense", type=int, default=0, metavar="N", help="the first N blocks stay dense")


def run(args: argparse.Namespace) -> int:
    spec = UpcycleConfig(experts=args.experts, top_k=args.top_k, granularity=args.granularity, shared=args.shared,
                         drop=args.drop, seed=args.seed, router_std=args.router_std, first_k_dense=args.first_dense)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder: choose a new folder for the MoE model")
    model_type = read_json(args.dense, "config.json").get("model_type")
    if model_type not in DENSE_FAMILIES:
        raise ValueError(f"{args.dense}: model_type={model_type!r} is not a dense model upcycle takes; choose a "
                         f"{', '.join(DENSE_FAMILIES)} folder (an MoE model has its experts already)")
    dense = from_pretrained(args.dense)
    model = upcycle(dense, spec)
    difference = max_logit_difference(dense, model, spec.seed)
    save_pretrained(model, out)
    for name in TOKENIZER_FILES:
        source = folder_file(args.dense, name)
        if source.is_file():
            shutil.copyfile(source, out / name)
    cfg, moe = model.cfg, model.cfg.moe
    assert moe is not None
    print(f"wrote {out}: {cfg.family}, {cfg.n_moe_layers} MoE blocks of {moe.n_shared_experts} shared + "
          f"{moe.n_routed_experts} routed experts of width {moe.expert_dim}, top-{moe.top_k}; "
          f"{cfg.num_params():,} parameters, {cfg.num_active_params():,} active (dense: {dense.cfg.num_params():,})")
    dtype = str(model.embed.weight.dtype).removeprefix("torch.")
    held = "the dense model's function, up to the rounding of its sums" if spec.drop == 0 else \
        f"Drop-Upcycling re-drew {spec.drop:g} of each routed expert's units"
    print(f"logits against the dense model's on 2 x 32 random tokens: max |difference| {difference:.2e} in {dtype} "
          f"({held})")
    return 0
