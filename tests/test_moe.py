"""The MoE layer (dsmoe.moe): the fast grouped path equals the per-expert reference loop (outputs and
gradients) across router variants, shapes and both grouped_mm paths; a one-expert MoE is a dense SwiGLU;
dropless and capacity conservation; bias counting and updating; input validation."""

import math
from typing import cast

import pytest
import torch

from dsmoe import GroupedExperts, MoE, MoEConfig, SwiGLU, update_biases
from dsmoe.ops.routed_swiglu import _grouped_mm_ok

# Expert paths: aligned dims (multiples of 4 in fp32) may take torch's grouped_mm (forced here, since the
# default may choose by device), or be forced onto the per-expert loop; unaligned dims always fall back.
DIMS = {"grouped": (8, 12), "loop": (8, 12), "unaligned": (6, 10)}
FORCE_GROUPED_MM = {"grouped": True, "loop": False, "unaligned": None}
GROUPS = {  # (n_groups, topk_groups, group_score); 16 experts, so 4 per group and up to 8 reachable
    "nogroups": (1, 1, "max"),
    "groups-max": (4, 2, "max"),
    "groups-top2": (4, 2, "top2"),
}


def make_cfg(dims="grouped", groups="nogroups", **kw) -> MoEConfig:
    D, F = DIMS[dims]
    G, M, gs = GROUPS[groups]
    base = dict(dim=D, expert_dim=F, n_routed_experts=16, n_shared_experts=1, top_k=2,
                n_groups=G, topk_groups=M, group_score=gs)
    return MoEConfig(**{**base, **kw})


def set_path(moe: MoE, path: str) -> MoE:
    cast(GroupedExperts, moe.experts).use_grouped_mm = FORCE_GROUPED_MM[path]
    return moe


def fast_and_reference(cfg: MoEConfig, seed: int = 0, path: str = "grouped"):
    torch.manual_seed(seed)
    fast = set_path(MoE(cfg), path)
    with torch.no_grad():  # a random bias, so that selection differs from the plain top-k of the scores
        fast.gate.bias.normal_(0, 0.05)
    ref = MoE(cfg, reference=True)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def outputs_and_grads(moe: MoE, x: torch.Tensor, g: torch.Tensor | None):
    """y and the gradients of every parameter and of x, for upstream g (None: y.sum(), a zero-stride grad)."""
    x = x.clone().requires_grad_(True)
    y = moe(x)
    loss = y.sum() if g is None else (y * g).sum()
    params = [p for _, p in sorted(moe.named_parameters())]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True, materialize_grads=True)
    return y.detach(), grads


def assert_fast_equals_reference(cfg: MoEConfig, T: int, seed: int = 0, path: str = "grouped"):
    fast, ref = fast_and_reference(cfg, seed, path)
    x = torch.randn(T, cfg.dim)
    g = torch.randn(T, cfg.dim)
    for upstream in (g, None):
        y_fast, grads_fast = outputs_and_grads(fast, x, upstream)
        y_ref, grads_ref = outputs_and_grads(ref, x, upstream)
        torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
        names = ["x"] + [n for n, _ in sorted(fast.named_parameters())]
        for name, a, b in zip(names, grads_fast, grads_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"grad of {name}: {m}")  # type: ignore[misc]  # mypy: no lambda with defaults
    assert torch.equal(fast.tokens_per_expert, ref.tokens_per_expert)
    return fast


# --------------------------------------------------------------------------- fast path == reference

VARIANTS = [  # every router variant x both grouped_mm paths x 0..2 shared; K, T and capacity cycle
    (score, groups, norm, dims, shared)
    for score in ("softmax", "sigmoid")
    for groups in GROUPS
    for norm in (False, True)
    for dims in DIMS
    for shared in (0, 1, 2)
]


VARIANT_IDS = ["-".join(map(str, v)).replace("False", "plain").replace("True", "norm") for v in VARIANTS]


