"""Corpora and batching: prepared token folders (dsmoe.prepare) read through memory maps, mixtures of them, and
the windows a training step or an evaluation reads.

The built-in corpus is the running interpreter's own standard library: real, varied text that is on every
machine that runs dsmoe, so training needs no download. It, and any raw path given as data, is prepared on the
fly into the cache (the same code as `dsmoe prepare`): documents split into train and validation by a hash of
their path (a file never straddles the split), tokenized once.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsmoe.paths import folder_file
from dsmoe.prepare import (
    MANIFEST,
    PrepareError,
    is_prepared,
    prepare,
    read_manifest,
    source_files,
    train_bpe,
)
from dsmoe.tokenizer import BPETokenizer, ByteTokenizer

CACHE_VERSION = 3
# Reading and encoding all ~30 MB of the standard library would slow the first run down for no gain
# (a 5-minute CPU run sees ~6M tokens); documents are taken in hash order up to this many bytes.
MAX_CORPUS_BYTES = 12_000_000
# Share of documents held out for validation. Files cluster (a few dozen code-page tables, test suites with
# their own data): with 10% held out, validation MaxVio of one trained model ranged 0.18-0.48 (p10-p90)
# across random draws of the held-out files, with 20% 0.16-0.30, so 20% is held out.
VAL_FRACTION = 0.2
# Each standard-library document is cut to this many characters, so that no single file dominates a split: the stdlib's
# largest file (pydoc_data/topics.py, 750 KB of English help text) was otherwise most of the validation
# split, and validation metrics measured prose instead of code.
MAX_DOC_CHARS = 65_536


def default_cache_dir() -> Path:
    """$DSMOE_CACHE, else ~/.cache/dsmoe."""
    return Path(os.environ.get("DSMOE_CACHE") or Path.home() / ".cache" / "dsmoe")


# ---- corpus -----------------------------------------------------------------------------------------

class Shard:
    """Tokens [offset, offset+length) of a shard file, read by pread: a window costs one system call and maps
    nothing (random windows through np.memmap mapped ~0.5 MB of page cache into the process each, so its resident
    memory grew with the corpus: +360 MB after 640 windows of a 1 GB corpus). Up to 128 files stay open."""

    _open: collections.OrderedDict[Path, int] = collections.OrderedDict()

    def __init__(self, path: Path, dtype: np.dtype, offset: int = 0, length: int | None = None):
        self.path, self.dtype, self.offset = path, dtype, offset
        self.length = path.stat().st_size // dtype.itemsize - offset if length is None else length

    def __len__(self) -> int:
        return self.length

    def part(self, lo: int, hi: int) -> Shard:
        return Shard(self.path, self.dtype, self.offset + lo, hi - lo)

    def read(self, lo: int, n: int) -> np.ndarray:
        fd = Shard._open.pop(self.path, None)
        if fd is None:
            fd = os.open(self.path, os.O_RDONLY)
            if len(Shard._open) >= 128:
                os.close(Shard._open.popitem(last=False)[1])
        Shard._open[self.path] = fd
        size = self.dtype.itemsize
        data = os.pread(fd, n * size, (self.offset + lo) * size)
        if len(data) != n * size:
            raise PrepareError(f"{self.path} is shorter than its manifest says: prepare the corpus again")
        return np.frombuffer(data, dtype=self.dtype)


class TokenSet:
    """A prepared corpus folder (dsmoe.prepare) opened for reading: each file first checked against the
    manifest (size and SHA-256), so a truncated or changed shard is an error, never data; windows read by
    pread (Shard)."""

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        self.keep: object = None  # what must live as long as the set (a temporary folder)
        self.manifest = manifest = read_manifest(folder)
        if not manifest.get("complete"):
            raise PrepareError(f"{folder}: `dsmoe prepare` did not finish ({len(manifest['chunks'])} chunks written); "
                               "run the same command again to finish it")
        self.dtype = np.dtype(manifest["dtype"])
        self.chunks: dict[str, list[tuple[Shard, Shard | None]]] = {}
        self.starts: dict[str, np.ndarray] = {}  # global offset of each chunk, and the split's size last
        for split in ("train", "val"):
            entries = [c[split] for c in manifest["chunks"] if c[split]["tokens"]]
            if verify:
                for entry in entries:
                    self._verify(entry)
            self.chunks[split] = [self._open(e) for e in entries]
        self.max_id = max((c[s]["max_id"] for c in manifest["chunks"] for s in ("train", "val")), default=0)
        self.docs = {s: sum(c[s]["docs"] for c in manifest["chunks"]) for s in ("train", "val")}
        if "held_out" in manifest:
            self._hold_out(manifest["held_out"]["from"], manifest["held_out"]["at"])
        for split in ("train", "val"):
            self.starts[split] = np.cumsum([0] + [len(tokens) for tokens, _ in self.chunks[split]])

    def _hold_out(self, full: str, at: int) -> None:
        """All documents fell into one split: its tokens from `at` on are the other split (views, no copy)."""
        kept: list[tuple[Shard, Shard | None]] = []
        moved: list[tuple[Shard, Shard | None]] = []
        offset = before = 0
        entries = [c[full] for c in self.manifest["chunks"] if c[full]["tokens"]]  # as self.chunks[full]
        for (tokens, mask), entry in zip(self.chunks[full], entries):
            cut = min(max(at - offset, 0), len(tokens))
            starts = np.fromfile(folder_file(self.folder, entry["file"][:-len(".bin")] + ".idx"), dtype=np.int64)
            before += int((starts < cut).sum())
            for part, lo, hi in ((kept, 0, cut), (moved, cut, len(tokens))):
                if hi > lo:
                    part.append((tokens.part(lo, hi), None if mask is None else mask.part(lo, hi)))
            offset += len(tokens)
        other = "val" if full == "train" else "train"
        self.chunks[full], self.chunks[other] = kept, moved
        self.docs = {full: before, other: self.docs[full] - before + 1}  # the document cut in two counts in both

    def _verify(self, entry: dict) -> None:
        stem = entry["file"][:-len(".bin")]
        sizes = {".bin": entry["tokens"] * self.dtype.itemsize, ".idx": entry["docs"] * 8, ".mask": entry["tokens"]}
        for name, digest in entry["sha256"].items():
            path = folder_file(self.folder, name)
            size = path.stat().st_size if path.is_file() else None
            if size != sizes[name[len(stem):]]:
                raise PrepareError(f"{path} is {'missing' if size is None else f'truncated or grown ({size:,} bytes)'}"
                                   f"; the manifest says {sizes[name[len(stem):]]:,} bytes: prepare the corpus again")
            if _sha256(path) != digest:
                raise PrepareError(f"{path} does not match its SHA-256 in {self.folder / 'manifest.json'} (changed "
                                   "or corrupt): prepare the corpus again")

    def _open(self, entry: dict) -> tuple[Shard, Shard | None]:
        path = folder_file(self.folder, entry["file"])
        mask = Shard(path.with_suffix(".mask"), np.dtype(np.uint8)) if entry["mask"] else None
        return Shard(path, self.dtype), mask

    def size(self, split: str) -> int:
        return int(self.starts[split][-1])

    def read(self, split: str, start: int, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens [start, start+n) of the split (int64) and their loss mask (None: all trained on)."""
        chunk = int(np.searchsorted(self.starts[split], start, side="right")) - 1
        tokens, masks, any_mask = [], [], False
        while n > 0:
            ids, mask = self.chunks[split][chunk]
            lo = start - int(self.starts[split][chunk])
            take = min(n, len(ids) - lo)
            tokens.append(ids.read(lo, take).astype(np.int64))
            masks.append(np.ones(take, np.uint8) if mask is None else mask.read(lo, take))
            any_mask |= mask is not None
            start, n, chunk = start + take, n - take, chunk + 1
        return np.concatenate(tokens), np.concatenate(masks) if any_mask else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


