"""The language model (dsmoe.model) and its config (dsmoe.config.ModelConfig): forward shapes, causal
masking, KV-cache decoding against full recomputation, grouped-query attention, parameter counts of every
preset (total, active, dense twins), auxiliary-loss summation, set_top_k, and clear errors."""

import pytest
import torch

from dsmoe.config import ModelConfig, MoEConfig
from dsmoe.model import MoETransformer
from dsmoe.moe import MoE
from dsmoe.presets import PRESETS, preset


def tiny_cfg(**kw) -> ModelConfig:
    """A two-block model (one dense, one MoE) small enough for sub-second tests."""
    moe = MoEConfig(dim=32, n_routed_experts=8, n_shared_experts=1, top_k=2, expert_dim=16,
                    score_func="sigmoid", norm_topk_prob=True, bias_update_speed=1e-3)
    base = dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=32,
                first_k_dense=1, moe=moe)
    return ModelConfig(**{**base, **kw})


def make_model(seed=0, **kw) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(tiny_cfg(**kw)).eval()


VARIANTS = {
    "mha": {},
    "gqa": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "untied": {"tie_embeddings": False},
    "all-moe": {"first_k_dense": 0},
    "dense": {"moe": None, "first_k_dense": 2, "dense_hidden": 48},
}


def actual_active_params(model: MoETransformer) -> float:
    """Parameters a token touches, counted on the module: routed experts scaled by top_k / E."""
    routed = {id(p): m.cfg.top_k / m.cfg.n_routed_experts
              for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()}
    return sum(p.numel() * routed.get(id(p), 1.0) for p in model.parameters())


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_forward_shapes_and_loss(kw):
    model = make_model(**kw)
    idx = torch.randint(0, 50, (3, 7))
    logits, loss = model(idx)
    assert logits.shape == (3, 7, 50) and loss is None
    logits, loss = model(idx, targets_BS=torch.randint(0, 50, (3, 7)))
    assert loss.shape == () and torch.isfinite(loss)
    # an untrained model predicts roughly uniformly: cross-entropy near log(V) for random targets
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5


def test_ignore_index_targets():
    model = make_model()
    idx = torch.randint(0, 50, (2, 6))
    targets = idx.clone()
    targets[:, :3] = -1
    _, loss = model(idx, targets)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, 3:].flatten(0, 1), idx[:, 3:].flatten())
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("kw", [VARIANTS["mha"], VARIANTS["gqa"], VARIANTS["dense"]], ids=["mha", "gqa", "dense"])
def test_causal_masking(kw):
    """Changing tokens after position t leaves the logits at positions <= t unchanged."""
    model = make_model(**kw)
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 6:] = torch.randint(0, 50, (2, 6))
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_gqa_differs_from_mha_and_has_fewer_params():
    mha, gqa = make_model(), make_model(n_kv_heads=2)
    assert gqa.layers[0].attn.wk.weight.shape == (2 * 8, 32)
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(mha) - n(gqa) == 2 * 2 * (32 * 16)  # wk and wv shrink by half in both blocks


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("kw", [VARIANTS["mha"], VARIANTS["gqa"], VARIANTS["all-moe"]], ids=["mha", "gqa", "all-moe"])
def test_kv_cache_logits_equal_full_recompute(kw):
    """Prefill a prompt, then decode one token at a time: each step's logits equal a full forward's."""
    from dsmoe.attention import KVCache

    model = make_model(**kw)
    cfg = model.cfg
    seq = torch.randint(0, 50, (2, 20))
    full, _ = model(seq)
    cache = KVCache(cfg.n_layers, 2, 20, model.layers[0].attn.cache_shapes(), seq.device, torch.float32)
    with torch.no_grad():
        prefill, _ = model(seq[:, :5], cache=cache)
        torch.testing.assert_close(prefill, full[:, :5], atol=1e-5, rtol=1e-5)
        for t in range(5, 20):
            step, _ = model(seq[:, t:t + 1], cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5,
                                       msg=lambda m, t=t: f"step {t}: {m}")
    assert cache.pos == 20


