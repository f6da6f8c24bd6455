"""Expert computation.

Shapes: T tokens, D model dim, E experts, F expert hidden dim, K experts per token, A = T*K assignments.

`GroupedExperts` stores the experts stacked ([E, F, D] like HuggingFace's per-expert [F, D]) and sorts the A
token-expert assignments by expert. A hand-written autograd function then gathers each expert's tokens, runs
its SwiGLU (the routing weight scales the hidden activation, before the down projection) and adds the results
back into the T outputs: on CUDA one torch grouped_mm per projection over all A rows; on CPU one matmul per
expert over chunks of a few experts, so that temporaries stay small. It saves only the gate and up
pre-activations for backward. `reference_experts` is the plain per-expert loop it must equal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases. Also the fused shared experts and the dense FFN."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _grouped_mm_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch's grouped_mm needs 16-byte aligned rows, and on CUDA a Hopper-class GPU."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    if x.device.type not in ("cpu", "cuda") or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    align = 16 // x.element_size()
    return all(w.dtype == x.dtype and w.shape[-1] % align == 0 and w.shape[-2] % align == 0 for w in weights)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm rejects zero strides)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


# Chunks of assignments, sorted by expert. A chunk is (rows, parts): `rows` a slice of the A sorted
# assignments, and `parts` either a list of (sub-slice of the chunk, expert index), one matmul each, or the
# int32 offsets of every expert's rows for one torch grouped_mm (then the chunk is all of A).
_CHUNK_BYTES = 2**18  # a chunk's [rows, D] input: about one expert at 4096 tokens, more at fewer (measured)


def _project(x_nI, w_EOI, parts, out=None):
    """Rows of each expert times that expert's w^T: x [n, I], w [E, O, I] -> [n, O]."""
    if isinstance(parts, torch.Tensor):
        return torch._grouped_mm(x_nI, w_EOI.transpose(1, 2), offs=parts)
    out = x_nI.new_empty(x_nI.shape[0], w_EOI.shape[1]) if out is None else out
    for sub, e in parts:
        torch.mm(x_nI[sub], w_EOI[e].T, out=out[sub])
    return out


def _project_back(g_nO, w_EOI, parts, acc_nI=None):
    """The input gradient of _project: rows of each expert times that expert's w, [n, O] -> [n, I];
    added into acc when given."""
    if isinstance(parts, torch.Tensor):
        out = torch._grouped_mm(g_nO, w_EOI, offs=parts)
        return out if acc_nI is None else acc_nI.add_(out)
    out = g_nO.new_empty(g_nO.shape[0], w_EOI.shape[2]) if acc_nI is None else acc_nI
    for sub, e in parts:
        if acc_nI is None:
            torch.mm(g_nO[sub], w_EOI[e], out=out[sub])
        else:
            out[sub].addmm_(g_nO[sub], w_EOI[e])
    return out


def _weight_grad(g_nO, x_nI, parts, grad_EOI):
    """The weight gradient of _project, g^T @ x per expert, written into grad (or returned whole)."""
    if isinstance(parts, torch.Tensor):
        return torch._grouped_mm(g_nO.T, x_nI, offs=parts)
    for sub, e in parts:
        torch.mm(g_nO[sub].T, x_nI[sub], out=grad_EOI[e])
    return grad_EOI


def _silu_and_grad(g):
    """silu(g) and its derivative sigmoid(g) * (1 + g * (1 - sigmoid(g)))."""
    s = torch.sigmoid(g)
    sg = g * s
    return sg, (g - sg).add_(1).mul_(s)  # = s * (1 + g * (1 - s)), in fewer passes


def _chunks(counts: list[int], row_bytes: int) -> list:
    """Group consecutive experts into chunks of about _CHUNK_BYTES of input rows (empty experts skipped)."""
    chunks, parts, start, end = [], [], 0, 0
    for e, n in enumerate(counts):
        if n:
            parts.append((slice(end - start, end - start + n), e))
            end += n
        if parts and ((end - start) * row_bytes >= _CHUNK_BYTES or e == len(counts) - 1):
            chunks.append((slice(start, end), parts))
            parts, start = [], end
    return chunks


