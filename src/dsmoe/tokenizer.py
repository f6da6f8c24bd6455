"""Tokenizers: bytes, a BPE trained locally, or a HuggingFace folder's own. Free of torch, so that
`dsmoe prepare`'s worker processes stay small."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from dsmoe.paths import folder_file
from dsmoe.runtime import optional_import

SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>")


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
    if not path.exists() and (directory / "tiktoken.model").exists():  # Moonlight, Kimi-K2
        raise ValueError(f"{directory} ships a tiktoken tokenizer (tiktoken.model), which dsmoe does not read yet: "
                         "convert it to a tokenizer.json (transformers' AutoTokenizer can save one)")
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
