"""dsmoe.studies: the studies' configurations keep what they claim constant, token kinds, the redundancy
test's expert masking against a slow reference, mutual information, and the whole machinery on a micro
model (results.json complete and finite; an interrupted study resumes without retraining finished runs)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import math
import os
import shutil

import pytest
import torch

from dsmoe import studies
from dsmoe.cli import main
from dsmoe.cli import study as study_cli
from dsmoe.config import ModelConfig, MoEConfig
from dsmoe.model import MoETransformer
from dsmoe.presets import build_configs, preset
from dsmoe.router import route
from dsmoe.studies import runner
from dsmoe.tokenizer import ByteTokenizer


def micro_model() -> ModelConfig:
    moe = MoEConfig(dim=16, n_routed_experts=16, n_shared_experts=1, top_k=2, expert_dim=8,
                    score_func="sigmoid", norm_topk_prob=True, bias_update_speed=1e-3)
    return ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16, first_k_dense=1, moe=moe)


# ---- configurations --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["debug", "tiny"], ids=["debug", "tiny"])
def test_segmentation_keeps_expert_params(name):
    """Every m, with or without a shared expert, has the same total and active expert width."""
    base = preset(name)
    widths = set()
    for v in studies.segmentation_variants(base):
        moe = v.model.moe
        if moe is None:
            continue
        total = (moe.n_routed_experts + moe.n_shared_experts) * moe.expert_dim
        active = (moe.top_k + moe.n_shared_experts) * moe.expert_dim
        widths.add((total, active, v.model.dense_hidden))
    assert len(widths) == 1


@pytest.mark.parametrize("name", ["debug", "tiny"], ids=["debug", "tiny"])
def test_shared_study_constant_fine_experts(name):
    variants = studies.shared_variants(preset(name))
    assert [v.info["shared"] for v in variants] == list(studies.SHARED_COUNTS)
    assert len({(v.model.moe.n_routed_experts + v.model.moe.n_shared_experts,
                 v.model.moe.top_k + v.model.moe.n_shared_experts) for v in variants}) == 1


def test_segmentation_core_reuses_the_full_studies_runs():
    """Every run of the core subset is a run of segmentation or shared (same model config, same cache key)."""
    base = preset("tiny")
    full = [v.model for v in studies.segmentation_variants(base) + studies.shared_variants(base)]
    core = studies.segmentation_core_variants(base)
    assert [v.model in full for v in core] == [True] * len(core)
    assert [(v.info["m"], v.info["shared"]) for v in core] == list(studies.SEGMENTATION_CORE)
    assert [v.group == "dense" for v in core] == [m == 0 for m, _ in studies.SEGMENTATION_CORE]


def test_run_key_follows_what_changes_the_run():
    """The cache key changes with any field that changes the computation, not with where a run writes, its
    runtime checks, or an option spelled out at its default (so new options keep old caches)."""
    model, train_cfg = build_configs("debug", [])
    key = studies.run_key(model, train_cfg, "corpus")
    same = [(dataclasses.replace(model, moe=model.moe.replace(check_inputs=False)), train_cfg),
            (model, dataclasses.replace(train_cfg, out="elsewhere", tensorboard=True)),
            (dataclasses.replace(model, rope_scaling=None, mtp_layers=0), train_cfg)]
    other = [(dataclasses.replace(model, n_layers=model.n_layers + 1), train_cfg),
             (dataclasses.replace(model, moe=model.moe.replace(top_k=model.moe.top_k + 1)), train_cfg),
             (model, dataclasses.replace(train_cfg, seed=train_cfg.seed + 1))]
    assert [studies.run_key(m, t, "corpus") for m, t in same] == [key] * len(same)
    assert len({key, studies.run_key(model, train_cfg, "other corpus")} |
               {studies.run_key(m, t, "corpus") for m, t in other}) == 2 + len(other)


def test_dense_references_match_moe_sizes():
    """Dense same-active equals the MoE's active params up to the router; same-total within 2%."""
    base = preset("debug")
    moe_model = studies.segmented_model(base, 1, 0).model
    same_active, same_total = (v.model for v in studies.dense_models(base))
    router = base.n_moe_layers * base.dim * moe_model.moe.n_routed_experts
    assert same_active.num_params() == moe_model.num_active_params() - router
    assert abs(same_total.num_params() - moe_model.num_params()) / moe_model.num_params() < 0.02


