"""The routed SwiGLU of dropless experts, as one registered custom op (dsmoe::routed_swiglu, with its own
backward op, fake implementations of both and autograd): torch.compile sees one opaque op whatever the routing
counts. GroupedExperts and the expert-parallel receive side call `routed_swiglu`.

Shapes (the suffixes on names):
    T tokens   D model dim   E experts   F expert hidden dim
    A assignments (token, expert), sorted by expert
    n rows of one chunk of the A sorted assignments (all A for the grouped plan)
    I, O a projection's input and output width, its weights stacked [E, O, I]:
      gate and up [E, F, D] (I=D, O=F), down [E, D, F] (I=F, O=D)

The op gathers each expert's tokens, runs its SwiGLU (the routing weight scales the hidden activation, before
the down projection) and adds the results back into the T outputs, following a plan: `GroupedMMPlan` runs one
torch grouped_mm per projection over all A rows (CUDA, and small experts on CPU); `ChunkedPlan` one matmul per
expert over chunks of a few experts, so that temporaries stay small (make_plan chooses). It saves only the gate
and up pre-activations for backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _grouped_mm_ok(x: torch.Tensor, *stacked_EOI: torch.Tensor) -> bool:
    """torch's grouped_mm needs 16-byte aligned rows, and on CUDA a Hopper-class GPU."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    if x.device.type not in ("cpu", "cuda") or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    align = 16 // x.element_size()
    return all(w_EOI.dtype == x.dtype and w_EOI.shape[-1] % align == 0 and w_EOI.shape[-2] % align == 0
               for w_EOI in stacked_EOI)


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm rejects zero strides)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Plans: how the A sorted assignments are cut into chunks and how each chunk's rows meet their experts' weights.
# chunks() yields (rows of A, sub-plan); a sub-plan projects a chunk: project (forward), project_back (input
# gradient), weight_grad. saves_in_place says whether chunks write the saved pre-activations into [A, F]
# buffers (else the one chunk's outputs are kept); grad_buffers gives what weight_grad writes into.

_CHUNK_BYTES = 2**18  # a chunk's [n, D] input: about one expert at 4096 tokens, more at fewer (measured)


