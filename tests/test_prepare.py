"""dsmoe prepare: sources to memory-mapped token shards, resuming, mixtures, fine-tuning masks, bad input."""

import errno
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsmoe import cli, prepare
from dsmoe.data import Corpus, TokenSet, load_corpus, parse_data
from dsmoe.prepare import PrepareError
from dsmoe.runtime import RunLock
from dsmoe.tokenizer import ByteTokenizer, HFTokenizer

BYTE = ByteTokenizer()
EOS = BYTE.eos_id


def texts(root: Path, n: int = 40, words: int = 20) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}: " + "the quick brown fox jumps. " * words)
    return root


def jsonl(path: Path, records: list, gz: bool = False) -> Path:
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return path


def decoded(folder: Path, split: str) -> list[str]:
    """A prepared split's documents as text (split at EOS)."""
    ts = TokenSet(folder)
    ids = ts.read(split, 0, ts.size(split))[0]
    docs: list[str] = []
    cur: list[int] = []
    for t in ids.tolist():
        if t == EOS:
            docs.append(BYTE.decode(cur))
            cur = []
        else:
            cur.append(t)
    return docs


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".bin", ".idx", ".mask")}


# ---- sources ----------------------------------------------------------------------------------------

def test_a_folder_prepares_every_document_whole_into_one_split(tmp_path):
    src = texts(tmp_path / "src")
    result = prepare.prepare([str(src)], tmp_path / "out", BYTE, progress=False)
    assert not result.already and result.manifest["complete"] and result.manifest["dtype"] == "uint16"
    train, val = decoded(tmp_path / "out", "train"), decoded(tmp_path / "out", "val")
    originals = sorted(p.read_text() for p in src.iterdir())
    assert sorted(train + val) == originals and train and val  # each document whole, in exactly one split
    prepare.prepare([str(src)], tmp_path / "out2", BYTE, progress=False)
    assert files_of(tmp_path / "out") == files_of(tmp_path / "out2")  # deterministic
    starts = np.fromfile(tmp_path / "out" / "train-00000.idx", dtype=np.int64)
    assert len(starts) == len(train) and starts[0] == 0
    assert result.manifest["chunks"][0]["train"]["docs"] == len(train)


