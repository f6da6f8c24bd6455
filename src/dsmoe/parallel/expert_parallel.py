"""Expert parallelism over torch.distributed (DeepSeek-V2 §2.1.3, DeepSeek-V3 §2.1.2 and §3.2), applied to a built
model from outside.

Shapes: T local tokens, D model dim, E routed experts, L = E/R experts per rank, R ranks of the
expert-parallel group, K experts per token, A = T*K assignments sent, P (token, rank) pairs sent,
B assignments received, Q pairs received.

`apply_expert_parallel(model, group)` gives rank r the contiguous block of experts r*L .. r*L+L-1 of
every MoE layer and replaces `layer.experts` by an `ExpertParallel` module with the same call
signature. Its forward:

    1. count exchange     all-to-all of [pairs, per-expert counts] per destination rank (one host sync:
                          the uneven splits of the next all-to-alls)
    2. dispatch           each token travels ONCE to each rank owning one of its experts (a (token, rank)
                          pair), with the local expert ids and routing weights of its assignments there;
                          the shared experts are computed while the hidden states are in flight
    3. expert compute     the received assignments sorted by local expert, grouped matrix multiplies,
                          the routing weight on the hidden activation (as GroupedExperts does)
    4. combine            each pair's expert outputs summed on the expert's rank, sent back in one
                          reverse all-to-all, and added into the token's output

Deduplicating per (token, rank) is what makes device-limited routing pay (DeepSeek-V2 §2.2.2): with the
experts grouped by rank and topk_groups = M, a token crosses the network at most M times however
large K is. The all-to-alls are autograd-aware: the backward of each is the reverse all-to-all.
Overlap: the forward dispatch runs with async_op=True while the shared experts compute (gloo runs it
on its own thread, NCCL on its own stream); the backward all-to-alls are synchronous, since autograd
orders the backward and gives no place to slot the shared experts' backward between start and wait.

The other parameters (attention, embeddings, router, shared experts) are data parallel: in training,
FSDP2 shards them and averages their gradients (dsmoe.parallel.fsdp); expert gradients stay on the
expert's rank.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from dsmoe.experts import GroupedExperts, SwiGLU
from dsmoe.moe import MoE, moe_layers
from dsmoe.ops.routed_swiglu import ContiguousGrad, routed_swiglu
from dsmoe.parallel.comm import _all_to_all, all_to_all, all_to_all_async

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")

_M = TypeVar("_M", bound=nn.Module)


class OverlappedSwiGLU(SwiGLU):
    """The shared experts of an expert-parallel layer (same parameters and state-dict keys as SwiGLU).

    ExpertParallel computes them while its dispatch all-to-all is in flight (`precompute`); the MoE
    layer's own call on the same input then returns that result instead of computing it again. This relies on
    MoE.forward calling its routed experts before its shared experts, on the same tensor object
    (tests/test_moe.py holds it to that); on any other input it computes as SwiGLU does.
    """

    def __init__(self, shared: SwiGLU):
        nn.Module.__init__(self)
        self.gate_proj, self.up_proj, self.down_proj = shared.gate_proj, shared.up_proj, shared.down_proj
        self._ready: tuple[torch.Tensor, torch.Tensor] | None = None

    def precompute(self, x: torch.Tensor) -> None:
        self._ready = (x, super().forward(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ready, self._ready = self._ready, None
        if ready is not None and ready[0] is x:
            return ready[1]
        return super().forward(x)


class ExpertParallel(nn.Module):
    """This rank's block of L experts, computed for the tokens of every rank of `group`.

    Same call as GroupedExperts: forward(x_TD, ids_TK, weights_TK, keep_A=None) -> y_TD, with ids the
    global expert ids. After each forward it holds the communication of that forward:
    `sent_tokens_R` / `recv_tokens_R` (tokens sent to / received from each rank, one per (token, rank)
    pair, self included), `sent_assignments_R` / `recv_assignments_R`, `max_ranks_per_token`, and
    `a2a_bytes` (bytes this rank sent to other ranks in the forward all-to-alls; the backward sends the
    same dispatch and combine volume again, in the other direction).
    """

    w_gate: nn.Parameter  # [L, F, D] this rank's slice of the experts (set by name from EXPERT_WEIGHTS)
    w_up: nn.Parameter    # [L, F, D]
    w_down: nn.Parameter  # [L, D, F]

    def __init__(self, experts: GroupedExperts, group: dist.ProcessGroup | None = None,
                 shared: OverlappedSwiGLU | None = None):
        super().__init__()
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        E = experts.w_gate.shape[0]
        if E % self.world:
            raise ValueError(f"n_routed_experts={E} must be divisible by the expert-parallel world size {self.world}")
        self.n_experts, self.n_local = E, E // self.world
        lo, hi = self.rank * self.n_local, (self.rank + 1) * self.n_local
        for name in EXPERT_WEIGHTS:  # keep only the local slice as the parameter
            setattr(self, name, nn.Parameter(getattr(experts, name).detach()[lo:hi].clone()))
        self._shared = (shared,)  # a tuple: not a submodule, its parameters belong to the MoE layer
        self._reset_stats()

    @property
    def expert_range(self) -> range:
        return range(self.rank * self.n_local, (self.rank + 1) * self.n_local)

    def _reset_stats(self) -> None:
        R = self.world
        self.sent_tokens_R = self.recv_tokens_R = torch.zeros(R, dtype=torch.long)
        self.sent_assignments_R = self.recv_assignments_R = torch.zeros(R, dtype=torch.long)
        self.max_ranks_per_token: int | torch.Tensor = 0  # a tensor once a forward has run
        self.a2a_bytes = 0

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                keep_A: torch.Tensor | None = None) -> torch.Tensor:
        T, K = ids_TK.shape
        R, L, group = self.world, self.n_local, self.group
        dev = x_TD.device

        # 1. assignments grouped by destination rank; one (token, rank) pair per rank a token reaches
        ids_A, w_A = ids_TK.reshape(-1), weights_TK.reshape(-1).float()
        token_A = torch.arange(T * K, device=dev) // K
        if keep_A is not None:
            ids_A, w_A, token_A = ids_A[keep_A], w_A[keep_A], token_A[keep_A]
        rank_A = ids_A // L
        key_A = rank_A * T + token_A
        key_P, pair_A = torch.unique(key_A, sorted=True, return_inverse=True)  # pairs by rank, then token
        rank_P, token_P = key_P // max(T, 1), key_P % max(T, 1)
        sent_pairs_R = torch.bincount(rank_P, minlength=R)
        sent_RL = torch.bincount(ids_A, minlength=R * L).view(R, L)

        # count exchange: [pairs, per-local-expert assignments] for every destination rank
        counts_R1L = torch.cat([sent_pairs_R.unsqueeze(1), sent_RL], 1)
        recv_R1L, _ = _all_to_all(counts_R1L, [1] * R, [1] * R, group)
        send_c, recv_c = torch.stack([counts_R1L, recv_R1L]).tolist()  # the one host sync
        send_pairs, recv_pairs = [c[0] for c in send_c], [c[0] for c in recv_c]
        send_assign, recv_assign = [sum(c[1:]) for c in send_c], [sum(c[1:]) for c in recv_c]

        # 2. dispatch: hidden states once per pair; per assignment its pair (within the rank's block)
        # and local expert, packed in one int64, and its routing weight (with gradient)
        order_A = torch.argsort(key_A, stable=True)
        pair_start_R = sent_pairs_R.cumsum(0) - sent_pairs_R
        meta_A = ((pair_A - pair_start_R[rank_A]) * L + ids_A % L)[order_A]
        wait_x = all_to_all_async(x_TD[token_P], recv_pairs, send_pairs, group)
        wait_w = all_to_all_async(w_A[order_A], recv_assign, send_assign, group)
        meta_B, _ = _all_to_all(meta_A, recv_assign, send_assign, group)
        shared = self._shared[0]
        if shared is not None:  # overlaps the dispatch in flight
            shared.precompute(x_TD)
        x_QD, w_B = wait_x(), wait_w()

        # 3. the received assignments, sorted by local expert, through the grouped SwiGLU
        recv_R = torch.tensor(recv_pairs, device=dev)
        src_B = torch.repeat_interleave(torch.arange(R, device=dev), torch.tensor(recv_assign, device=dev))
        pair_B = (recv_R.cumsum(0) - recv_R)[src_B] + meta_B // L
        expert_B = meta_B % L
        order_B = torch.argsort(expert_B, stable=True)
        pair_B, w_B = pair_B[order_B], w_B[order_B]
        counts_L = recv_R1L[:, 1:].sum(0)
        out_QD = routed_swiglu(x_QD, self.w_gate, self.w_up, self.w_down, w_B.to(x_QD.dtype), pair_B, counts_L)

        # 4. combine: each pair's outputs are summed here (above); send back, add into the tokens
        y_PD = all_to_all(out_QD, send_pairs, recv_pairs, group)
        self._record(x_TD, token_P, send_pairs, recv_pairs, send_assign, recv_assign)
        return torch.zeros_like(x_TD).index_add_(0, token_P, ContiguousGrad.apply(y_PD))  # type: ignore[no-untyped-call]  # torch: Function.apply is untyped

    @torch.no_grad()
    def _record(self, x_TD: torch.Tensor, token_P: torch.Tensor, send_pairs: list[int], recv_pairs: list[int],
                send_assign: list[int], recv_assign: list[int]) -> None:
        r, D, elem = self.rank, x_TD.shape[1], x_TD.element_size()
        self.sent_tokens_R, self.recv_tokens_R = torch.tensor(send_pairs), torch.tensor(recv_pairs)
        self.sent_assignments_R, self.recv_assignments_R = torch.tensor(send_assign), torch.tensor(recv_assign)
        T = x_TD.shape[0]
        # kept a tensor: read (a host sync) only when comm_stats() asks
        self.max_ranks_per_token = torch.bincount(token_P, minlength=max(T, 1)).max()
        off_pairs = sum(send_pairs) - send_pairs[r]           # dispatched hidden states
        off_assign = sum(send_assign) - send_assign[r]        # weight (fp32) + meta (int64)
        back_pairs = sum(recv_pairs) - recv_pairs[r]          # combined outputs sent back
        counts = (self.world - 1) * (self.n_local + 1) * 8
        self.a2a_bytes = (off_pairs + back_pairs) * D * elem + off_assign * 12 + counts


# --------------------------------------------------------------------------------------------- apply

def _check_layer(layer: MoE, world: int) -> None:
    cfg = layer.cfg
    if not isinstance(layer.experts, GroupedExperts):
        raise TypeError(f"expert parallelism applies to GroupedExperts, got {type(layer.experts).__name__} "
                        "(already applied?)")
    if layer.reference:
        raise ValueError("expert parallelism replaces the grouped experts; MoE(reference=True) is not supported")
    if cfg.n_routed_experts % world:
        raise ValueError(f"n_routed_experts={cfg.n_routed_experts} must be divisible by the expert-parallel "
                         f"world size {world}")
    G = cfg.n_groups
    if G > 1 and G % world and world % G:  # groups inside a device (V2), or a group a node of devices (V3)
        raise ValueError(f"n_groups={G} must be 1 (no device limit), a multiple of the expert-parallel world size "
                         f"{world} (groups within devices) or a divisor of it (a group spans {world}/n_groups devices)")
    if (cfg.comm_loss_alpha or cfg.device_loss_alpha) and cfg.n_groups != world:
        raise ValueError(f"the device and communication balance losses count expert groups as devices: "
                         f"n_groups={cfg.n_groups} must equal the expert-parallel world size {world}")
    if cfg.capacity_factor is not None:
        raise ValueError("capacity_factor is computed per rank under expert parallelism and would differ from "
                         "the single-process layer; use the dropless default (capacity_factor=None)")


def apply_expert_parallel(model: _M, group: dist.ProcessGroup | None = None, overlap_shared: bool = True) -> _M:
    """Shard the routed experts of every MoE layer of a built model over the ranks of `group`, in place.

    Every rank must hold the same full model (same seed or the same checkpoint) before the call.
    Rank r keeps experts r*L .. r*L+L-1 (L = E / world): with n_groups == world, the router's expert
    groups are the devices, and topk_groups = M bounds the ranks a token reaches to M (DeepSeek-V2's
    device-limited routing); with n_groups dividing world a group is a node of world/n_groups devices,
    and M bounds the nodes (DeepSeek-V3's node-limited routing).
    """
    world = dist.get_world_size(group)
    layers = moe_layers(model)
    for layer in layers:
        _check_layer(layer, world)
    for layer in layers:
        assert isinstance(layer.experts, GroupedExperts)  # checked above
        shared = None
        if overlap_shared and layer.shared_experts is not None:
            shared = layer.shared_experts = OverlappedSwiGLU(layer.shared_experts)
        layer.experts = ExpertParallel(layer.experts, group, shared)
    return model


def expert_parallel_modules(model: nn.Module) -> dict[str, ExpertParallel]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallel)}


def comm_stats(model: nn.Module) -> dict[str, float]:
    """This rank's communication in the last forward, summed over layers."""
    mods = list(expert_parallel_modules(model).values())
    return {
        "tokens_sent": sum(int(m.sent_tokens_R.sum()) for m in mods),
        "tokens_received": sum(int(m.recv_tokens_R.sum()) for m in mods),
        "a2a_bytes": sum(m.a2a_bytes for m in mods),
        "max_ranks_per_token": max((int(m.max_ranks_per_token) for m in mods), default=0),
    }


def expert_parameter_names(model: nn.Module) -> dict[str, int]:
    """{parameter name: experts in the whole layer} for every expert-parallel weight."""
    return {f"{prefix}.{w}" if prefix else w: m.n_experts
            for prefix, m in expert_parallel_modules(model).items() for w in EXPERT_WEIGHTS}
