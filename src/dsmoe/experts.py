"""Expert computation.

Shapes (the suffixes on names):
    T tokens   D model dim   E experts   F expert hidden dim   K experts per token
    A assignments (token, expert), sorted by expert: T*K, fewer once dropped ones are removed
      (keep_A marks the kept ones among all T*K)
    n rows of one chunk of the A sorted assignments (all A for the grouped plan)
    I, O a projection's input and output width, its weights stacked [E, O, I]:
      gate and up [E, F, D] (I=D, O=F), down [E, D, F] (I=F, O=D)
Routing weights are `weights_A`; expert weight matrices are `w_gate_EFD`, `w_up_EFD`, `w_down_EDF`.

`SwiGLU` is one expert (and the fused shared experts, and the dense FFN). `GroupedExperts` stores E experts
stacked ([E, F, D] like HuggingFace's per-expert [F, D]), sorts the A assignments by expert and hands them to
the routed SwiGLU op (dsmoe.ops.routed_swiglu). `reference_experts` is the plain per-expert loop it must equal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.metrics import expert_load
from dsmoe.ops.routed_swiglu import routed_swiglu


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases. Also the fused shared experts and the dense FFN."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # nn.Module.__call__ returns Any
        return y


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights, computed dropless: assignments sorted by expert, one matmul
    per expert and projection (CPU) or one grouped matmul per projection (CUDA).

    `use_grouped_mm` picks the kernel: None chooses by device, True/False force it (tests, benchmarks).
    """

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n_experts, hidden, dim))  # [E, F, D]
        self.w_up = nn.Parameter(torch.empty(n_experts, hidden, dim))  # [E, F, D]
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, hidden))  # [E, D, F]
        self.use_grouped_mm: bool | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w_EOI in (self.w_gate, self.w_up, self.w_down):  # nn.Linear's default, per expert
            bound = 1 / math.sqrt(w_EOI.shape[-1])
            nn.init.uniform_(w_EOI, -bound, bound)

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                keep_A: torch.Tensor | None = None) -> torch.Tensor:
        """keep_A [T*K] bool marks the assignments that are not dropped."""
        T, K = ids_TK.shape
        E = self.w_gate.shape[0]
        ids_A, weights_A = ids_TK.reshape(-1), weights_TK.reshape(-1)
        if keep_A is not None:
            assign_A = keep_A.nonzero().squeeze(1)
            ids_A, weights_A = ids_A[assign_A], weights_A[assign_A]
        order_A = ids_A.argsort(stable=True)
        token_A = (order_A if keep_A is None else assign_A[order_A]) // K
        weights_A = weights_A[order_A].to(x_TD.dtype)
        counts_E = expert_load(ids_A, E)
        return routed_swiglu(x_TD, self.w_gate, self.w_up, self.w_down, weights_A, token_A, counts_E,
                             self.use_grouped_mm)


def reference_experts(experts: GroupedExperts, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                      keep_A: torch.Tensor | None = None) -> torch.Tensor:
    """The obviously-correct loop over experts that GroupedExperts must equal (slow; for tests)."""
    T, K = ids_TK.shape
    keep_TK = torch.ones_like(ids_TK, dtype=torch.bool) if keep_A is None else keep_A.view(T, K)
    y_TD = torch.zeros_like(x_TD)
    for e in range(experts.w_gate.shape[0]):
        token_n, slot_n = torch.where((ids_TK == e) & keep_TK)
        hidden_nF = F.silu(x_TD[token_n] @ experts.w_gate[e].T) * (x_TD[token_n] @ experts.w_up[e].T)
        out_nD = (hidden_nF * weights_TK[token_n, slot_n].to(hidden_nF.dtype).unsqueeze(-1)) @ experts.w_down[e].T
        y_TD = y_TD.index_add(0, token_n, out_nD)
    return y_TD