def test_jsonl_gzip_and_parquet_sources_read_their_field(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    docs = [f"record {i} " * 5 for i in range(30)]
    jsonl(tmp_path / "a.jsonl", [{"body": d} for d in docs[:10]])
    jsonl(tmp_path / "b.jsonl.gz", [{"body": d} for d in docs[10:20]], gz=True)
    pq.write_table(pa.table({"body": docs[20:], "n": list(range(10))}), tmp_path / "c.parquet")
    sources = [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.parquet")]
    prepare.prepare(sources, tmp_path / "out", BYTE, field="body", progress=False)
    got = decoded(tmp_path / "out", "train") + decoded(tmp_path / "out", "val")
    assert sorted(got) == sorted(docs)


def test_two_workers_write_the_same_shards_as_one(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_CHARS", 2000)  # many work items
    src = texts(tmp_path / "src", n=60)
    prepare.prepare([str(src)], tmp_path / "one", BYTE, workers=1, progress=False)
    prepare.prepare([str(src)], tmp_path / "two", BYTE, workers=2, progress=False)
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")


def test_a_long_text_file_is_read_in_pieces_as_one_document(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "PIECE_BYTES", 1000)
    text = "".join(f"line {i} of a long file\n" for i in range(500))
    (tmp_path / "big.txt").write_text(text)
    prepare.prepare([str(tmp_path / "big.txt")], tmp_path / "out", BYTE, progress=False)
    ts = TokenSet(tmp_path / "out")
    # one document: too few to split by document, so the tail of its tokens is held out
    assert ts.docs == {"train": 1, "val": 0}
    whole = np.concatenate([ts.read(s, 0, ts.size(s))[0] for s in ("train", "val")])
    assert BYTE.decode(whole.tolist()) == text and whole[-1] == EOS
    assert ts.size("val") == max(1, int(len(whole) * 0.2))


@pytest.mark.parametrize("name", ["f0.txt", "f4.txt"], ids=["hashes-to-train", "hashes-to-val"])
def test_a_single_document_trains_on_its_head_and_holds_out_its_tail(tmp_path, name):
    text = "".join(f"line {i}\n" for i in range(300))
    (tmp_path / name).write_text(text)
    prepare.prepare([str(tmp_path / name)], tmp_path / "out", BYTE, progress=False)
    ts = TokenSet(tmp_path / "out")
    head, tail = (BYTE.decode(ts.read(s, 0, ts.size(s))[0].tolist()) for s in ("train", "val"))
    assert head + tail == text and len(tail) < len(head) and tail.endswith("line 299\n")
    assert ts.docs == {"train": 1, "val": 0}  # the document starts in the head


# ---- resuming ---------------------------------------------------------------------------------------

def interrupted_after_two_chunks(monkeypatch, sources, out, kw):
    """prepare() stopped by a Ctrl-C right after its second chunk was committed."""
    real, commits = prepare._commit, []

    def commit_then_die(*args):
        real(*args)
        commits.append(1)
        if len(commits) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(sources, out, BYTE, **kw)
    monkeypatch.setattr(prepare, "_commit", real)


def test_an_interrupted_prepare_resumes_to_the_same_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_CHARS", 1000)
    src = texts(tmp_path / "src", n=60)
    kw = {"shard_tokens": 3000, "progress": False}
    prepare.prepare([str(src)], tmp_path / "full", BYTE, **kw)
    interrupted_after_two_chunks(monkeypatch, [str(src)], tmp_path / "cut", kw)
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["chunks"]) == 2
    with pytest.raises(PrepareError, match="did not finish"):
        TokenSet(tmp_path / "cut")
    assert not prepare.prepare([str(src)], tmp_path / "cut", BYTE, **kw).already
    assert files_of(tmp_path / "cut") == files_of(tmp_path / "full") and len(files_of(tmp_path / "full")) > 8
    again = prepare.prepare([str(src)], tmp_path / "cut", BYTE, **kw)
    assert again.already  # the same sources once more: nothing to do


def test_a_resumed_run_counts_what_it_skipped_once(tmp_path, monkeypatch):
    """Bad lines before the resume point were counted by the run that got there: the manifests are equal."""
    monkeypatch.setattr(prepare, "BATCH_CHARS", 300)
    records = [{"text": f"record {i} " * 10} if i % 7 else "{bad" for i in range(200)]
    src = str(jsonl(tmp_path / "d.jsonl", records))
    kw = {"shard_tokens": 2000, "progress": False, "skip_bad": True}
    full = prepare.prepare([src], tmp_path / "full", BYTE, **kw).manifest
    interrupted_after_two_chunks(monkeypatch, [src], tmp_path / "cut", kw)
    resumed = prepare.prepare([src], tmp_path / "cut", BYTE, **kw).manifest
    assert resumed["skipped"] == full["skipped"] == {"bad lines": 29}
    assert resumed["chunks"] == full["chunks"] and len(full["chunks"]) > 3


def test_a_run_that_wrote_nothing_can_be_run_again_with_other_settings(tmp_path):
    src = str(jsonl(tmp_path / "d.jsonl", ["{bad"] + [{"text": f"r {i} " * 9} for i in range(30)]))
    with pytest.raises(PrepareError, match="--skip-bad"):
        prepare.prepare([src], tmp_path / "out", BYTE, progress=False)
    result = prepare.prepare([src], tmp_path / "out", BYTE, skip_bad=True, progress=False)  # as the error says
    assert result.manifest["complete"] and result.manifest["skipped"] == {"bad lines": 1}


def test_a_folder_prepared_again_is_read_afresh_in_the_same_process(tmp_path):
    (tmp_path / "a.txt").write_text("AAAA" * 100)
    prepare.prepare([str(tmp_path / "a.txt")], tmp_path / "out", BYTE, progress=False)
    first = TokenSet(tmp_path / "out")
    assert BYTE.decode(first.read("train", 0, 4)[0].tolist()) == "AAAA"
    for p in (tmp_path / "out").iterdir():
        p.unlink()
    (tmp_path / "a.txt").write_text("BBBB" * 100)
    prepare.prepare([str(tmp_path / "a.txt")], tmp_path / "out", BYTE, progress=False)
    assert BYTE.decode(TokenSet(tmp_path / "out").read("train", 0, 4)[0].tolist()) == "BBBB"


def test_an_unreadable_source_is_not_called_a_full_disk(tmp_path, monkeypatch):
    src = texts(tmp_path / "src")
    real_open = Path.open

    def deny(self, *args, **kwargs):
        if self.name == "doc07.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)
    with pytest.raises(PermissionError, match="doc07.txt") as error:
        prepare.prepare([str(src)], tmp_path / "out", BYTE, progress=False)
    assert "free space" not in str(error.value)


def test_disk_full_keeps_the_chunks_before_and_a_rerun_finishes(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_CHARS", 1000)
    src = texts(tmp_path / "src", n=60)
    kw = {"shard_tokens": 3000, "progress": False}
    prepare.prepare([str(src)], tmp_path / "full", BYTE, **kw)
    real, writes = prepare._File.write, []

    def write(self, array):
        writes.append(1)
        if len(writes) == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, array)

    monkeypatch.setattr(prepare._File, "write", write)
    with pytest.raises(OSError, match="No space left on device.*chunks written before are complete"):
        prepare.prepare([str(src)], tmp_path / "cut", BYTE, **kw)
    monkeypatch.setattr(prepare._File, "write", real)
    assert not list((tmp_path / "cut").glob("*.tmp"))  # nothing half-written is left
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert manifest["chunks"]
    for chunk in manifest["chunks"]:  # the chunks before are whole: those of the uninterrupted run
        for split in ("train", "val"):
            for name in chunk[split]["sha256"]:
                assert files_of(tmp_path / "full")[name] == (tmp_path / "cut" / name).read_bytes()
    prepare.prepare([str(src)], tmp_path / "cut", BYTE, **kw)
    assert files_of(tmp_path / "cut") == files_of(tmp_path / "full")


def test_other_sources_into_a_prepared_folder_are_refused(tmp_path):
    prepare.prepare([str(texts(tmp_path / "a"))], tmp_path / "out", BYTE, progress=False)
    with pytest.raises(PrepareError, match="other sources or settings.*sources"):
        prepare.prepare([str(texts(tmp_path / "b", n=5))], tmp_path / "out", BYTE, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="not empty"):
        prepare.prepare([str(tmp_path / "a")], tmp_path / "busy", BYTE, progress=False)


def test_two_prepares_into_one_folder_at_once_are_refused(tmp_path):
    (tmp_path / "out").mkdir()
    lock = RunLock(tmp_path / "out", what="dsmoe prepare")
    try:
        with pytest.raises(ValueError, match="another dsmoe prepare is writing to"):
            prepare.prepare([str(texts(tmp_path / "a"))], tmp_path / "out", BYTE, progress=False)
    finally:
        lock.release()


# ---- reading ----------------------------------------------------------------------------------------

@pytest.fixture
def prepared(tmp_path):
    prepare.prepare([str(texts(tmp_path / "src"))], tmp_path / "out", BYTE, progress=False)
    return tmp_path / "out"


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove"])
def test_a_damaged_shard_is_an_error_naming_it(prepared, damage):
    """Also after the folder was read once (its files' checksums then stand until a size, time or inode changes)."""
    load_corpus(str(prepared), BYTE)
    assert (prepared / ".verified.json").exists()
    path = prepared / "train-00000.bin"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-2])
    elif damage == "flip":
        path.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    else:
        path.unlink()
    match = {"truncate": "truncated", "flip": "does not match its SHA-256", "remove": "missing"}[damage]
    with pytest.raises(PrepareError, match=f"train-00000.bin.*{match}|{match}"):
        load_corpus(str(prepared), BYTE)


