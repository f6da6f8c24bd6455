"""`dsmoe inspect` (dsmoe.inspection): on tiny HuggingFace DeepSeek-V3 and V2 folders (byte vocabulary, a small
corpus) it writes the markdown, the JSON and every PNG; each layer's load sums to tokens * K, MaxVio is
dsmoe.metrics.max_violation of that load, the token-kind counts add up to the load, and the loss is
dsmoe.evaluate's on the same windows; the redundancy rows follow the study's disabled counts. A dsmoe run
directory works too (slow: it trains), with numbers equal to `dsmoe eval`'s. A missing folder, a dense model
and a vocabulary the tokenizer does not fit are one-line errors."""

import json
from pathlib import Path

import pytest
import torch

from dsmoe import cli
from dsmoe.analysis import disabled_counts
from dsmoe.data import load_corpus
from dsmoe.evaluate import evaluate
from dsmoe.inspection import compare, inspect
from dsmoe.metrics import max_violation
from dsmoe.pretrained import from_pretrained
from dsmoe.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers", minversion="5.0")

BASE = dict(vocab_size=260, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, first_k_dense_replace=1, max_position_embeddings=64, n_shared_experts=1,
            n_routed_experts=8, num_experts_per_tok=2)
CASES = {"v3": ("deepseek_v3", dict(q_lora_rank=24, n_group=2, topk_group=1)),
         "v2": ("deepseek_v2", dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1))}
SMALL = dict(batches=2, batch_size=2, seq_len=16, progress=False)


def save_hf(path: Path, model_type: str, fields: dict) -> Path:
    Config = transformers.DeepseekV3Config if model_type == "deepseek_v3" else transformers.DeepseekV2Config
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(Config(**(BASE | fields)), dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=CASES.values(), ids=list(CASES))
def hf_dir(request, tmp_path_factory):
    return save_hf(tmp_path_factory.mktemp("hf"), *request.param)


def test_report_and_numbers(hf_dir, corpus, tmp_path):
    r = inspect(hf_dir, str(corpus), tmp_path / "out", **SMALL)
    for name in ("report.md", "results.json", "load.png", "kinds.png", "redundancy.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert sorted(r["figures"]) == sorted(str(tmp_path / "out" / n) for n in ("load.png", "kinds.png",
                                                                              "redundancy.png"))
    assert r["tokens"] == 2 * 2 * 16 and r["blocks"] == [1, 2]
    load = torch.tensor(r["load"])
    assert load.shape == (2, 8) and load.sum(1).tolist() == [r["tokens"] * 2] * 2  # tokens * K per layer
    assert r["maxvio_global"] == max_violation(load).tolist()
    assert r["mean_maxvio_global"] == pytest.approx(sum(r["maxvio_global"]) / 2)
    assert r["dead_experts"] == [torch.nonzero(row == 0).flatten().tolist() for row in load]
    assert torch.tensor(r["kind_counts"]).sum(1).tolist() == r["load"]  # every assignment has one kind
    model = from_pretrained(hf_dir)
    ev = evaluate(model, load_corpus(str(corpus), load_tokenizer(hf_dir)), 2, 16, 2)
    assert r["loss"] == pytest.approx(ev["loss"], rel=1e-5) and r["load"] == ev["load"]
    assert [x["disabled"] for x in r["redundancy"]] == [0, *disabled_counts(8, 2)]
    assert r["redundancy"][0]["rise"] == 0.0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "MaxVio_global" in report and "Redundancy test" in report and "![load.png](load.png)" in report
    assert json.loads((tmp_path / "out" / "results.json").read_text())["maxvio_global"] == r["maxvio_global"]


def test_redundancy_can_be_skipped(hf_dir, corpus, tmp_path):
    r = inspect(hf_dir, str(corpus), tmp_path / "out", redundancy_batches=0, **SMALL)
    assert r["redundancy"] == [] and not (tmp_path / "out" / "redundancy.png").exists()


