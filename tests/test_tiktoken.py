"""The tiktoken tokenizer of Moonlight and Kimi-K2 folders (tiktoken.model + tokenizer_config.json): equal to a
tiktoken.Encoding built directly from the same ranks, pattern and special tokens (and to transformers' conversion of
the file), the folders' cutting of long text, saving and loading, prepare and generate with it, and bad folders."""

import base64
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsmoe import tokenizer as dsmoe_tokenizer
from dsmoe.tokenizer import MOONSHOT_PATTERN, RESERVED_SPECIALS, TiktokenTokenizer, load_tokenizer

tiktoken = pytest.importorskip("tiktoken")

# pat_str of tokenization_moonshot.py (Moonlight-16B-A3B) and tokenization_kimi.py (Kimi-K2), as one string
PAT_STR = (r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&"
           r"[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
           r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
CL100K_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
# merges on top of the 256 bytes, each of two tokens before it: words, a Han character (3 UTF-8 bytes), pairs
# across the places the pattern cuts (camelCase "oW", Han then Latin "\xad" "a") and one that long runs break
MERGES = [b"he", b"ll", b"hell", b"hello", b"or", b"ld", b" w", b" wor", b" world", b"oW", b"\xada", b"\xe4\xb8",
          b"\xe4\xb8\xad", b"ab", b"in", b"def", b" (", b"re", b"'s", b"12", b"123"]
RANKS = {**{bytes([b]): b for b in range(256)}, **{m: 256 + i for i, m in enumerate(MERGES)}}
N = len(RANKS)  # the first special id
NAMED = {N: "[BOS]", N + 1: "[EOS]", N + 2: "<|im_end|>", N + 3: "<|im_user|>", N + 4: "<|im_assistant|>",
         N + 6: "<|im_system|>", N + 7: "<|im_middle|>", N + 254: "[UNK]", N + 255: "[PAD]"}  # N + 5: a gap
TEMPLATE = ("{% for m in messages %}<|im_{{ m.role }}|>{{ m.role }}<|im_middle|>{{ m.content }}<|im_end|>"
            "{% endfor %}")
TEXTS = ["hello world", "Hello World's I'LL re-define 12345 café", "HelloWorld", "中中文abc 中a",
         "def f (x):\n\treturn x", "<|im_user|>user<|im_middle|>hi<|im_end|>[EOS]",
         f"<|reserved_token_{N + 5}|> and <|reserved_token_{N}|>",
         "\r\n\n   x  \u3000 y\u00a0z", "😀 emoji \U0001f600 and ab" * 3, "", " ", "[EOS", "<|im_end|"]


def model_file(ranks: dict[bytes, int]) -> str:
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())