def test_a_folder_of_another_tokenizer_or_vocabulary_is_refused(prepared, tmp_path):
    from dsmoe.tokenizer import BPETokenizer
    bpe = BPETokenizer.train(["some text to learn from " * 50], vocab_size=300)
    with pytest.raises(PrepareError, match="prepared with another tokenizer.*byte"):
        load_corpus(str(prepared), bpe)
    corpus = load_corpus(str(prepared), BYTE)
    with pytest.raises(ValueError, match="token id 257, beyond the model's vocab_size=200"):
        corpus.check(16, vocab_size=200)
    corpus.check(16, vocab_size=BYTE.vocab_size)


def test_windows_are_read_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_CHARS", 500)
    prepare.prepare([str(texts(tmp_path / "src", n=60))], tmp_path / "out", BYTE, shard_tokens=1000, progress=False)
    ts = TokenSet(tmp_path / "out")
    assert len(ts.chunks["train"]) > 3
    whole = np.concatenate([np.fromfile(c.tokens, dtype=np.uint16) for c in ts.chunks["train"]]).astype(np.int64)
    corpus = Corpus([ts], [1.0], {})
    starts = torch.tensor([0, 995, 1990, len(whole) - 33])
    x, y = corpus.windows("train", starts, 32)
    for row, s in enumerate(starts.tolist()):
        assert x[row].tolist() == whole[s:s + 32].tolist() and y[row].tolist() == whole[s + 1:s + 33].tolist()


