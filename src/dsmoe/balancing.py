"""Load balancing (DeepSeekMoE, DeepSeek-V2/V3, Loss-Free Balancing, Switch, ST-MoE): auxiliary losses as pure
functions, and the loss-free bias update.

Shapes: T tokens, B sequences of S tokens, E routed experts, K experts per token, G expert groups
(devices), M groups a token may reach.
"""

from __future__ import annotations

import torch

from dsmoe.config import BiasRule


def _expert_fraction(ids_TK: torch.Tensor, E: int) -> torch.Tensor:
    """f_i = (E / (K*T)) * #tokens choosing i: 1 for every expert under uniform routing. No gradient."""
    T, K = ids_TK.shape
    return torch.bincount(ids_TK.reshape(-1), minlength=E).float() * (E / (K * T))


def expert_balance_loss(scores_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """sum_i f_i * P_i (Switch Transformer eq. 4, DeepSeekMoE eq. 12). Equals 1 under uniform routing of softmax
    scores (sigmoid scores need not sum to 1 over experts, so their minimum differs)."""
    return (_expert_fraction(ids_TK, scores_TE.shape[1]) * scores_TE.mean(0)).sum()


def sequence_balance_loss(scores_BSE: torch.Tensor, top_k: int) -> torch.Tensor:
    """The expert-level loss per sequence, averaged over sequences (DeepSeek-V3 eq. 17-20).

    f counts the top-K of the unbiased scores; P uses scores normalized to sum to 1 per token.
    """
    B, S, E = scores_BSE.shape
    ids_BA = scores_BSE.detach().topk(top_k, dim=-1).indices.reshape(B, -1)
    ones_BA = torch.ones_like(ids_BA, dtype=torch.float)
    f_BE = torch.zeros(B, E, device=scores_BSE.device).scatter_add_(1, ids_BA, ones_BA)
    f_BE = f_BE * (E / (top_k * S))
    P_BE = (scores_BSE / scores_BSE.sum(-1, keepdim=True)).mean(1)
    return (f_BE * P_BE).sum(-1).mean()


def device_balance_loss(scores_TE: torch.Tensor, ids_TK: torch.Tensor, n_groups: int) -> torch.Tensor:
    """sum_d f'_d P'_d with f'_d the mean f_i and P'_d the summed P_i over device d's experts (DeepSeek-V2 eq. 14)."""
    G = n_groups
    f_G = _expert_fraction(ids_TK, scores_TE.shape[1]).view(G, -1).mean(-1)
    P_G = scores_TE.mean(0).view(G, -1).sum(-1)
    return (f_G * P_G).sum()


def comm_balance_loss(scores_TE: torch.Tensor, ids_TK: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """sum_d f''_d P''_d, f''_d = (G / (M*T)) * #tokens sent to device d (DeepSeek-V2 eq. 16-17)."""
    T, E = scores_TE.shape
    G, M = n_groups, topk_groups
    sent_TG = torch.zeros(T, G, dtype=torch.bool, device=ids_TK.device).scatter_(1, ids_TK // (E // G), True)
    f_G = sent_TG.sum(0).float() * (G / (M * T))
    P_G = scores_TE.mean(0).view(G, -1).sum(-1)
    return (f_G * P_G).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean_t (logsumexp_i logits_ti)^2 (ST-MoE eq. 5): keeps router logits small."""
    return logits_TE.float().logsumexp(-1).square().mean()


@torch.no_grad()
def update_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, speed: float, rule: str) -> None:
    """One loss-free balancing step (Wang et al. 2024, alg. 1), in place on the fp32 bias.

    counts are this optimizer step's token counts, summed over every rank by the caller
    (dsmoe.moe.update_biases), so that every replica applies the same update.
    """
    counts_E = counts_E.float()
    mean = counts_E.mean()
    error_E = mean - counts_E
    if rule == BiasRule.SIGN:
        bias_E += speed * error_E.sign()
    else:
        bias_E += speed * error_E / mean.clamp_min(1.0)
