"""Experts (dsmoe.experts, and its op dsmoe.ops.routed_swiglu): the grouped, sorted computation equals the
per-expert reference loop (outputs and gradients of x, of the routing weights and of the stacked expert
weights) on both the grouped_mm path and the fallback, with empty batches, idle experts, dropped assignments
and zero-stride or non-contiguous upstream gradients; each kernel plan forced (GroupedMMPlan, ChunkedPlan at
several chunk sizes) against the reference, and how ChunkedPlan cuts the assignments; SwiGLU by hand; the
grouped_mm eligibility rule and the plan choice. CUDA cases skip without a GPU."""

import pytest
import torch
import torch.nn.functional as F

import dsmoe.ops.routed_swiglu
from dsmoe.experts import GroupedExperts, SwiGLU, reference_experts
from dsmoe.ops.routed_swiglu import ChunkedPlan, ContiguousGrad, GroupedMMPlan, _grouped_mm_ok, make_plan

# fp32 grouped_mm needs dims that are multiples of 4: aligned dims run either kernel (forced, since the default
# chooses by device), unaligned dims always fall back to the per-expert loop
DIMS = {"grouped": (8, 12), "loop": (8, 12), "unaligned": (6, 10)}
FORCE_GROUPED_MM = {"grouped": True, "loop": False, "unaligned": None}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def inputs(T, K, E, D, seed=0, device="cpu", keep=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    ids = torch.rand(T, E, generator=gen).topk(K, dim=-1).indices  # K distinct experts per token
    w = torch.rand(T, K, generator=gen)
    keep_A = (torch.rand(T * K, generator=gen) > 0.3) if keep else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x).to(dtype), to(ids), to(w), to(keep_A)


def run(fn, experts, x, ids, w, keep_A, upstream):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = fn(experts, x, ids, w, keep_A)
    loss = y.float().sum() if upstream is None else (y.float() * upstream).sum()
    params = [experts.w_gate, experts.w_up, experts.w_down]
    return (y.detach(), *torch.autograd.grad(loss, [x, w, *params], allow_unused=True, materialize_grads=True))


def grouped(experts, *args):
    return experts(*args)


