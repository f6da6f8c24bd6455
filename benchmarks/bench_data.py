"""Data benchmarks: `dsmoe prepare` speed and memory at two corpus sizes, and training from a prepared corpus.

    python benchmarks/bench_data.py corpus --size-mb 1024 --out /tmp/corpus-1g   # a local text corpus
    python benchmarks/bench_data.py prepare --src /tmp/corpus-1g --sample-mb 64   # tokens/s and peak RSS
    python benchmarks/bench_data.py train --data /tmp/prepared-1g                   # RSS and the loader's share

The corpus is the standard library's and site-packages' text files, repeated with variation (each copy's
identifiers suffixed by its copy number) until it reaches the size asked for. Peak RSS is the largest sum over
the process tree (the command and its workers), sampled every 50 ms from /proc. Run on a quiet machine, one
benchmark at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

DSMOE = [sys.executable, "-m", "dsmoe"]


def make_corpus(size_mb: int, out: Path) -> None:
    roots = [Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib")]
    texts = []
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.suffix in (".py", ".txt", ".md", ".rst") and p.is_file():
                try:
                    texts.append(p.read_text("utf-8"))
                except (UnicodeDecodeError, OSError):
                    pass
    out.mkdir(parents=True, exist_ok=True)
    target, written, copy = size_mb << 20, 0, 0
    word = re.compile(r"\b([A-Za-z_]{4,})\b")
    while written < target:
        copy += 1
        chunk, n = [], 0
        for i, text in enumerate(texts):
            varied = word.sub(rf"\g<1>{copy}", text) if copy > 1 else text
            chunk.append(varied)
            n += len(varied)
            if n >= 1 << 20 or i == len(texts) - 1:  # files of about 1 MB
                data = "\n".join(chunk).encode()
                (out / f"c{copy:03d}-{i:06d}.txt").write_bytes(data)
                written += len(data)
                chunk, n = [], 0
                if written >= target:
                    break
    print(f"{written / 2**20:.0f} MB in {len(list(out.iterdir()))} files: {out}")


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def measure(cmd: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS of the process tree, stdout) of a command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0]

    def poll() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.05)

    thread = threading.Thread(target=poll)
    thread.start()
    out, _ = proc.communicate()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out}")
    return time.perf_counter() - t0, peak[0], out


def sample(src: Path, mb: int, out: Path) -> Path:
    """The first `mb` MB of the corpus' files (in name order), as a folder."""
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for p in sorted(src.iterdir()):
        if total >= mb << 20:
            break
        (out / p.name).write_bytes(p.read_bytes())
        total += p.stat().st_size
    return out