@pytest.mark.parametrize("kw", [VARIANTS["mha"], VARIANTS["gqa"]], ids=["mha", "gqa"])
def test_greedy_generation_equals_recompute(kw):
    """generate() with its cache picks the same greedy tokens as re-running the whole sequence each step."""
    model = make_model(**kw)
    prompt = torch.randint(0, 50, (2, 4))
    out = model.generate(prompt, max_new_tokens=12, temperature=0)
    assert out.shape == (2, 16) and torch.equal(out[:, :4], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(seq)[0][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_generation_stops_at_max_seq_len_and_sampling_is_seeded():
    model = make_model()
    prompt = torch.randint(0, 50, (1, 30))
    assert model.generate(prompt, max_new_tokens=10, temperature=0).shape == (1, 32)
    a, b = (model.generate(prompt[:, :3], 8, temperature=1.0, top_k=10, top_p=0.9,
                           generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name", list(PRESETS), ids=list(PRESETS))
def test_preset_param_counts_match_module(name):
    cfg = preset(name)
    with torch.device("meta"):  # counts only: no memory, no init cost
        model = MoETransformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert cfg.num_active_params() == pytest.approx(actual_active_params(model), abs=1e-6)


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_variant_param_counts_match_module(kw):
    model = make_model(**kw)
    assert model.cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert model.cfg.num_active_params() == pytest.approx(actual_active_params(model))


BASE_PRESETS = [n for n in PRESETS if not n.endswith(("-dense", "-mla"))]


@pytest.mark.parametrize("name", BASE_PRESETS, ids=BASE_PRESETS)
def test_mla_preset_has_the_attention_parameters_of_its_base(name):
    base, mla = preset(name), preset(f"{name}-mla")
    assert mla.mla and not base.mla and mla.moe == base.moe
    assert abs(mla.num_params() - base.num_params()) / base.num_params() < 0.01


@pytest.mark.parametrize("name", BASE_PRESETS, ids=BASE_PRESETS)
def test_dense_twin_has_same_active_params_but_router(name):
    cfg, twin = preset(name), preset(f"{name}-dense")
    assert twin.moe is None and twin.n_moe_layers == 0
    router = cfg.n_moe_layers * cfg.dim * cfg.moe.n_routed_experts
    assert cfg.num_active_params() - twin.num_active_params() == router
    assert twin.num_params() == twin.num_active_params()
    if name != "debug":  # the throughput comparison of `dsmoe bench train` holds 3-8x more parameters
        assert 3 <= cfg.num_params() / twin.num_params() <= 8


# ----------------------------------------------------------------------------- MoE bookkeeping


def test_aux_loss_sums_layers():
    model = make_model(first_k_dense=0, moe=tiny_cfg().moe.replace(aux_loss_alpha=0.1, z_loss_beta=0.01))
    model(torch.randint(0, 50, (2, 8)))
    layers = model.moe_layers()
    assert len(layers) == 2 and all(m.aux_loss > 0 for m in layers)
    torch.testing.assert_close(model.aux_loss(), layers[0].aux_loss + layers[1].aux_loss)


def test_aux_loss_zero_without_terms_and_for_dense():
    model = make_model()
    model(torch.randint(0, 50, (2, 8)))
    assert model.aux_loss().item() == 0
    dense = make_model(**VARIANTS["dense"])
    dense(torch.randint(0, 50, (2, 8)))
    assert dense.aux_loss().item() == 0 and dense.routing_stats() == {}


def test_routing_stats_shapes():
    model = make_model(first_k_dense=0)
    model(torch.randint(0, 50, (2, 8)))
    stats = model.routing_stats()
    assert stats["tokens_per_expert"].shape == (2, 8) and stats["maxvio"].shape == (2,)
    assert (stats["tokens_per_expert"].sum(-1) == 2 * 8 * 2).all()  # every token picks top_k=2 experts


@pytest.mark.parametrize("k", [1, 3, 8], ids=["k1", "k3", "k8"])
def test_set_top_k(k):
    model = make_model(first_k_dense=0)
    model.set_top_k(k)
    assert all(m.cfg.top_k == k and m.gate.cfg.top_k == k for m in model.moe_layers())
    model(torch.randint(0, 50, (2, 8)))
    assert (model.routing_stats()["tokens_per_expert"].sum(-1) == 2 * 8 * k).all()


def test_set_top_k_rejects_too_many():
    model = make_model()
    with pytest.raises(ValueError, match="top_k"):
        model.set_top_k(9)


# ----------------------------------------------------------------------------- errors


def test_sequence_longer_than_max_seq_len():
    model = make_model()
    with pytest.raises(ValueError, match="sequence of 33 tokens exceeds max_seq_len=32"):
        model(torch.randint(0, 50, (1, 33)))
    with pytest.raises(ValueError, match="prompt of 33 tokens exceeds max_seq_len=32"):
        model.generate(torch.randint(0, 50, (1, 33)), max_new_tokens=4)


BAD_CONFIGS = {
    "heads-not-dividing-dim": ({"n_heads": 5}, "n_heads"),
    "kv-heads-not-dividing": ({"n_kv_heads": 3}, "n_kv_heads"),
    "odd-head-dim": ({"dim": 24, "n_heads": 8, "moe": None, "dense_hidden": 8}, "even head dim"),
    "first-k-dense-too-big": ({"first_k_dense": 3}, "first_k_dense"),
    "zero-layers": ({"n_layers": 0}, "n_layers"),
    "dense-without-width": ({"moe": None, "dense_hidden": 0}, "dense_hidden"),
    "moe-dim-mismatch": ({"dim": 64}, "moe.dim"),
    "negative-vocab": ({"vocab_size": -1}, "vocab_size"),
}


@pytest.mark.parametrize("kw,match", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_invalid_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_cfg(**kw)


def test_unknown_preset_error_lists_choices():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny"):
        preset("huge")
