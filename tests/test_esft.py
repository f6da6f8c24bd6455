"""ESFT (dsmoe.esft; arXiv 2407.01906): the selection rule on hand-built score tables (ties, p met exactly, p = 1,
zero scores, at least one expert) and as a property; the scores as the paper defines them, recomputed from each
layer's own routing; an ESFT fine-tune of a tiny DeepSeek-V3 folder leaves every frozen tensor bit-identical
(other experts, attention, embeddings, routers, balancing bias), also across a resume, and changes the chosen
ones; its adapter, merged into the base folder or applied in memory, reproduces the trained model's logits; bad
settings are errors that name the field."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from dsmoe import esft
from dsmoe.cli import main
from dsmoe.config import TrainConfig
from dsmoe.presets import build_configs, preset
from dsmoe.pretrained import from_pretrained

transformers = pytest.importorskip("transformers", minversion="5.0")

# ---- the selection rule ---------------------------------------------------------------------------------------

TABLES = {  # scores of one layer's experts, p, the experts kept (highest score first)
    "first-expert-meets-p": ([0.5, 0.3, 0.2], 0.5, [0]),
    "second-crosses-p": ([0.5, 0.3, 0.2], 0.6, [0, 1]),
    "p-1-takes-all": ([0.5, 0.3, 0.2], 1.0, [0, 1, 2]),
    "sorted-by-score": ([0.1, 0.6, 0.3], 0.7, [1, 2]),
    "ties-lower-id-first": ([0.25, 0.25, 0.25, 0.25], 0.5, [0, 1]),
    "tie-across-p": ([0.125, 0.375, 0.375, 0.125], 0.5, [1, 2]),
    "decimal-sum-meets-p": ([0.7, 0.1, 0.1, 0.1], 0.9, [0, 1, 2]),
    "tiny-p-keeps-one": ([0.3, 0.3, 0.4], 1e-6, [2]),
    "zero-scores-never": ([0.0, 0.6, 0.0, 0.4], 1.0, [1, 3]),
    "mass-below-p-keeps-nonzero": ([0.05, 0.1, 0.0, 0.0], 0.5, [1, 0]),
    "all-zero-keeps-one": ([0.0, 0.0, 0.0], 0.2, [0]),
    "one-expert": ([1.0], 1.0, [0]),
}


@pytest.mark.parametrize("scores,p,kept", TABLES.values(), ids=TABLES.keys())
def test_selection_on_hand_built_tables(scores, p, kept):
    assert esft.select_experts(scores, p) == kept


@settings(max_examples=200, deadline=None)
@given(scores=st.lists(st.one_of(st.just(0.0), st.floats(0, 1)), min_size=1, max_size=16),
       p=st.floats(1e-6, 1.0))
def test_selection_is_the_smallest_top_scored_set_reaching_p(scores, p):
    """The paper's argmin: the kept experts are a prefix of the experts by score (ties by id), the fewest whose
    sum reaches p: without the last one the sum is below p; with it, p is reached (or no expert is left with a
    nonzero score)."""
    kept = esft.select_experts(scores, p)
    order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
    assert kept == order[:len(kept)] and len(kept) >= 1
    reached = lambda experts: math.fsum(scores[e] for e in experts) >= p - esft.REACH_TOLERANCE  # noqa: E731
    assert len(kept) == 1 or not reached(kept[:-1])
    assert len(kept) == 1 or all(scores[e] > 0 for e in kept)
    assert reached(kept) or all(scores[e] == 0 for e in order[len(kept):])


@pytest.mark.parametrize("scores,p", [([0.5, 0.5], 0.0), ([0.5, 0.5], 1.5), ([0.5, -0.1], 0.2),
                                      ([0.5, math.nan], 0.2), ([], 0.2)],
                         ids=["p-0", "p-above-1", "negative", "nan", "empty"])
def test_selection_refuses_bad_input(scores, p):
    with pytest.raises(ValueError, match="top_p|scores"):
        esft.select_experts(scores, p)


# ---- the scores ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_scores_as_the_paper_defines_them(score_func):
    """g_i = mean over tokens of the (per-token normalized) affinity where i is routed, else 0; r_i = share of
    the T*K assignments; recomputed here from each MoE layer's own input and router."""
    from dsmoe.model import MoETransformer
    from dsmoe.router import route

    cfg = preset("debug")
    cfg = dataclasses.replace(cfg, moe=cfg.moe.replace(score_func=score_func, n_groups=2, topk_groups=1))
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    inputs: dict[int, list[torch.Tensor]] = {}
    for i, layer in esft.moe_blocks(model):
        layer.gate.bias.copy_(torch.randn(cfg.moe.n_routed_experts) * 0.1)  # the bias decides the choice
        layer.register_forward_pre_hook(lambda m, args, i=i: inputs.setdefault(i, []).append(args[0].flatten(0, -2)))
    batches = [(torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(s)), None)
               for s in range(2)]
    gate, token, tokens = esft.expert_scores(model, batches)
    assert tokens == 64 and set(gate) == set(token) == {i for i, _ in esft.moe_blocks(model)}
    for i, layer in esft.moe_blocks(model):
        x_TD = torch.cat(inputs[i])
        with torch.no_grad():
            _, ids_TK, scores_TE = route(x_TD @ layer.gate.weight.T, layer.gate.bias, layer.cfg)
        affinity_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        routed_TE = torch.zeros_like(scores_TE).scatter_(1, ids_TK, 1.0)
        torch.testing.assert_close(torch.tensor(gate[i]), (affinity_TE * routed_TE).mean(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(token[i]), routed_TE.mean(0) / cfg.moe.top_k)
        assert math.isclose(sum(token[i]), 1.0) and sum(gate[i]) <= 1.0


# ---- freezing rows of an [E, ...] tensor ----------------------------------------------------------------------

def test_kept_rows_train_as_adamw_would_and_frozen_rows_do_not_move():
    """The kept experts' rows follow plain AdamW (weight decay included) step for step; the frozen rows keep
    their bits, although AdamW decays every row of a tensor it updates."""
    from dsmoe.train import build_optimizer

    torch.manual_seed(0)
    keep = torch.tensor([1, 3])
    ours, plain = torch.nn.Parameter(torch.randn(4, 3, 2)), torch.nn.Parameter(torch.randn(4, 3, 2))
    with torch.no_grad():
        plain.copy_(ours)
    start = ours.detach().clone()
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    frozen = torch.ones(4, 1, 1, dtype=torch.bool)
    frozen[keep] = False
    ours.register_hook(lambda g: g.masked_fill(frozen, 0))
    opt_ours = build_optimizer(torch.nn.ParameterList([ours]), cfg)
    esft.keep_frozen_rows(opt_ours, [(ours, keep)], cfg.weight_decay)
    opt_plain = build_optimizer(torch.nn.ParameterList([plain]), cfg)
    for step in range(3):
        target = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(step))
        for p, opt in ((ours, opt_ours), (plain, opt_plain)):
            ((p - target).square() * (~frozen)).sum().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(ours[keep], plain[keep], atol=1e-6, rtol=0)
    assert torch.equal(ours.detach()[frozen.flatten()], start[frozen.flatten()])
    assert not torch.equal(plain.detach()[frozen.flatten()], start[frozen.flatten()])  # plain AdamW decays them


