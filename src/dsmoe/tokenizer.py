"""Tokenizers: bytes, a BPE trained locally, or a HuggingFace folder's own (its tokenizer.json, or the tiktoken.model
of Moonlight and Kimi-K2). Free of torch, so that `dsmoe prepare`'s worker processes stay small."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator
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
        return cls(tok, _read_settings(config) if config.exists() else {})

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def cache_key(self) -> str:
        return "hf-" + hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def save(self, directory) -> None:
        self.tok.save(str(Path(directory, "tokenizer.json")))
        Path(directory, "tokenizer_config.json").write_text(json.dumps(self.config))


# ---- tiktoken (Moonlight, Kimi-K2) -----------------------------------------------------------------

# A tiktoken.model holds only the byte-pair ranks; the split before merging is in the folders' Python tokenizer
# (tokenization_moonshot.py, tokenization_kimi.py: the same pattern in both), transcribed here exactly: runs of
# Han characters; a word (Han excluded) with at most one leading non-letter and an English contraction, lowercase-
# led or uppercase-led; up to 3 digits; punctuation with the newlines after it; newlines; spaces.
MOONSHOT_PATTERN = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",  # noqa: E501
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",  # noqa: E501
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
# Special ids follow the ranks: 256 of them, as Kimi-K2's tokenizer has (163584 + 256 = its vocab_size 163840).
# Moonlight's Python tokenizer numbers 2 more, past its model's vocab_size (the same 163840): ids the model has
# no embedding for, left out here.
RESERVED_SPECIALS = 256
# The folders' tokenizer gives tiktoken at most this many characters at a time, and cuts a longer run of
# whitespace or of other characters every so many (tiktoken's regex is slow, and its stack deep, on such runs):
# where it cuts changes the tokens, so dsmoe cuts at the same places.
MAX_ENCODE_CHARS, MAX_RUN_CHARS = 400_000, 25_000


class TiktokenTokenizer:
    """A Moonlight or Kimi-K2 folder's tokenizer: tiktoken.model (a `base64(token) rank` line per token) split by
    MOONSHOT_PATTERN, then RESERVED_SPECIALS special ids named by tokenizer_config.json's added_tokens_decoder (the
    others `<|reserved_token_ID|>`), its eos_token. As the folders' own tokenizer does, a special token written in
    the text is that token (a chat template's markers), and no BOS is added."""

    kind = "tiktoken"

    def __init__(self, model: bytes, config: dict, where: Path = Path("tiktoken.model"),
                 config_where: Path = Path("tokenizer_config.json")):
        tiktoken = _import_tiktoken(where)
        ranks = _read_ranks(model, where)
        self.model, self.config, self.num_ranks = model, config, len(ranks)
        self.specials = _special_tokens(len(ranks), config, config_where)
        self.enc = tiktoken.Encoding(name=where.name, pat_str=MOONSHOT_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.specials)
        self.vocab_size = self.enc.n_vocab
        self.eos_id = self._special_id("eos_token", config_where)
        self.bos_id = self._special_id("bos_token", config_where)
        blob = json.dumps([MOONSHOT_PATTERN, sorted(self.specials.items(), key=lambda kv: kv[1]), self.eos_id])
        self._key = "tiktoken-" + hashlib.sha256(model + blob.encode()).hexdigest()[:16]

    @classmethod
    def load(cls, directory) -> TiktokenTokenizer:
        """directory/tiktoken.model with directory/tokenizer_config.json; a missing or corrupt one is an error
        naming it."""
        path, config = folder_file(directory, "tiktoken.model"), folder_file(directory, "tokenizer_config.json")
        if not config.is_file():
            raise FileNotFoundError(f"{config} is missing: beside {path.name} it names the tiktoken tokenizer's "
                                    "special tokens (added_tokens_decoder) and its eos_token")
        return cls(path.read_bytes(), _read_settings(config), path, config)

    def _special_id(self, field: str, where: Path) -> int | None:
        """The id of the special token config[field] names (None when it names none); one that is not a special
        token is an error."""
        name = self.config.get(field)
        name = name.get("content") if isinstance(name, dict) else name
        if name is None:
            return None
        if name not in self.specials:
            raise ValueError(f"{where}: {field} {name!r} is not one of the special tokens (ids {self.num_ranks}.."
                             f"{self.vocab_size - 1}, named in added_tokens_decoder)")
        return self.specials[name]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _pieces(text):
            ids += self.enc.encode(piece, allowed_special="all")
        return ids

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(self.encode(t), dtype=np.int32) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of ids; special tokens left out (as a HuggingFace folder's are) unless skip_special_tokens is
        False, and ids past the vocabulary (a padded model's) always."""
        end = self.num_ranks if skip_special_tokens else self.vocab_size
        return self.enc.decode([int(i) for i in ids if 0 <= i < end])

    def cache_key(self) -> str:
        return self._key

    def save(self, directory) -> None:
        directory = Path(directory)
        (directory / "tiktoken.model").write_bytes(self.model)
        (directory / "tokenizer_config.json").write_text(json.dumps(self.config))
        (directory / "tokenizer.json").unlink(missing_ok=True)  # load_tokenizer would take it over tiktoken.model


def _import_tiktoken(where: Path):
    try:
        import tiktoken
    except ImportError:
        raise ImportError(f"{where} is a tiktoken tokenizer (Moonlight, Kimi-K2), read with the tiktoken package: "
                          "pip install tiktoken (dsmoe's `cli` extra installs it)") from None
    return tiktoken


def _read_ranks(model: bytes, where: Path) -> dict[bytes, int]:
    """{token bytes: rank} of a tiktoken.model; ranks 0..N-1 each once, every single byte a token (tiktoken
    cannot encode text with a byte it lacks)."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(model.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            key, value = base64.b64decode(token, validate=True), int(rank)
        except ValueError as e:  # binascii.Error is one
            raise ValueError(f"{where}, line {number}: {line[:60]!r} is not `base64(token) rank` ({e})") from None
        if key in ranks:
            raise ValueError(f"{where}, line {number}: the token {key!r} is listed twice")
        ranks[key] = value
    if not ranks:
        raise ValueError(f"{where} holds no tokens: a tiktoken.model has a `base64(token) rank` line per token")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{where}: the ranks are not 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{where} has no token for the single byte(s) {missing[:8]}: not a byte-level tiktoken.model")
    return ranks


def _special_tokens(num_ranks: int, config: dict, where: Path) -> dict[str, int]:
    """{name: id} of the ids num_ranks .. num_ranks + RESERVED_SPECIALS - 1: added_tokens_decoder's name for the id,
    else `<|reserved_token_ID|>`. An added token outside those ids (on a BPE rank, or past them), or a name given
    to two ids, is an error: tiktoken would encode it as another token than the folder says."""
    added = config.get("added_tokens_decoder") or {}
    if not isinstance(added, dict):
        raise ValueError(f"{where}: added_tokens_decoder is a {type(added).__name__}, not {{id: {{\"content\": ...}}}}")
    names: dict[int, str] = {}
    for key, entry in added.items():
        name = entry.get("content") if isinstance(entry, dict) else entry
        try:
            token_id = int(key)
        except ValueError:
            token_id = -1
        if not isinstance(name, str) or not name or token_id < 0:
            raise ValueError(f"{where}: added_tokens_decoder entry {key!r} is not a token id with a non-empty "
                             '"content"')
        if not num_ranks <= token_id < num_ranks + RESERVED_SPECIALS:
            where_it_is = "a BPE rank of tiktoken.model" if token_id < num_ranks else "past the special ids"
            raise ValueError(f"{where}: the added token {name!r} has id {token_id}, {where_it_is} (tiktoken.model has "
                             f"{num_ranks} ranks; special ids are {num_ranks}..{num_ranks + RESERVED_SPECIALS - 1})")
        names[token_id] = name
    specials: dict[str, int] = {}
    for token_id in range(num_ranks, num_ranks + RESERVED_SPECIALS):
        name = names.get(token_id, f"<|reserved_token_{token_id}|>")
        if name in specials:
            raise ValueError(f"{where}: the special token {name!r} has two ids, {specials[name]} and {token_id}")
        specials[name] = token_id
    return specials


def _pieces(text: str, chunk: int = MAX_ENCODE_CHARS, run: int = MAX_RUN_CHARS) -> Iterator[str]:
    """text cut where the folders' tokenizer cuts it before tiktoken: into `chunk`-character parts, and each part
    inside a run of more than `run` whitespace (str.isspace) or other characters, every `run` characters of it."""
    long_run = re.compile(rf"\s{{{run + 1},}}|\S{{{run + 1},}}")  # Python's \s is str.isspace
    for start in range(0, len(text), chunk):
        part, cut = text[start:start + chunk], 0
        for found in long_run.finditer(part):
            for at in range(found.start() + run, found.end(), run):
                yield part[cut:at]
                cut = at
        yield part[cut:]


def _read_settings(path: Path) -> dict:
    """A tokenizer_config.json; a corrupt one is an error naming it."""
    try:
        settings = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is corrupt ({e})") from None
    return settings if isinstance(settings, dict) else {}


Tokenizer = ByteTokenizer | BPETokenizer | HFTokenizer | TiktokenTokenizer


def load_tokenizer(directory) -> Tokenizer:
    """The tokenizer saved in a checkpoint directory, or a HuggingFace folder's (tokenizer.json, else
    tiktoken.model); byte when there is none.

    A missing, corrupt or mismatched tokenizer is an error naming the file, never a silent fallback to bytes: a
    bpe.json without tokenizer.json, no tokenizer.json where a dsmoe model's vocabulary (config.json) is not the
    byte tokenizer's, or a tokenizer with more tokens than the model (a model may have more: padded, or
    initialized from a HuggingFace checkpoint).
    """
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.exists() and (directory / "tiktoken.model").exists():  # Moonlight, Kimi-K2
        return _fits_model(directory, TiktokenTokenizer.load(directory))
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
    return _fits_model(directory, tok)


def _fits_model(directory: Path, tok: Tokenizer) -> Tokenizer:
    """tok, unless it has more tokens than the dsmoe model of the directory's config.json."""
    vocab_size = _model_vocab_size(directory / "config.json")
    if vocab_size is not None and vocab_size < tok.vocab_size:
        raise ValueError(f"{directory}: the {tok.kind} tokenizer has {tok.vocab_size} tokens, more than the model's "
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
