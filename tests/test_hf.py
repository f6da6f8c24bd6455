"""HuggingFace DeepSeek-V2/V3 compatibility (dsmoe.hf): a dsmoe MoE loaded from transformers' own
DeepseekV2Moe / DeepseekV3MoE computes the same outputs; configs and weights round-trip; bad configs and
bad state dicts fail with clear errors."""

from typing import cast

import pytest
import torch

from dsmoe import hf
from dsmoe.config import MoEConfig
from dsmoe.moe import MoE

transformers = pytest.importorskip("transformers", minversion="5.0")  # 5.x: fused experts, these routers
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402

D, F = 16, 8
TINY = dict(hidden_size=D, moe_intermediate_size=F, num_attention_heads=2, num_key_value_heads=2)

# (model_type, config fields, semantics): transformers' module must equal dsmoe read with `semantics`.
CASES = {
    "v3-groups": ("deepseek_v3", dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                                      n_group=4, topk_group=2), "deepseek"),
    "v3-no-norm": ("deepseek_v3", dict(n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, n_group=2,
                                       topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.5), "deepseek"),
    "v3-one-group": ("deepseek_v3", dict(n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2,
                                         n_group=1, topk_group=1), "deepseek"),
    "v3-k1-transformers": ("deepseek_v3", dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=1,
                                               n_group=4, topk_group=2), "transformers"),
    "v3-k1-deepseek": ("deepseek_v3", dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=1,
                                           n_group=4, topk_group=2), "deepseek"),  # inference/model.py normalizes
    "v2-greedy": ("deepseek_v2", dict(n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                                      topk_method="greedy", routed_scaling_factor=2.0), "deepseek"),
    "v2-group-limited": ("deepseek_v2", dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                                             topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                             routed_scaling_factor=16.0), "deepseek"),
    "v2-norm-transformers": ("deepseek_v2", dict(n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
                                                 norm_topk_prob=True, routed_scaling_factor=2.0), "transformers"),
}


def hf_module(model_type: str, fields: dict, seed: int = 0):
    """transformers' own MoE block with random weights (and a nonzero V3 bias), in eval mode."""
    Config = transformers.DeepseekV3Config if model_type == "deepseek_v3" else transformers.DeepseekV2Config
    config = Config(**TINY, **fields)
    config._experts_implementation = "eager"  # standalone experts module: the plain per-expert loop
    module = (DeepseekV3MoE if model_type == "deepseek_v3" else DeepseekV2Moe)(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if model_type == "deepseek_v3":
            bias = cast(torch.Tensor, module.gate.e_score_correction_bias)  # mypy: the V2 block's gate has none
            bias.copy_(torch.randn(fields["n_routed_experts"], generator=g) * 0.2)
    return config, module


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_transformers(case):
    model_type, fields, semantics = case
    config, module = hf_module(model_type, fields)
    layer = MoE(hf.moe_config_from_hf(config.to_dict(), semantics)).eval()
    hf.load_hf_state_dict(layer, module.state_dict())  # transformers' fused experts, unfused on load
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), module(x), rtol=1e-5, atol=1e-5)  # outputs reach ~50
        _, _, ids_ref = module.gate(x)
        _, ids, _, _ = layer.gate(x.view(-1, D))
    assert torch.equal(ids.sort(-1).values, ids_ref.sort(-1).values)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_dsmoe_weights_load_into_transformers(model_type):
    """The other direction: dsmoe's hf_state_dict, fused, is a valid transformers state dict."""
    fields = CASES["v3-groups" if model_type == "deepseek_v3" else "v2-group-limited"][1]
    config, module = hf_module(model_type, fields)
    layer = MoE(hf.moe_config_from_hf(config.to_dict())).eval()
    if model_type == "deepseek_v3":
        layer.gate.bias.normal_(0, 0.2)
    module.load_state_dict(hf.fuse_experts(hf.hf_state_dict(layer)), strict=True)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), module(x), rtol=1e-5, atol=1e-5)