def test_a_mixture_samples_by_weight_deterministically(tmp_path):
    a = prepare.prepare([str(texts(tmp_path / "a"))], tmp_path / "pa", BYTE, progress=False).out
    b = prepare.prepare([str(texts(tmp_path / "b", n=10, words=200))], tmp_path / "pb", BYTE, progress=False).out
    corpus = load_corpus(f"{a}=0.7,{b}=0.3", BYTE)
    draw = [corpus.sample("train", 4000, 16, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    share = corpus.set_of("train", draw[0]).bincount(minlength=2) / 4000
    assert abs(share[0].item() - 0.7) < 0.03
    x, _ = corpus.windows("train", draw[0][:64], 16)  # every window inside one set
    sizes = [s.size("train") for s in corpus.sets]
    assert ((draw[0] < sizes[0] - 16) | ((draw[0] >= sizes[0]) & (draw[0] < sum(sizes) - 16))).all()
    spread = corpus.set_of("val", corpus.spread("val", 10, 16)).bincount(minlength=2)
    assert spread.tolist() == [7, 3]
    assert corpus.info["train_tokens"] == sum(sizes)


@pytest.mark.parametrize("spec", ["a=0,b=1", "a=x", "=0.5", "a=inf"])
def test_a_bad_mixture_is_a_clear_error(spec):
    with pytest.raises(ValueError, match="expected PATH=WEIGHT"):
        parse_data(spec)


def test_a_path_with_an_equals_sign_is_a_path(tmp_path):
    folder = tmp_path / "a=1"
    folder.mkdir()
    assert parse_data(str(folder)) == [(str(folder), 1.0)]


# ---- fine-tuning data -------------------------------------------------------------------------------

def test_prompt_completion_trains_on_the_completion_only(tmp_path):
    records = [{"prompt": f"Q{i}: what is {i}+{i}? ", "completion": f"A: {2 * i}."} for i in range(40)]
    prepare.prepare([str(jsonl(tmp_path / "sft.jsonl", records))], tmp_path / "out", BYTE, progress=False)
    corpus = load_corpus(str(tmp_path / "out"), BYTE)
    ts = corpus.sets[0]
    ids, mask, _ = ts.read("train", 0, ts.size("train"))
    assert mask is not None
    trained = "".join(chr(t) for t, m in zip(ids.tolist(), mask.tolist()) if m and t < 256)
    assert "A: " in trained and "Q" not in trained and "what" not in trained
    assert all(m == 1 for t, m in zip(ids.tolist(), mask.tolist()) if t == EOS)  # EOS ends a completion
    x, y = corpus.windows("train", torch.tensor([0]), len(ids) - 1)
    assert torch.equal(y[0] == -1, torch.from_numpy(mask[1:] == 0))  # the loss ignores the prompt


def chat_tokenizer(folder: Path, template: str) -> HFTokenizer:
    """A HuggingFace tokenizer folder: one token per character of a small alphabet, EOS <eos>, a chat template."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {c: i for i, c in enumerate("<>|abcdefghijklmnopqrstuvwxyz:? ")}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens(["<eos>"])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "chat_template": template}))
    return HFTokenizer.load(folder)


def test_messages_are_rendered_with_the_chat_template_and_only_the_assistant_trained(tmp_path):
    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
                "{% endif %}{% endfor %}")
    hf = chat_tokenizer(tmp_path / "model", template)
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                             {"role": "user", "content": "why"}, {"role": "assistant", "content": "because"}]}] * 30
    prepare.prepare([str(jsonl(tmp_path / "chat.jsonl", records))], tmp_path / "out", hf, progress=False)
    ts = TokenSet(tmp_path / "out")
    ids, mask, starts = ts.read("train", 0, ts.size("train"), docs=True)
    assert mask is not None and starts is not None
    first = ids[:starts[1]]  # the first conversation, as the .idx file says
    trained = hf.decode(first[mask[:len(first)] == 1].tolist()).replace(" ", "")
    assert trained == "<|assistant|>hello<|assistant|>because"  # (decode leaves out the EOS tokens)
    assert hf.decode(first.tolist()).replace(" ", "") == "<|user|>hi<|assistant|>hello<|user|>why<|assistant|>because"
    eos_at = np.flatnonzero(first == hf.eos_id)
    assert len(eos_at) == 2 and eos_at[-1] == len(first) - 1 and mask[eos_at].all()  # each turn's EOS, trained
    # the template's EOS after each turn neither cuts the conversation into documents nor doubles the last EOS
    corpus = Corpus([ts], [1.0], {})
    _, _, docs = corpus.windows_with_docs("train", torch.tensor([0]), int(starts[2]) + 3)
    assert docs[0].tolist() == [0] * int(starts[1]) + [1] * int(starts[2] - starts[1]) + [2] * 3


# ---- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, match", [("{not json", "line 2: not JSON"), ('{"other": 1}', "line 2: no field 'text'"),
                                         ('{"text": 5}', "line 2: field 'text' is a int"),
                                         ("[1, 2]", "line 2: a list")])
def test_a_bad_jsonl_line_names_its_number_or_is_skipped(tmp_path, line, match):
    good = [{"text": f"more {i} " * 20} for i in range(20)]
    path = jsonl(tmp_path / "d.jsonl", [{"text": "good " * 20}, line, *good])
    with pytest.raises(PrepareError, match=f"{match}.*--skip-bad"):
        prepare.prepare([str(path)], tmp_path / "out", BYTE, progress=False)
    result = prepare.prepare([str(path)], tmp_path / "out2", BYTE, skip_bad=True, progress=False)
    assert result.manifest["skipped"] == {"bad lines": 1}


def test_an_empty_source_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nothing").mkdir()
    for src in ("empty.txt", "nothing"):
        with pytest.raises(PrepareError, match="is empty"):
            prepare.prepare([str(tmp_path / src)], tmp_path / f"out-{src}", BYTE, progress=False)
    jsonl(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(PrepareError, match="hold no text"):
        prepare.prepare([str(tmp_path / "blank.jsonl")], tmp_path / "out-blank", BYTE, progress=False)


def test_a_parquet_column_that_is_not_text_is_refused(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "n.parquet")
    with pytest.raises(PrepareError, match="column 'text' holds int64, not text"):
        prepare.prepare([str(tmp_path / "n.parquet")], tmp_path / "out", BYTE, progress=False)
    with pytest.raises(PrepareError, match="no column 'body'"):
        prepare.prepare([str(tmp_path / "n.parquet")], tmp_path / "out2", BYTE, field="body", progress=False)


def test_the_command_prepares_and_then_has_nothing_to_do(tmp_path, capsys):
    src = texts(tmp_path / "src")
    argv = ["prepare", str(src), "--out", str(tmp_path / "out"), "--quiet"]
    assert cli.main(argv) == 0
    assert "prepared:" in capsys.readouterr().out
    assert cli.main(argv) == 0
    assert "already prepared (nothing to do)" in capsys.readouterr().out
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "bpe"), "--tokenizer", "bpe", "--vocab-size", "300",
                     "--quiet"]) == 0
    assert json.loads((tmp_path / "bpe" / "manifest.json").read_text())["tokenizer"]["kind"] == "bpe"
    assert cli.main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().out


# ---- training on prepared data ----------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_its_own_rows_of_the_same_global_batch(prepared, world):
    """Every rank draws the same starts and reads only its rows: the ranks' windows, in rank order, are the
    one-process batch, so a run resumed at another world size sees the same tokens."""
    from dsmoe.parallel.context import MeshContext
    corpus = load_corpus(str(prepared), BYTE)
    whole = corpus.batch("train", 8, 16, torch.Generator().manual_seed(5))
    parts = []
    for rank in range(world):
        ctx = MeshContext.__new__(MeshContext)  # only local_batch, which needs rank and world
        ctx.rank, ctx.world = rank, world
        (local,) = ctx.local_batch(corpus.sample("train", 8, 16, torch.Generator().manual_seed(5)))
        parts.append(corpus.windows("train", local, 16))
    for i in range(2):
        assert torch.equal(torch.cat([p[i] for p in parts]), whole[i])


def _train(tmp_path, name, *sets):
    from dsmoe.presets import build_configs
    from dsmoe.train import train
    fast = ["seq_len=16", "batch_size=4", "eval_batches=2", "eval_every=0", "save_every=0", "log_every=1",
            "warmup_steps=2", "tensorboard=false", "steps=4", f"out={tmp_path / name}"]
    return train(*build_configs("debug", fast + list(sets)), progress=False)


@pytest.mark.slow
def test_training_reads_prepared_folders_mixtures_and_fine_tuning_data(tmp_path):
    a = prepare.prepare([str(texts(tmp_path / "a"))], tmp_path / "pa", BYTE, progress=False).out
    records = [{"prompt": f"Q{i}? ", "completion": f"A{i}. " * 8} for i in range(60)]
    sft = jsonl(tmp_path / "sft.jsonl", records)
    b = prepare.prepare([str(sft)], tmp_path / "pb", BYTE, progress=False).out
    plain = _train(tmp_path, "plain", f"data={a}")
    raw = _train(tmp_path, "raw", f"data={tmp_path / 'a'}")  # the raw folder, prepared on the fly: the same tokens
    assert plain["val_loss"] == raw["val_loss"] and plain["train_loss"] == raw["train_loss"]
    mixed = _train(tmp_path, "mixed", f"data={a}=0.5,{b}=0.5", "doc_mask=true")
    assert mixed["mix_weights"] == [0.5, 0.5] and len(mixed["mix_realized"]) == 2
    assert abs(sum(mixed["mix_realized"]) - 1) < 1e-6 and all(0 < p < 1 for p in mixed["mix_realized"])
    rows = [json.loads(line) for line in open(tmp_path / "mixed" / "metrics.jsonl")]
    assert all("mix" in r for r in rows if r["kind"] == "train")
    assert all(np.isfinite(r["loss"]) for r in rows if r["kind"] == "train")


def test_a_long_line_is_cut_between_characters(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "PIECE_BYTES", 1001)
    text = "é€😀a" * 700  # 2-, 3- and 4-byte characters on one line: no newline to cut at
    (tmp_path / "line.txt").write_text(text)
    prepare.prepare([str(tmp_path / "line.txt")], tmp_path / "out", BYTE, progress=False)
    ts = TokenSet(tmp_path / "out")
    whole = np.concatenate([ts.read(s, 0, ts.size(s))[0] for s in ("train", "val")])
    assert BYTE.decode(whole.tolist()) == text


def test_prepare_and_its_workers_import_no_torch(tmp_path):
    """`dsmoe prepare` and each worker process (which imports dsmoe.prepare and the command's main module again)
    run without torch: tens of MB each, not hundreds."""
    import subprocess
    import sys
    src = texts(tmp_path / "src")
    code = ("import sys; from dsmoe.cli import main; "
            f"main(['prepare', {str(src)!r}, '--out', {str(tmp_path / 'out')!r}, '--quiet']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    assert out.endswith("False") and (tmp_path / "out" / "manifest.json").exists()


def test_a_conversation_the_chat_template_refuses_names_its_line(tmp_path):
    template = ("{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
                "{{ raise_exception('roles must be user or assistant') }}{% endif %}{{ m.content }}{% endfor %}")
    hf = chat_tokenizer(tmp_path / "model", template)
    records = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "a"}]}] * 5
    records.insert(2, {"messages": [{"role": "system", "content": "a"}]})
    src = str(jsonl(tmp_path / "chat.jsonl", records))
    with pytest.raises(PrepareError, match="chat.jsonl line 3: the chat template refuses.*roles must be user"):
        prepare.prepare([src], tmp_path / "out", hf, progress=False)
    result = prepare.prepare([src], tmp_path / "out", hf, skip_bad=True, progress=False)
    assert result.manifest["skipped"] == {"bad lines": 1}


@pytest.mark.slow
def test_fine_tuning_loss_is_the_mean_over_trained_targets_whatever_the_accumulation(tmp_path):
    """Masks leave micro-batches with different numbers of trained targets: the step's loss is the mean over all
    of them, so 1 micro-batch of 8 and 2 of 4 (the same windows) log the same loss."""
    records = [{"prompt": f"question {i} " * (1 + i % 5), "completion": f"answer {i}." * (1 + i % 3)}
               for i in range(80)]
    b = prepare.prepare([str(jsonl(tmp_path / "sft.jsonl", records))], tmp_path / "p", BYTE, progress=False).out
    one = _train(tmp_path, "one", f"data={b}", "steps=1", "batch_size=8", "grad_accum=1")
    two = _train(tmp_path, "two", f"data={b}", "steps=1", "batch_size=4", "grad_accum=2")
    assert one["train_loss"] == pytest.approx(two["train_loss"], rel=1e-6)


def test_what_a_tester_tried_is_refused_clearly_or_read_right(tmp_path, prepared, capsys):
    """Inputs a user will give: each refused naming what to do, or read as meant."""
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}] * 3
    with pytest.raises(PrepareError, match=r"line 1: no 'assistant' turn \(roles \['bot', 'user'\]\)"):
        prepare.prepare([str(jsonl(tmp_path / "bot.jsonl", chat))], tmp_path / "o1", BYTE, progress=False)
    with pytest.raises(PrepareError, match="prepared already: give it to train/eval/inspect as --data"):
        prepare.prepare([str(prepared)], tmp_path / "o2", BYTE, progress=False)
    with pytest.raises(PrepareError, match="is part of the prepared corpus"):
        load_corpus(str(prepared / "manifest.json"), BYTE)
    (prepared / "manifest.json").rename(tmp_path / "kept.json")
    with pytest.raises(PrepareError, match="lost its manifest"):
        load_corpus(str(prepared), BYTE)
    # JSON Lines by any of their names, in any case; other compressed files named
    records = [{"text": f"line {i} " * 5} for i in range(20)]
    for name in ("a.ndjson", "b.JSONL"):
        result = prepare.prepare([str(jsonl(tmp_path / name, records))], tmp_path / f"o-{name}", BYTE, progress=False)
        assert sum(c[s]["docs"] for c in result.manifest["chunks"] for s in ("train", "val")) == 20
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "t.txt.gz").write_bytes(gzip.compress(b"text"))
    with pytest.raises(PrepareError, match="t.txt.gz: a compressed file dsmoe does not read"):
        prepare.prepare([str(tmp_path / "z")], tmp_path / "o3", BYTE, progress=False)
    # a byte that is not UTF-8: its own line, skippable
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n' * 3 + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(PrepareError, match=r"latin.jsonl line 4: not UTF-8 \(byte 0xe9"):
        prepare.prepare([str(tmp_path / "latin.jsonl")], tmp_path / "o4", BYTE, progress=False)
    # a folder refused keeps nothing of the run; a changed file is named; a file given twice is read once
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(PrepareError, match="not empty"):
        prepare.prepare([str(tmp_path / "latin.jsonl")], tmp_path / "mine", BYTE, progress=False)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    src = texts(tmp_path / "again", n=10)
    once = prepare.prepare([str(src), str(src / "doc03.txt")], tmp_path / "o5", BYTE, progress=False).manifest
    assert sum(c[s]["docs"] for c in once["chunks"] for s in ("train", "val")) == 10
    (src / "doc03.txt").write_text("changed")
    with pytest.raises(PrepareError, match="differ in files: .*doc03.txt added, removed or changed"):
        prepare.prepare([str(src), str(src / "doc03.txt")], tmp_path / "o5", BYTE, progress=False)


def test_a_corrupt_manifest_is_one_clear_error(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    for broken in ({k: v for k, v in manifest.items() if k != "chunks"}, {**manifest, "dtype": "float99"}):
        (prepared / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(PrepareError, match="manifest.json is corrupt"):
            TokenSet(prepared)


def test_a_dictionary_encoded_parquet_column_is_text(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    docs = [f"row {i} " * 4 for i in range(20)]
    pq.write_table(pa.table({"text": pa.array(docs).dictionary_encode()}), tmp_path / "d.parquet")
    prepare.prepare([str(tmp_path / "d.parquet")], tmp_path / "out", BYTE, progress=False)
    assert sorted(decoded(tmp_path / "out", "train") + decoded(tmp_path / "out", "val")) == sorted(docs)


def test_the_command_reuses_a_folders_bpe_only_when_it_is_the_one_asked_for(tmp_path, capsys):
    src = texts(tmp_path / "src")
    out = str(tmp_path / "out")
    assert cli.main(["prepare", str(src), "--out", out, "--quiet"]) == 0  # byte
    assert cli.main(["prepare", str(src), "--out", out, "--tokenizer", "bpe", "--vocab-size", "300", "--quiet"]) == 1
    assert "differ in tokenizer" in capsys.readouterr().out
    assert cli.main(["prepare", str(src), "--out", out, "--tokenizer", str(tmp_path / "nosuch")]) == 1
    assert "not byte, bpe, or a folder with a tokenizer.json" in capsys.readouterr().out
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "o2"), "--tokenizer", out, "--quiet"]) == 0


@pytest.mark.slow
def test_a_run_on_a_mixture_with_fine_tuning_data_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Ctrl-C in step 3 of a doc_mask run on a mixture of text and prompt/completion records; the resumed run's
    losses equal the uninterrupted one's exactly (the data RNG and the window reads are the same)."""
    import os
    import signal

    from dsmoe.presets import build_configs
    from dsmoe.train import train
    a = prepare.prepare([str(texts(tmp_path / "a"))], tmp_path / "pa", BYTE, progress=False).out
    records = [{"prompt": f"Q{i}? ", "completion": f"A{i}. " * 8} for i in range(60)]
    b = prepare.prepare([str(jsonl(tmp_path / "sft.jsonl", records))], tmp_path / "pb", BYTE, progress=False).out
    sets = [f"data={a}=0.6,{b}=0.4", "doc_mask=true", "steps=6", "grad_accum=2"]
    full = _train(tmp_path, "full", *sets)
    real, calls = Corpus.sample, []

    def sample(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # step 3
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(Corpus, "sample", sample)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "cut", *sets)
    monkeypatch.setattr(Corpus, "sample", real)
    assert json.load(open(tmp_path / "cut" / "checkpoint" / "config.json"))["step"] == 3
    fast = ["seq_len=16", "batch_size=4", "eval_batches=2", "eval_every=0", "save_every=0", "log_every=1",
            "warmup_steps=2", "tensorboard=false", f"out={tmp_path / 'cut'}", f"resume={tmp_path / 'cut'}"]
    resumed = train(*build_configs("debug", fast + sets), progress=False)

    def losses(run_dir):
        return [json.loads(line)["loss"] for line in open(f"{run_dir}/metrics.jsonl") if '"train"' in line]
    assert losses(resumed["run_dir"]) == losses(full["run_dir"]) and resumed["val_loss"] == full["val_loss"]
    assert resumed["mix_realized"] == full["mix_realized"]