def test_cli_prints_summary(hf_dir, corpus, tmp_path, capsys):
    assert cli.main(["inspect", str(hf_dir), "--data", str(corpus), "--out", str(tmp_path / "o"), "--batches", "1",
                     "--batch-size", "2", "--seq-len", "16", "--redundancy-batches", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "MaxVio_global: mean" in out and "dead experts:" in out and "redundancy test" in out
    assert f"report: {tmp_path / 'o' / 'report.md'}" in out


def test_errors_are_one_line(corpus, tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().out
    v3 = dict(q_lora_rank=None, n_group=2, topk_group=1)
    dense = save_hf(tmp_path / "dense", "deepseek_v3", v3 | dict(first_k_dense_replace=3))
    with pytest.raises(ValueError, match="dense model"):
        inspect(dense, str(corpus), tmp_path / "o", **SMALL)
    other_vocab = save_hf(tmp_path / "v64", "deepseek_v3", v3 | dict(vocab_size=64))
    assert cli.main(["inspect", str(other_vocab), "--data", str(corpus), "--quiet"]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith("dsmoe inspect: error:") and "vocab_size=64" in out and "\n" not in out
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "hidden_act": "gelu"}))
    assert cli.main(["inspect", str(bad), "--quiet"]) == 1
    assert capsys.readouterr().out.startswith("dsmoe inspect: error:")


def test_a_larger_vocabulary_without_a_tokenizer_takes_the_byte_tokenizer(corpus, tmp_path):
    """As train --init does: a folder without a tokenizer gets the byte tokenizer, which fits a model of at least
    its 260 tokens (the ids above 259 are simply never fed)."""
    v3 = dict(q_lora_rank=None, n_group=2, topk_group=1)
    r = inspect(save_hf(tmp_path / "v300", "deepseek_v3", v3 | dict(vocab_size=300)), str(corpus), tmp_path / "o",
                **SMALL)
    assert r["tokens"] == 2 * 2 * 16


@pytest.mark.slow
def test_dsmoe_run_directory(corpus, tmp_path, monkeypatch):
    """A trained run: the report goes to RUN/inspect and the numbers are `dsmoe eval`'s on the same windows."""
    from dsmoe.checkpoint import load_checkpoint
    from dsmoe.presets import build_configs
    from dsmoe.train import train

    run = tmp_path / "run"
    fast = ["seq_len=16", "batch_size=4", "eval_batches=1", "eval_every=0", "save_every=0", "log_every=1",
            "warmup_steps=1", "tensorboard=false", "steps=2", f"data={corpus}", f"out={run}"]
    train(*build_configs("debug", fast), progress=False)
    r = inspect(run, batches=2, progress=False)  # the run's corpus and training shape, as `dsmoe eval`
    assert r["source"] == "dsmoe" and (r["batch_size"], r["seq_len"]) == (4, 16)
    assert Path(r["report"]) == run / "inspect" / "report.md"
    assert (run / "inspect" / "load.png").exists() and (run / "inspect" / "kinds.png").exists()
    # beside a HF folder with no --data: both on the run's corpus and its windows, not each on its own default
    compared = compare([run, save_hf(tmp_path / "hf", *CASES["v3"])], out=tmp_path / "cmp", batches=1,
                       redundancy_batches=0, progress=False)
    assert [(x["corpus"], x["seq_len"], x["batch_size"]) for x in compared["results"]] == [(str(corpus), 16, 4)] * 2
    model, model_cfg, _, tok = load_checkpoint(run)
    ev = evaluate(model, load_corpus(str(corpus), tok), 4, 16, 2)
    assert r["maxvio_global"] == ev["maxvio_global"] and r["loss"] == pytest.approx(ev["loss"], rel=1e-5)
    K = model_cfg.moe.top_k
    assert all(sum(row) == r["tokens"] * K for row in r["load"])


def test_two_models_are_compared_side_by_side(corpus, tmp_path, capsys):
    """`dsmoe inspect A B`: both inspected on the same corpus, each its report, one table of the two."""
    a = save_hf(tmp_path / "v3", *CASES["v3"])
    b = save_hf(tmp_path / "v2", *CASES["v2"])
    out = tmp_path / "cmp"
    assert cli.main(["inspect", str(a), str(b), "--data", str(corpus), "--out", str(out), "--batches", "1",
                     "--batch-size", "2", "--seq-len", "16", "--redundancy-batches", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("MaxVio_global: mean") == 2 and f"comparison: {out / 'compare.md'}" in printed
    table = (out / "compare.md").read_text()
    assert "|  | v3 | v2 |" in table and "sigmoid" in table and "softmax" in table and "MaxVio_global" in table
    for name in ("v3", "v2"):
        results = json.loads((out / name / "results.json").read_text())
        assert f"{results['mean_maxvio_global']:.3f}" in table and results["corpus"] == str(corpus)
    assert cli.main(["inspect", str(a), str(b), str(a)]) == 1
    assert "give one model to inspect or two to compare" in capsys.readouterr().out
