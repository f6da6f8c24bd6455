"""MoEConfig (dsmoe.config): validation that names the bad field, parameter counting against a built MoE,
and fine-grained segmentation keeping total and active expert parameters constant."""

import dataclasses

import pytest
import torch

from dsmoe import ModelConfig, MoE, MoEConfig, TrainConfig

BASE = dict(dim=8, n_routed_experts=8, n_shared_experts=1, top_k=2, expert_dim=4)

BAD = [  # (changes, field named in the message, a word of the allowed values)
    (dict(n_groups=3), "n_groups", "divide"),
    (dict(n_groups=2, topk_groups=3), "topk_groups", "n_groups=2"),
    (dict(n_groups=4, topk_groups=1, top_k=3), "top_k", "topk_groups=1"),
    (dict(top_k=9), "top_k", "n_routed_experts=8"),
    (dict(n_groups=8, topk_groups=2, group_score="top2"), "group_score", "2 experts per group"),
    (dict(dim=0), "dim", "positive"),
    (dict(expert_dim=-4), "expert_dim", "positive"),
    (dict(n_routed_experts=0), "n_routed_experts", "positive"),
    (dict(top_k=0), "top_k", "positive"),
    (dict(n_groups=0), "n_groups", "positive"),
    (dict(topk_groups=0), "topk_groups", "positive"),
    (dict(dim=8.0), "dim", "integer"),
    (dict(n_shared_experts=-1), "n_shared_experts", ">= 0"),
    (dict(score_func="relu"), "score_func", "'softmax', 'sigmoid'"),
    (dict(group_score="sum"), "group_score", "'max', 'top2'"),
    (dict(bias_update_rule="clip"), "bias_update_rule", "'sign', 'proportional'"),
    (dict(aux_loss_alpha=-0.01), "aux_loss_alpha", ">= 0"),
    (dict(seq_aux_loss_alpha=-1e-4), "seq_aux_loss_alpha", ">= 0"),
    (dict(device_loss_alpha=-1.0), "device_loss_alpha", ">= 0"),
    (dict(comm_loss_alpha=-1.0), "comm_loss_alpha", ">= 0"),
    (dict(z_loss_beta=-1e-3), "z_loss_beta", ">= 0"),
    (dict(bias_update_speed=-1e-3), "bias_update_speed", ">= 0"),
    (dict(route_scale=0.0), "route_scale", "> 0"),
    (dict(capacity_factor=0.0), "capacity_factor", "> 0"),
    (dict(capacity_factor=-1.0), "capacity_factor", "> 0"),
]


@pytest.mark.parametrize("changes,field,allowed", BAD, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD)])
def test_bad_config_names_the_field(changes, field, allowed):
    with pytest.raises(ValueError) as info:
        MoEConfig(**{**BASE, **changes})
    assert field in str(info.value) and allowed in str(info.value)


@pytest.mark.parametrize("changes", [
    dict(n_groups=4, topk_groups=2, top_k=4),          # exactly the reachable experts
    dict(n_groups=4, topk_groups=4, group_score="top2"),
    dict(n_groups=8, topk_groups=2, group_score="max"),  # one expert per group is fine for max
    dict(n_routed_experts=1, top_k=1, group_score="top2"),  # top2 is irrelevant without groups
    dict(capacity_factor=1.0, score_func="sigmoid", bias_update_rule="proportional"),
], ids=["reachable-edge", "top2", "max-1-per-group", "top2-no-groups", "misc"])
def test_good_configs(changes):
    cfg = MoEConfig(**{**BASE, **changes})
    assert isinstance(cfg.score_func, str) and cfg.experts_per_group == cfg.n_routed_experts // cfg.n_groups


def test_replace_validates():
    cfg = MoEConfig(**BASE)
    assert cfg.replace(top_k=3).top_k == 3 and cfg.top_k == 2
    with pytest.raises(ValueError, match="top_k"):
        cfg.replace(top_k=100)


def count_module(cfg: MoEConfig) -> tuple[int, int]:
    """(total, active) parameters of a built MoE; active = router + K of the E experts + shared."""
    moe = MoE(cfg)
    total = sum(p.numel() for p in moe.parameters())
    per_expert = sum(p.numel() for p in moe.experts.parameters()) // cfg.n_routed_experts
    shared = sum(p.numel() for p in moe.shared_experts.parameters()) if moe.shared_experts else 0
    return total, moe.gate.weight.numel() + cfg.top_k * per_expert + shared


@pytest.mark.parametrize("changes", [{}, dict(n_shared_experts=0), dict(n_shared_experts=2, top_k=5, expert_dim=6)],
                         ids=["one-shared", "no-shared", "two-shared"])
def test_num_params_match_the_module(changes):
    cfg = MoEConfig(**{**BASE, **changes})
    total, active = count_module(cfg)
    assert cfg.num_params() == total
    assert cfg.num_active_params() == active


