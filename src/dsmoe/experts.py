"""Expert computation.

Shapes: T tokens, D model dim, E experts, F expert hidden dim, K experts per token, A = T*K assignments.

`GroupedExperts` stores the experts stacked ([E, F, D] like HuggingFace's per-expert [F, D]), sorts the A
token-expert assignments by expert and runs each projection as one grouped matrix multiply. The routing
weight scales the hidden activation (before the down projection), and the results are combined into the
T outputs with one index_add. `reference_experts` is the plain per-expert loop it must equal.
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


def grouped_mm(x_AI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor, counts: list[int] | None):
    """Row block e of x (rows offs[e-1]:offs[e]) times w[e]^T. Shapes: x [A, I], w [E, O, I] -> [A, O].

    The fallback loops over experts on an unbind of w: one gradient per expert is stacked once, where
    indexing w[e] under autograd would write a full [E, O, I] zero gradient for every expert.
    """
    if counts is None:
        return torch._grouped_mm(x_AI, w_EOI.transpose(1, 2), offs=offs_E)
    outs = [xe @ we.T for xe, we in zip(x_AI.split(counts), w_EOI.unbind(0))]
    return torch.cat(outs) if outs else x_AI.new_zeros(0, w_EOI.shape[1])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm rejects zero strides)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights, computed dropless by grouped matrix multiplies."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w_up = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, hidden))
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
        token_A = torch.arange(T * K, device=x_TD.device) // K
        if keep_A is not None:
            ids_A, w_A, token_A = ids_A[keep_A], w_A[keep_A], token_A[keep_A]
        order_A = ids_A.argsort(stable=True)
        token_A, w_A = token_A[order_A], w_A[order_A]
        counts_E = torch.bincount(ids_A, minlength=E)
        offs_E = counts_E.cumsum(0).to(torch.int32)
        counts = None if _grouped_mm_ok(x_TD, self.w_gate, self.w_down) else counts_E.tolist()
        x_AD = x_TD[token_A]
        h_AF = F.silu(grouped_mm(x_AD, self.w_gate, offs_E, counts)) * grouped_mm(x_AD, self.w_up, offs_E, counts)
        h_AF = h_AF * w_A.to(h_AF.dtype).unsqueeze(-1)
        out_AD = grouped_mm(_ContiguousGrad.apply(h_AF), self.w_down, offs_E, counts)
        return torch.zeros_like(x_TD).index_add_(0, token_A, _ContiguousGrad.apply(out_AD))


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