class _RoutedSwiGLU(torch.autograd.Function):
    """Gather -> SwiGLU of each assignment's expert, scaled by its routing weight -> scatter-add, by hand.

    Assignments come sorted by expert and split into chunks (see _chunks): on CPU a chunk is a few experts'
    rows, small enough that every temporary stays in cache and in the allocator's free lists (the large
    [A, D] gathers of the one-shot version cost fresh pages each step); on CUDA one chunk takes every row
    with one grouped_mm per projection and no host sync.
    Only the two pre-activations g and u are saved: the gathered input, silu(g) and the hidden are
    recomputed in backward, so the routed experts keep 2*A*F numbers for backward instead of A*D + 5*A*F.
    """

    @staticmethod
    def forward(ctx, x_TD, w_gate, w_up, w_down, w_A, token_A, chunks):
        A, F_ = token_A.numel(), w_gate.shape[1]
        one_shot = len(chunks) == 1 and isinstance(chunks[0][1], torch.Tensor)
        g_AF = None if one_shot else x_TD.new_empty(A, F_)  # chunks write their rows in place
        u_AF = None if one_shot else x_TD.new_empty(A, F_)
        y_TD = torch.zeros_like(x_TD)
        for rows, parts in chunks:
            tok = token_A[rows]
            x_nD = x_TD.index_select(0, tok)
            g = _project(x_nD, w_gate, parts, None if one_shot else g_AF[rows])
            u = _project(x_nD, w_up, parts, None if one_shot else u_AF[rows])
            del x_nD
            h = F.silu(g).mul_(u).mul_(w_A[rows, None])
            y_TD.index_add_(0, tok, _project(h, w_down, parts))
        if one_shot:
            g_AF, u_AF = g, u
        ctx.save_for_backward(x_TD, w_gate, w_up, w_down, w_A, token_A, g_AF, u_AF)
        ctx.chunks = chunks
        return y_TD

    @staticmethod
    def backward(ctx, grad_TD):
        x_TD, w_gate, w_up, w_down, w_A, token_A, g_AF, u_AF = ctx.saved_tensors
        grad_x = torch.zeros_like(x_TD)
        grad_wg, grad_wu, grad_wd = (torch.empty_like(w) for w in (w_gate, w_up, w_down))
        used = [e for _, parts in ctx.chunks if isinstance(parts, list) for _, e in parts]
        if len(used) < w_gate.shape[0] and not (ctx.chunks and isinstance(ctx.chunks[0][1], torch.Tensor)):
            idle_E = torch.ones(w_gate.shape[0], dtype=torch.bool, device=w_gate.device)
            idle_E[used] = False
            for grad in (grad_wg, grad_wu, grad_wd):
                grad[idle_E] = 0  # an idle expert's gradient is exactly zero
        grad_wA = torch.empty_like(w_A)
        for rows, parts in ctx.chunks:
            tok = token_A[rows]
            x_nD, gy_nD = x_TD.index_select(0, tok), grad_TD.index_select(0, tok)  # contiguous, always
            g, u, w = g_AF[rows], u_AF[rows], w_A[rows, None]
            sg, dsilu = _silu_and_grad(g)
            h = sg * u
            grad_wd = _weight_grad(gy_nD, h * w, parts, grad_wd)
            grad_hw = _project_back(gy_nD, w_down, parts)
            del gy_nD
            grad_wA[rows] = (grad_hw * h).sum(-1)
            grad_h = grad_hw.mul_(w)
            grad_u = grad_h * sg
            grad_g = grad_h.mul_(u).mul_(dsilu)
            grad_wg = _weight_grad(grad_g, x_nD, parts, grad_wg)
            grad_wu = _weight_grad(grad_u, x_nD, parts, grad_wu)
            grad_x.index_add_(0, tok, _project_back(grad_u, w_up, parts, _project_back(grad_g, w_gate, parts)))
        return grad_x, grad_wg, grad_wu, grad_wd, grad_wA, None, None


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights, computed dropless: assignments sorted by expert, one matmul
    per expert and projection (CPU) or one grouped matmul per projection (CUDA).

    `use_grouped_mm` picks the kernel: None chooses by device, True/False force it (tests, benchmarks).
    """

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w_up = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.use_grouped_mm: bool | None = None
        self.reset_parameters()

    def reset_parameters(self):
        for w in (self.w_gate, self.w_up, self.w_down):  # nn.Linear's default, per expert
            bound = 1 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x_TD, ids_TK, weights_TK, keep_A: torch.Tensor | None = None):
        """x [T, D]; ids, weights [T, K]; keep [T*K] bool marks the assignments that are not dropped."""
        T, K = ids_TK.shape
        E = self.w_gate.shape[0]
        ids_A, w_A = ids_TK.reshape(-1), weights_TK.reshape(-1)
        if keep_A is not None:
            assign_A = keep_A.nonzero().squeeze(1)
            ids_A, w_A = ids_A[assign_A], w_A[assign_A]
        order_A = ids_A.argsort(stable=True)
        token_A = (order_A if keep_A is None else assign_A[order_A]) // K
        w_A = w_A[order_A].to(x_TD.dtype)
        counts_E = torch.bincount(ids_A, minlength=E)
        return routed_swiglu(x_TD, self.w_gate, self.w_up, self.w_down, w_A, token_A, counts_E, self.use_grouped_mm)


def routed_swiglu(x_TD, w_gate, w_up, w_down, w_A, token_A, counts_E, use_grouped_mm: bool | None = None):
    """sum over assignments a of w_A[a] * expert_e(x[token_A[a]]) into row token_A[a], assignments sorted by
    expert e with counts_E[e] of them. Shared by GroupedExperts and the expert-parallel receive side.

    use_grouped_mm None picks by device: on CPU torch's grouped_mm is itself a loop over experts, but over the
    whole gathered [A, D] input, and the chunked per-expert loop here measures faster (benchmarks/bench_layer.py);
    on CUDA one kernel per projection avoids a host sync.
    """
    grouped = _grouped_mm_ok(x_TD, w_gate, w_down) and (
        x_TD.device.type == "cuda" if use_grouped_mm is None else use_grouped_mm)
    if grouped:
        chunks = [(slice(None), counts_E.cumsum(0).to(torch.int32))]
    else:
        chunks = _chunks(counts_E.tolist(), x_TD.shape[1] * x_TD.element_size())
    return _RoutedSwiGLU.apply(x_TD, w_gate, w_up, w_down, w_A, token_A, chunks)


def reference_experts(experts: GroupedExperts, x_TD, ids_TK, weights_TK, keep_A=None):
    """The obviously-correct loop over experts that GroupedExperts must equal (slow; for tests)."""
    T, K = ids_TK.shape
    keep_TK = torch.ones_like(ids_TK, dtype=torch.bool) if keep_A is None else keep_A.view(T, K)
    y_TD = torch.zeros_like(x_TD)
    for e in range(experts.w_gate.shape[0]):
        tok, slot = torch.where((ids_TK == e) & keep_TK)
        h = F.silu(x_TD[tok] @ experts.w_gate[e].T) * (x_TD[tok] @ experts.w_up[e].T)
        out = (h * weights_TK[tok, slot].to(h.dtype).unsqueeze(-1)) @ experts.w_down[e].T
        y_TD = y_TD.index_add(0, tok, out)
    return y_TD