def assert_grouped_equals_reference(E, D, Fh, T, K, keep, seed=0, device="cpu", dtype=torch.float32, tol=1e-5,
                                    path=None):
    torch.manual_seed(seed)
    experts = GroupedExperts(E, D, Fh).to(device)
    experts.use_grouped_mm = FORCE_GROUPED_MM.get(path)
    x, ids, w, keep_A = inputs(T, K, E, D, seed, device, keep)
    fast_experts = experts.to(dtype)
    ref_experts = GroupedExperts(E, D, Fh).to(device)
    ref_experts.load_state_dict({k: v.float() for k, v in experts.state_dict().items()})
    g = torch.randn(T, D, device=device)
    for upstream in (g, None, g.t().contiguous().t()[:, :].expand(T, D)):
        got = run(grouped, fast_experts, x.to(dtype), ids, w, keep_A, upstream)
        want = run(reference_experts, ref_experts, x.float(), ids, w, keep_A, upstream)
        for name, a, b in zip(["y", "x", "weights", "w_gate", "w_up", "w_down"], got, want):
            torch.testing.assert_close(a.float(), b, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dims", list(DIMS))
@pytest.mark.parametrize("T,K", [(0, 2), (1, 1), (1, 4), (9, 2), (30, 3), (30, 6)], ids=lambda v: str(v))
@pytest.mark.parametrize("keep", [False, True], ids=["dropless", "dropping"])
def test_grouped_equals_reference(dims, T, K, keep):
    D, Fh = DIMS[dims]
    assert_grouped_equals_reference(6, D, Fh, T, K, keep, seed=T * 10 + K, path=dims)


@pytest.mark.parametrize("dims", list(DIMS))
def test_all_tokens_on_one_expert(dims):
    D, Fh = DIMS[dims]
    experts = GroupedExperts(5, D, Fh)
    experts.use_grouped_mm = FORCE_GROUPED_MM[dims]
    x = torch.randn(7, D)
    ids = torch.full((7, 1), 3)
    w = torch.rand(7, 1)
    torch.testing.assert_close(experts(x, ids, w), reference_experts(experts, x, ids, w), atol=1e-6, rtol=1e-6)
    y = experts(x, ids, w)
    y.sum().backward()
    idle = [0, 1, 2, 4]
    assert experts.w_gate.grad[idle].abs().sum() == 0 and experts.w_down.grad[3].abs().sum() > 0


def test_all_assignments_dropped():
    experts = GroupedExperts(4, 8, 8)
    x, ids, w, _ = inputs(5, 2, 4, 8)
    y = experts(x, ids, w, torch.zeros(10, dtype=torch.bool))
    assert torch.equal(y, torch.zeros_like(x))


def test_weight_scales_the_expert_output():
    """A token's output is its weight times the expert's SwiGLU: linear in the weight, zero at weight 0."""
    experts = GroupedExperts(3, 8, 4)
    x = torch.randn(1, 8)
    ids = torch.tensor([[1]])
    e1 = F.silu(x @ experts.w_gate[1].T) * (x @ experts.w_up[1].T) @ experts.w_down[1].T
    torch.testing.assert_close(experts(x, ids, torch.tensor([[0.5]])), 0.5 * e1)
    torch.testing.assert_close(experts(x, ids, torch.tensor([[0.0]])), torch.zeros_like(x))


def test_swiglu_by_hand():
    torch.manual_seed(0)
    ffn = SwiGLU(6, 5)
    x = torch.randn(3, 6)
    a, b = x @ ffn.gate_proj.weight.T, x @ ffn.up_proj.weight.T
    want = (a * torch.sigmoid(a) * b) @ ffn.down_proj.weight.T
    torch.testing.assert_close(ffn(x), want)
    assert all(m.bias is None for m in (ffn.gate_proj, ffn.up_proj, ffn.down_proj))


@pytest.mark.parametrize("D,Fh,dtype,ok", [
    (8, 12, torch.float32, True), (6, 12, torch.float32, False), (8, 10, torch.float32, False),
    (8, 8, torch.bfloat16, True), (8, 12, torch.bfloat16, False), (8, 8, torch.float64, False),
    (8, 8, torch.float16, False),
], ids=["fp32-aligned", "fp32-D6", "fp32-F10", "bf16-aligned", "bf16-F12", "fp64", "fp16"])
def test_grouped_mm_eligibility(D, Fh, dtype, ok):
    experts = GroupedExperts(4, D, Fh).to(dtype)
    assert _grouped_mm_ok(torch.zeros(1, D, dtype=dtype), experts.w_gate, experts.w_down) == ok


@pytest.mark.parametrize("path", ["grouped", "loop"])
def test_bf16_matches_fp32_reference_loosely(path):
    assert_grouped_equals_reference(4, 16, 16, 20, 2, keep=False, dtype=torch.bfloat16, tol=6e-2, path=path)


def test_init_like_linear():
    experts = GroupedExperts(4, 16, 64)
    assert experts.w_gate.abs().max() <= 1 / 16**0.5 and experts.w_down.abs().max() <= 1 / 64**0.5
    assert experts.w_gate.shape == (4, 64, 16) and experts.w_down.shape == (4, 16, 64)


@CUDA
@pytest.mark.parametrize("dims", list(DIMS))
@pytest.mark.parametrize("keep", [False, True], ids=["dropless", "dropping"])
def test_grouped_equals_reference_cuda(dims, keep, monkeypatch):
    D, Fh = DIMS[dims]
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # compare true fp32
    assert_grouped_equals_reference(6, D, Fh, 33, 3, keep, device="cuda", tol=1e-4, path=dims)
    assert_grouped_equals_reference(6, D, Fh, 0, 3, keep, device="cuda", tol=1e-4, path=dims)


@CUDA
def test_bf16_grouped_cuda():
    assert_grouped_equals_reference(8, 64, 32, 100, 2, keep=False, device="cuda", dtype=torch.bfloat16, tol=6e-2)


@pytest.mark.parametrize("chunk_bytes", [1, 100, 2**18], ids=["one-expert-chunks", "few-expert-chunks", "one-chunk"])
@pytest.mark.parametrize("keep", [False, True], ids=["dropless", "dropping"])
def test_chunked_cpu_path_equals_reference(monkeypatch, chunk_bytes, keep):
    """The CPU path splits the sorted assignments into chunks of a few experts: any chunking gives the same
    outputs and gradients, with idle experts between chunks."""
    monkeypatch.setattr(dsmoe.ops.routed_swiglu, "_CHUNK_BYTES", chunk_bytes)
    assert_grouped_equals_reference(E=9, D=8, Fh=12, T=17, K=2, keep=keep, path="loop")


# A forced plan: (use_grouped_mm, _CHUNK_BYTES); with D=8 fp32 a row is 32 bytes
PLANS = {"grouped": (True, 2**18), "chunked-one-expert": (False, 1), "chunked-few-experts": (False, 100),
         "chunked-one-chunk": (False, 2**18)}
GROUPED_MM = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")


@GROUPED_MM
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("active", [range(9), [1, 2, 5, 7], [4]], ids=["all-experts", "some-idle", "one-expert"])
def test_each_plan_equals_reference(monkeypatch, plan, active):
    """Each plan, forced, equals the reference loop in outputs and every gradient; an expert without tokens
    gets a weight gradient of exactly zero (at the ends of the expert range and between chunks)."""
    use_grouped_mm, chunk_bytes = PLANS[plan]
    monkeypatch.setattr(dsmoe.ops.routed_swiglu, "_CHUNK_BYTES", chunk_bytes)
    E, D, Fh, T, K = 9, 8, 12, 13, min(2, len(active))
    torch.manual_seed(len(active))
    experts = GroupedExperts(E, D, Fh)
    experts.use_grouped_mm = use_grouped_mm
    x = torch.randn(T, D)
    ids = torch.tensor(list(active))[torch.rand(T, len(active)).topk(K, dim=-1).indices]
    w = torch.rand(T, K)
    counts_E = torch.bincount(ids.reshape(-1), minlength=E)
    want_plan = GroupedMMPlan if use_grouped_mm else ChunkedPlan
    assert type(make_plan(x, experts.w_gate, experts.w_down, counts_E, use_grouped_mm)) is want_plan
    upstream = torch.randn(T, D)  # contiguous: grouped_mm's backward rejects y.sum()'s zero-stride gradient
    got = run(grouped, experts, x, ids, w, None, upstream)
    want = run(reference_experts, experts, x, ids, w, None, upstream)
    for name, a, b in zip(["y", "x", "weights", "w_gate", "w_up", "w_down"], got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    idle = [e for e in range(E) if e not in active]
    for grad_EOI in got[3:]:
        assert torch.equal(grad_EOI[idle], torch.zeros_like(grad_EOI[idle]))
        assert all(grad_EOI[e].abs().sum() > 0 for e in active)


@pytest.mark.parametrize("counts", [[3, 0, 2, 5, 0, 1], [0, 0, 4, 0], [0, 0, 0], [7], []],
                         ids=["idle-between", "idle-at-ends", "all-idle", "one-expert", "no-experts"])
@pytest.mark.parametrize("chunk_bytes", [1, 100, 2**18], ids=["one-expert-chunks", "few-expert-chunks", "one-chunk"])
def test_chunked_plan_covers_assignments_in_order(monkeypatch, counts, chunk_bytes):
    """ChunkedPlan's chunks tile the A sorted assignments once, in order, each row with its expert, and close
    as soon as they reach _CHUNK_BYTES of input."""
    monkeypatch.setattr(dsmoe.ops.routed_swiglu, "_CHUNK_BYTES", chunk_bytes)
    row_bytes = 32
    plan = ChunkedPlan(counts, row_bytes)
    expert_A = [e for e, n in enumerate(counts) for _ in range(n)]
    seen, chunks = [], list(plan.chunks())
    for i, (rows, chunk) in enumerate(chunks):
        assert rows.start == len(seen) and rows.stop > rows.start
        n = 0
        for sub, e in chunk.parts:
            assert sub.start == n and sub.stop == n + counts[e]  # an expert's rows, whole, in one chunk
            n = sub.stop
            seen += [e] * counts[e]
        assert n == rows.stop - rows.start
        last = i == len(chunks) - 1
        assert last or n * row_bytes >= chunk_bytes
        assert (n - counts[chunk.parts[-1][1]]) * row_bytes < chunk_bytes
    assert seen == expert_A
    assert plan.used == [e for e, n in enumerate(counts) if n]


@pytest.mark.parametrize("D,force,assignments,want", [
    (8, None, 12, GroupedMMPlan), (8, None, 2**21, ChunkedPlan), (8, True, 2**21, GroupedMMPlan),
    (8, False, 12, ChunkedPlan), (6, True, 12, ChunkedPlan), (6, None, 12, ChunkedPlan),
], ids=["cpu-small-experts", "cpu-large-experts", "forced-grouped", "forced-chunked", "unaligned-falls-back",
        "unaligned-default"])
def test_plan_choice(D, force, assignments, want):
    """On CPU the default is grouped_mm while each expert's matmul is small (assignments / E * D * F up to
    2^24 multiply-adds), the chunked plan above; forcing grouped_mm needs aligned shapes."""
    if want is GroupedMMPlan and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    experts = GroupedExperts(4, D, 8)
    plan = make_plan(torch.zeros(3, D), experts.w_gate, experts.w_down, torch.tensor([1, 0, 2, 0]), force, assignments)
    assert type(plan) is want


def test_contiguous_grad():
    """The identity, with a contiguous gradient even from sum() (whose gradient has zero strides)."""
    x = torch.randn(3, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(ContiguousGrad.apply(x).sum(), x)
    assert grad.is_contiguous() and torch.equal(grad, torch.ones(3, 4))
