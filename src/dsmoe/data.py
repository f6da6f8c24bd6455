"""Corpora, tokenizers and batching.

The built-in corpus is the running interpreter's own standard library: real, varied text that is on
every machine that runs dsmoe, so training needs no download. Documents are split into train and
validation by a hash of their path (a file never straddles the split), encoded once, and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsmoe.paths import folder_file
from dsmoe.runtime import optional_import

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
SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>")


def default_cache_dir() -> Path:
    """$DSMOE_CACHE, else ~/.cache/dsmoe."""
    return Path(os.environ.get("DSMOE_CACHE") or Path.home() / ".cache" / "dsmoe")


# ---- tokenizers -------------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes 0..255 plus the specials 256.. (vocab 260): lossless, nothing to train."""

    kind = "byte"
    vocab_size = 256 + len(SPECIALS)
    eos_id = 256 + SPECIALS.index("<|eos|>")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def cache_key(self) -> str:
        return "byte"

    def save(self, directory) -> None:
        Path(directory, "tokenizer.json").write_text(json.dumps({"kind": "byte"}))


class BPETokenizer:
    """Byte-level BPE trained locally with the `tokenizers` package (GPT-2-style pre-tokenization)."""

    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = tok.token_to_id("<|eos|>")

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> BPETokenizer:
        optional_import("tokenizers", "the BPE tokenizer (tokenizer='bpe')")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, directory) -> BPETokenizer:
        """The tokenizer saved in directory/bpe.json; a missing or corrupt file is an error that names it."""
        path = Path(directory, "bpe.json")
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: a BPE tokenizer is saved there with the checkpoint "
                                    "(copy the whole checkpoint directory)")
        Tokenizer = optional_import("tokenizers", "the BPE tokenizer (tokenizer='bpe')").Tokenizer
        try:
            tok = cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ValueError(f"{path} is not a valid BPE tokenizer file ({str(e)[:200]})") from None
        if tok.eos_id is None:
            raise ValueError(f"{path} is not a dsmoe BPE tokenizer: it has no <|eos|> token")
        return tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def cache_key(self) -> str:
        return "bpe-" + hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def save(self, directory) -> None:
        self.tok.save(str(Path(directory, "bpe.json")))
        Path(directory, "tokenizer.json").write_text(json.dumps({"kind": "bpe"}))


class HFTokenizer(BPETokenizer):
    """A HuggingFace folder's own tokenizer (tokenizer.json in the `tokenizers` format, eos_token from
    tokenizer_config.json), for models loaded with dsmoe.pretrained; no special tokens are added."""

    kind = "hf"

    def __init__(self, tok, config: dict):
        self.tok, self.config = tok, config
        self.vocab_size = tok.get_vocab_size()
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_id = tok.token_to_id(eos) if isinstance(eos, str) else None  # None: documents joined as they are

    @classmethod
    def load(cls, directory) -> HFTokenizer:
        Tokenizer = optional_import("tokenizers", f"the tokenizer of {directory}").Tokenizer
        path, config = folder_file(directory, "tokenizer.json"), folder_file(directory, "tokenizer_config.json")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ValueError(f"{path} is not a valid HuggingFace tokenizer file ({str(e)[:200]})") from None
        try:
            settings = json.loads(config.read_text()) if config.exists() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{config} is corrupt ({e})") from None
        return cls(tok, settings if isinstance(settings, dict) else {})

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def cache_key(self) -> str:
        return "hf-" + hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def save(self, directory) -> None:
        self.tok.save(str(Path(directory, "tokenizer.json")))
        Path(directory, "tokenizer_config.json").write_text(json.dumps(self.config))


Tokenizer = ByteTokenizer | BPETokenizer | HFTokenizer


def load_tokenizer(directory) -> Tokenizer:
    """The tokenizer saved in a checkpoint directory (byte when none was saved).

    A missing, corrupt or mismatched tokenizer is an error naming the file, never a silent fallback to bytes: a
    bpe.json without tokenizer.json, no tokenizer.json where a dsmoe model's vocabulary (config.json) is not the
    byte tokenizer's, or a tokenizer with more tokens than the model (a model may have more: padded, or
    initialized from a HuggingFace checkpoint).
    """
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if path.exists() and _is_hf_tokenizer(path):
        return HFTokenizer.load(directory)
    if path.exists():
        kind = _tokenizer_kind(path)
    elif (directory / "bpe.json").exists():
        raise FileNotFoundError(f"{path} is missing, but {directory / 'bpe.json'} is there: this checkpoint used "
                                'a BPE tokenizer; restore tokenizer.json (it holds {"kind": "bpe"})')
    else:
        kind = "byte"
    if kind not in ("byte", "bpe"):
        raise ValueError(f"{path}: unknown tokenizer kind {kind!r}; expected 'byte' or 'bpe'")
    tok: Tokenizer = ByteTokenizer() if kind == "byte" else BPETokenizer.load(directory)
    vocab_size = _model_vocab_size(directory / "config.json")
    if vocab_size is not None and not path.exists() and vocab_size != tok.vocab_size:
        raise FileNotFoundError(f"{path} is missing and the model's vocab_size={vocab_size} (config.json) is not "
                                f"the byte tokenizer's {tok.vocab_size}: restore the checkpoint's tokenizer files")
    if vocab_size is not None and vocab_size < tok.vocab_size:
        raise ValueError(f"{directory}: the {kind} tokenizer has {tok.vocab_size} tokens, more than the model's "
                         f"vocab_size={vocab_size} (config.json): the tokenizer belongs to another model")
    return tok