# ---- a fine-tune ----------------------------------------------------------------------------------------------

V3 = dict(vocab_size=260, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
          num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
          v_head_dim=8, first_k_dense_replace=1, max_position_embeddings=64, n_shared_experts=1, q_lora_rank=None,
          n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)
RUN = ["--preset", "debug", "--set", "seq_len=32", "--set", "batch_size=4", "--set", "eval_batches=1",
       "--set", "tensorboard=false", "--set", "esft_score_batches=2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny DeepSeek-V3 folder (byte vocabulary, a nonzero balancing bias) and a corpus of Python files."""
    root = tmp_path_factory.mktemp("esft")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV3Config(**V3), dtype=torch.float32)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape) * 0.05)
    model.save_pretrained(root / "hf")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        text = "".join(f"def f{i}_{j}(x):\n    return x * {j % 5} + {j}\n" for j in range(40))
        (corpus / f"m{i}.py").write_text(text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSMOE_CACHE", str(root / "cache"))
        yield root / "hf", corpus


@pytest.fixture(scope="module")
def gate_run(base, tmp_path_factory):
    """`dsmoe train --init BASE --set esft=gate --set esft_top_p=0.1`, 4 steps: the run directory and what it
    printed (the progress bar goes to stderr)."""
    folder, corpus = base
    out = tmp_path_factory.mktemp("gate") / "run"
    argv = ["train", "--init", str(folder), "--data", str(corpus), "--out", str(out), "--steps", "4", *RUN,
            "--set", "esft=gate", "--set", "esft_top_p=0.1"]
    with pytest.MonkeyPatch.context() as mp:
        lines: list[str] = []
        mp.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
        assert main(argv) == 0, lines
    return out, "\n".join(lines)


def _frozen_and_changed(before: dict, after: dict, trained: set) -> None:
    assert before.keys() == after.keys()
    for key in before:
        if key in trained:
            assert not torch.equal(before[key], after[key]), f"{key} was to train"
        else:
            assert torch.equal(before[key], after[key]), f"{key} was to stay frozen"


def test_esft_trains_the_chosen_experts_only(base, gate_run):
    folder, _ = base
    out, printed = gate_run
    selection = json.loads((out / "esft.json").read_text())
    experts = {int(k): v for k, v in selection["experts"].items()}
    assert set(experts) == {1, 2} and all(1 <= len(v) < 8 for v in experts.values())
    for layer, kept in experts.items():
        assert kept == esft.select_experts(selection["scores"][str(layer)], 0.1)
    trained = {f"model.layers.{layer}.mlp.experts.{e}.{name}_proj.weight"
               for layer, kept in experts.items() for e in kept for name in ("gate", "up", "down")}
    adapter = load_file(str(out / "esft" / "adapter.safetensors"))
    assert set(adapter) == trained
    # every tensor of the trained model (RUN/hf, written from it) against the base folder, bit for bit
    _frozen_and_changed(load_file(str(folder / "model.safetensors")), load_file(str(out / "hf" / "model.safetensors")),
                        trained)
    assert "ESFT-Gate (p=0.1" in printed and "experts trained per MoE layer 1:" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["esft"]["experts_per_layer"] == [len(experts[1]), len(experts[2])]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if r["kind"] == "esft"][0]["experts"] == selection["experts"]