class GroupedMMPlan:
    """All A rows in one chunk, one torch._grouped_mm per projection over int32 offsets: no host sync."""

    saves_in_place = False  # grouped_mm allocates its outputs; the one chunk's are the [A, F] pre-activations

    def __init__(self, counts_E: torch.Tensor):
        self.offsets_E = counts_E.cumsum(0).to(torch.int32)

    def chunks(self) -> tuple[tuple[slice, GroupedMMPlan]]:
        return ((slice(None), self),)

    def grad_buffers(self, *w_EOI: torch.Tensor) -> tuple[None, ...]:
        return (None,) * len(w_EOI)  # grouped_mm allocates each weight gradient whole (zero for idle experts)

    def project(self, x_nI: torch.Tensor, w_EOI: torch.Tensor, out_nO: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of each expert times that expert's w^T: [n, I] -> [n, O] (grouped_mm allocates; no out)."""
        return torch._grouped_mm(x_nI, w_EOI.transpose(1, 2), offs=self.offsets_E)

    def project_back(self, grad_nO: torch.Tensor, w_EOI: torch.Tensor,
                     acc_nI: torch.Tensor | None = None) -> torch.Tensor:
        """The input gradient of project, [n, O] -> [n, I]; added into acc when given."""
        out_nI = torch._grouped_mm(grad_nO, w_EOI, offs=self.offsets_E)
        return out_nI if acc_nI is None else acc_nI.add_(out_nI)

    def weight_grad(self, grad_nO: torch.Tensor, x_nI: torch.Tensor, grad_EOI: torch.Tensor | None) -> torch.Tensor:
        """The weight gradient of project, grad^T @ x per expert, returned whole (grad_EOI is not written)."""
        return torch._grouped_mm(grad_nO.T, x_nI, offs=self.offsets_E)


class ChunkedPlan:
    """Consecutive experts grouped into chunks of about _CHUNK_BYTES of input rows (experts without rows
    skipped), so that every temporary stays in cache and in the allocator's free lists (the large [A, D]
    gathers of a one-shot version cost fresh pages each step). Needs the counts on the host."""

    saves_in_place = True

    def __init__(self, counts: list[int], row_bytes: int):
        self.n_experts, self.used = len(counts), [e for e, n in enumerate(counts) if n]
        self._chunks: list[tuple[slice, _PerExpertMM]] = []
        parts: list[tuple[slice, int]] = []
        start = end = 0
        for e, n in enumerate(counts):
            if n:
                parts.append((slice(end - start, end - start + n), e))
                end += n
            if parts and ((end - start) * row_bytes >= _CHUNK_BYTES or e == len(counts) - 1):
                self._chunks.append((slice(start, end), _PerExpertMM(parts)))
                parts, start = [], end

    def chunks(self) -> list[tuple[slice, _PerExpertMM]]:
        return self._chunks

    def grad_buffers(self, *w_EOI: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Weight gradients that the chunks fill expert by expert; an idle expert's, which no chunk writes, is
        exactly zero."""
        grads_EOI = tuple(map(torch.empty_like, w_EOI))
        if len(self.used) < self.n_experts:
            idle_E = torch.ones(self.n_experts, dtype=torch.bool, device=w_EOI[0].device)
            idle_E[self.used] = False
            for grad_EOI in grads_EOI:
                grad_EOI[idle_E] = 0
        return grads_EOI


class _PerExpertMM:
    """One chunk of a ChunkedPlan: one torch.mm per expert over its rows of the chunk."""

    def __init__(self, parts: list[tuple[slice, int]]):
        self.parts = parts  # (that expert's rows of the chunk, expert index), in row order

    def project(self, x_nI: torch.Tensor, w_EOI: torch.Tensor, out_nO: torch.Tensor | None = None) -> torch.Tensor:
        out_nO = x_nI.new_empty(x_nI.shape[0], w_EOI.shape[1]) if out_nO is None else out_nO
        for rows, e in self.parts:
            torch.mm(x_nI[rows], w_EOI[e].T, out=out_nO[rows])
        return out_nO

    def project_back(self, grad_nO: torch.Tensor, w_EOI: torch.Tensor,
                     acc_nI: torch.Tensor | None = None) -> torch.Tensor:
        out_nI = grad_nO.new_empty(grad_nO.shape[0], w_EOI.shape[2]) if acc_nI is None else acc_nI
        for rows, e in self.parts:
            if acc_nI is None:
                torch.mm(grad_nO[rows], w_EOI[e], out=out_nI[rows])
            else:
                out_nI[rows].addmm_(grad_nO[rows], w_EOI[e])
        return out_nI

    def weight_grad(self, grad_nO: torch.Tensor, x_nI: torch.Tensor, grad_EOI: torch.Tensor | None) -> torch.Tensor:
        assert grad_EOI is not None  # ChunkedPlan.grad_buffers allocates every one
        for rows, e in self.parts:
            torch.mm(grad_nO[rows].T, x_nI[rows], out=grad_EOI[e])
        return grad_EOI


# ----------------------------------------------------------------------------------------------------------------
# The routed SwiGLU as a registered custom op (torch.library): torch.compile sees one opaque op whatever the routing
# counts (the chunked plan reads them on the host, which would otherwise break or re-specialize the graph), with a
# fake implementation for its output shapes and a backward op of its own.

_KERNEL = {-1: None, 0: False, 1: True}  # the op's use_grouped_mm: auto, chunked, grouped


def _forward(plan: GroupedMMPlan | ChunkedPlan, x_TD: torch.Tensor, w_gate_EFD: torch.Tensor, w_up_EFD: torch.Tensor,
             w_down_EDF: torch.Tensor, weights_A: torch.Tensor,
             token_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather -> SwiGLU of each assignment's expert, scaled by its routing weight -> scatter-add, chunk by chunk
    of the plan. Returns y and the gate and up pre-activations, the only tensors backward keeps: the gathered
    input, silu and the hidden are recomputed there, so the routed experts keep 2*A*F numbers for backward
    instead of A*D + 5*A*F."""
    A, F_ = token_A.numel(), w_gate_EFD.shape[1]
    gate_AF = x_TD.new_empty(A, F_) if plan.saves_in_place else None
    up_AF = x_TD.new_empty(A, F_) if plan.saves_in_place else None
    y_TD = torch.zeros_like(x_TD)
    for rows, chunk in plan.chunks():
        token_n = token_A[rows]
        x_nD = x_TD.index_select(0, token_n)
        gate_nF = chunk.project(x_nD, w_gate_EFD, None if gate_AF is None else gate_AF[rows])
        up_nF = chunk.project(x_nD, w_up_EFD, None if up_AF is None else up_AF[rows])
        del x_nD
        hidden_nF = F.silu(gate_nF).mul_(up_nF).mul_(weights_A[rows, None])
        y_TD.index_add_(0, token_n, chunk.project(hidden_nF, w_down_EDF))
    if gate_AF is None or up_AF is None:  # one chunk of all A rows
        gate_AF, up_AF = gate_nF, up_nF
    return y_TD, gate_AF, up_AF


def _backward(plan: GroupedMMPlan | ChunkedPlan, grad_TD: torch.Tensor, x_TD: torch.Tensor, w_gate_EFD: torch.Tensor,
              w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor, weights_A: torch.Tensor, token_A: torch.Tensor,
              gate_AF: torch.Tensor,
              up_AF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, the three stacked weights and the routing weights."""
    grad_x_TD = torch.zeros_like(x_TD)
    grad_gate_EFD, grad_up_EFD, grad_down_EDF = plan.grad_buffers(w_gate_EFD, w_up_EFD, w_down_EDF)
    grad_weights_A = torch.empty_like(weights_A)
    for rows, chunk in plan.chunks():
        token_n = token_A[rows]
        x_nD, grad_y_nD = x_TD.index_select(0, token_n), grad_TD.index_select(0, token_n)  # contiguous, always
        gate_nF, up_nF, weights_n1 = gate_AF[rows], up_AF[rows], weights_A[rows, None]
        silu_nF = F.silu(gate_nF)
        hidden_nF = silu_nF * up_nF
        grad_down_EDF = chunk.weight_grad(grad_y_nD, hidden_nF * weights_n1, grad_down_EDF)
        grad_hw_nF = chunk.project_back(grad_y_nD, w_down_EDF)  # gradient of the weighted hidden
        del grad_y_nD
        grad_weights_A[rows] = (grad_hw_nF * hidden_nF).sum(-1)
        grad_hidden_nF = grad_hw_nF.mul_(weights_n1)
        grad_up_nF = grad_hidden_nF * silu_nF
        grad_gate_nF = torch.ops.aten.silu_backward(grad_hidden_nF.mul_(up_nF), gate_nF)  # one pass
        grad_gate_EFD = chunk.weight_grad(grad_gate_nF, x_nD, grad_gate_EFD)
        grad_up_EFD = chunk.weight_grad(grad_up_nF, x_nD, grad_up_EFD)
        grad_x_TD.index_add_(0, token_n, chunk.project_back(grad_up_nF, w_up_EFD,
                                                            chunk.project_back(grad_gate_nF, w_gate_EFD)))
    assert grad_gate_EFD is not None and grad_up_EFD is not None and grad_down_EDF is not None  # every plan wrote
    return grad_x_TD, grad_gate_EFD, grad_up_EFD, grad_down_EDF, grad_weights_A


@torch.library.custom_op("dsmoe::routed_swiglu", mutates_args=())
def routed_swiglu_op(x_TD: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                     weights_A: torch.Tensor, token_A: torch.Tensor, counts_E: torch.Tensor,
                     use_grouped_mm: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_TD, gate_AF, up_AF): the routed experts' output and the pre-activations backward needs."""
    plan = make_plan(x_TD, w_gate, w_down, counts_E, _KERNEL[use_grouped_mm], token_A.shape[0])
    return _forward(plan, x_TD, w_gate, w_up, w_down, weights_A, token_A)


@routed_swiglu_op.register_fake
def _(x_TD: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, weights_A: torch.Tensor,
      token_A: torch.Tensor, counts_E: torch.Tensor,
      use_grouped_mm: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    A, F_ = token_A.shape[0], w_gate.shape[1]
    return torch.empty_like(x_TD), x_TD.new_empty(A, F_), x_TD.new_empty(A, F_)


@torch.library.custom_op("dsmoe::routed_swiglu_backward", mutates_args=())
def routed_swiglu_backward_op(grad_TD: torch.Tensor, x_TD: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                              w_down: torch.Tensor, weights_A: torch.Tensor, token_A: torch.Tensor,
                              counts_E: torch.Tensor, gate_AF: torch.Tensor, up_AF: torch.Tensor,
                              use_grouped_mm: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    """Gradients of x, w_gate, w_up, w_down and the routing weights."""
    plan = make_plan(x_TD, w_gate, w_down, counts_E, _KERNEL[use_grouped_mm], token_A.shape[0])
    return _backward(plan, grad_TD, x_TD, w_gate, w_up, w_down, weights_A, token_A, gate_AF, up_AF)


@routed_swiglu_backward_op.register_fake
def _(grad_TD: torch.Tensor, x_TD: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
      weights_A: torch.Tensor, token_A: torch.Tensor, counts_E: torch.Tensor, gate_AF: torch.Tensor,
      up_AF: torch.Tensor, use_grouped_mm: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
    return (torch.empty_like(x_TD), torch.empty_like(w_gate), torch.empty_like(w_up), torch.empty_like(w_down),
            torch.empty_like(weights_A))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x_TD, w_gate, w_up, w_down, weights_A, token_A, counts_E, use_grouped_mm = inputs
    _, gate_AF, up_AF = output
    ctx.save_for_backward(x_TD, w_gate, w_up, w_down, weights_A, token_A, counts_E, gate_AF, up_AF)
    ctx.use_grouped_mm = use_grouped_mm


def _autograd_backward(ctx: Any, grad_TD: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
    x_TD, w_gate, w_up, w_down, weights_A, token_A, counts_E, gate_AF, up_AF = ctx.saved_tensors
    grads = routed_swiglu_backward_op(grad_TD, x_TD, w_gate, w_up, w_down, weights_A, token_A, counts_E, gate_AF,
                                      up_AF, ctx.use_grouped_mm)
    return (*grads, None, None, None)


routed_swiglu_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# On CPU, grouped_mm's own loop over experts beats the chunked plan's Python loop while each expert's matmul is
# small (the loop's overhead per matmul dominates), and the chunked plan wins on large ones (its temporaries stay
# in cache), forward + backward. With glibc's default allocator, which faults large temporaries in every step:
# 1.09-1.11x at 1M-6M multiply-adds per expert and projection (the tiny and small presets' layers, the benchmark
# shape at 512 tokens) and 0.69x at 50M (the benchmark shape at 4096 tokens), on one thread. With the heap kept
# (the dsmoe command, dsmoe.runtime.keep_freed_memory) the two are within 4% everywhere at one and two threads.
_CPU_GROUPED_MAX_MACS = 2**24


def make_plan(x_TD: torch.Tensor, w_gate_EFD: torch.Tensor, w_down_EDF: torch.Tensor, counts_E: torch.Tensor,
              use_grouped_mm: bool | None = None, assignments: int = 0) -> GroupedMMPlan | ChunkedPlan:
    """GroupedMMPlan where torch's grouped_mm applies and is wanted, else ChunkedPlan (one host sync).

    use_grouped_mm None picks by device and size: on CUDA grouped_mm (one kernel per projection, no host sync);
    on CPU grouped_mm while an expert's mean matmul, `assignments` / E rows by D by F, is under
    _CPU_GROUPED_MAX_MACS, else the chunked per-expert loop, which keeps the gathered rows in cache.
    """
    E, F_, D = w_gate_EFD.shape
    small = assignments / max(E, 1) * D * F_ <= _CPU_GROUPED_MAX_MACS
    grouped = _grouped_mm_ok(x_TD, w_gate_EFD, w_down_EDF) and (
        (x_TD.device.type == "cuda" or small) if use_grouped_mm is None else use_grouped_mm)
    if grouped:
        return GroupedMMPlan(counts_E)
    return ChunkedPlan(counts_E.tolist(), x_TD.shape[1] * x_TD.element_size())


def routed_swiglu(x_TD: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  weights_A: torch.Tensor, token_A: torch.Tensor, counts_E: torch.Tensor,
                  use_grouped_mm: bool | None = None) -> torch.Tensor:
    """sum over assignments a of weights_A[a] * expert_e(x[token_A[a]]) into row token_A[a], assignments sorted
    by expert e with counts_E[e] of them. Shared by GroupedExperts and the expert-parallel receive side."""
    kernel = {None: -1, False: 0, True: 1}[use_grouped_mm]
    y_TD: torch.Tensor = routed_swiglu_op(x_TD, w_gate, w_up, w_down, weights_A, token_A, counts_E, kernel)[0]
    return y_TD