def _is_hf_tokenizer(path: Path) -> bool:
    """A `tokenizers` file (a HuggingFace folder's), not dsmoe's {"kind": ...}."""
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(content, dict) and "model" in content and "kind" not in content


def _tokenizer_kind(path: Path) -> object:
    try:
        return json.loads(path.read_text())["kind"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f'{path} is corrupt (or not a dsmoe one): expected {{"kind": "byte"}} or {{"kind": "bpe"}} '
                         f"({type(e).__name__}: {e})") from None


def _model_vocab_size(path: Path) -> int | None:
    """model.vocab_size of a dsmoe checkpoint's config.json; None where there is none to read (its loader reports
    a corrupt one), and for a HuggingFace folder's, whose model may have any vocabulary the byte tokenizer fits
    (its ids are all < 260; the model's loader checks that it has that many)."""
    try:
        vocab_size = json.loads(path.read_text())["model"]["vocab_size"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return vocab_size if isinstance(vocab_size, int) else None


# ---- documents --------------------------------------------------------------------------------------

def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library .py files, sorted (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "__pycache__")]  # not the stdlib
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def _path_hash(rel: str) -> float:
    """A stable number in [0, 1) per document path: decides order and split, independent of the machine."""
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") / 2**64


def _text_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts))


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is binary or undecodable."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def list_documents(path: str | None, max_bytes: int = MAX_CORPUS_BYTES) -> tuple[Path, list[Path]]:
    """(root, files) of a corpus in hash order, capped at max_bytes; path None = the standard library."""
    if path is None:
        root, files = Path(sysconfig.get_paths()["stdlib"]), stdlib_files()
    else:
        root = Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"corpus path {str(root)!r} does not exist "
                                    "(give a text file or a folder of text files)")
        files = _text_files(root)
        if not files:
            raise ValueError(f"corpus {str(root)!r} holds no files (give a text file or a folder of text files)")
    base = root if root.is_dir() else root.parent
    # a salted hash for the order, so the cap does not pick documents by their split hash
    files.sort(key=lambda p: _path_hash("order:" + str(p.relative_to(base))))
    kept, total = [], 0
    for p in files:
        if total >= max_bytes:
            break
        kept.append(p)
        total += p.stat().st_size
    return base, kept


# ---- corpus -----------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """Token streams of the two splits (documents joined by <|eos|>)."""

    train: torch.Tensor  # (N_train,) integer tokens
    val: torch.Tensor    # (N_val,)
    info: dict           # documents, bytes, tokens per split, cache file

    def check(self, seq_len: int) -> None:
        """Both splits must hold at least one window of seq_len+1 tokens."""
        for split in ("train", "val"):
            n = len(getattr(self, split))
            if n < seq_len + 1:
                raise ValueError(f"corpus too small: the {split} split has {n} tokens, but one batch of "
                                 f"seq_len={seq_len} needs at least {seq_len + 1}; add text or lower seq_len")

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator | None = None):
        """(x_BS, y_BS): random windows of the split, y shifted by one token."""
        data = getattr(self, split)
        starts_B = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)
        return self.windows(split, starts_B, seq_len)

    def windows(self, split: str, starts_B: torch.Tensor, seq_len: int):
        data = getattr(self, split)
        idx_BS = starts_B[:, None] + torch.arange(seq_len + 1)
        tokens = data[idx_BS].long()
        return tokens[:, :-1], tokens[:, 1:]


def _encode(tokenizer, texts: list[str]) -> torch.Tensor:
    sep = np.array([] if tokenizer.eos_id is None else [tokenizer.eos_id], dtype=np.int32)
    parts = []
    for ids in tokenizer.encode_many(texts):
        parts += [ids.astype(np.int32), sep]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    dtype = torch.int16 if tokenizer.vocab_size <= 2**15 else torch.int32
    return torch.from_numpy(tokens).to(dtype)