def test_v2_norm_follows_deepseek_code_by_default():
    """DeepSeek's V2 code normalizes OR scales; transformers' V2 ignores norm_topk_prob and scales."""
    d = dict(model_type="deepseek_v2", hidden_size=D, moe_intermediate_size=F, n_routed_experts=8,
             num_experts_per_tok=3, norm_topk_prob=True, routed_scaling_factor=16.0)
    cfg = hf.moe_config_from_hf(d)
    assert (cfg.norm_topk_prob, cfg.route_scale) == (True, 1.0)
    assert (lambda c: (c.norm_topk_prob, c.route_scale))(hf.moe_config_from_hf(d, "transformers")) == (False, 16.0)
    weights, _, _, _ = MoE(cfg).gate(torch.randn(5, D))
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    single = hf.moe_config_from_hf(d | dict(num_experts_per_tok=1))  # K=1: DeepSeek's code takes the scale branch
    assert (single.norm_topk_prob, single.route_scale) == (False, 16.0)


K1_WEIGHT = {"deepseek": True, "transformers": True, "deepseek-hub": False}  # semantics: normalizes one weight?


@pytest.mark.parametrize("semantics,normalized", K1_WEIGHT.items(), ids=K1_WEIGHT.keys())
def test_v3_single_weight_per_semantics(semantics, normalized):
    """V3, K=1, norm_topk_prob: DeepSeek-V3's inference/model.py and transformers normalize the one weight to 1
    (then route_scale); DeepSeek's hub modeling code keeps the raw sigmoid score."""
    cfg = hf.moe_config_from_hf(GOOD | dict(num_experts_per_tok=1, routed_scaling_factor=2.5), semantics)
    assert cfg.norm_topk_prob == normalized and cfg.route_scale == 2.5
    weights, ids, scores, _ = MoE(cfg).gate(torch.randn(5, D, generator=torch.Generator().manual_seed(0)))
    expected = torch.full((5, 1), 2.5) if normalized else 2.5 * scores.gather(1, ids)
    torch.testing.assert_close(weights, expected)
    if not normalized:
        assert (weights < 2.5).all()  # sigmoid scores < 1: the two readings really differ


@pytest.mark.parametrize("seq_aux,alpha,expected", [(True, 1e-3, "routed"), (False, 1e-3, "topk"), (True, 0, "topk")],
                         ids=["seq-aux", "expert-level", "no-loss"])
def test_v2_sequence_loss_counts_routed_experts(seq_aux, alpha, expected):
    """DeepSeek-V2's sequence-wise loss counts the routed experts (its eq. 24 and code); V3's the top-K."""
    d = dict(model_type="deepseek_v2", hidden_size=D, moe_intermediate_size=F, n_routed_experts=8,
             num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=4, topk_group=2,
             aux_loss_alpha=alpha, seq_aux=seq_aux)
    assert hf.moe_config_from_hf(d).seq_aux_experts == expected
    assert hf.moe_config_from_hf(GOOD | dict(aux_loss_alpha=1e-3, seq_aux=True)).seq_aux_experts == "topk"


def test_release_configs():
    """Field values of the released V3 and V2-Lite config.json files (DeepSeek-V3 and V2-Lite releases)."""
    v3 = dict(model_type="deepseek_v3", hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256,
              n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
              norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", aux_loss_alpha=0.001,
              seq_aux=True)
    assert hf.moe_config_from_hf(v3) == MoEConfig(
        dim=7168, n_routed_experts=256, n_shared_experts=1, top_k=8, expert_dim=2048, score_func="sigmoid",
        norm_topk_prob=True, route_scale=2.5, n_groups=8, topk_groups=4, group_score="top2",
        seq_aux_loss_alpha=0.001)
    lite = dict(model_type="deepseek_v2", hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64,
                n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                norm_topk_prob=False, scoring_func="softmax", topk_method="greedy", aux_loss_alpha=0.001,
                seq_aux=True)
    assert hf.moe_config_from_hf(lite) == MoEConfig(  # V2's sequence-wise loss counts the routed experts
        dim=2048, n_routed_experts=64, n_shared_experts=2, top_k=6, expert_dim=1408, seq_aux_loss_alpha=0.001,
        seq_aux_experts="routed")
    minimal = {k: v3[k] for k in ("model_type", "hidden_size", "moe_intermediate_size", "n_routed_experts",
                                  "num_experts_per_tok")}
    assert hf.moe_config_from_hf(minimal) == hf.moe_config_from_hf(v3).replace(seq_aux_loss_alpha=0.0)  # V3 defaults