def test_balance_methods_cover_the_spec():
    variants = studies.balance_variants(preset("debug"))
    by_gate = {g: [v for v in variants if v.group == g] for g in ("sigmoid", "softmax")}
    assert len(by_gate["sigmoid"]) == 9 and len(by_gate["softmax"]) == 8  # sigmoid: aux loss in both forms of P
    aux = {v.label: v.model.moe for v in by_gate["sigmoid"] if v.model.moe.aux_loss_alpha}
    assert {(m.aux_loss_alpha, str(m.aux_loss_scores)) for m in aux.values()} == {
        (a, how) for a in (1e-3, 1e-2) for how in ("normalized", "raw")}
    assert all(str(m.aux_loss_scores) in label for label, m in aux.items())
    speeds = sorted({v.model.moe.bias_update_speed for v in variants})
    assert speeds == [0.0, 1e-4, 1e-3, 1e-2]
    none = next(v for v in by_gate["sigmoid"] if v.label == "no balancing").model.moe
    assert none.bias_update_speed == none.aux_loss_alpha == none.seq_aux_loss_alpha == 0


def test_balance_core_is_a_subset_of_balance():
    """balance-core trains the very configurations of balance (so the two share runs), one per listed key."""
    base = preset("debug")
    full = {(v.group, v.label): v.model for v in studies.balance_variants(base)}
    core = studies.balance_core_variants(base)
    assert [(v.group, v.label) for v in core] == list(studies.BALANCE_CORE)
    assert all(full[(v.group, v.label)] == v.model for v in core)
    assert "balance-core" in studies.STUDIES and studies.VARIANTS["balance-core"] is studies.balance_core_variants


# ---- token kinds and information -----------------------------------------------------------------------


def test_char_kinds_hand_example():
    text = "if x1:  # no\n    print(3)"
    kinds = studies.char_kinds(text)
    expect = {0: "keyword", 3: "identifier", 4: "identifier", 5: "punctuation", 6: "space", 8: "comment",
              12: "newline", 17: "builtin", 22: "bracket", 23: "digit"}
    assert {i: kinds[i] for i in expect} == expect


def test_token_kinds_bytes_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode("é'") + [tok.eos_id]
    assert [studies.KINDS[k] for k in studies.token_kinds(ids, tok)] == ["other", "other", "quote", "special"]


@pytest.mark.parametrize("counts,expect", [([[5, 5], [5, 5]], 0.0), ([[10, 0], [0, 10]], 1.0)],
                         ids=["independent", "determined"])
def test_mutual_information(counts, expect):
    mi, frac = studies.mutual_information(counts)
    assert mi == pytest.approx(expect) and frac == pytest.approx(expect)