def test_the_adapter_merged_into_the_base_reproduces_the_trained_logits(base, gate_run, tmp_path):
    from dsmoe.checkpoint import load_checkpoint

    folder, _ = base
    out, _ = gate_run
    assert main(["esft-merge", str(out / "esft"), "--base", str(folder), "--out", str(tmp_path / "merged")]) == 0
    trained = load_checkpoint(out)[0].eval()
    ids = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(ids)[0]
        torch.testing.assert_close(from_pretrained(tmp_path / "merged")(ids)[0], want, atol=1e-6, rtol=0)
        applied = esft.load_adapter(from_pretrained(folder), out / "esft")  # the same, in memory
        torch.testing.assert_close(applied(ids)[0], want, atol=1e-6, rtol=0)
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for key, t in load_file(str(out / "hf" / "model.safetensors")).items():
        assert torch.equal(merged[key], t), key
    # the base the adapter records is the default; a folder that is not empty is refused
    assert main(["esft-merge", str(out / "esft"), "--out", str(tmp_path / "again")]) == 0
    with pytest.raises(esft.AdapterError, match="not empty"):
        esft.merge_adapter(out / "esft", tmp_path / "merged", folder)


def test_merge_refuses_another_base(base, gate_run, tmp_path):
    folder, _ = base
    out, _ = gate_run
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    sd = load_file(str(other / "model.safetensors"))
    key = next(iter(load_file(str(out / "esft" / "adapter.safetensors"))))
    sd[key] = sd[key] + 1e-3
    save_file(sd, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(esft.AdapterError, match="not the base this adapter was trained from"):
        esft.merge_adapter(out / "esft", tmp_path / "merged", other)
    with pytest.raises(esft.AdapterError, match="not an ESFT adapter"):
        esft.merge_adapter(folder, tmp_path / "merged", folder)


def test_token_scores_with_shared_experts_stay_frozen_across_a_resume(base, tmp_path):
    """ESFT-Token training the shared experts too, stopped after 2 steps and resumed to 4: the resumed run keeps
    its experts (RUN/esft.json) and its frozen rows (AdamW's groups rebuilt, weight decay kept off them)."""
    from dsmoe.train import run_configs, train

    folder, corpus = base
    sets = ["seq_len=32", "batch_size=4", "eval_batches=1", "tensorboard=false", "esft=token", "esft_top_p=0.3",
            "esft_train_shared=true", "esft_score_batches=2", f"data={corpus}", f"out={tmp_path / 'run'}"]
    model_cfg, train_cfg, _ = run_configs("debug", [*sets, "steps=2"], init=str(folder))
    assert model_cfg.moe.bias_update_speed == 0  # ESFT keeps the base's routing
    train(model_cfg, train_cfg, progress=False)
    first = load_file(str(tmp_path / "run" / "esft" / "adapter.safetensors"))
    train(*run_configs(None, ["steps=4"], resume=str(tmp_path / "run"))[:2], progress=False)
    selection = json.loads((tmp_path / "run" / "esft.json").read_text())
    assert selection["score"] == "token"
    kept = {int(k): v for k, v in selection["experts"].items()}
    for layer, experts in kept.items():
        assert math.isclose(sum(selection["scores"][str(layer)]), 1.0)
        assert sum(sorted(selection["scores"][str(layer)], reverse=True)[:len(experts)]) >= 0.3 - 1e-9
    trained = {f"model.layers.{layer}.mlp.experts.{e}.{name}_proj.weight"
               for layer, experts in kept.items() for e in experts for name in ("gate", "up", "down")}
    trained |= {f"model.layers.{layer}.mlp.shared_experts.{name}_proj.weight"
                for layer in kept for name in ("gate", "up", "down")}
    adapter = load_file(str(tmp_path / "run" / "esft" / "adapter.safetensors"))
    assert set(adapter) == set(first) == trained
    assert any(not torch.equal(adapter[k], first[k]) for k in adapter)  # the resumed steps trained them
    _frozen_and_changed(load_file(str(folder / "model.safetensors")),
                        load_file(str(tmp_path / "run" / "hf" / "model.safetensors")), trained)
    with pytest.raises(ValueError, match="esft_top_p=0.3 \\(requested 0.5\\)"):
        train(*run_configs(None, ["steps=6", "esft_top_p=0.5"], resume=str(tmp_path / "run"))[:2], progress=False)


def test_training_the_rest_too_freezes_only_the_other_experts_and_the_bias(base, tmp_path):
    """esft_train_rest: attention, embeddings, norms, routers, dense FFN and head train with the chosen experts;
    the other experts, the shared ones (esft_train_shared is apart) and the balancing bias stay the base's; the
    adapter holds everything that trained."""
    from dsmoe.train import run_configs, train

    folder, corpus = base
    sets = ["steps=2", "seq_len=32", "batch_size=4", "eval_batches=1", "tensorboard=false", "esft=gate",
            "esft_top_p=0.1", "esft_train_rest=true", "esft_score_batches=1", f"data={corpus}", f"out={tmp_path}"]
    summary = train(*run_configs("debug", sets, init=str(folder))[:2], progress=False)
    kept = {int(k): v for k, v in summary["esft"]["experts"].items()}
    before = load_file(str(folder / "model.safetensors"))
    frozen = {f"model.layers.{layer}.mlp.experts.{e}.{name}_proj.weight"
              for layer in kept for e in range(8) if e not in kept[layer] for name in ("gate", "up", "down")}
    frozen |= {k for k in before if k.endswith("e_score_correction_bias") or ".shared_experts." in k}  # no train_shared
    adapter = load_file(str(tmp_path / "esft" / "adapter.safetensors"))
    assert set(adapter) == set(before) - frozen and "model.layers.1.mlp.gate.weight" in adapter
    _frozen_and_changed(before, load_file(str(tmp_path / "hf" / "model.safetensors")), set(adapter))
    assert 0 < summary["esft"]["trained_params"] < summary["esft"]["total_params"]


# ---- bad settings ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sets,match", [
    (["esft=gate"], "esft='gate' is invalid: .*--init"),
    (["esft=experts"], "esft='experts' is invalid: choose 'gate'"),
    (["esft_train_shared=true"], "esft_train_shared=True is invalid: applies to ESFT only"),
], ids=["no-init", "unknown-score", "shared-without-esft"])
def test_bad_settings_without_a_folder(sets, match):
    from dsmoe.train import run_configs

    with pytest.raises(ValueError, match=match):
        run_configs("debug", sets)