ROUND_TRIP = {
    "default": MoEConfig(),
    "v3-like": MoEConfig(dim=32, n_routed_experts=16, n_shared_experts=1, top_k=4, expert_dim=8,
                         score_func="sigmoid", norm_topk_prob=True, route_scale=2.5, n_groups=4, topk_groups=2,
                         group_score="top2", seq_aux_loss_alpha=1e-4),
    "v2-grouped": MoEConfig(dim=32, n_routed_experts=16, top_k=3, expert_dim=8, route_scale=16.0, n_groups=4,
                            topk_groups=3, aux_loss_alpha=0.003),
    "v2-norm": MoEConfig(dim=32, n_routed_experts=8, n_shared_experts=0, top_k=2, expert_dim=8,
                         norm_topk_prob=True),
    "v2-seq-aux": MoEConfig(dim=32, n_routed_experts=16, top_k=3, expert_dim=8, n_groups=4, topk_groups=3,
                            seq_aux_loss_alpha=0.003, seq_aux_experts="routed"),
    "v3-k1-norm": MoEConfig(dim=32, n_routed_experts=16, n_shared_experts=1, top_k=1, expert_dim=8,
                            score_func="sigmoid", norm_topk_prob=True, route_scale=2.5, n_groups=4, topk_groups=2,
                            group_score="top2"),
}