def write_folder(folder: Path, config: dict | None = None, model: str | None = None) -> Path:
    """A Moonlight-like tokenizer folder: tiktoken.model and tokenizer_config.json (no tokenizer.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiktoken.model").write_text(model_file(RANKS) if model is None else model)
    added = {str(i): {"content": name, "special": True} for i, name in NAMED.items()}
    default = {"added_tokens_decoder": added, "bos_token": "[BOS]", "eos_token": "[EOS]", "chat_template": TEMPLATE,
               "tokenizer_class": "TikTokenTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(default if config is None else config))
    return folder


def reference_specials() -> dict[str, int]:
    return {NAMED.get(i, f"<|reserved_token_{i}|>"): i for i in range(N, N + 256)}


def reference():
    """What the folders' Python tokenizer builds: the file's ranks, their pattern, their specials."""
    return tiktoken.Encoding(name="ref", pat_str=PAT_STR, mergeable_ranks=RANKS, special_tokens=reference_specials())


def reference_cuts(s: str, run: int) -> list[str]:
    """The folders' cutting of a part of the text, character by character: a new piece after `run` characters
    of one kind (whitespace or not) in a row."""
    pieces, start, count, space = [], 0, 0, s[:1].isspace()
    for i, c in enumerate(s):
        if c.isspace() != space:
            count, space = 1, c.isspace()
        else:
            count += 1
            if count > run:
                pieces.append(s[start:i])
                start, count = i, 1
    return pieces + [s[start:]]


def reference_encode(enc, text: str, chunk: int = 400_000, run: int = 25_000) -> list[int]:
    ids = []
    for at in range(0, len(text), chunk):
        for piece in reference_cuts(text[at:at + chunk], run):
            ids += enc.encode(piece, allowed_special="all")
    return ids


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("moonlight"))


@pytest.fixture(scope="module")
def tok(folder):
    return load_tokenizer(folder)


# ---- equal to the reference -------------------------------------------------------------------------

def test_the_pattern_is_the_folders_own():
    assert MOONSHOT_PATTERN == PAT_STR and RESERVED_SPECIALS == 256


def test_a_tiktoken_folder_loads_with_its_special_tokens(tok, folder, monkeypatch):
    from tiktoken.load import load_tiktoken_bpe

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's own reader, without its cache
    assert load_tiktoken_bpe(str(folder / "tiktoken.model")) == RANKS == tok.enc._mergeable_ranks
    assert isinstance(tok, TiktokenTokenizer) and tok.kind == "tiktoken"
    assert tok.vocab_size == N + 256 and tok.num_ranks == N
    assert (tok.bos_id, tok.eos_id) == (N, N + 1)
    assert tok.specials == reference_specials()
    assert tok.encode("[EOS]") == [N + 1] and tok.encode(f"<|reserved_token_{N + 5}|>") == [N + 5]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_and_decode_equal_tiktoken_built_directly(tok, text):
    ref = reference()
    ids = tok.encode(text)
    assert ids == ref.encode(text, allowed_special="all")
    assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    assert tok.decode(ids) == ref.decode([i for i in ids if i < N])  # specials left out, as HF folders' are
    assert [a.tolist() for a in tok.encode_many([text, text + "!"])] == [ids, tok.encode(text + "!")]


@given(st.lists(st.one_of(st.text(alphabet="hewoldrHW中文a b\n\t'sLl12é😀", max_size=12),
                          st.sampled_from(["[EOS]", "<|im_end|>", "[BOS", "<|", "|>", f"<|reserved_token_{N + 9}|>"])),
                max_size=8))
def test_any_text_encodes_as_the_reference_and_round_trips(tok, parts):
    text = "".join(parts)
    ids = tok.encode(text)
    assert ids == reference().encode(text, allowed_special="all")
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_the_pattern_decides_the_tokens(tok):
    """Another split (GPT-4's, which transformers' own tiktoken reader uses) gives other tokens for camelCase and for
    Han then Latin: the pattern must be the folders'."""
    other = tiktoken.Encoding(name="cl100k-split", pat_str=CL100K_PAT, mergeable_ranks=RANKS, special_tokens={})
    for text in ("HelloWorld", "中abc"):
        assert tok.encode(text) != other.encode(text)


def test_equal_to_transformers_conversion_of_the_file(folder, tok):
    """transformers' TikTokenConverter (offline: it reads the local file) given the folders' pattern and specials."""
    pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    names = sorted(tok.specials, key=tok.specials.get)
    hf = TikTokenConverter(vocab_file=str(folder / "tiktoken.model"), pattern=PAT_STR,
                           extra_special_tokens=names).converted()
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text), text


@given(st.text(alphabet="ab \t\n\u3000", max_size=60), st.integers(1, 7), st.integers(1, 30))
def test_long_runs_are_cut_where_the_folders_tokenizer_cuts_them(text, run, chunk):
    pieces = list(dsmoe_tokenizer._pieces(text, chunk, run))
    expected = [p for at in range(0, len(text), chunk) for p in reference_cuts(text[at:at + chunk], run)]
    assert pieces == expected and "".join(pieces) == text


def test_a_long_run_is_cut_as_the_folders_tokenizer_cuts_it(tok):
    text = "x" + "ab" * 15_000 + " " * 30_001 + "hello"  # the cut at 25,000 falls inside an "ab"
    ids = tok.encode(text)
    assert ids == reference_encode(reference(), text)
    assert ids != reference().encode(text, allowed_special="all")  # uncut, the "ab" there is one token
    assert tok.decode(ids) == text


# ---- saved, prepared, generated ---------------------------------------------------------------------

