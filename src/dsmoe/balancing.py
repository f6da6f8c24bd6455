"""Load balancing (DeepSeekMoE, DeepSeek-V2/V3, Loss-Free Balancing, Switch, ST-MoE): auxiliary losses as pure
functions, and the loss-free bias update.

Shapes: T tokens, B sequences of S tokens, E routed experts, K experts per token, G expert groups
(devices), M groups a token may reach.
"""

from __future__ import annotations

import torch

from dsmoe.config import AuxLossScores, BiasRule
from dsmoe.metrics import expert_load


def loss_scores(scores_TE: torch.Tensor, how: str) -> torch.Tensor:
    """The scores P_i averages: normalized to sum to 1 per token, or raw (MoEConfig.aux_loss_scores).

    With raw sigmoid scores, dL/ds_i = f_i / T >= 0 for every expert, so the loss pushes every logit down
    (most where f_i is large), and it is sum_j s_j times the normalized loss (about E/2 at initialization:
    ~30x at E=64) at the same alpha. After normalizing (Megatron-LM; DeepSeek-V3 eq. 19), raising one score
    lowers every other P_j, so the gradient moves probability from overloaded to underloaded experts, as
    with softmax.
    Softmax scores already sum to 1: both choices agree for them (up to rounding).
    """
    if how == AuxLossScores.NORMALIZED:
        return scores_TE / (scores_TE.sum(-1, keepdim=True) + 1e-20)  # + 1e-20 as Megatron: an all-zero row stays 0
    return scores_TE


def _expert_fraction(ids_TK: torch.Tensor, E: int) -> torch.Tensor:
    """f_i = (E / (K*T)) * #tokens choosing i: 1 for every expert under uniform routing. No gradient."""
    T, K = ids_TK.shape
    return expert_load(ids_TK, E).float() * (E / (K * T))


def expert_balance_loss(scores_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """sum_i f_i * P_i (Switch Transformer eq. 4, DeepSeekMoE eq. 12), P_i the mean of scores_TE[:, i].

    Pass the scores P should average (`loss_scores`: the layer normalizes sigmoid scores by default).
    Equals 1 under uniform routing of scores that sum to 1 per token. f counts ids_TK, the routed experts.
    """
    return (_expert_fraction(ids_TK, scores_TE.shape[1]) * scores_TE.mean(0)).sum()


def sequence_balance_loss(scores_BSE: torch.Tensor, top_k: int, ids_BSK: torch.Tensor | None = None) -> torch.Tensor:
    """The expert-level loss per sequence, averaged over sequences (DeepSeek-V3 eq. 17-20, DeepSeek-V2 eq. 24).

    f counts ids_BSK, the experts actually routed (DeepSeek-V2's code and paper: group limit included), or,
    when None, the top-K of the unbiased scores (DeepSeek-V3 eq. 18). P always uses scores normalized to sum
    to 1 per token (V3 eq. 19; V2's softmax scores already do).
    """
    B, S, E = scores_BSE.shape
    if ids_BSK is None:
        ids_BSK = scores_BSE.detach().topk(top_k, dim=-1).indices
    ids_BA = ids_BSK.reshape(B, -1)
    ones_BA = torch.ones_like(ids_BA, dtype=torch.float)
    f_BE = torch.zeros(B, E, device=scores_BSE.device).scatter_add_(1, ids_BA, ones_BA)
    f_BE = f_BE * (E / (top_k * S))
    P_BE = (scores_BSE / scores_BSE.sum(-1, keepdim=True)).mean(1)
    return (f_BE * P_BE).sum(-1).mean()


def device_balance_loss(scores_TE: torch.Tensor, ids_TK: torch.Tensor, n_groups: int) -> torch.Tensor:
    """sum_d f'_d P'_d with f'_d the mean f_i and P'_d the summed P_i over device d's experts (DeepSeek-V2 eq. 14).

    scores_TE: the scores P averages, as for `expert_balance_loss`.
    """
    G = n_groups
    f_G = _expert_fraction(ids_TK, scores_TE.shape[1]).view(G, -1).mean(-1)
    P_G = scores_TE.mean(0).view(G, -1).sum(-1)
    return (f_G * P_G).sum()


def comm_balance_loss(scores_TE: torch.Tensor, ids_TK: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """sum_d f''_d P''_d, f''_d = (G / (M*T)) * #tokens sent to device d (DeepSeek-V2 eq. 16-17).

    scores_TE: the scores P averages, as for `expert_balance_loss`.
    """
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
