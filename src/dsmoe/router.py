"""The DeepSeekMoE router (DeepSeek-V2 §2.1.2-2.1.3, DeepSeek-V3 §2.1.2).

Shapes: T tokens, D model dim, E routed experts, G expert groups, K experts per token.

    s = score(x @ W^T)                 fp32
    choice = s + b                     b only picks experts; it never enters the weights
    choice[exclude] = -inf             optional: experts a token may not choose (the redundancy test)
    group limit (G > 1): keep the top-M groups, mask the rest with -inf
    ids = topk(choice, K);  w = s[ids];  optionally w /= sum(w);  w *= route_scale
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import GroupScore, MoEConfig, ScoreFunc


def group_limit(choice_TE: torch.Tensor, n_groups: int, topk_groups: int, group_score: str) -> torch.Tensor:
    """Set every expert outside a token's top `topk_groups` groups to -inf.

    -inf, never 0: with a bias, choice can be negative, and a 0 mask would let discarded groups win.
    """
    T, E = choice_TE.shape
    choice_TGe = choice_TE.view(T, n_groups, E // n_groups)
    if group_score == GroupScore.TOP2:
        group_TG = choice_TGe.topk(2, dim=-1).values.sum(-1)
    else:
        group_TG = choice_TGe.amax(-1)
    keep_TM = group_TG.topk(topk_groups, dim=-1).indices
    drop_TG = torch.ones_like(group_TG, dtype=torch.bool).scatter_(1, keep_TM, False)
    return choice_TGe.masked_fill(drop_TG.unsqueeze(-1), float("-inf")).view(T, E)


def route(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, cfg: MoEConfig,
          exclude_TE: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing from fp32 logits. Returns (weights_TK, ids_TK, scores_TE).

    exclude_TE: an optional bool mask of the experts each token may not choose (DeepSeekMoE's redundancy
    test); like the bias it changes the choice only, never the scores the weights are taken from.
    """
    logits_TE = logits_TE.float()
    scores_TE = logits_TE.softmax(-1) if cfg.score_func == ScoreFunc.SOFTMAX else logits_TE.sigmoid()
    choice_TE = scores_TE.detach()
    if bias_E is not None:
        choice_TE = choice_TE + bias_E
    if exclude_TE is not None:  # before the group limit: a group is scored by the experts a token may choose
        choice_TE = choice_TE.masked_fill(exclude_TE, float("-inf"))
    if cfg.n_groups > 1:
        choice_TE = group_limit(choice_TE, cfg.n_groups, cfg.topk_groups, cfg.group_score)
    if cfg.uniform_routing:  # debug switch: token t takes experts t*K .. t*K+K-1 (mod E)
        T = logits_TE.shape[0]
        ids_TK = torch.arange(T * cfg.top_k, device=logits_TE.device).view(T, cfg.top_k) % cfg.n_routed_experts
    else:
        ids_TK = choice_TE.topk(cfg.top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, ids_TK)  # from the unbiased scores
    if cfg.norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    return weights_TK * cfg.route_scale, ids_TK, scores_TE


class Router(nn.Module):
    """Gate weight [E, D] and the auxiliary-loss-free balancing bias (an fp32 buffer, saved, no gradient).

    `exclude_top = n > 0` excludes each token's n top choices (bias included), so it takes its next K: the
    redundancy test of dsmoe.studies sets it on a trained model; 0, the default, excludes nothing.
    """

    bias: torch.Tensor  # [E] fp32 buffer

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default
        self.exclude_top = 0

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Router:
        """.to(dtype) and friends cast the weight; the bias keeps its fp32 values (a loss-free step of 1e-3 is
        below bf16's resolution at the bias's typical size) and follows the weight's device."""
        bias = self.bias
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        if self.bias.dtype != torch.float32:
            self.bias = bias.to(self.bias.device)
        return self

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (weights_TK, ids_TK, scores_TE, logits_TE); scores and logits are fp32."""
        with torch.autocast(x_TD.device.type, enabled=False):  # fp32 even under bf16 autocast (DeepSeek-V3 §3.3)
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        exclude_TE = None
        if self.exclude_top > 0:
            top_TN = route(logits_TE, self.bias, self.cfg.replace(top_k=self.exclude_top))[1]
            exclude_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter_(1, top_TN, True)
        return (*route(logits_TE, self.bias, self.cfg, exclude_TE), logits_TE)