@dataclass
class Corpus:
    """One prepared token set, or a mixture of several sampled by weight. Windows are addressed by a global
    position: set i's split occupies [base_i, base_i + size_i) of a virtual concatenation, and no window
    crosses from one set into the next."""

    sets: list[TokenSet]
    weights: list[float]
    info: dict           # source, documents and tokens per split, folders

    def size(self, split: str) -> int:
        return sum(s.size(split) for s in self.sets)

    def _bases(self, split: str) -> np.ndarray:
        return np.cumsum([0] + [s.size(split) for s in self.sets])

    def check(self, seq_len: int, vocab_size: int | None = None) -> None:
        """Every set's splits must hold a window of seq_len+1 tokens; its ids must fit the model's vocabulary."""
        for s in self.sets:
            for split in ("train", "val"):
                n = s.size(split)
                if n < seq_len + 1:
                    raise ValueError(f"corpus too small: the {split} split of {s.folder} has {n} tokens, but one "
                                     f"batch of seq_len={seq_len} needs at least {seq_len + 1}; add text or lower "
                                     "seq_len")
            if vocab_size is not None and s.max_id >= vocab_size:
                raise ValueError(f"{s.folder} holds token id {s.max_id}, beyond the model's vocab_size={vocab_size}: "
                                 "it was prepared with another tokenizer; prepare it with the model's")

    def sample(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """Global start positions of batch_size random windows: a set drawn by weight, then a uniform start."""
        if len(self.sets) == 1:
            return torch.randint(self.sets[0].size(split) - seq_len, (batch_size,), generator=generator)
        which = torch.multinomial(torch.tensor(self.weights), batch_size, replacement=True, generator=generator)
        room = torch.tensor([s.size(split) - seq_len for s in self.sets], dtype=torch.float64)[which]
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return torch.from_numpy(self._bases(split)[:-1]).long()[which] + (u * room).long()

    def spread(self, split: str, n: int, seq_len: int) -> torch.Tensor:
        """n window starts spread evenly over the split (each set's share by weight): evaluation's, with no RNG."""
        counts = _shares(self.weights, n)
        bases = self._bases(split)
        return torch.cat([bases[i] + torch.linspace(0, s.size(split) - seq_len - 1, c).long()
                          for i, (s, c) in enumerate(zip(self.sets, counts))])

    def set_of(self, split: str, starts_B: torch.Tensor) -> torch.Tensor:
        """The set each window comes from."""
        return torch.from_numpy(np.searchsorted(self._bases(split), starts_B.numpy(), side="right") - 1)

    def windows(self, split: str, starts_B: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_BS, y_BS): the windows at these global starts, y shifted by one token and -1 (ignored by the loss)
        where a fine-tuning set's mask says the token is not trained on."""
        bases = self._bases(split)
        rows, masks = [], []
        for start in starts_B.tolist():
            i = int(np.searchsorted(bases, start, side="right")) - 1
            tokens, mask = self.sets[i].read(split, start - int(bases[i]), seq_len + 1)
            rows.append(tokens)
            masks.append(mask)
        tokens_BS = torch.from_numpy(np.stack(rows))
        x, y = tokens_BS[:, :-1], tokens_BS[:, 1:].clone()
        if any(m is not None for m in masks):
            trained = np.stack([np.ones(seq_len + 1, np.uint8) if m is None else m for m in masks])[:, 1:]
            y[torch.from_numpy(trained) == 0] = -1
        return x, y

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator | None = None):
        """(x_BS, y_BS): random windows of the split."""
        return self.windows(split, self.sample(split, batch_size, seq_len, generator), seq_len)