@pytest.mark.parametrize("n_shared", [0, 1, 2], ids=lambda s: f"shared{s}")
def test_segmentation_keeps_expert_params_constant(n_shared):
    """DeepSeekMoE §3.1: m*N experts of width F/m, top-m*K, K_s of them shared: the same total and active
    expert parameters for every m. Only the router [E, D] grows with the number of routed experts."""
    D, N, K, F = 8, 4, 2, 64
    counts = set()
    for m in (1, 2, 4, 8):
        if n_shared >= m * K:
            continue
        cfg = MoEConfig.segmented(dim=D, n_experts=N, top_k=K, expert_dim=F, m=m, n_shared=n_shared)
        assert (cfg.n_routed_experts, cfg.top_k, cfg.expert_dim) == (m * N - n_shared, m * K - n_shared, F // m)
        router = D * cfg.n_routed_experts
        total, active = count_module(cfg)
        assert (total, active) == (cfg.num_params(), cfg.num_active_params())
        counts.add((total - router, active - router))
    assert counts == {(3 * D * F * N, 3 * D * F * K)}


@pytest.mark.parametrize("kwargs,field", [
    (dict(m=0), "m"), (dict(m=3), "m"), (dict(m=1, n_shared=2), "n_shared"), (dict(m=2, n_shared=-1), "n_shared"),
], ids=["m0", "m-not-dividing", "too-many-shared", "negative-shared"])
def test_bad_segmentation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig.segmented(dim=8, n_experts=4, top_k=2, expert_dim=64, **kwargs)


def test_segmented_dense_baseline():
    """A dense FFN of width W is the baseline N=1, K=1: segmenting it gives a fine-grained MoE of equal size."""
    cfg = MoEConfig.segmented(dim=8, n_experts=1, top_k=1, expert_dim=32, m=4, n_shared=1)
    assert (cfg.n_routed_experts, cfg.top_k, cfg.n_shared_experts, cfg.expert_dim) == (3, 3, 1, 8)
    assert cfg.num_active_params() - 8 * 3 == 3 * 8 * 32
    moe = MoE(cfg)
    assert moe(torch.randn(2, 8)).shape == (2, 8)


def _float_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.type in ("float", "float | None")]


@pytest.mark.parametrize("cls", [MoEConfig, ModelConfig, TrainConfig], ids=lambda c: c.__name__)
def test_an_int_for_a_float_becomes_a_float_and_a_bool_is_refused(cls):
    """Where values enter (the library, --set, config.json): `beta1=0` is 0.0, so torch never sees an int where it
    takes a float (AdamW refused int betas); `lr=True` names the field instead of training at lr 1."""
    base = {MoEConfig: BASE, ModelConfig: {"dense_hidden": 16}}.get(cls, {})
    good = {"route_scale": 2, "capacity_factor": 1, "rope_theta": 10000, "norm_eps": 1, "lr": 1, "min_lr": 0,
            "dist_timeout_s": 60, "esft_top_p": 1}
    for name in _float_fields(cls):
        value = good.get(name, 0)
        cfg = cls(**{**base, name: value})
        assert type(getattr(cfg, name)) is float and getattr(cfg, name) == value, name
        with pytest.raises(ValueError, match=name):
            cls(**{**base, name: True})
        with pytest.raises(ValueError, match=name):  # an int beyond float's range: named, not an OverflowError
            cls(**{**base, name: 10**400})


@pytest.mark.parametrize("changes", [dict(vocab_size=True), dict(rope_theta=0), dict(norm_eps=0.0),
                                     dict(first_k_dense=1.5), dict(tie_embeddings="yes"), dict(rope_scaling=[1]),
                                     dict(moe="big")], ids=lambda c: next(iter(c)))
def test_bad_model_config_names_the_field(changes):
    with pytest.raises(ValueError, match=next(iter(changes))):
        ModelConfig(**{"dense_hidden": 16, **changes})


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("changes,field", [
    (dict(factor="x"), "rope_scaling.factor"), (dict(factor=0), "rope_scaling.factor"),
    (dict(original_max_position_embeddings=-3), "rope_scaling.original_max_position_embeddings"),
    (dict(beta_fast=float("nan")), "rope_scaling.beta_fast"), (dict(mscale=-1), "rope_scaling.mscale"),
    (dict(rope_type="linear"), "rope_scaling")], ids=lambda c: str(c))
def test_bad_yarn_scaling_names_the_field(changes, field):
    with pytest.raises(ValueError, match=f"{field}="):
        ModelConfig(dense_hidden=16, rope_scaling=YARN | changes)
    with pytest.raises(ValueError, match="rope_theta"):  # yarn's ramp divides by log(rope_theta)
        ModelConfig(dense_hidden=16, rope_scaling=YARN, rope_theta=1.0)
    assert ModelConfig(dense_hidden=16, rope_scaling=YARN | {"mscale": 0, "mscale_all_dim": 0.7}).rope_scaling
