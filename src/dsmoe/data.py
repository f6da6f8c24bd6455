"""Corpora and batching: prepared token folders (dsmoe.prepare) read through memory maps, mixtures of them, and
the windows a training step or an evaluation reads.

The built-in corpus is the running interpreter's own standard library: real, varied text that is on every
machine that runs dsmoe, so training needs no download. It, and any raw path given as data, is prepared on the
fly into the cache (the same code as `dsmoe prepare`): documents split into train and validation by a hash of
their path (a file never straddles the split), tokenized once.
"""

from __future__ import annotations

import collections
import dataclasses
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
from dsmoe.runtime import RunLock
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

class _Files:
    """The open files of one TokenSet, read by pread: a window costs a system call and maps nothing (random
    windows through np.memmap mapped ~0.5 MB of page cache into the process each, so its resident memory grew
    with the corpus: +366 MB after 640 windows of a 1 GB corpus). At most 128 files stay open."""

    def __init__(self) -> None:
        self.fds: collections.OrderedDict[Path, int] = collections.OrderedDict()

    def read(self, path: Path, dtype: np.dtype, start: int, n: int) -> np.ndarray:
        """Items [start, start+n) of a file of dtype."""
        fd = self.fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if len(self.fds) >= 128:
                os.close(self.fds.popitem(last=False)[1])
        self.fds[path] = fd
        data = os.pread(fd, n * dtype.itemsize, start * dtype.itemsize)
        if len(data) != n * dtype.itemsize:
            raise PrepareError(f"{path} is shorter than its manifest says: prepare the corpus again")
        return np.frombuffer(data, dtype=dtype)

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])

    def __del__(self) -> None:
        self.close()


@dataclass
class _Chunk:
    """A chunk's share of a split: items [offset, offset+length) of its token file (and mask), whose documents
    start at the positions its .idx file lists (`docs` of them)."""

    tokens: Path
    mask: Path | None
    idx: Path
    docs: int
    offset: int
    length: int

    def part(self, lo: int, hi: int) -> _Chunk:
        return dataclasses.replace(self, offset=self.offset + lo, length=hi - lo)


INT64 = np.dtype(np.int64)