def _shares(weights: list[float], n: int) -> list[int]:
    """n split by weight into integers that sum to n (largest remainders)."""
    raw = [w / sum(weights) * n for w in weights]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[:n - sum(counts)]:
        counts[i] += 1
    return counts


def document_ids(x_BS: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each token's document number in its row: a new document starts after every EOS."""
    ends = (x_BS == eos_id).long()
    return ends.cumsum(1) - ends


def parse_data(data: str | None) -> list[tuple[str | None, float]]:
    """`--data`: None (the standard library), a path, or a mixture `a=0.7,b=0.3` of paths and weights."""
    if data is None or "=" not in data:
        return [(data, 1.0)]
    parts: list[tuple[str | None, float]] = []
    for item in data.split(","):
        path, _, weight = item.rpartition("=")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not path or not value > 0 or value == float("inf"):
            raise ValueError(f"data mixture item {item!r}: expected PATH=WEIGHT with a weight > 0, as in "
                             "--data a=0.7,b=0.3")
        parts.append((path, value))
    return parts


def _corpus_key(path, files, tokenizer, max_bytes, val_fraction) -> str:
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p, _ in files]
    blob = json.dumps([CACHE_VERSION, sys.version, str(path), stats, tokenizer.cache_key(), max_bytes, val_fraction])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def corpus_fingerprint(path: str | None, max_bytes: int = MAX_CORPUS_BYTES, val_fraction: float = VAL_FRACTION) -> str:
    """A hash of what decides a corpus' documents and split, the tokenizer aside: this code's CACHE_VERSION,
    the split settings and every kept file's name (relative to the corpus root) and bytes: touching a file
    keeps it, editing, adding or removing one changes it. A prepared folder's is its manifest's."""
    if is_prepared(path):
        return hashlib.sha256(Path(path, MANIFEST).read_bytes()).hexdigest()[:20]  # type: ignore[arg-type]
    h = hashlib.sha256(json.dumps([CACHE_VERSION, path is None, max_bytes, val_fraction]).encode())
    for p, base in source_files([path], max_bytes if path is None else None):
        h.update(f"\0{p.relative_to(base)}\0".encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:20]