def read_split(path: str | None, max_bytes: int = MAX_CORPUS_BYTES, val_fraction: float = VAL_FRACTION):
    """{"train": [(name, text)], "val": [...]}: documents split by path hash; with too few documents, one
    text whose last val_fraction (at least 10%) is held out."""
    base, files = list_documents(path, max_bytes)
    limit = MAX_DOC_CHARS if path is None else None  # a user's own files are taken whole
    read = [(str(p.relative_to(base)), _read_text(p)) for p in files]
    docs = [(name, text[:limit]) for name, text in read if text]
    where = path or "the standard library"
    if not docs:
        raise ValueError(f"corpus {where!r} is empty or unreadable: no non-empty UTF-8 text file found")
    split: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    for name, text in docs:
        split["val" if _path_hash(name) < val_fraction else "train"].append((name, text))
    if not split["train"] or not split["val"]:  # too few documents to split by file: cut the text instead
        text = "\n".join(t for _, t in docs)
        cut = int(len(text) * (1 - max(val_fraction, 0.1)))
        split = {"train": [(where, text[:cut])], "val": [(where, text[cut:])]}
    return split


def _corpus_key(path, files_root, files, tokenizer, max_bytes, val_fraction) -> str:
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps([CACHE_VERSION, sys.version, str(path), str(files_root), stats, tokenizer.cache_key(),
                       max_bytes, val_fraction])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def corpus_fingerprint(path: str | None, max_bytes: int = MAX_CORPUS_BYTES, val_fraction: float = VAL_FRACTION) -> str:
    """A hash of what decides a corpus' documents and split, the tokenizer aside: this code's CACHE_VERSION,
    the split settings and every kept file's name (relative to the corpus root) and bytes: touching a file
    keeps it, editing, adding or removing one changes it."""
    base, files = list_documents(path, max_bytes)
    h = hashlib.sha256(json.dumps([CACHE_VERSION, path is None, max_bytes, val_fraction]).encode())
    for p in files:
        h.update(f"\0{p.relative_to(base)}\0".encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:20]


def load_corpus(path: str | None, tokenizer, cache_dir=None, max_bytes: int = MAX_CORPUS_BYTES,
                val_fraction: float = VAL_FRACTION) -> Corpus:
    """Read, split and encode a corpus (path None = the standard library), through a token cache.

    cache_dir None = default_cache_dir(); False = no cache.
    The cache key covers the tokenizer, the Python version and every file's path, size and mtime, so
    an edited file or another tokenizer re-encodes.
    """
    root, files = list_documents(path, max_bytes)
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    cache = None
    if cache_dir:
        cache = Path(cache_dir) / f"corpus-{_corpus_key(path, root, files, tokenizer, max_bytes, val_fraction)}.pt"
        if cache.exists():
            try:
                d = torch.load(cache, weights_only=True)
                return Corpus(d["train"], d["val"], {**json.loads(d["info"]), "cache": str(cache)})
            except Exception:
                pass  # unreadable cache: rebuild it below
    split = read_split(path, max_bytes, val_fraction)
    train, val = (_encode(tokenizer, [t for _, t in split[s]]) for s in ("train", "val"))
    info = {"source": path or "stdlib", "train_docs": len(split["train"]), "val_docs": len(split["val"]),
            "train_tokens": len(train), "val_tokens": len(val)}
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            torch.save({"train": train, "val": val, "info": json.dumps(info)}, tmp)
            os.replace(tmp, cache)
            info["cache"] = str(cache)
        except OSError:  # a read-only or odd cache folder costs the next run an encode, never this run
            pass
    return Corpus(train, val, info)


def build_tokenizer(kind: str, path: str | None, vocab_size: int = 2048, cache_dir=None,
                    max_bytes: int = MAX_CORPUS_BYTES):
    """A byte tokenizer, or a BPE tokenizer trained on the corpus' train split (cached like the corpus)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"tokenizer={kind!r} is not allowed; choose 'byte' or 'bpe'")
    root, files = list_documents(path, max_bytes)
    key = _corpus_key(path, root, files, ByteTokenizer(), max_bytes, vocab_size)
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    cached = Path(cache_dir, f"bpe-{key}") if cache_dir else None
    if cached is not None and (cached / "bpe.json").exists():
        try:
            return BPETokenizer.load(cached)
        except Exception:  # a cache cut short by a crash: train again below
            pass
    # a few MB of text learn a small vocabulary well and keep training to seconds
    texts, budget = [], 4_000_000
    for _, text in read_split(path, max_bytes)["train"]:
        texts.append(text[:budget])
        budget -= len(texts[-1])
        if budget <= 0:
            break
    tok = BPETokenizer.train(texts, vocab_size)
    if cached is not None:
        try:
            cached.mkdir(parents=True, exist_ok=True)
            tok.save(cached)
        except OSError:
            pass
    return tok