# ---- redundancy test masking --------------------------------------------------------------------------


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"], ids=["sigmoid", "softmax"])
@pytest.mark.parametrize("n", [1, 2, 3], ids=["top1", "top2", "top3"])
def test_disable_top_experts_matches_reference(score_func, n):
    """With the top-n disabled a token takes its choices n+1..n+K, weighted by their unbiased scores."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(micro_model(), moe=micro_model().moe.replace(score_func=score_func))
    model = MoETransformer(cfg)
    gate = model.moe_layers()[0].gate
    gate.bias.uniform_(-0.1, 0.1)
    x_TD = torch.randn(32, cfg.dim)
    with studies.disable_top_experts(model, n):
        weights_TK, ids_TK, scores_TE, _ = gate(x_TD)
    logits_TE = x_TD @ gate.weight.T
    ranked_TE = (route(logits_TE, gate.bias, gate.cfg)[2] + gate.bias).argsort(dim=-1, descending=True)
    K = gate.cfg.top_k
    assert torch.equal(ids_TK.sort(-1).values, ranked_TE[:, n:n + K].sort(-1).values)
    w_TK = scores_TE.gather(1, ids_TK)
    if gate.cfg.norm_topk_prob:
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
    torch.testing.assert_close(weights_TK, w_TK * gate.cfg.route_scale)
    assert gate.exclude_top == 0  # the router is restored


def test_disable_top_experts_rejects_too_many():
    model = MoETransformer(micro_model())
    with pytest.raises(ValueError, match="cannot disable 15 of 16 experts"):
        with studies.disable_top_experts(model, 15):
            pass
    assert all(m.gate.exclude_top == 0 for m in model.moe_layers())  # nothing was left excluded


# ---- the machinery end to end ---------------------------------------------------------------------------


def _finite(x, path="results") -> None:
    if isinstance(x, dict):
        for k, v in x.items():
            _finite(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _finite(v, f"{path}[{i}]")
    else:
        assert x is not None, f"{path} is empty"
        if isinstance(x, float):
            assert math.isfinite(x), f"{path} = {x}"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro base config: 2-layer 16-wide model, 2 steps, a small corpus of real Python source."""
    data = tmp_path_factory.mktemp("corpus")
    for name in ("dataclasses", "json.decoder", "string", "keyword"):
        (data / f"{name}.py").write_text(inspect.getsource(importlib.import_module(name)))
    _, train_cfg = build_configs("debug", [f"data={data}", "batch_size=2", "seq_len=16", "eval_batches=2"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `dsmoe study` does: tiny models only lose from more threads
    yield micro_model(), train_cfg
    torch.set_num_threads(threads)


def _run(micro, out, names, seeds=1):
    model, train_cfg = micro
    return studies.study(names, model, train_cfg, steps=2, seeds=seeds, out=out, log=lambda msg: None)


@pytest.mark.slow
def test_all_studies_write_complete_results(micro, tmp_path, monkeypatch):
    # a few variants of each study keep this fast; every code path of the studies still runs
    few = {"balance": lambda b: [studies.balance_variants(b)[i] for i in (0, 1, 3, 6, 15)],
           "balance-core": lambda b: studies.balance_core_variants(b)[:2],  # runs shared with balance's
           "shared": lambda b: studies.shared_variants(b)[:2],
           "segmentation": lambda b: studies.segmentation_variants(b)[::4],
           "segmentation-core": lambda b: studies.segmentation_core_variants(b)[:2]}
    for name, variants in few.items():
        monkeypatch.setitem(studies.VARIANTS, name, variants)
    _run(micro, tmp_path, list(studies.STUDIES))
    for name in studies.STUDIES:
        res = json.loads((tmp_path / name / "results.json").read_text())
        assert res["rows"] and res["steps"] == 2 and res["seeds"] == 1, name
        _finite(res["rows"], name)  # (the configs echoed beside the rows may hold None, e.g. data)
        assert (tmp_path / name / "results.md").read_text().count("|") > 10
        assert list((tmp_path / name).glob("*.png")), name
    rows = json.loads((tmp_path / "balance" / "results.json").read_text())["rows"]
    for r in rows:
        for key in ("val_ppl", "maxvio_global_mean", "maxvio_batch_mean", "dead_experts"):
            assert r[key]["mean"] >= 0 and len(r[key]["values"]) == 1
        assert r["curve"]["step"]


@pytest.mark.slow
def test_resume_skips_finished_runs(micro, tmp_path, monkeypatch):
    """An interrupted study trains only the runs that had not finished, and a finished one trains none."""
    real, calls = runner.train, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the third run dies half-way
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(micro, tmp_path, ["shared"], seeds=2)
    n_runs = len(studies.shared_variants(micro[0])) * 2  # 4 variants x 2 seeds
    calls.clear()
    monkeypatch.setattr(runner, "train", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    _run(micro, tmp_path, ["shared"], seeds=2)
    assert len(calls) == n_runs - 2
    calls.clear()
    _run(micro, tmp_path, ["shared"], seeds=2)
    assert calls == []


@pytest.mark.slow
def test_changed_corpus_trains_again(micro, tmp_path, monkeypatch):
    """A cached run belongs to its corpus: editing a corpus file makes the same study train again; touching
    one does not."""
    model, train_cfg = micro
    data = shutil.copytree(train_cfg.data, tmp_path / "corpus")
    mine = (model, dataclasses.replace(train_cfg, data=str(data)))
    monkeypatch.setitem(studies.VARIANTS, "shared", lambda b: studies.shared_variants(b)[:1])
    real, calls = runner.train, []
    monkeypatch.setattr(runner, "train", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for change, trained in ((None, 1), (None, 0), ("touch", 0), ("edit", 1)):
        if change == "touch":
            os.utime(data / "string.py", (1e9, 1e9))
        if change == "edit":
            with open(data / "string.py", "a") as f:
                f.write("\n# one more line\n")
        calls.clear()
        _run(mine, tmp_path / "out", ["shared"])
        assert len(calls) == trained


@pytest.mark.parametrize("argv,message", [(["--steps", "0"], "steps (0)"), (["--set", "nope=1"], "unknown --set key"),
                                          (["--threads", "0"], "--threads 0")],
                         ids=["zero-steps", "unknown-key", "zero-threads"])
def test_cli_rejects_bad_input(argv, message, tmp_path, capsys):
    assert main(["study", "balance", "--out", str(tmp_path), *argv]) == 1
    assert message in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # nothing was trained


def test_cli_help_names_default_steps():
    parser = argparse.ArgumentParser()
    study_cli.add_arguments(parser)
    assert "default per preset: debug 1200, tiny 1500" in " ".join(parser.format_help().split())