@pytest.mark.parametrize("cfg", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_config_round_trip(cfg):
    assert hf.moe_config_from_hf(hf.moe_config_to_hf(cfg)) == cfg


BAD_TO_HF = {
    "v2-norm-and-scale": (dict(norm_topk_prob=True, route_scale=2.0), "normalizes OR scales"),
    "two-aux-losses": (dict(aux_loss_alpha=0.01, seq_aux_loss_alpha=1e-4), "one auxiliary loss"),
    "sigmoid-max-groups": (dict(score_func="sigmoid", n_groups=2, topk_groups=1), "group_score='max'"),
    "uniform-routing": (dict(uniform_routing=True), "uniform_routing"),
    "v2-norm-k1": (dict(norm_topk_prob=True, top_k=1), "top_k=1"),
    "v2-seq-topk": (dict(seq_aux_loss_alpha=1e-3), "seq_aux_experts='topk' .* deepseek_v2, .* 'routed'"),
    "v3-seq-routed": (dict(score_func="sigmoid", seq_aux_loss_alpha=1e-4, seq_aux_experts="routed"),
                      "seq_aux_experts='routed' .* deepseek_v3, .* 'topk'"),
}


@pytest.mark.parametrize("changes,match", BAD_TO_HF.values(), ids=BAD_TO_HF.keys())
def test_to_hf_rejects_unrepresentable(changes, match):
    with pytest.raises(ValueError, match=match):
        hf.moe_config_to_hf(MoEConfig(**(dict(dim=16, n_routed_experts=8, top_k=2, expert_dim=8) | changes)))


GOOD = dict(model_type="deepseek_v3", hidden_size=D, moe_intermediate_size=F, n_routed_experts=8,
            num_experts_per_tok=2, n_group=4, topk_group=2)
BAD_FROM_HF = {
    "model-type": (dict(model_type="mixtral"), "model_type='mixtral' is not supported"),
    "no-model-type": (dict(model_type=None), "model_type=None is not supported"),
    "v3-topk-method": (dict(topk_method="group_limited_greedy"), "topk_method='group_limited_greedy'"),
    "v2-noaux": (dict(model_type="deepseek_v2", topk_method="noaux_tc"), "topk_method='noaux_tc'"),
    "v3-softmax": (dict(scoring_func="softmax"), "scoring_func='softmax'"),
    "v2-sigmoid": (dict(model_type="deepseek_v2", scoring_func="sigmoid"), "scoring_func='sigmoid'"),
    "missing-field": (dict(moe_intermediate_size=None), r"moe_intermediate_size"),
    "no-groups": (dict(model_type="deepseek_v2", topk_method="group_limited_greedy", n_group=None),
                  "needs n_group"),
    "bad-groups": (dict(n_group=3), "must divide n_routed_experts"),
    "zero-experts": (dict(n_routed_experts=0), "n_routed_experts=0 is invalid: must be an integer >= 1"),
    "negative-shared": (dict(n_shared_experts=-1), "n_shared_experts=-1 is invalid: must be an integer >= 0"),
    "zero-scale": (dict(routed_scaling_factor=0), "routed_scaling_factor=0 is invalid: must be a finite number > 0"),
    "empty-alpha": (dict(aux_loss_alpha=""), "aux_loss_alpha='' is invalid"),  # never silently 0
    "empty-scoring": (dict(scoring_func=""), "scoring_func='' is not supported"),  # never silently the default
}


@pytest.mark.parametrize("changes,match", BAD_FROM_HF.values(), ids=BAD_FROM_HF.keys())
def test_from_hf_rejects_bad_config(changes, match):
    with pytest.raises(ValueError, match=match):
        hf.moe_config_from_hf(GOOD | changes)


def test_from_hf_rejects_bad_semantics():
    with pytest.raises(ValueError, match="semantics='vllm'"):
        hf.moe_config_from_hf(GOOD, semantics="vllm")


def random_layer(cfg: MoEConfig) -> MoE:
    layer = MoE(cfg)
    layer.gate.bias.normal_()
    return layer


SMALL = {
    "v3": hf.moe_config_from_hf(GOOD),
    "v2": MoEConfig(dim=D, n_routed_experts=4, n_shared_experts=2, top_k=2, expert_dim=F),
}


@pytest.mark.parametrize("cfg", SMALL.values(), ids=SMALL.keys())
def test_state_dict_round_trip(cfg):
    a = random_layer(cfg) if cfg.score_func == "sigmoid" else MoE(cfg)
    sd = hf.hf_state_dict(a)
    assert set(sd) == set(hf.expected_shapes(cfg))
    assert ("gate.e_score_correction_bias" in sd) == (cfg.score_func == "sigmoid")
    b = MoE(cfg)
    assert hf.load_hf_state_dict(b, sd) == ([], [])
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert b.gate.bias.dtype == torch.float32
    sd2 = hf.hf_state_dict(b)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    sd["experts.0.gate_proj.weight"].add_(1)  # plain tensors, not views into the layer
    assert not torch.equal(sd["experts.0.gate_proj.weight"], b.experts.w_gate[0])
    assert all(torch.equal(v, hf.unfuse_experts(hf.fuse_experts(sd2))[k]) for k, v in sd2.items())


def test_load_reports_missing_and_unexpected_keys():
    layer = MoE(SMALL["v3"])
    sd = hf.hf_state_dict(layer)
    del sd["experts.3.up_proj.weight"]
    sd["experts.8.up_proj.weight"] = torch.zeros(F, D)
    with pytest.raises(KeyError, match=r"missing keys \[experts.3.up_proj.weight\].*unexpected keys "
                                       r"\[experts.8.up_proj.weight\]"):
        hf.load_hf_state_dict(layer, sd)
    assert hf.load_hf_state_dict(layer, sd, strict=False) == (["experts.3.up_proj.weight"],
                                                           ["experts.8.up_proj.weight"])


def test_load_rejects_wrong_shapes():
    layer = MoE(SMALL["v2"])
    sd = hf.hf_state_dict(layer)
    sd["shared_experts.down_proj.weight"] = torch.zeros(D, F)  # width F, the layer has 2 shared experts
    with pytest.raises(ValueError, match=r"shared_experts.down_proj.weight: got \(16, 8\), expected \(16, 16\)"):
        hf.load_hf_state_dict(layer, sd, strict=False)


def test_v2_layer_with_bias_cannot_be_written():
    layer = random_layer(SMALL["v2"])
    with pytest.raises(ValueError, match="no gate.e_score_correction_bias"):
        hf.hf_state_dict(layer)


def test_unfuse_rejects_mismatched_fused_experts():
    sd = {"experts.gate_up_proj": torch.zeros(4, 2 * F, D), "experts.down_proj": torch.zeros(4, D, 2 * F)}
    with pytest.raises(ValueError, match=r"down_proj \[E, D, F\], got \(4, 16, 16\) and \(4, 16, 16\)"):
        hf.unfuse_experts(sd)
