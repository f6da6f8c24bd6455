"""The DeepSeekMoE layer (DeepSeekMoE, arXiv 2401.06066): y = shared(x) + sum_{i in TopK(x)} g_i(x) * expert_i(x).

Shapes: T tokens, D model dim, E routed experts, K experts per token, A = T*K assignments.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dsmoe import balancing
from dsmoe.config import MoEConfig, SeqAuxExperts
from dsmoe.experts import GroupedExperts, SwiGLU, reference_experts
from dsmoe.metrics import expert_load, max_violation
from dsmoe.router import Router


def capacity_keep(ids_TK: torch.Tensor, weights_TK: torch.Tensor, n_experts: int, factor: float) -> torch.Tensor:
    """Which of the A assignments fit in their expert's capacity ceil(factor * A / E), lowest affinity dropped."""
    ids_A, w_A = ids_TK.reshape(-1), weights_TK.detach().reshape(-1)
    A = ids_A.numel()
    by_weight = w_A.argsort(descending=True, stable=True)
    order = by_weight[ids_A[by_weight].argsort(stable=True)]  # by expert, then by affinity descending
    counts_E = expert_load(ids_A, n_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    rank_A = torch.empty_like(ids_A)
    rank_A[order] = torch.arange(A, device=ids_A.device) - starts_E[ids_A[order]]
    return rank_A < math.ceil(factor * A / n_experts)


class MoE(nn.Module):
    """DeepSeekMoE layer: router, fine-grained routed experts, fused shared experts.

    After each forward the layer holds `aux_loss` (the weighted sum of the enabled auxiliary losses, a
    scalar tensor with gradient), `losses` (each enabled term, unweighted), `tokens_per_expert` [E] and
    `maxvio` (MaxVio of this batch), and `dropped` (assignments dropped by the capacity limit).
    In training it also adds the token counts to `counts`, which `update_bias()` consumes once per
    optimizer step.
    """

    counts: torch.Tensor  # [E] long, non-persistent buffer: assignments per expert since the last update_bias()

    def __init__(self, cfg: MoEConfig, reference: bool = False):
        super().__init__()
        self.cfg = cfg
        self.reference = reference  # run the slow per-expert loop (for tests and benchmarks)
        self.gate = Router(cfg)
        # GroupedExperts, or a module with the same call (apply_expert_parallel swaps in ExpertParallel)
        self.experts: nn.Module = GroupedExperts(cfg.n_routed_experts, cfg.dim, cfg.expert_dim)
        self.shared_experts = SwiGLU(cfg.dim, cfg.shared_width) if cfg.n_shared_experts else None
        # Qwen2-MoE's gate on the shared experts' output: sigmoid(x @ w)
        self.shared_expert_gate = nn.Linear(cfg.dim, 1, bias=False) if cfg.shared_expert_gate else None
        self.recomputing = False  # set while activation checkpointing recomputes this forward in backward
        self.register_buffer("counts", torch.zeros(cfg.n_routed_experts, dtype=torch.long), persistent=False)
        self.aux_loss = torch.zeros(())
        self.losses: dict[str, torch.Tensor] = {}
        self.tokens_per_expert = torch.zeros(cfg.n_routed_experts, dtype=torch.long)
        self.maxvio = torch.zeros(())
        self.dropped = torch.zeros((), dtype=torch.long)

    def _check_input(self, x: torch.Tensor) -> None:
        """Type, shape, device and dtype of the input (its values are checked in forward, under check_inputs).

        The layer computes in its weights' dtype, as nn.Linear does: another input dtype is an error, unless
        autocast chooses the dtypes (training on cuda under bf16 autocast).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoE input must be a torch.Tensor, got {type(x).__name__}")
        if not torch.is_floating_point(x):
            raise TypeError(f"MoE input must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.cfg.dim:
            raise ValueError(f"MoE input must have shape (..., dim={self.cfg.dim}), got {tuple(x.shape)}")
        weight = next(self.experts.parameters(), self.gate.weight)
        if x.device != weight.device:
            raise ValueError(f"MoE input is on {x.device}, the layer on {weight.device}: move one to the other "
                             f"(x.to({str(weight.device)!r}) or moe.to({str(x.device)!r}))")
        if x.is_meta:
            raise ValueError("MoE input is on the meta device: routing depends on the values, which meta tensors "
                             "do not hold; give a real tensor (moe.to_empty(device=...) for a meta layer)")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"MoE input has dtype {x.dtype}, the layer's weights {weight.dtype}: convert the input "
                            f"(x.to({weight.dtype})) or the layer (moe.to({x.dtype})), or run under torch.autocast")

    def _check_values(self, x_TD: torch.Tensor, logits_TE: torch.Tensor, y_TD: torch.Tensor) -> None:
        """NaN or inf in the input, the balancing bias or the output, with one host sync.

        A NaN or inf anywhere in a token makes all of its logits non-finite (inf * 0 is NaN too), so checking the
        [T, E] logits catches every bad input at E/D of the cost of checking x. A finite input can still overflow
        in the experts (|x| ~ 1e30 in fp32), and a NaN bias silently routes every token to the same experts.
        Under torch.compile on the CPU the same three checks are asserts inside the graph (torch._assert_async: no
        graph break), raising a RuntimeError with the same messages (without the output's largest input, which
        would need a sync). On CUDA a failed device-side assert would end the process's CUDA context, so a
        compiled layer skips them there; training checks its loss at every log point instead.
        """
        ok = [torch.isfinite(logits_TE).all(), torch.isfinite(self.gate.bias).all(), torch.isfinite(y_TD).all()]
        messages = ["MoE router logits are not finite: the input contains NaN or inf (or the router weight does, "
                    "or the logits overflow)",
                    "MoE balancing bias (gate.bias) is not finite: it would decide every token's experts; load it "
                    "from a good checkpoint, or zero it",
                    f"MoE output is not finite although the input is: the experts overflow {y_TD.dtype}; normalize "
                    "or scale the input down"]
        if torch.compiler.is_compiling():
            if x_TD.device.type == "cpu":
                for ok_, message in zip(ok, messages):
                    torch._assert_async(ok_, message)
            return
        bad_input, bad_bias, bad_output = torch.stack(ok).logical_not().tolist()
        if bad_input or bad_bias:
            raise ValueError(messages[0] if bad_input else messages[1])
        if bad_output:
            raise ValueError(f"{messages[2]} (largest |input| {x_TD.detach().abs().max().item():.3g})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        cfg = self.cfg
        x_TD = x.reshape(-1, cfg.dim)
        weights_TK, ids_TK, scores_TE, logits_TE = self.gate(x_TD)

        keep_A = None
        if cfg.capacity_factor is not None and x_TD.shape[0] > 0:
            # a factor of E already keeps all A assignments; capped, so that a huge one cannot overflow ceil()
            factor = min(cfg.capacity_factor, cfg.n_routed_experts)
            keep_A = capacity_keep(ids_TK, weights_TK, cfg.n_routed_experts, factor)
        if self.reference:
            assert isinstance(self.experts, GroupedExperts)
            y_TD = reference_experts(self.experts, x_TD, ids_TK, weights_TK, keep_A)
        else:
            y_TD = self.experts(x_TD, ids_TK, weights_TK, keep_A)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        if cfg.check_inputs:
            self._check_values(x_TD, logits_TE, y_TD)

        # decided here: inside _record (no_grad) is_grad_enabled() would always be False
        self._record(ids_TK, keep_A, count=self.training and torch.is_grad_enabled() and not self.recomputing)
        self._compute_losses(x.shape, scores_TE, ids_TK, logits_TE)
        return y_TD.view(x.shape)

    @torch.no_grad()
    def _record(self, ids_TK: torch.Tensor, keep_A: torch.Tensor | None, count: bool) -> None:
        """Routing statistics of this forward; counts for the bias only from training forwards (`count`)."""
        load_E = expert_load(ids_TK, self.cfg.n_routed_experts)
        self.tokens_per_expert = load_E
        self.maxvio = max_violation(load_E)
        self.dropped = (~keep_A).sum() if keep_A is not None else load_E.new_zeros(())
        if count:  # not in eval, nor under no_grad
            self.counts += load_E

    def _compute_losses(self, shape: torch.Size, scores_TE: torch.Tensor, ids_TK: torch.Tensor,
                        logits_TE: torch.Tensor) -> None:
        cfg = self.cfg
        terms: dict[str, tuple[float, torch.Tensor]] = {}  # name: (coefficient, unweighted loss)
        if scores_TE.shape[0] > 0:
            # P_i of the expert, device and comm losses: normalized per token by default (see loss_scores)
            P_scores_TE = (balancing.loss_scores(scores_TE, cfg.aux_loss_scores)
                           if cfg.aux_loss_alpha or cfg.device_loss_alpha or cfg.comm_loss_alpha else scores_TE)
            if cfg.aux_loss_alpha:
                terms["aux"] = (cfg.aux_loss_alpha, balancing.expert_balance_loss(P_scores_TE, ids_TK))
            if cfg.seq_aux_loss_alpha:
                S = shape[-2] if len(shape) >= 3 else scores_TE.shape[0]
                scores_BSE = scores_TE.view(-1, S, cfg.n_routed_experts)
                # f counts the routed experts (V2) or the top-K of the unbiased scores (V3, ids None)
                routed_BSK = ids_TK.view(-1, S, cfg.top_k) if cfg.seq_aux_experts == SeqAuxExperts.ROUTED else None
                terms["seq_aux"] = (cfg.seq_aux_loss_alpha,
                                    balancing.sequence_balance_loss(scores_BSE, cfg.top_k, routed_BSK))
            if cfg.device_loss_alpha:
                terms["device"] = (cfg.device_loss_alpha,
                                   balancing.device_balance_loss(P_scores_TE, ids_TK, cfg.n_groups))
            if cfg.comm_loss_alpha:
                terms["comm"] = (cfg.comm_loss_alpha,
                                 balancing.comm_balance_loss(P_scores_TE, ids_TK, cfg.n_groups, cfg.topk_groups))
            if cfg.z_loss_beta:
                terms["z"] = (cfg.z_loss_beta, balancing.z_loss(logits_TE))
        self.losses = {name: loss for name, (_, loss) in terms.items()}
        self.aux_loss = sum((coef * loss for coef, loss in terms.values()), scores_TE.new_zeros(()))

    def update_bias(self) -> None:
        """Apply one loss-free balancing step from the counts gathered since the last call, then reset them.

        Call once per optimizer step, after all gradient-accumulation micro-batches (for a whole model,
        possibly over several ranks: `update_biases`).
        """
        if self.cfg.bias_update_speed > 0:
            balancing.update_bias(self.gate.bias, self.counts, self.cfg.bias_update_speed, self.cfg.bias_update_rule)
        self.counts.zero_()

    def set_top_k(self, k: int) -> None:
        """Change K in place (a dynamic top-k schedule); validated like a new config."""
        self.cfg = self.gate.cfg = self.cfg.replace(top_k=k)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def update_biases(model: nn.Module, all_reduce_: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """update_bias() on every MoE layer of a model: once per optimizer step.

    `all_reduce_` sums a tensor over the ranks in place (a distributed context's): every layer's counts
    travel in one all-reduce, so that every rank applies the same update.
    """
    layers = moe_layers(model)
    if all_reduce_ is not None and layers:
        counts = all_reduce_(torch.cat([m.counts for m in layers]))
        for m, c in zip(layers, torch.split(counts, [m.counts.numel() for m in layers])):
            m.counts.copy_(c)
    for m in layers:
        m.update_bias()