def batch_encode_tokens_per_s(folder: Path, tokenizer_dir: Path) -> tuple[float, int]:
    """One `tokenizers` encode_batch call over the folder's files (all in memory): the practical limit."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_dir / "bpe.json"))
    texts = [p.read_text() for p in sorted(folder.iterdir())]
    t0 = time.perf_counter()
    n = sum(len(e.ids) for e in tok.encode_batch(texts))
    return n / (time.perf_counter() - t0), n


def prepare_bench(src: Path, sample_mb: int, workers: list[int]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp_path = Path(tmp)
        small = sample(src, sample_mb, tmp_path / "sample")
        # the BPE tokenizer once (trained on the sample's first 4 MB), then every run uses that folder's
        subprocess.run(DSMOE + ["prepare", str(small), "--out", str(tmp_path / "tok"), "--tokenizer", "bpe",
                                "--quiet", "--shard-tokens", "1"], check=True, stdout=subprocess.DEVNULL)
        tokenizer = tmp_path / "tok"
        model = tmp_path / "model"  # an HF-style folder with that tokenizer: --tokenizer PATH
        model.mkdir()
        (model / "tokenizer.json").write_bytes((tokenizer / "bpe.json").read_bytes())
        (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eos|>"}))
        rows = {}
        limit, tokens = batch_encode_tokens_per_s(small, tokenizer)
        rows["tokenizers encode_batch (one call, all in memory)"] = {"tokens_per_s": limit, "tokens": tokens}
        for w in workers:  # interleaved with nothing else: one command at a time
            secs, rss, _ = measure(DSMOE + ["prepare", str(small), "--out", str(tmp_path / f"w{w}"), "--tokenizer",
                                            str(model), "--workers", str(w), "--quiet"])
            manifest = json.loads((tmp_path / f"w{w}" / "manifest.json").read_text())
            n = sum(c[s]["tokens"] for c in manifest["chunks"] for s in ("train", "val"))
            rows[f"dsmoe prepare --workers {w}"] = {"tokens_per_s": n / secs, "tokens": n, "seconds": secs,
                                                    "peak_rss_mb": rss / 2**20}
        return rows


def rss_bench(src: Path, workers: int, sizes_mb: list[int], tokenizer: str) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        for mb in sizes_mb:
            folder = sample(src, mb, Path(tmp) / f"s{mb}")
            out = Path(tmp) / f"p{mb}"
            secs, rss, _ = measure(DSMOE + ["prepare", str(folder), "--out", str(out), "--workers", str(workers),
                                            "--tokenizer", tokenizer, "--quiet"])
            manifest = json.loads((out / "manifest.json").read_text())
            n = sum(c[s]["tokens"] for c in manifest["chunks"] for s in ("train", "val"))
            rows[f"{mb} MB corpus"] = {"seconds": secs, "peak_rss_mb": rss / 2**20, "tokens": n,
                                       "tokens_per_s": n / secs}
            for p in folder.iterdir():
                p.unlink()
    return rows


def train_child(data: str | None, steps: int) -> None:
    """In this process: a tiny-preset run, with the time spent fetching batches (dsmoe.train.next_batch) and in
    training steps (dsmoe.train.train_step, which calls it) summed."""
    from dsmoe import train as train_mod
    from dsmoe.presets import build_configs
    spent = {"next_batch": 0.0, "train_step": 0.0}

    def timed(name):
        real = getattr(train_mod, name)

        def wrapper(*args):
            t0 = time.perf_counter()
            out = real(*args)
            spent[name] += time.perf_counter() - t0
            return out
        setattr(train_mod, name, wrapper)

    timed("next_batch")
    timed("train_step")
    with tempfile.TemporaryDirectory() as out:
        sets = [f"steps={steps}", "eval_every=0", "save_every=0", "eval_batches=1", "log_every=10",
                "tensorboard=false", f"out={out}/run"] + ([f"data={data}"] if data else [])
        t0 = time.perf_counter()
        train_mod.train(*build_configs("tiny", sets), progress=False)
        total = time.perf_counter() - t0
    print(json.dumps({"loader_s": spent["next_batch"], "steps_s": spent["train_step"], "total_s": total}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["corpus", "prepare", "rss", "train", "_train_child"])
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--out", type=Path)
    p.add_argument("--src", type=Path)
    p.add_argument("--sample-mb", type=int, default=64)
    p.add_argument("--sizes-mb", default="256,1024")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--data", help="a prepared folder (train)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--tokenizer", default="byte", help="rss: byte, bpe or a HuggingFace folder")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} cpus; load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    if args.what == "corpus":
        make_corpus(args.size_mb, args.out)
    elif args.what == "prepare":
        print(json.dumps(prepare_bench(args.src, args.sample_mb, [int(w) for w in args.workers.split(",")]), indent=1))
    elif args.what == "rss":
        print(json.dumps(rss_bench(args.src, int(args.workers.split(",")[-1]),
                                   [int(s) for s in args.sizes_mb.split(",")], args.tokenizer), indent=1))
    elif args.what == "_train_child":
        train_child(args.data, args.steps)
    else:  # the stdlib default and the prepared folder, alternated twice
        rows: dict[str, list] = {}
        for _ in range(2):
            for label, data in (("stdlib (12 MB)", None), (f"prepared {args.data}", args.data)):
                cmd = [sys.executable, __file__, "_train_child", "--steps", str(args.steps)]
                secs, rss, out = measure(cmd + (["--data", data] if data else []))
                child = json.loads(out.strip().splitlines()[-1])
                rows.setdefault(label, []).append({"peak_rss_mb": rss / 2**20, "seconds": secs,
                                                   "loader_share_of_steps": child["loader_s"] / child["steps_s"]})
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