@pytest.mark.parametrize("sets,match", [
    (["esft=token", "esft_top_p=0"], "esft_top_p=0.0 is invalid: must be a number in \\(0, 1\\]"),
    (["esft=token", "esft_top_p=1.5"], "esft_top_p=1.5 is invalid"),
    (["esft=token", "esft_score_batches=0"], "esft_score_batches=0 is invalid"),
    (["esft=gate", "moe.bias_update_speed=0.001"], "moe.bias_update_speed=0.001 is invalid with esft='gate'"),
], ids=["p-0", "p-above-1", "no-batches", "bias-trains"])
def test_bad_settings_with_a_folder(base, sets, match, tmp_path):
    from dsmoe.train import run_configs, train

    folder, _ = base
    with pytest.raises(ValueError, match=match):
        train(*run_configs("debug", [*sets, f"out={tmp_path}"], init=str(folder))[:2], progress=False)


def test_a_dense_model_is_refused(base, tmp_path, capsys):
    from dsmoe.train import train

    folder, _ = base
    model_cfg, train_cfg = build_configs("debug-dense", [f"out={tmp_path}"])
    with pytest.raises(ValueError, match="esft='gate' is invalid: .*no MoE layers"):
        train(model_cfg, dataclasses.replace(train_cfg, esft="gate", init=str(folder)), progress=False)
    assert esft.check_config(model_cfg, TrainConfig()) is None  # without esft, nothing to check
    assert main(["train", "--preset", "debug", "--set", "esft=token"]) == 1
    assert "esft='token' is invalid" in capsys.readouterr().out


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_any_family_trains_and_merges_back(model_type, base, tmp_path):
    """Mixtral's block_sparse_moe.experts.E.w1/w2/w3 and Qwen2-MoE's gated shared expert (esft_train_shared): the
    adapter holds exactly the trained tensors under the family's own keys and merges back to the trained logits."""
    from dsmoe.checkpoint import load_checkpoint
    from test_families import hf_model

    _, corpus = base
    hf_model(model_type, {"vocab_size": 260}).save_pretrained(tmp_path / "hf")
    out = tmp_path / "run"
    argv = ["train", "--init", str(tmp_path / "hf"), "--data", str(corpus), "--out", str(out), "--steps", "3", *RUN,
            "--set", "esft=token", "--set", "esft_top_p=0.3", "--set", "esft_train_shared=true", "--quiet"]
    assert main(argv) == 0
    adapter = set(load_file(str(out / "esft" / "adapter.safetensors")))
    experts = {int(k): v for k, v in json.loads((out / "esft.json").read_text())["experts"].items()}
    names = ("w1", "w2", "w3") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    block = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    want = {f"model.layers.{i}.{block}.experts.{e}.{n}.weight" for i, kept in experts.items() for e in kept
            for n in names}
    if model_type == "qwen2_moe":  # its shared expert and the gate on it
        want |= {k for k in load_file(str(tmp_path / "hf" / "model.safetensors")) if ".mlp.shared_expert" in k
                 and int(k.split(".")[2]) in experts}
    assert adapter == want and want
    assert main(["esft-merge", str(out / "esft"), "--out", str(tmp_path / "merged")]) == 0
    ids = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path / "merged")(ids)[0],
                                   load_checkpoint(out)[0].eval()(ids)[0], atol=1e-6, rtol=0)
