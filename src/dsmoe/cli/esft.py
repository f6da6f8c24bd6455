"""`dsmoe esft-merge ADAPTER --out DIR [--base HF_DIR]`: an ESFT adapter (RUN/esft) merged into its base folder."""

from __future__ import annotations

import argparse

from dsmoe.esft import merge_adapter, read_adapter


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", metavar="ADAPTER", help="an ESFT adapter folder: RUN/esft of a run with --set esft=...")
    p.add_argument("--base", metavar="HF_DIR",
                   help="the HuggingFace folder the run was initialized from (default: the one the adapter records)")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged folder to write (new or empty)")


def run(args: argparse.Namespace) -> int:
    config, _ = read_adapter(args.adapter)
    out = merge_adapter(args.adapter, args.out, args.base)
    kept = ", ".join(f"{layer}: {len(e)}" for layer, e in config["experts"].items())
    print(f"wrote {out}: {args.base or config['base']['path']} with the adapter's {config['keys']} tensors "
          f"(ESFT-{config['score']}, p={config['top_p']:g}; experts per MoE layer {kept})")
    return 0