def test_saved_and_loaded_it_is_the_same_tokenizer(tok, tmp_path):
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiktoken.model", "tokenizer_config.json"]
    again = load_tokenizer(tmp_path)
    assert again.cache_key() == tok.cache_key() and again.encode(TEXTS[5]) == tok.encode(TEXTS[5])
    assert again.config["chat_template"] == TEMPLATE
    other = write_folder(tmp_path / "other", model=model_file({**{t: r for t, r in RANKS.items() if t != b"123"},
                                                                   b"23": RANKS[b"123"]}))
    assert load_tokenizer(other).cache_key() != tok.cache_key()  # another vocabulary, another key


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "2-workers"])
def test_prepare_tokenizes_text_and_chat_with_it(tok, tmp_path, workers):
    from dsmoe import prepare
    from dsmoe.data import TokenSet

    docs = [{"text": f"hello world {i}"} for i in range(20)]
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 20
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs + chats))
    result = prepare.prepare([str(tmp_path / "d.jsonl")], tmp_path / "out", tok, workers=workers, progress=False)
    assert result.manifest["tokenizer"] == {"kind": "tiktoken", "key": tok.cache_key()}
    assert load_tokenizer(tmp_path / "out").cache_key() == tok.cache_key()  # saved beside the manifest
    ids = np.concatenate([TokenSet(tmp_path / "out").read(s, 0, TokenSet(tmp_path / "out").size(s))[0]
                          for s in ("train", "val")]).tolist()
    chat = tok.encode("<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>hello<|im_end|>")
    assert chat[0] == N + 3 and ids.count(N + 3) == 20 and ids.count(tok.eos_id) == 40  # template rendered, EOS each
    assert tok.decode(ids).count("hello world") == 20


