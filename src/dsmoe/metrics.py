"""Balance metrics (Loss-Free Balancing, arXiv 2408.15664 §4.1). Load_i = tokens routed to expert i."""

from __future__ import annotations

import math

import torch


def expert_load(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Load_i [E]: how many of `ids` (any shape) are i. Like bincount, but of a fixed shape, which
    torch.compile traces without a graph break."""
    ids = ids.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def max_violation(load_E: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i Load_i - mean_i Load_i) / mean_i Load_i; 0 when nothing was routed."""
    load_E = load_E.float()
    mean = load_E.mean(-1)
    return torch.where(mean > 0, (load_E.amax(-1) - mean) / mean.clamp_min(1e-12), torch.zeros_like(mean))


def load_entropy(load_E: torch.Tensor) -> torch.Tensor:
    """Entropy of the load distribution divided by log(E): 1 is perfectly even, 0 all on one expert (or none)."""
    E = load_E.shape[-1]
    p = load_E.float() / load_E.float().sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    if E == 1:  # log(1) = 0: a single expert is trivially balanced
        return torch.ones_like(entropy)
    return entropy / math.log(E)


def dead_experts(load_E: torch.Tensor) -> torch.Tensor:
    """Number of experts that received no token."""
    return (load_E == 0).sum(-1)