class TokenSet:
    """A prepared corpus folder (dsmoe.prepare) opened for reading: each file first checked against the
    manifest (size and SHA-256), so a truncated or changed shard is an error, never data. `name` (default the
    folder) is what messages call it: the path the user gave, for a raw one prepared into the cache."""

    def __init__(self, folder: str | Path, verify: bool = True, name: str | None = None):
        self.folder, self.name = Path(folder), name or str(folder)
        self.keep: object = None  # what must live as long as the set (a temporary folder)
        self.files = _Files()
        self.manifest = manifest = read_manifest(folder)
        if not manifest.get("complete"):
            try:
                RunLock(self.folder, what="dsmoe prepare").release()
            except ValueError as e:
                raise PrepareError(f"{e}: it is not finished yet") from None
            except OSError:  # a read-only folder: nobody is writing it
                pass
            raise PrepareError(f"{folder}: `dsmoe prepare` did not finish ({len(manifest['chunks'])} chunks written); "
                               "run the same command again to finish it")
        self.dtype = np.dtype(manifest["dtype"])
        self.chunks: dict[str, list[_Chunk]] = {}
        verified = _read_json(self.folder / VERIFIED) if verify else {}
        for split in ("train", "val"):
            entries = [c[split] for c in manifest["chunks"] if c[split]["tokens"]]
            if verify:
                for entry in entries:
                    self._verify(entry, verified)
            self.chunks[split] = [self._open(e) for e in entries]
        if verify:
            _write_json(self.folder / VERIFIED, verified)
        self.max_id = max((c[s]["max_id"] for c in manifest["chunks"] for s in ("train", "val")), default=0)
        self.docs = {s: sum(c[s]["docs"] for c in manifest["chunks"]) for s in ("train", "val")}
        if "held_out" in manifest:
            self._hold_out(manifest["held_out"]["from"], manifest["held_out"]["at"])
        self.starts = {split: np.cumsum([0] + [c.length for c in self.chunks[split]]) for split in ("train", "val")}

    def _open(self, entry: dict) -> _Chunk:
        path = folder_file(self.folder, entry["file"])
        return _Chunk(path, path.with_suffix(".mask") if entry["mask"] else None, path.with_suffix(".idx"),
                      entry["docs"], 0, entry["tokens"])

    def _hold_out(self, full: str, at: int) -> None:
        """All documents fell into one split: its first `at` tokens train, the rest are held out."""
        offsets = np.cumsum([0] + [c.length for c in self.chunks[full]])
        head = [c.part(0, max(0, min(at - int(o), c.length))) for c, o in zip(self.chunks[full], offsets)]
        tail = [c.part(h.length, c.length) for c, h in zip(self.chunks[full], head)]
        self.chunks = {"train": [c for c in head if c.length], "val": [c for c in tail if c.length]}
        before = sum(len(self._doc_starts(c, 0, c.length)) for c in self.chunks["train"])
        self.docs = {"train": before, "val": self.docs[full] - before}

    def _verify(self, entry: dict, verified: dict) -> None:
        """Sizes always; each file's SHA-256 unless `verified` holds it for this size, time and inode (a file
        checked once is not hashed again on every start and every rank: 2 s per GB)."""
        stem = entry["file"][:-len(".bin")]
        sizes = {".bin": entry["tokens"] * self.dtype.itemsize, ".idx": entry["docs"] * 8, ".mask": entry["tokens"]}
        for name, digest in entry["sha256"].items():
            path = folder_file(self.folder, name)
            stat = path.stat() if path.is_file() else None
            if stat is None or stat.st_size != sizes[name[len(stem):]]:
                found = "missing" if stat is None else f"truncated or grown ({stat.st_size:,} bytes)"
                raise PrepareError(f"{path} is {found}; the manifest says {sizes[name[len(stem):]]:,} bytes: prepare "
                                   "the corpus again")
            stamp = [digest, stat.st_size, stat.st_mtime_ns, stat.st_ino]
            if verified.get(name) == stamp:
                continue
            if _sha256(path) != digest:
                raise PrepareError(f"{path} does not match its SHA-256 in {self.folder / 'manifest.json'} (changed "
                                   "or corrupt): prepare the corpus again")
            verified[name] = stamp

    def size(self, split: str) -> int:
        return int(self.starts[split][-1])

    def _doc_starts(self, chunk: _Chunk, lo: int, hi: int) -> np.ndarray:
        """Positions in [lo, hi) of the chunk where a document starts (a binary search of its .idx by pread)."""
        def first_at_or_after(position: int) -> int:
            a, b = 0, chunk.docs
            while a < b:
                mid = (a + b) // 2
                if self.files.read(chunk.idx, INT64, mid, 1)[0] < position:
                    a = mid + 1
                else:
                    b = mid
            return a
        i, j = first_at_or_after(chunk.offset + lo), first_at_or_after(chunk.offset + hi)
        return self.files.read(chunk.idx, INT64, i, j - i) - chunk.offset

    def read(self, split: str, start: int, n: int, docs: bool = False
             ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Tokens [start, start+n) of the split (int64), their loss mask (None: all trained on) and, with docs,
        the positions in the window where a document starts (as the .idx files say)."""
        k = int(np.searchsorted(self.starts[split], start, side="right")) - 1
        tokens, masks, begins, done = [], [], [], 0
        while done < n:
            chunk = self.chunks[split][k]
            lo = start + done - int(self.starts[split][k])
            take = min(n - done, chunk.length - lo)
            tokens.append(self.files.read(chunk.tokens, self.dtype, chunk.offset + lo, take).astype(np.int64))
            masks.append(None if chunk.mask is None else
                         self.files.read(chunk.mask, np.dtype(np.uint8), chunk.offset + lo, take))
            if docs:
                begins.append(self._doc_starts(chunk, lo, lo + take) - lo + done)
            done, k = done + take, k + 1
        mask = None if all(m is None for m in masks) else np.concatenate(
            [np.ones(len(t), np.uint8) if m is None else m for t, m in zip(tokens, masks)])
        return np.concatenate(tokens), mask, np.concatenate(begins) if docs else None


VERIFIED = ".verified.json"  # in a prepared folder: the files whose SHA-256 matched, by size, time and inode


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return content if isinstance(content, dict) else {}


def _write_json(path: Path, content: dict) -> None:
    """Best effort (a read-only folder is checked again next time), atomic."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(content))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


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

    @property
    def has_masks(self) -> bool:
        """Whether some training tokens are not trained on (fine-tuning data)."""
        return any(c.mask is not None for s in self.sets for c in s.chunks["train"])

    def _bases(self, split: str) -> np.ndarray:
        return np.cumsum([0] + [s.size(split) for s in self.sets])

    def check(self, seq_len: int, vocab_size: int | None = None) -> None:
        """Every set's splits must hold a window of seq_len+1 tokens; its ids must fit the model's vocabulary."""
        for s in self.sets:
            for split in ("train", "val"):
                n = s.size(split)
                if n < seq_len + 1:
                    raise ValueError(f"corpus too small: the {split} split of {s.name} has {n} tokens, but one "
                                     f"batch of seq_len={seq_len} needs at least {seq_len + 1}; add text or lower "
                                     "seq_len")
            if vocab_size is not None and s.max_id >= vocab_size:
                raise ValueError(f"{s.name} holds token id {s.max_id}, beyond the model's vocab_size={vocab_size}: "
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
        x, y, _ = self._rows(split, starts_B, seq_len, docs=False)
        return x, y

    def windows_with_docs(self, split: str, starts_B: torch.Tensor, seq_len: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_BS, y_BS, docs_BS): the windows and each token's document number in its row (from the .idx files,
        so a chat template's EOS inside a conversation does not cut it): MoETransformer's docs_BS."""
        x, y, docs = self._rows(split, starts_B, seq_len, docs=True)
        assert docs is not None
        return x, y, docs

    def _rows(self, split: str, starts_B: torch.Tensor, seq_len: int, docs: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        bases = self._bases(split)
        rows, masks, begins = [], [], np.zeros((len(starts_B), seq_len), dtype=np.int64)
        for row, start in enumerate(starts_B.tolist()):
            i = int(np.searchsorted(bases, start, side="right")) - 1
            tokens, mask, doc_starts = self.sets[i].read(split, start - int(bases[i]), seq_len + 1, docs)
            rows.append(tokens)
            masks.append(mask)
            if doc_starts is not None:
                inside = doc_starts[(doc_starts > 0) & (doc_starts < seq_len)]
                begins[row, inside] = 1
        tokens_BS = torch.from_numpy(np.stack(rows))
        x, y = tokens_BS[:, :-1], tokens_BS[:, 1:].clone()
        if any(m is not None for m in masks):
            trained = np.stack([np.ones(seq_len + 1, np.uint8) if m is None else m for m in masks])[:, 1:]
            y[torch.from_numpy(trained) == 0] = -1
        return x, y, torch.from_numpy(begins.cumsum(1)) if docs else None

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


def parse_data(data: str | None) -> list[tuple[str | None, float]]:
    """`--data`: None (the standard library), a path, or a mixture `a=0.7,b=0.3` of paths and weights."""
    if data is None or "=" not in data or Path(data).exists():
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
    """A prepared folder, checked against the tokenizer; or a raw path (None: the standard library) prepared
    with the defaults into the cache (a temporary folder where cache_dir is False)."""
    if is_prepared(path):
        tokens = TokenSet(path)  # type: ignore[arg-type]
        key = tokens.manifest["tokenizer"]["key"]
        if key != tokenizer.cache_key():
            raise PrepareError(f"{path} was prepared with another tokenizer ({tokens.manifest['tokenizer']['kind']}, "
                               f"{key}) than the model's ({tokenizer.kind}, {tokenizer.cache_key()}): prepare it with "
                               "the model's (dsmoe prepare --tokenizer "
                               f"{'byte' if tokenizer.kind == 'byte' else 'MODEL_OR_RUN_FOLDER'})")
        return tokens
    cap = max_bytes if path is None else None
    files = source_files([path], cap)
    tmp = tempfile.TemporaryDirectory(prefix="dsmoe-corpus-") if cache_dir is False else None
    if tmp is not None:
        folder, wait, progress = Path(tmp.name), False, False
    else:
        key = _corpus_key(path, files, tokenizer, cap, val_fraction)
        folder = Path(default_cache_dir() if cache_dir is None else cache_dir) / f"prepared-{key}"
        wait, progress = True, sum(p.stat().st_size for p, _ in files) > 64 << 20
    try:
        prepare([path], folder, tokenizer, val_fraction=val_fraction, max_bytes=cap,
                max_doc_chars=MAX_DOC_CHARS if path is None else None, progress=progress, wait=wait)
    except PrepareError as e:  # its advice names prepare's options, which train/eval take through a folder
        raise PrepareError(f"{e} (a raw source is read with the defaults; `dsmoe prepare` takes --field and "
                           "--skip-bad: prepare it there and give the prepared folder as --data)") from None
    tokens = TokenSet(folder, name=path or "the standard library")
    tokens.keep = tmp  # a temporary folder goes with the set that reads it
    return tokens


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