@pytest.mark.parametrize("score,groups,norm,dims,shared", VARIANTS, ids=VARIANT_IDS)
def test_fast_equals_reference_variants(score, groups, norm, dims, shared):
    i = VARIANTS.index((score, groups, norm, dims, shared))
    K = (1, 3, 8, 2, 5)[i % 5]
    T = (1, 7, 33, 0)[i % 4]
    cfg = make_cfg(dims, groups, score_func=score, norm_topk_prob=norm, n_shared_experts=shared, top_k=K,
                   route_scale=(1.0, 2.5)[i % 2])
    assert_fast_equals_reference(cfg, T, seed=i, path=dims)


@pytest.mark.parametrize("dims", list(DIMS))
@pytest.mark.parametrize("K", range(1, 9), ids=lambda k: f"k{k}")
@pytest.mark.parametrize("T", [0, 1, 5, 40], ids=lambda t: f"T{t}")
def test_fast_equals_reference_topk_and_tokens(dims, K, T):
    cfg = make_cfg(dims, "groups-top2", score_func="sigmoid", norm_topk_prob=True, top_k=K)
    assert_fast_equals_reference(cfg, T, seed=K * 100 + T, path=dims)


@pytest.mark.parametrize("dims", list(DIMS))
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25], ids=lambda f: f"cf{f}")
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("T", [0, 1, 24], ids=lambda t: f"T{t}")
def test_fast_equals_reference_with_capacity(dims, factor, score, T):
    cfg = make_cfg(dims, "groups-max", score_func=score, top_k=3, capacity_factor=factor)
    fast = assert_fast_equals_reference(cfg, T=T, path=dims)
    if T == 24:
        assert fast.dropped > 0  # the random router overflows some expert at these factors


