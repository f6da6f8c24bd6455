"""`dsmoe prepare SRC... --out DIR`: tokenize a corpus into token shards (dsmoe.prepare)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dsmoe.cli.format import check_at_least
from dsmoe.config import BPE_MIN_VOCAB
from dsmoe.prepare import SHARD_TOKENS, is_prepared, prepare, read_manifest, split_sizes, train_bpe
from dsmoe.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="text files, folders, .jsonl / .jsonl.gz (one JSON document per line) or .parquet files")
    p.add_argument("--out", required=True, metavar="DIR", help="the prepared folder (new, or one to resume)")
    p.add_argument("--tokenizer", default="byte", metavar="byte|bpe|PATH",
                   help="byte; bpe (trained here on the first 4 MB of training text); or a folder whose "
                        "tokenizer.json to use: a HuggingFace model (to fine-tune it with train --init), a dsmoe run "
                        "or a prepared corpus")
    p.add_argument("--vocab-size", type=int, default=2048, help="the BPE tokenizer's vocabulary")
    p.add_argument("--field", default="text", help="the JSONL field or Parquet column that holds the text")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of documents held out for validation")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    p.add_argument("--skip-bad", action="store_true",
                   help="count and skip bad JSONL lines (not JSON, not UTF-8, no text field, a conversation "
                        "the chat template refuses or with no assistant turn) instead of stopping")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per chunk (the unit of resuming)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    check_at_least(args, 1, "workers", "shard_tokens")
    check_at_least(args, BPE_MIN_VOCAB, "vocab_size")
    tokenizer = _tokenizer(args)
    if tokenizer.eos_id is None:
        print(f"warning: the tokenizer of {args.tokenizer} has no eos_token: documents are joined with nothing "
              "between them (train with --set doc_mask=true to keep them apart)")
    try:
        result = prepare(args.sources, args.out, tokenizer, field=args.field, val_fraction=args.val_fraction,
                         workers=args.workers, skip_bad=args.skip_bad, shard_tokens=args.shard_tokens,
                         progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the whole chunks in {args.out} are kept; run the same command to go on")
        raise
    m = result.manifest
    counts = split_sizes(m)
    docs = sum(c[s]["docs"] for c in m["chunks"] for s in ("train", "val"))
    skipped = ", ".join(f"{n:,} {what}" for what, n in m["skipped"].items())
    print(f"{'already prepared (nothing to do)' if result.already else 'prepared'}: {result.out} | "
          f"{docs:,} documents: train {counts['train']:,} tokens, val {counts['val']:,} | "
          f"{m['tokenizer']['kind']} tokenizer, vocab {m['vocab_size']:,}, {m['dtype']}, {len(m['chunks'])} chunks"
          + (f" | skipped {skipped}" if skipped else ""))
    return 0


def _tokenizer(args: argparse.Namespace) -> Tokenizer:
    """byte; bpe (the folder's own when it was begun with bpe of this vocabulary, else trained on the sources);
    or the tokenizer.json (or tiktoken.model) of a folder: a HuggingFace model, a dsmoe checkpoint (or run) or a
    prepared corpus."""
    if args.tokenizer == "byte":
        return ByteTokenizer()
    if args.tokenizer == "bpe":
        if is_prepared(args.out):
            manifest = read_manifest(args.out)
            if manifest["tokenizer"]["kind"] == "bpe" and manifest["vocab_size"] == args.vocab_size:
                return load_tokenizer(args.out)
        return train_bpe(args.sources, args.vocab_size, args.field, args.val_fraction)
    folder = Path(args.tokenizer)
    if (folder / "checkpoint" / "tokenizer.json").is_file():  # a dsmoe run
        folder = folder / "checkpoint"
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tiktoken.model")):
        raise ValueError(f"--tokenizer {args.tokenizer}: not byte, bpe, or a folder with a tokenizer.json or "
                         "tiktoken.model (a HuggingFace model, a dsmoe run or checkpoint, a prepared corpus)")
    return load_tokenizer(folder)
