"""Configuration dataclasses: every field commented, validated at construction, able to count itself."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from enum import Enum

try:
    from enum import StrEnum
except ImportError:  # Python 3.10
    class StrEnum(str, Enum):
        def __str__(self):
            return self.value


class ScoreFunc(StrEnum):
    SOFTMAX = "softmax"  # DeepSeekMoE, V2
    SIGMOID = "sigmoid"  # V3


class GroupScore(StrEnum):
    MAX = "max"    # V2 "group_limited_greedy": a group scores its best expert
    TOP2 = "top2"  # V3 "noaux_tc": a group scores the sum of its two best experts


class BiasRule(StrEnum):
    SIGN = "sign"                  # b_i += u * sign(mean(c) - c_i)         (fits sigmoid gates)
    PROPORTIONAL = "proportional"  # b_i += u * (mean(c) - c_i) / mean(c)   (fits softmax gates)


def _choice(name: str, value, enum: type[StrEnum]) -> StrEnum:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(e.value) for e in enum)
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {allowed}") from None


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


@dataclass
class MoEConfig:
    """One DeepSeekMoE layer: y = shared(x) + sum_{i in TopK} g_i * expert_i(x)."""

    dim: int = 512                      # D, model (input and output) dimension
    n_routed_experts: int = 64          # E, fine-grained routed experts
    n_shared_experts: int = 2           # N_s, always-active experts, fused into one SwiGLU of width N_s*F
    top_k: int = 6                      # K, routed experts per token
    expert_dim: int = 256               # F, hidden width of each expert's SwiGLU
    score_func: str = "softmax"         # "softmax" (DeepSeekMoE, V2) or "sigmoid" (V3)
    norm_topk_prob: bool = False        # divide the K weights by their sum (V3: True)
    route_scale: float = 1.0            # multiply the weights after normalization (V3: 2.5)
    n_groups: int = 1                   # G, expert groups (devices / nodes); 1 disables group limits
    topk_groups: int = 1                # M, groups a token may reach
    group_score: str = "max"            # how a group is scored: "max" (V2) or "top2" (V3)
    # balancing (Loss-Free Balancing, Switch, DeepSeek-V2/V3, ST-MoE); every term is off at 0 and they combine freely
    bias_update_speed: float = 0.0      # u of auxiliary-loss-free balancing; 0 turns the bias update off
    bias_update_rule: str = "sign"      # "sign" or "proportional"
    aux_loss_alpha: float = 0.0         # expert-level auxiliary loss (Switch / DeepSeekMoE)
    seq_aux_loss_alpha: float = 0.0     # sequence-wise auxiliary loss (V3: 1e-4)
    device_loss_alpha: float = 0.0      # device-level balance loss over the G groups (V2: 0.05)
    comm_loss_alpha: float = 0.0        # communication balance loss over the G groups (V2: 0.02)
    z_loss_beta: float = 0.0            # router z-loss (ST-MoE: ~1e-3)
    capacity_factor: float | None = None  # None = dropless; else drop lowest-affinity tokens over capacity
    uniform_routing: bool = False       # debug: route round-robin, to time kernels apart from routing skew
    check_inputs: bool = True           # reject NaN/inf inputs (checked on the router logits; one host sync)

    def __post_init__(self):
        self.score_func = _choice("score_func", self.score_func, ScoreFunc)
        self.group_score = _choice("group_score", self.group_score, GroupScore)
        self.bias_update_rule = _choice("bias_update_rule", self.bias_update_rule, BiasRule)
        for name in ("dim", "n_routed_experts", "top_k", "expert_dim", "n_groups", "topk_groups"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, name, value, "must be a positive integer")
        _check(isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0,
               "n_shared_experts", self.n_shared_experts, "must be an integer >= 0")
        E, G = self.n_routed_experts, self.n_groups
        _check(E % G == 0, "n_groups", G, f"must divide n_routed_experts={E}")
        _check(self.topk_groups <= G, "topk_groups", self.topk_groups, f"must be <= n_groups={G}")
        _check(self.top_k <= E, "top_k", self.top_k, f"must be <= n_routed_experts={E}")
        reachable = self.topk_groups * (E // G)
        _check(self.top_k <= reachable, "top_k", self.top_k,
               f"must be <= the {reachable} experts in topk_groups={self.topk_groups} groups of {E // G}")
        if G > 1 and self.group_score == GroupScore.TOP2:
            _check(E // G >= 2, "group_score", "top2", "needs at least 2 experts per group")
        for name in ("bias_update_speed", "aux_loss_alpha", "seq_aux_loss_alpha", "device_loss_alpha",
                     "comm_loss_alpha", "z_loss_beta"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and value >= 0, name, value, "must be a number >= 0")
        _check(self.route_scale > 0, "route_scale", self.route_scale, "must be > 0")
        _check(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
               self.capacity_factor, "must be None (dropless) or > 0")

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_groups

    def num_params(self) -> int:
        """Router + every routed expert + the shared experts."""
        D, F = self.dim, self.expert_dim
        return D * self.n_routed_experts + 3 * D * F * (self.n_routed_experts + self.n_shared_experts)

    def num_active_params(self) -> int:
        """Parameters one token touches: router + top-k routed + shared experts."""
        D, F = self.dim, self.expert_dim
        return D * self.n_routed_experts + 3 * D * F * (self.top_k + self.n_shared_experts)

    def replace(self, **changes) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def segmented(cls, dim: int, n_experts: int, top_k: int, expert_dim: int, m: int,
                  n_shared: int = 0, **kwargs) -> "MoEConfig":
        """Fine-grained segmentation (DeepSeekMoE, arXiv 2401.06066 §3.1).

        A baseline of `n_experts` experts of width `expert_dim`, top-`top_k`, becomes m*N experts of width
        expert_dim/m, top-m*K; `n_shared` of the fine experts are isolated as always-active shared experts.
        Total and active expert parameters stay those of the baseline. A dense FFN of width W is the
        baseline n_experts=1, top_k=1, expert_dim=W.
        """
        _check(isinstance(m, int) and m >= 1, "m", m, "must be a positive integer")
        _check(expert_dim % m == 0, "m", m, f"must divide expert_dim={expert_dim}")
        _check(0 <= n_shared < m * top_k, "n_shared", n_shared, f"must be in [0, m*top_k={m * top_k})")
        return cls(dim=dim, n_routed_experts=m * n_experts - n_shared, n_shared_experts=n_shared,
                   top_k=m * top_k - n_shared, expert_dim=expert_dim // m, **kwargs)

    @classmethod
    def from_hf(cls, d: dict) -> "MoEConfig":
        """From a HuggingFace DeepSeek-V2 / V3 `config.json` dict (see dsmoe.hf)."""
        from dsmoe.hf import moe_config_from_hf
        return moe_config_from_hf(d)

    def to_hf(self) -> dict:
        from dsmoe.hf import moe_config_to_hf
        return moe_config_to_hf(self)


@dataclass
class ModelConfig:
    """A decoder-only DeepSeekMoE language model: pre-RMSNorm blocks, rotary attention, MoE FFNs."""

    vocab_size: int = 260               # bytes + 4 specials by default
    dim: int = 128                      # D, model width
    n_layers: int = 4                   # transformer blocks
    n_heads: int = 4                    # query heads
    n_kv_heads: int = 4                 # key/value heads (< n_heads: grouped-query attention)
    max_seq_len: int = 256              # longest context (rotary table and KV cache size)
    first_k_dense: int = 1              # the first blocks use a dense FFN (DeepSeekMoE 16B: 1, V3: 3)
    dense_hidden: int = 0               # width of those dense FFNs; 0 = the MoE's active width (K+N_s)*F
    moe: MoEConfig | None = None        # the MoE FFN; None makes every block dense (a "dense twin")
    tie_embeddings: bool = True         # share the embedding and output matrices
    rope_theta: float = 10000.0         # rotary base
    norm_eps: float = 1e-5              # RMSNorm epsilon

    def __post_init__(self):
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, name, value, "must be a positive integer")
        _check(self.dim % self.n_heads == 0, "n_heads", self.n_heads, f"must divide dim={self.dim}")
        _check((self.dim // self.n_heads) % 2 == 0, "n_heads", self.n_heads, "must leave an even head dim for rotary")
        _check(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", self.n_kv_heads,
               f"must divide n_heads={self.n_heads}")
        _check(0 <= self.first_k_dense <= self.n_layers, "first_k_dense", self.first_k_dense,
               f"must be in [0, n_layers={self.n_layers}]")
        _check(self.dense_hidden >= 0, "dense_hidden", self.dense_hidden, "must be >= 0")
        _check(self.moe is not None or self.dense_hidden > 0, "dense_hidden", self.dense_hidden,
               "must be > 0 when moe is None")
        if self.moe is not None:
            _check(self.moe.dim == self.dim, "moe.dim", self.moe.dim, f"must equal dim={self.dim}")
            if not self.dense_hidden:
                self.dense_hidden = (self.moe.top_k + self.moe.n_shared_experts) * self.moe.expert_dim

    @property
    def n_moe_layers(self) -> int:
        return 0 if self.moe is None else self.n_layers - self.first_k_dense

    def _count(self, moe_params: int) -> int:
        D, hd = self.dim, self.dim // self.n_heads
        attn = D * D * 2 + 2 * D * self.n_kv_heads * hd  # wq, wo, wk, wv
        dense = 3 * D * self.dense_hidden
        n_dense = self.n_layers - self.n_moe_layers
        embed = self.vocab_size * D * (1 if self.tie_embeddings else 2)
        norms = D * (2 * self.n_layers + 1)
        return embed + norms + self.n_layers * attn + n_dense * dense + self.n_moe_layers * moe_params

    def num_params(self) -> int:
        return self._count(self.moe.num_params() if self.moe else 0)

    def num_active_params(self) -> int:
        return self._count(self.moe.num_active_params() if self.moe else 0)

    def dense_twin(self) -> "ModelConfig":
        """Every block dense, FFN width = the MoE's active width: the same active parameters but the router."""
        return dataclasses.replace(self, moe=None, first_k_dense=self.n_layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _preset(dim, n_layers, n_heads, seq, experts, expert_dim, top_k, shared, **moe) -> ModelConfig:
    moe_cfg = MoEConfig(dim=dim, n_routed_experts=experts, expert_dim=expert_dim, top_k=top_k,
                        n_shared_experts=shared, score_func="sigmoid", norm_topk_prob=True,
                        bias_update_speed=1e-3, **moe)
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads, max_seq_len=seq,
                       first_k_dense=1, moe=moe_cfg)


# Named presets: V3-style gates (sigmoid, normalized top-k, loss-free bias u=1e-3) at laptop scale.
PRESETS: dict[str, ModelConfig] = {
    "debug": _preset(dim=64, n_layers=2, n_heads=4, seq=64, experts=16, expert_dim=16, top_k=2, shared=1),
    "tiny": _preset(dim=128, n_layers=4, n_heads=4, seq=128, experts=32, expert_dim=64, top_k=2, shared=1),
    "small": _preset(dim=256, n_layers=6, n_heads=8, seq=256, experts=64, expert_dim=64, top_k=6, shared=2),
}
PRESETS.update({f"{name}-dense": cfg.dense_twin() for name, cfg in list(PRESETS.items())})


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