def load_corpus(data: str | None, tokenizer, cache_dir=None, max_bytes: int = MAX_CORPUS_BYTES,
                val_fraction: float = VAL_FRACTION) -> Corpus:
    """The corpus `--data` names (see parse_data): prepared folders are read as they are (their tokenizer must be
    this one); raw paths are prepared on the fly into the cache (max_bytes caps the standard library only).

    cache_dir None = default_cache_dir(); False = a temporary folder, removed with the corpus.
    The cache key covers the tokenizer, the Python version and every file's path, size and mtime, so
    an edited file or another tokenizer prepares again.
    """
    parts = parse_data(data)
    sets = [_token_set(path, tokenizer, cache_dir, max_bytes, val_fraction) for path, _ in parts]
    weights = [w for _, w in parts]
    info: dict = {"source": data or "stdlib", "folders": [str(s.folder) for s in sets], "weights": weights}
    for split in ("train", "val"):
        info[f"{split}_tokens"] = sum(s.size(split) for s in sets)
        info[f"{split}_docs"] = sum(s.docs[split] for s in sets)
    return Corpus(sets, weights, info)


def _token_set(path: str | None, tokenizer, cache_dir, max_bytes: int, val_fraction: float) -> TokenSet:
    if is_prepared(path):
        tokens = TokenSet(path)  # type: ignore[arg-type]
        key = tokens.manifest["tokenizer"]["key"]
        if key != tokenizer.cache_key():
            raise PrepareError(f"{path} was prepared with another tokenizer ({tokens.manifest['tokenizer']['kind']}, "
                               f"{key}) than the model's ({tokenizer.kind}, {tokenizer.cache_key()}): prepare it with "
                               "the model's (dsmoe prepare --tokenizer MODEL_FOLDER)")
        return tokens
    cap = max_bytes if path is None else None
    files = source_files([path], cap)
    limit = MAX_DOC_CHARS if path is None else None
    key = _corpus_key(path, files, tokenizer, cap, val_fraction)
    if cache_dir is False:
        tmp = tempfile.TemporaryDirectory(prefix="dsmoe-corpus-")
        prepare([path], tmp.name, tokenizer, val_fraction=val_fraction, max_bytes=cap, max_doc_chars=limit,
                progress=False)
        tokens = TokenSet(tmp.name)
        tokens.keep = tmp  # the folder goes with the set that reads it
        return tokens
    folder = Path(default_cache_dir() if cache_dir is None else cache_dir) / f"prepared-{key}"
    big = sum(p.stat().st_size for p, _ in files) > 64 << 20
    prepare([path], folder, tokenizer, val_fraction=val_fraction, max_bytes=cap, max_doc_chars=limit,
            progress=big, wait=True)
    return TokenSet(folder)


def build_tokenizer(kind: str, path: str | None, vocab_size: int = 2048, cache_dir=None,
                    max_bytes: int = MAX_CORPUS_BYTES):
    """A byte tokenizer, or a BPE tokenizer trained on the corpus' train split (cached like the corpus)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"tokenizer={kind!r} is not allowed; choose 'byte' or 'bpe'")
    key = _corpus_key(path, source_files([path], max_bytes), ByteTokenizer(), max_bytes, vocab_size)
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    cached = Path(cache_dir, f"bpe-{key}") if cache_dir else None
    if cached is not None and (cached / "bpe.json").exists():
        try:
            return BPETokenizer.load(cached)
        except Exception:  # a cache cut short by a crash: train again below
            pass
    cap, limit = (max_bytes, MAX_DOC_CHARS) if path is None else (None, None)
    tok = train_bpe([path], vocab_size, max_bytes=cap, max_doc_chars=limit)
    if cached is not None:
        try:
            cached.mkdir(parents=True, exist_ok=True)
            tok.save(cached)
        except OSError:
            pass
    return tok