@pytest.mark.parametrize("dims", list(DIMS))
def test_fast_equals_reference_with_an_idle_expert(dims):
    cfg = make_cfg(dims, top_k=3)
    fast, ref = fast_and_reference(cfg, path=dims)
    for m in (fast, ref):
        m.gate.bias[[0, 5, 15]] = -1e3  # never chosen
    x, g = torch.randn(9, cfg.dim), torch.randn(9, cfg.dim)
    (y_f, gr_f), (y_r, gr_r) = outputs_and_grads(fast, x, g), outputs_and_grads(ref, x, g)
    assert (fast.tokens_per_expert[[0, 5, 15]] == 0).all()
    torch.testing.assert_close(y_f, y_r, atol=1e-5, rtol=1e-5)
    for a, b in zip(gr_f, gr_r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    grads = dict(zip(["x"] + [n for n, _ in sorted(fast.named_parameters())], gr_f))
    for name in ("experts.w_gate", "experts.w_up", "experts.w_down"):
        assert grads[name][[0, 5, 15]].abs().sum() == 0  # an idle expert gets exactly zero gradient


@pytest.mark.parametrize("dims,expected", [("grouped", True), ("unaligned", False)])
def test_both_grouped_mm_paths_are_taken(dims, expected, monkeypatch):
    """The aligned config really can run torch._grouped_mm and the unaligned one really falls back."""
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    moe = set_path(MoE(make_cfg(dims)), dims)
    assert _grouped_mm_ok(torch.zeros(1, moe.cfg.dim), moe.experts.w_gate, moe.experts.w_down) == expected
    moe(torch.randn(5, moe.cfg.dim)).sum().backward()
    assert bool(calls) == expected


def test_batched_input_shape():
    fast, ref = fast_and_reference(make_cfg())
    x = torch.randn(2, 3, fast.cfg.dim)
    y = fast(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.view(6, -1), fast(x.view(6, -1)), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- one expert == dense FFN

@pytest.mark.parametrize("dims", list(DIMS))
@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_one_expert_moe_equals_dense_swiglu(dims, reference):
    D, F = DIMS[dims]
    torch.manual_seed(0)
    moe = set_path(MoE(MoEConfig(dim=D, expert_dim=F, n_routed_experts=1, top_k=1, n_shared_experts=0,
                                 score_func="softmax"), reference=reference), dims)
    dense = SwiGLU(D, F)
    with torch.no_grad():
        dense.gate_proj.weight.copy_(moe.experts.w_gate[0])
        dense.up_proj.weight.copy_(moe.experts.w_up[0])
        dense.down_proj.weight.copy_(moe.experts.w_down[0])
    x = torch.randn(11, D)
    g = torch.randn(11, D)
    xm, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ym, yd = moe(xm), dense(xd)
    torch.testing.assert_close(ym, yd, atol=1e-6, rtol=1e-6)
    (ym * g).sum().backward()
    (yd * g).sum().backward()
    torch.testing.assert_close(xm.grad, xd.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(moe.experts.w_gate.grad[0], dense.gate_proj.weight.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(moe.experts.w_up.grad[0], dense.up_proj.weight.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(moe.experts.w_down.grad[0], dense.down_proj.weight.grad, atol=1e-6, rtol=1e-6)
    # a softmax over one expert is constant 1: the router gets no gradient
    torch.testing.assert_close(moe.gate.weight.grad, torch.zeros_like(moe.gate.weight), atol=1e-7, rtol=0)


# --------------------------------------------------------------------------- conservation

@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("K", [1, 4, 8], ids=lambda k: f"k{k}")
def test_dropless_every_token_processed_top_k_times(groups, K):
    cfg = make_cfg("grouped", groups, top_k=K, score_func="sigmoid")
    moe = MoE(cfg)
    T = 37
    moe(torch.randn(T, cfg.dim))
    assert moe.tokens_per_expert.sum() == T * K
    assert moe.dropped == 0
    _, ids_TK, _, _ = moe.gate(torch.randn(T, cfg.dim))
    assert (ids_TK.sort(-1).values.diff(dim=-1) > 0).all()  # K distinct experts per token


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0, 2.0], ids=lambda f: f"cf{f}")
def test_capacity_conservation(factor):
    from dsmoe.moe import capacity_keep
    cfg = make_cfg(top_k=3, capacity_factor=factor)
    moe = MoE(cfg)
    T, K, E = 29, cfg.top_k, cfg.n_routed_experts
    x = torch.randn(T, cfg.dim)
    moe(x)
    weights_TK, ids_TK, _, _ = moe.gate(x)
    keep_A = capacity_keep(ids_TK, weights_TK, E, factor)
    capacity = math.ceil(factor * T * K / E)
    kept_E = torch.bincount(ids_TK.reshape(-1)[keep_A], minlength=E)
    assert int(moe.dropped) + int(keep_A.sum()) == T * K
    assert int(moe.dropped) == int((~keep_A).sum())
    assert kept_E.max() <= capacity
    # an expert under capacity keeps all its tokens; one over capacity keeps exactly `capacity`
    load_E = moe.tokens_per_expert
    torch.testing.assert_close(kept_E, load_E.clamp_max(capacity))
    # the dropped assignments are the lowest-affinity ones of their expert
    w_A, ids_A = weights_TK.reshape(-1).detach(), ids_TK.reshape(-1)
    for e in range(E):
        here = ids_A == e
        if (here & ~keep_A).any():
            assert w_A[here & ~keep_A].max() <= w_A[here & keep_A].min()


def test_dropped_token_passes_through_as_zero():
    """With every assignment dropped the routed part is zero, leaving only the shared experts."""
    cfg = make_cfg(top_k=1, capacity_factor=1e-9)  # capacity ceil(tiny) = 1 per expert
    moe = MoE(cfg)
    x = torch.randn(1, cfg.dim).expand(40, -1).contiguous()  # 40 identical tokens -> one expert
    y = moe(x)
    assert moe.dropped == 39
    torch.testing.assert_close(y[1:], moe.shared_experts(x[1:]))


# --------------------------------------------------------------------------- bias counts and update

def biased_moe(rule="sign", **kw):
    torch.manual_seed(0)
    return MoE(make_cfg(score_func="sigmoid", bias_update_speed=1e-2, bias_update_rule=rule, **kw))


def test_counts_accumulate_over_micro_batches_and_bias_updates_once():
    moe = biased_moe()
    xs = [torch.randn(10, moe.cfg.dim) for _ in range(3)]
    for x in xs:
        moe(x).sum().backward()
        assert (moe.gate.bias == 0).all()  # unchanged until the explicit step
    assert moe.counts.sum() == 3 * 10 * moe.cfg.top_k
    expected = torch.stack([torch.bincount(moe.gate(x)[1].reshape(-1), minlength=16) for x in xs]).sum(0)
    assert torch.equal(moe.counts, expected)
    moe.update_bias()
    assert (moe.counts == 0).all()
    bias_after_one = moe.gate.bias.clone()
    err = expected.float().mean() - expected.float()
    torch.testing.assert_close(bias_after_one, 1e-2 * err.sign())
    moe.update_bias()  # no new counts: a second step with zero counts moves nothing (sign(0) = 0)
    torch.testing.assert_close(moe.gate.bias, bias_after_one)


def test_no_counts_in_eval_or_no_grad():
    moe = biased_moe()
    x = torch.randn(10, moe.cfg.dim)
    moe.eval()
    moe(x)
    assert moe.counts.sum() == 0
    assert moe.tokens_per_expert.sum() == 10 * moe.cfg.top_k  # statistics are still recorded
    moe.train()
    with torch.no_grad():
        moe(x)
    assert moe.counts.sum() == 0
    moe(x)
    assert moe.counts.sum() == 10 * moe.cfg.top_k


def test_update_biases_over_a_model():
    model = torch.nn.Sequential(biased_moe(), biased_moe())
    model(torch.randn(10, 8))
    update_biases(model)
    for layer in model:
        assert (layer.counts == 0).all() and layer.gate.bias.abs().sum() > 0


def test_zero_speed_only_clears_counts():
    moe = MoE(make_cfg())
    moe(torch.randn(10, 8))
    moe.update_bias()
    assert (moe.counts == 0).all() and (moe.gate.bias == 0).all()


def test_bias_is_an_fp32_buffer_saved_in_the_state_dict():
    moe = biased_moe()
    assert "gate.bias" in moe.state_dict() and "counts" not in moe.state_dict()
    assert moe.gate.bias.dtype == torch.float32 and not moe.gate.bias.requires_grad
    assert all(p is not moe.gate.bias for p in moe.parameters())


def test_bias_stays_fp32_when_the_layer_is_cast():
    """.to(bf16) casts the weights but keeps the bias's fp32 values: a loss-free step of 1e-3 on a bias near 1
    is below bf16's resolution (2^-7 there) and would vanish. A layer built on meta and cast keeps it fp32 too."""
    moe = biased_moe()
    moe.gate.bias.copy_(torch.linspace(-1, 1, moe.cfg.n_routed_experts) + 1e-3)
    before = moe.gate.bias.clone()
    moe.to(torch.bfloat16)
    assert moe.gate.weight.dtype == moe.experts.w_gate.dtype == torch.bfloat16
    assert moe.gate.bias.dtype == torch.float32 and torch.equal(moe.gate.bias, before)
    moe.half()
    assert moe.gate.bias.dtype == torch.float32 and torch.equal(moe.gate.bias, before)
    moe.to("meta", torch.bfloat16).to_empty(device="cpu")
    assert moe.gate.bias.dtype == torch.float32 and moe.gate.bias.device.type == "cpu"
    assert moe.experts.w_up.dtype == torch.bfloat16


# --------------------------------------------------------------------------- losses held by the layer

def test_aux_loss_combines_enabled_terms():
    cfg = make_cfg("grouped", "groups-max", aux_loss_alpha=0.01, seq_aux_loss_alpha=1e-4, device_loss_alpha=0.05,
                   comm_loss_alpha=0.02, z_loss_beta=1e-3)
    moe = MoE(cfg)
    moe(torch.randn(2, 5, cfg.dim))
    assert set(moe.losses) == {"aux", "seq_aux", "device", "comm", "z"}
    coef = {"aux": 0.01, "seq_aux": 1e-4, "device": 0.05, "comm": 0.02, "z": 1e-3}
    torch.testing.assert_close(moe.aux_loss, sum(coef[k] * v for k, v in moe.losses.items()))
    moe.aux_loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    moe(torch.randn(0, cfg.dim))  # no token: losses are an empty dict and aux_loss is zero
    assert moe.losses == {} and moe.aux_loss == 0


# --------------------------------------------------------------------------- input validation

@pytest.mark.parametrize("x,exc,words", [
    (torch.randn(3, 7), ValueError, "dim=8"),
    (torch.tensor(1.0), ValueError, "dim=8"),
    (torch.full((3, 8), float("nan")), ValueError, "NaN"),
    (torch.full((3, 8), float("inf")), ValueError, "inf"),
    (torch.ones(3, 8, dtype=torch.long), TypeError, "floating-point"),
], ids=["wrong-dim", "scalar", "nan", "inf", "integer"])
def test_bad_input_is_rejected_clearly(x, exc, words):
    moe = MoE(make_cfg())
    with pytest.raises(exc, match=words):
        moe(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_element_is_caught(bad):
    """The check runs on the router logits: one bad number in one token, even under a zero gate row, is enough."""
    moe = MoE(make_cfg())
    with torch.no_grad():
        moe.gate.weight[:, 5] = 0  # inf * 0 = NaN: still caught
    for col in (5, 6):
        x = torch.randn(4, 8)
        x[2, col] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            moe(x)
    with torch.no_grad():
        moe.gate.weight[0, 0] = float("nan")  # a broken router is named too
    with pytest.raises(ValueError, match="router weight"):
        moe(torch.randn(4, 8))


def test_set_top_k_validates():
    moe = MoE(make_cfg("grouped", "groups-max"))
    moe.set_top_k(5)
    assert moe(torch.randn(4, 8)).shape == (4, 8) and moe.tokens_per_expert.sum() == 20
    with pytest.raises(ValueError, match="top_k"):
        moe.set_top_k(9)  # only 8 experts in the 2 kept groups


def test_aux_loss_is_alpha_under_uniform_routing():
    """Expert-level loss under uniform routing: f_i = 1 and P_i = 1/E (a zero gate gives equal softmax scores,
    round-robin choice)."""
    cfg = make_cfg(top_k=2, aux_loss_alpha=0.01, uniform_routing=True, score_func="softmax")
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.zero_()
    moe(torch.randn(24, cfg.dim))  # 24 tokens * 2 = 3 per expert
    assert (moe.tokens_per_expert == 3).all() and moe.maxvio == 0
    torch.testing.assert_close(moe.aux_loss, torch.tensor(0.01))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_activation_checkpointing_counts_once(reentrant):
    """The recomputation of activation checkpointing must not count tokens a second time."""
    from torch.utils.checkpoint import checkpoint
    moe = biased_moe()
    x = torch.randn(10, moe.cfg.dim, requires_grad=True)
    checkpoint(moe, x, use_reentrant=reentrant).sum().backward()
    assert moe.counts.sum() == 10 * moe.cfg.top_k


def test_routed_experts_run_before_the_shared_experts_on_the_same_tensor():
    """The contract dsmoe.parallel's OverlappedSwiGLU relies on to compute the shared experts while the
    dispatch all-to-all is in flight: MoE.forward calls the routed experts first, then the shared experts,
    with the very same input tensor."""
    moe = MoE(MoEConfig(dim=8, n_routed_experts=4, n_shared_experts=1, top_k=2, expert_dim=4))
    calls = []
    for name in ("experts", "shared_experts"):
        getattr(moe, name).register_forward_pre_hook(lambda m, args, name=name: calls.append((name, args[0])))
    moe(torch.randn(2, 3, 8))
    assert [name for name, _ in calls] == ["experts", "shared_experts"]
    assert calls[0][1] is calls[1][1]