@pytest.fixture
def model_folder(tmp_path):
    """A tiny DeepSeek-V3 HuggingFace folder with the tiktoken tokenizer, its vocab_size the tokenizer's (as
    Moonlight's and Kimi-K2's is: ranks + 256)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers", minversion="5.0")
    config = transformers.DeepseekV3Config(
        vocab_size=N + 256, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, first_k_dense_replace=1, max_position_embeddings=64, n_shared_experts=1, q_lora_rank=None,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "hf")
    return write_folder(tmp_path / "hf")


def test_generate_and_inspect_take_a_moonlight_like_folder(model_folder, tmp_path, capsys, monkeypatch):
    from dsmoe.cli import main
    from dsmoe.inspection import load

    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    assert isinstance(load(model_folder, "cpu").tokenizer, TiktokenTokenizer)
    assert main(["generate", "--model", str(model_folder), "--prompt", "hello", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("hello")


@pytest.mark.slow
def test_train_init_fine_tunes_a_moonlight_like_folder_and_keeps_its_tokenizer(model_folder, tmp_path, monkeypatch):
    from dsmoe.cli import main

    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    records = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "world"}]}
               for i in range(60)] + [{"text": "def f (x): return x 123 中文 " * 4}] * 20
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    argv = ["train", "--init", str(model_folder), "--preset", "debug", "--data", str(tmp_path / "d.jsonl"), "--out",
            str(out), "--steps", "3", "--quiet", "--set", "seq_len=32", "--set", "batch_size=4", "--set",
            "eval_batches=1", "--set", "tensorboard=false"]
    assert main(argv) == 0
    key = load_tokenizer(model_folder).cache_key()
    assert load_tokenizer(out / "checkpoint").cache_key() == key and load_tokenizer(out / "hf").cache_key() == key
    assert main(["generate", "--checkpoint", str(out / "checkpoint"), "--prompt", "hello", "--max-tokens", "2"]) == 0


# ---- bad folders ------------------------------------------------------------------------------------

BAD_MODELS = {
    "not-base64": (model_file(RANKS).replace("aGU= 256", "a*e= 256"), r"line 257: .*not `base64\(token\) rank`"),
    "three-fields": (model_file(RANKS).replace("aGU= 256", "aGU= 256 x"), r"line 257: .*not `base64\(token\) rank`"),
    "rank-not-a-number": (model_file(RANKS).replace("aGU= 256", "aGU= x"), "line 257"),
    "token-twice": (model_file(RANKS) + "aGU= 999\n", r"line 278: the token b'he' is listed twice"),
    "rank-gap": (model_file(RANKS).replace("aGU= 256", "aGU= 900"), r"ranks are not 0\.\.276, each once"),
    "byte-missing": (model_file({t: r - 1 for t, r in RANKS.items() if t != b"\x00"}), r"single byte\(s\) \[0\]"),
    "empty": ("", "holds no tokens"),
}


@pytest.mark.parametrize("case", BAD_MODELS, ids=list(BAD_MODELS))
def test_a_corrupt_tiktoken_model_is_an_error_naming_it(tmp_path, case):
    text, match = BAD_MODELS[case]
    write_folder(tmp_path, model=text)
    with pytest.raises(ValueError, match=match) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tiktoken.model") in str(e.value)


def config_with(**changes) -> dict:
    added = {str(i): {"content": name} for i, name in NAMED.items()}
    return {"added_tokens_decoder": added, "eos_token": "[EOS]"} | changes


BAD_CONFIGS = {
    "on-a-bpe-rank": (config_with(added_tokens_decoder={"5": {"content": "[EOS]"}}), r"id 5, a BPE rank"),
    "past-the-specials": (config_with(added_tokens_decoder={str(N + 256): {"content": "[X]"}}),
                          rf"id {N + 256}, past the special ids .*{N}\.\.{N + 255}"),
    "a-name-twice": (config_with(added_tokens_decoder={str(N): {"content": "[EOS]"}, str(N + 1): {"content": "[EOS]"}}),
                     rf"'\[EOS\]' has two ids, {N} and {N + 1}"),
    "a-reserved-name-taken": (config_with(added_tokens_decoder={str(N): {"content": f"<|reserved_token_{N + 3}|>"}}),
                              "has two ids"),
    "id-not-a-number": (config_with(added_tokens_decoder={"x": {"content": "[X]"}}), "entry 'x' is not a token id"),
    "empty-content": (config_with(added_tokens_decoder={str(N): {"content": ""}}), "non-empty"),
    "eos-not-special": (config_with(eos_token="hello"), r"eos_token 'hello' is not one of the special tokens"),
    "decoder-a-list": (config_with(added_tokens_decoder=["[EOS]"]), "added_tokens_decoder is a list"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=list(BAD_CONFIGS))
def test_a_special_token_clash_is_an_error_naming_the_config(tmp_path, case):
    config, match = BAD_CONFIGS[case]
    write_folder(tmp_path, config=config)
    with pytest.raises(ValueError, match=match) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer_config.json") in str(e.value)


def test_a_missing_or_corrupt_tokenizer_config_is_an_error_naming_it(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config.json is corrupt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer_config.json is missing.*added_tokens_decoder"):
        load_tokenizer(tmp_path)


def test_without_an_eos_token_documents_are_joined_as_they_are(tmp_path):
    tok = load_tokenizer(write_folder(tmp_path, config={"added_tokens_decoder": {}}))
    assert tok.eos_id is None and tok.bos_id is None and tok.encode(f"<|reserved_token_{N}|>") == [N]


def test_a_tokenizer_json_is_chosen_over_tiktoken_model(tmp_path, folder):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tiktoken.model").write_bytes((folder / "tiktoken.model").read_bytes())
    (tmp_path / "a" / "tokenizer.json").write_text(json.dumps({"kind": "byte"}))
    assert load_tokenizer(tmp_path / "a").kind == "byte"


def test_a_tokenizer_larger_than_the_dsmoe_model_is_refused(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"vocab_size": N + 100}}))
    with pytest.raises(ValueError, match=rf"tiktoken tokenizer has {N + 256} tokens, more than the model's"):
        load_tokenizer(tmp_path)


def test_without_tiktoken_installed_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    write_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(ImportError, match=r"tiktoken.model is a tiktoken tokenizer .*pip install tiktoken"):
        load_tokenizer(tmp_path)


def test_prepare_takes_a_tiktoken_folder_on_the_command_line(folder, tok, tmp_path):
    from dsmoe.cli import main

    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--tokenizer", str(folder),
                 "--quiet"]) == 0
    assert load_tokenizer(tmp_path / "out").cache_key() == tok.cache_key()
