"""Corpus and tokenizers: stdlib listing, deterministic split by file, token cache, batching, clear errors."""

import numpy as np
import pytest
import torch

from dsmoe.data import load_corpus
from dsmoe.prepare import stdlib_files
from dsmoe.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}: " + "the quick brown fox jumps. " * 20)
    return root


def test_stdlib_files_sorted_python_only():
    files = stdlib_files()
    assert len(files) > 100
    assert files == sorted(files)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)


@pytest.mark.parametrize("path_kind", ["folder", "stdlib"], ids=["folder", "stdlib"])
def test_split_is_deterministic_and_by_file(folder, path_kind):
    path = str(folder) if path_kind == "folder" else None
    kw = {} if path_kind == "folder" else {"max_bytes": 2_000_000, "val_fraction": 0.2}
    tok = ByteTokenizer()
    a, b = (load_corpus(path, tok, cache_dir=False, **kw).sets[0] for _ in range(2))
    split_docs = {}
    for split in ("train", "val"):
        ids = a.read(split, 0, a.size(split))[0]
        assert np.array_equal(ids, b.read(split, 0, b.size(split))[0])
        split_docs[split] = _docs(ids, tok.eos_id)
    assert split_docs["train"] and split_docs["val"] and not split_docs["train"] & split_docs["val"]
    if path_kind == "folder":  # every file whole in one split
        assert split_docs["train"] | split_docs["val"] == {tuple(p.read_bytes()) for p in folder.iterdir()}


def _docs(ids, eos):
    """The documents of a token stream, each ending with EOS, as tuples of ids (EOS dropped)."""
    return {tuple(d[:-1].tolist()) for d in np.split(ids, np.flatnonzero(ids == eos) + 1)[:-1]}


def test_cache_round_trip(folder, tmp_path):
    tok = ByteTokenizer()
    first = load_corpus(str(folder), tok, cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("prepared-*")
    stamp = (cached / "manifest.json").stat().st_mtime_ns
    second = load_corpus(str(folder), tok, cache_dir=tmp_path / "cache")
    assert (cached / "manifest.json").stat().st_mtime_ns == stamp  # read, not prepared again
    assert second.info["folders"] == [str(cached)]
    for split in ("train", "val"):
        x, y = (c.sets[0].read(split, 0, c.size(split))[0] for c in (first, second))
        assert np.array_equal(x, y) and x.max() < tok.vocab_size
    assert first.sets[0].dtype == np.uint16


def test_batch_shapes_shift_and_determinism(folder):
    corpus = load_corpus(str(folder), ByteTokenizer(), cache_dir=False)
    x1, y1 = corpus.batch("train", 3, 8, torch.Generator().manual_seed(1))
    x2, y2 = corpus.batch("train", 3, 8, torch.Generator().manual_seed(1))
    assert x1.shape == y1.shape == (3, 8) and x1.dtype == torch.long
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])


@pytest.mark.parametrize("text", ["", "\0\1\2binary"], ids=["empty", "binary"])
def test_empty_or_unreadable_corpus_is_a_clear_error(tmp_path, text):
    (tmp_path / "a.txt").write_bytes(text.encode())
    with pytest.raises(ValueError, match="hold no text to train on"):
        load_corpus(str(tmp_path), ByteTokenizer(), cache_dir=False)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(str(tmp_path / "nope"), ByteTokenizer(), cache_dir=False)


def test_corpus_smaller_than_a_batch(tmp_path):
    (tmp_path / "a.txt").write_text("tiny text, far too short")
    corpus = load_corpus(str(tmp_path / "a.txt"), ByteTokenizer(), cache_dir=False)
    with pytest.raises(ValueError, match="corpus too small"):
        corpus.check(seq_len=64)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo' ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 260


def test_bpe_train_save_load(folder, tmp_path):
    texts = [p.read_text() for p in sorted(folder.iterdir())]
    tok = BPETokenizer.train(texts, vocab_size=300)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    text = "the quick brown fox"
    assert again.encode(text) == tok.encode(text) and again.decode(again.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode())
