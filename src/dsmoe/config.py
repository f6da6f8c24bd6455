"""Configuration: the layer, the model and the run, as dataclasses with a comment per field, validated at
construction (the error names the field and what is allowed). The named presets and `--set` overrides are
dsmoe.presets; the memory estimate of a training step is dsmoe.memory."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeGuard

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10
    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


class ScoreFunc(StrEnum):
    SOFTMAX = "softmax"  # DeepSeekMoE, V2
    SIGMOID = "sigmoid"  # V3


class GroupScore(StrEnum):
    MAX = "max"    # V2 "group_limited_greedy": a group scores its best expert
    TOP2 = "top2"  # V3 "noaux_tc": a group scores the sum of its two best experts


class BiasRule(StrEnum):
    SIGN = "sign"                  # b_i += u * sign(mean(c) - c_i)         (fits sigmoid gates)
    PROPORTIONAL = "proportional"  # b_i += u * (mean(c) - c_i) / mean(c)   (fits softmax gates)


class AuxLossScores(StrEnum):
    """The per-token scores P_i averages in the expert-level, device-level and communication losses."""
    NORMALIZED = "normalized"  # s_i / sum_j s_j (Megatron-LM; DeepSeek-V3 eq. 19 for its sequence-wise loss)
    RAW = "raw"                # s_i as the gate gives them (dsmoe's first form); with a sigmoid gate the
                               # gradient pushes every logit down instead of moving probability between experts


class SeqAuxExperts(StrEnum):
    """Which experts f_i counts in the sequence-wise loss."""
    TOPK = "topk"      # the top-K of the unbiased scores (DeepSeek-V3 eq. 18)
    ROUTED = "routed"  # the experts actually routed, group limit and bias included (DeepSeek-V2 eq. 24 and code)


def _choice(name: str, value: object, enum: type[StrEnum]) -> StrEnum:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(e.value) for e in enum)
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {allowed}") from None


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


def _is_int(value: object) -> bool:
    """An integer, and not a bool (True would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    """A finite int or float, and not a bool: inf and NaN pass every comparison test they should fail."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _integer(obj: object, name: str, minimum: int) -> None:
    value = getattr(obj, name)
    allowed = "must be a positive integer" if minimum == 1 else f"must be an integer >= {minimum}"
    _check(_is_int(value) and value >= minimum, name, value, allowed)


def _floats(obj: Any) -> None:
    """Every field typed float (or float | None) holds a float: an int given for it (`beta1=0`, a JSON `1`) is
    converted, so that torch never sees an int where it takes a float (AdamW refuses int betas). A bool stays
    as it is, for the field's own check to refuse."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.type in ("float", "float | None") and _is_int(value) and _is_number(value):  # 10**400: refused below
            setattr(obj, f.name, float(value))


def _boolean(obj: object, name: str) -> None:
    value = getattr(obj, name)
    _check(isinstance(value, bool), name, value, "must be True or False")


# route_scale multiplies every routed output: DeepSeek-V2 uses 16, V3 2.5; far larger only overflows
MAX_ROUTE_SCALE = 1000.0


@dataclass
class MoEConfig:
    """One DeepSeekMoE layer: y = shared(x) + sum_{i in TopK} g_i * expert_i(x)."""

    dim: int = 512                      # D, model (input and output) dimension
    n_routed_experts: int = 64          # E, fine-grained routed experts
    n_shared_experts: int = 2           # N_s, always-active experts, fused into one SwiGLU of width N_s*F
    shared_expert_dim: int = 0          # that SwiGLU's width when it is not N_s*F (Qwen2-MoE's own); 0 = N_s*F
    shared_expert_gate: bool = False    # scale the shared experts' output by sigmoid(x @ w), w [D] (Qwen2-MoE)
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
    aux_loss_scores: str = "normalized"  # P_i of the aux, device and comm losses: scores "normalized" to sum to 1
                                        # per token (Megatron; same as "raw" for softmax) or "raw" (old sigmoid form)
    seq_aux_experts: str = "topk"       # f_i of the sequence-wise loss: "topk" of the unbiased scores (V3) or the
                                        # "routed" experts, group limit included (V2); moe_config_from_hf sets it
    capacity_factor: float | None = None  # None = dropless; else drop lowest-affinity tokens over capacity
    uniform_routing: bool = False       # debug: route round-robin, to time kernels apart from routing skew
    check_inputs: bool = True           # reject NaN/inf inputs, a NaN/inf bias, an overflowing output (one host sync)

    def __post_init__(self) -> None:
        _floats(self)
        self.score_func = _choice("score_func", self.score_func, ScoreFunc)
        self.group_score = _choice("group_score", self.group_score, GroupScore)
        self.bias_update_rule = _choice("bias_update_rule", self.bias_update_rule, BiasRule)
        self.aux_loss_scores = _choice("aux_loss_scores", self.aux_loss_scores, AuxLossScores)
        self.seq_aux_experts = _choice("seq_aux_experts", self.seq_aux_experts, SeqAuxExperts)
        for name in ("dim", "n_routed_experts", "top_k", "expert_dim", "n_groups", "topk_groups"):
            _integer(self, name, 1)
        _integer(self, "n_shared_experts", 0)
        _integer(self, "shared_expert_dim", 0)
        _check(not self.shared_expert_dim or self.n_shared_experts > 0, "shared_expert_dim", self.shared_expert_dim,
               "must be 0 without shared experts (n_shared_experts=0)")
        for name in ("norm_topk_prob", "uniform_routing", "check_inputs", "shared_expert_gate"):
            _boolean(self, name)
        E, G = self.n_routed_experts, self.n_groups
        _check(E % G == 0, "n_groups", G, f"must divide n_routed_experts={E}")
        _check(self.topk_groups <= G, "topk_groups", self.topk_groups, f"must be <= n_groups={G}")
        _check(self.top_k <= E, "top_k", self.top_k, f"must be <= n_routed_experts={E}")
        reachable = self.topk_groups * (E // G)
        _check(self.top_k <= reachable, "top_k", self.top_k, f"must be <= the {reachable} experts in "
               f"topk_groups={self.topk_groups} of n_groups={G} groups of {E // G}")
        if G > 1 and self.group_score == GroupScore.TOP2:
            _check(E // G >= 2, "group_score", "top2", "needs at least 2 experts per group")
        for name in ("bias_update_speed", "aux_loss_alpha", "seq_aux_loss_alpha", "device_loss_alpha",
                     "comm_loss_alpha", "z_loss_beta"):
            value = getattr(self, name)
            _check(_is_number(value) and value >= 0, name, value, "must be a finite number >= 0")
        # The bias moves by u each step, and the scores it competes with lie in [0, 1]: a larger u lets the bias
        # alone pick the experts (at u=inf training reached MaxVio 7). The paper's u is 1e-3.
        _check(self.bias_update_speed <= 1, "bias_update_speed", self.bias_update_speed,
               "must be in [0, 1] (the bias competes with scores in [0, 1]; Loss-Free Balancing uses 1e-3)")
        _check(_is_number(self.route_scale) and 0 < self.route_scale <= MAX_ROUTE_SCALE, "route_scale",
               self.route_scale, f"must be a number > 0 and <= {MAX_ROUTE_SCALE:g} (released models use 1 to 16)")
        _check(self.capacity_factor is None or (_is_number(self.capacity_factor) and self.capacity_factor > 0),
               "capacity_factor", self.capacity_factor, "must be None (dropless) or a finite number > 0")
        _check(not self.shared_expert_gate or self.n_shared_experts > 0, "shared_expert_gate", True,
               "needs shared experts (n_shared_experts > 0)")

    @property
    def shared_width(self) -> int:
        """Hidden width of the fused shared experts' SwiGLU (0: none)."""
        return self.shared_expert_dim or self.n_shared_experts * self.expert_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_groups

    def _shared_params(self) -> int:
        return 3 * self.dim * self.shared_width + (self.dim if self.shared_expert_gate else 0)

    def num_params(self) -> int:
        """Router + every routed expert + the shared experts (and their gate)."""
        D, F = self.dim, self.expert_dim
        return D * self.n_routed_experts + 3 * D * F * self.n_routed_experts + self._shared_params()

    def num_active_params(self) -> int:
        """Parameters one token touches: router + top-k routed + shared experts."""
        D, F = self.dim, self.expert_dim
        return D * self.n_routed_experts + 3 * D * F * self.top_k + self._shared_params()

    def replace(self, **changes: Any) -> MoEConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def segmented(cls, dim: int, n_experts: int, top_k: int, expert_dim: int, m: int,
                  n_shared: int = 0, **kwargs: Any) -> MoEConfig:
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


@dataclass
class ModelConfig:
    """A DeepSeek-V2/V3-style decoder: pre-RMSNorm blocks, rotary attention (MHA/GQA, or Multi-head Latent
    Attention when kv_lora_rank > 0), the first `first_k_dense` FFNs dense and the rest MoE, optional
    multi-token prediction. Parameter counts include the MTP modules, as built and trained; `mtp=False` leaves them
    out, as DeepSeek's published counts do (V3: 682.6B built here, 671.0B without its MTP module)."""

    vocab_size: int = 260               # bytes + 4 specials by default
    dim: int = 128                      # D, model width
    n_layers: int = 4                   # transformer blocks
    n_heads: int = 4                    # query heads
    n_kv_heads: int = 4                 # key/value heads (< n_heads: grouped-query attention)
    max_seq_len: int = 256              # longest context (rotary table and KV cache size)
    head_dim: int = 0                   # per-head dims of MHA/GQA; 0 = dim // n_heads (Qwen3-MoE sets its own)
    qkv_bias: bool = False              # biases on the query/key/value projections (Qwen2-MoE, GLM-4.5)
    o_bias: bool = False                # a bias on the output projection (Llama-style attention_bias)
    qk_norm: str = ""                   # RMSNorm on queries and keys before rotary: "" none, "head" over each
                                        # head's dims (Qwen3-MoE, dots1), "all" over the whole projection (OLMoE)
    rope_dim: int = 0                   # rotary dims per MHA/GQA head (the first ones); 0 = all (GLM-4.5: half)
    first_k_dense: int = 1              # the first blocks use a dense FFN (DeepSeekMoE 16B: 1, V3: 3)
    dense_layers: list[int] = dataclasses.field(default_factory=list)  # further blocks with a dense FFN
                                        # (Qwen-MoE's mlp_only_layers and decoder_sparse_step)
    dense_hidden: int = 0               # width of those dense FFNs; 0 = the MoE's active width (K+N_s)*F
    moe: MoEConfig | None = None        # the MoE FFN; None makes every block dense (a "dense twin")
    tie_embeddings: bool = True         # share the embedding and output matrices
    rope_theta: float = 10000.0         # rotary base
    norm_eps: float = 1e-5              # RMSNorm epsilon
    # Multi-head Latent Attention (DeepSeek-V2 §2.1); kv_lora_rank 0 keeps plain rotary MHA/GQA
    kv_lora_rank: int = 0               # C, width of the compressed key/value latent (what the KV cache holds)
    q_lora_rank: int = 0                # queries through a latent of this width; 0 = one q_proj
    qk_nope_head_dim: int = 0           # per-head query/key dims without rotary
    qk_rope_head_dim: int = 0           # per-head rotary dims (the rotary key is shared by every head)
    v_head_dim: int = 0                 # per-head value dims
    rope_interleave: bool = True        # rotary dims stored as (x0, x1) pairs, as DeepSeek's checkpoints do
    rope_scaling: dict[str, Any] | None = None  # yarn: factor, original_max_position_embeddings, beta_fast,
    #                                             beta_slow, mscale, mscale_all_dim (HF rope_scaling)
    mtp_layers: int = 0                 # multi-token prediction depths (DeepSeek-V3 §2.2: 1)
    mtp_loss_weight: float = 0.3        # weight of the mean MTP loss over depths (V3: 0.3, later 0.1)
    token_ids: dict[str, Any] | None = None  # a HuggingFace release's bos/eos/pad_token_id, written back on export
    family: str = ""                    # the HuggingFace model_type it was read from and is exported as (qwen3_moe,
                                        # ...); "" = dsmoe's own, exported in DeepSeek-V2/V3's format

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    def __post_init__(self) -> None:
        _floats(self)
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        _check(self.moe is None or isinstance(self.moe, MoEConfig), "moe", self.moe, "must be a MoEConfig or None")
        for name in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "mtp_layers", "first_k_dense", "dense_hidden"):
            _integer(self, name, 0)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            _integer(self, name, 1)
        for name in ("tie_embeddings", "rope_interleave", "qkv_bias", "o_bias"):
            _boolean(self, name)
        _integer(self, "head_dim", 0)
        _integer(self, "rope_dim", 0)
        _check(self.qk_norm in ("", "head", "all"), "qk_norm", self.qk_norm, "choose '' (none), 'head' or 'all'")
        _check(isinstance(self.family, str), "family", self.family, "must be a HuggingFace model_type or ''")
        _check(isinstance(self.dense_layers, (list, tuple)) and all(_is_int(i) and 0 <= i < self.n_layers
                                                                    for i in self.dense_layers),
               "dense_layers", self.dense_layers, f"must be a list of block indices in [0, n_layers={self.n_layers})")
        self.dense_layers = sorted(set(self.dense_layers))
        for name in ("rope_theta", "norm_eps"):  # 0 makes the rotary table or the norms NaN, not an error
            _check(_is_number(getattr(self, name)) and getattr(self, name) > 0, name, getattr(self, name),
                   "must be a finite number > 0")
        _check(_is_number(self.mtp_loss_weight) and self.mtp_loss_weight >= 0, "mtp_loss_weight",
               self.mtp_loss_weight, "must be a finite number >= 0")
        if self.mla:
            for name in ("qk_rope_head_dim", "v_head_dim"):
                _check(getattr(self, name) > 0, name, getattr(self, name), "must be > 0 with kv_lora_rank > 0")
            _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", self.qk_rope_head_dim, "must be even")
        if self.rope_scaling is not None:
            self._check_yarn()
        self._check_token_ids()
        if not self.mla:  # MLA sizes its heads by qk_nope/qk_rope/v_head_dim instead
            self._check_heads()
        _check(0 <= self.first_k_dense <= self.n_layers, "first_k_dense", self.first_k_dense,
               f"must be in [0, n_layers={self.n_layers}]")
        _check(self.moe is not None or self.dense_hidden > 0, "dense_hidden", self.dense_hidden,
               "must be > 0 when moe is None")
        if self.moe is not None:
            _check(self.moe.dim == self.dim, "moe.dim", self.moe.dim, f"must equal dim={self.dim}")
            if not self.dense_hidden:
                self.dense_hidden = (self.moe.top_k + self.moe.n_shared_experts) * self.moe.expert_dim

    def _check_heads(self) -> None:
        """MHA/GQA: the heads' dims, their rotary dims (even: rotated in pairs) and the key/value heads."""
        if not self.head_dim:
            _check(self.dim % self.n_heads == 0, "n_heads", self.n_heads, f"must divide dim={self.dim}")
        name = "rope_dim" if self.rope_dim else "head_dim" if self.head_dim else "n_heads"
        _check(self.rope_dims % 2 == 0, name, getattr(self, name),
               "must leave an even head dim for rotary (an even number of rotary dims per head)")
        _check(self.rope_dim <= self.attn_head_dim, "rope_dim", self.rope_dim,
               f"must be <= the head dim {self.attn_head_dim}")
        _check(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", self.n_kv_heads,
               f"must divide n_heads={self.n_heads}")

    def _check_token_ids(self) -> None:
        ids = self.token_ids
        if ids is None:
            return
        def token(i: object) -> bool:
            return _is_int(i) and 0 <= i < self.vocab_size  # type: ignore[operator]
        ok = isinstance(ids, dict) and set(ids) <= set(TOKEN_ID_FIELDS) and all(
            v is None or token(v) or (isinstance(v, list) and all(map(token, v))) for v in ids.values())
        _check(ok, "token_ids", ids, f"must map some of {TOKEN_ID_FIELDS} to a token id in [0, vocab_size="
               f"{self.vocab_size}), a list of them, or None")

    def _check_yarn(self) -> None:
        """rope_scaling: yarn (DeepSeek-V2 §2.1; what attention.rotary_table computes) with values it can use."""
        scaling = self.rope_scaling
        _check(isinstance(scaling, dict), "rope_scaling", scaling, "must be a dict or None")
        assert isinstance(scaling, dict)
        kind = scaling.get("rope_type", scaling.get("type"))
        _check(kind == "yarn" and {"factor", "original_max_position_embeddings"} <= set(scaling), "rope_scaling",
               scaling, "only yarn is supported: {'rope_type': 'yarn', 'factor': ..., "
               "'original_max_position_embeddings': ...}")
        original = scaling["original_max_position_embeddings"]
        _check(_is_int(original) and original >= 1, "rope_scaling.original_max_position_embeddings", original,
               "must be a positive integer")
        for key in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            value = scaling.get(key)
            if value is None and key != "factor":
                continue
            at_least_0 = key.startswith("mscale")  # mscale >= 0 keeps the attention factor >= 1
            _check(_is_number(value) and (value >= 0 if at_least_0 else value > 0), f"rope_scaling.{key}", value,
                   f"must be a finite number {'>= 0' if at_least_0 else '> 0'}")
        _check(self.rope_theta > 1, "rope_theta", self.rope_theta, "must be > 1 with yarn scaling (its frequency "
               "ramp divides by log(rope_theta))")

    @property
    def attn_head_dim(self) -> int:
        """Per-head dims of MHA/GQA."""
        return self.head_dim or self.dim // self.n_heads

    @property
    def rope_dims(self) -> int:
        """Rotary dims per head: MLA's rotary key, else the first rope_dim (or all) of each head."""
        return self.qk_rope_head_dim if self.mla else self.rope_dim or self.attn_head_dim

    def is_moe(self, layer: int) -> bool:
        """Whether block `layer` (n_layers + d for the MTP modules) has the MoE FFN."""
        return self.moe is not None and layer >= self.first_k_dense and layer not in self.dense_layers

    @property
    def moe_blocks(self) -> list[int]:
        """The indices of the blocks with the MoE FFN."""
        return [i for i in range(self.n_layers) if self.is_moe(i)]

    @property
    def n_moe_layers(self) -> int:
        return len(self.moe_blocks)

    def _attention_params(self) -> int:
        D, H = self.dim, self.n_heads
        if not self.mla:
            q, kv = H * self.attn_head_dim, self.n_kv_heads * self.attn_head_dim
            bias = q + 2 * kv if self.qkv_bias else 0
            norms = {"": 0, "head": 2 * self.attn_head_dim, "all": q + kv}[self.qk_norm]
            return 2 * D * q + 2 * D * kv + bias + (D if self.o_bias else 0) + norms  # wq, wo, wk, wv
        qk = H * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        q = D * qk if not self.q_lora_rank else D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * qk
        C = self.kv_lora_rank
        kv = D * (C + self.qk_rope_head_dim) + C + C * H * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + H * self.v_head_dim * D

    def block_params(self, ffn_params: int) -> int:
        """One block: attention, its two norms and an FFN of `ffn_params` parameters."""
        return self._attention_params() + 2 * self.dim + ffn_params

    def mtp_own_params(self) -> int:
        """One multi-token-prediction module's parameters outside its block: enorm, hnorm, eh_proj [D, 2D] and its
        norm. The embedding and output head it uses are the model's own."""
        return 3 * self.dim + 2 * self.dim * self.dim

    def _count(self, moe_params: int, mtp: bool) -> int:
        D = self.dim
        dense = 3 * D * self.dense_hidden
        n_dense = self.n_layers - self.n_moe_layers
        embed = self.vocab_size * D * (1 if self.tie_embeddings else 2)
        blocks = n_dense * self.block_params(dense) + self.n_moe_layers * self.block_params(moe_params)
        # an MTP module's block is MoE whenever the model has MoE (its layer n_layers + depth is past first_k_dense)
        mtp_block = self.block_params(moe_params if self.moe else dense)
        mtp_modules = self.mtp_layers * (self.mtp_own_params() + mtp_block) if mtp else 0
        return embed + blocks + D + mtp_modules  # + the final norm

    def num_params(self, mtp: bool = True) -> int:
        """Every parameter the model builds; mtp=False leaves the MTP modules out (DeepSeek's published counts)."""
        return self._count(self.moe.num_params() if self.moe else 0, mtp)

    def num_active_params(self, mtp: bool = True) -> int:
        """Parameters one token touches in training: the routed experts' top-k of every MoE layer, the MTP
        modules' included unless mtp=False (they run only in training)."""
        return self._count(self.moe.num_active_params() if self.moe else 0, mtp)

    def dense_twin(self) -> ModelConfig:
        """Every block dense, FFN width = the MoE's active width: the same active parameters but the router."""
        return dataclasses.replace(self, moe=None, first_k_dense=self.n_layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
BPE_MIN_VOCAB = 256 + 4  # a byte-level BPE starts from the 256 byte symbols and the 4 special tokens


@dataclass
class TrainConfig:
    """Everything about a run except the model."""

    preset: str = "tiny"              # preset the run started from (see PRESETS)
    steps: int = 2500                 # optimizer steps
    batch_size: int = 16              # sequences per micro-batch (the global batch under data parallelism)
    seq_len: int = 0                  # tokens per sequence; 0 = the model's max_seq_len
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 3e-3                  # peak learning rate
    min_lr: float = 3e-4              # learning rate at the end of the cosine decay
    warmup_steps: int = 100           # linear warmup from 0 to lr
    weight_decay: float = 0.1         # AdamW decay on matrices only (not norms, biases or the router bias buffer)
    beta1: float = 0.9                # AdamW betas
    beta2: float = 0.95
    grad_clip: float = 1.0            # clip the global gradient norm; 0 disables
    eval_every: int = 500             # steps between evaluations; 0 = only at the start and the end
    eval_batches: int = 16            # validation batches per evaluation (windows spread over the whole split)
    save_every: int = 500             # steps between checkpoints; 0 = only at the end (and on Ctrl-C)
    log_every: int = 10               # steps between metrics rows (and the one host sync they need)
    seed: int = 0                     # seeds the init, the data order and everything else random
    device: str = "cpu"               # "cpu" or "cuda" (bf16 autocast)
    data: str | None = None           # a prepared folder (dsmoe prepare), a text file or folder, or a mixture
                                      # "a=0.7,b=0.3" of those; None = the Python standard library
    doc_mask: bool = False            # attention and rotary positions restart at each document of a window
    tokenizer: str = "byte"           # "byte" or "bpe" (trained locally, saved with the checkpoint)
    bpe_vocab_size: int = 2048        # vocabulary of the BPE tokenizer
    out: str | None = None            # run directory; None = runs/<preset>
    topk_start: int = 0               # dynamic top-k: start with this many experts per token (0 = off) ...
    topk_anneal_steps: int = 0        # ... and anneal linearly to the preset's top_k over this many steps
    resume: str | None = None         # checkpoint (or run) directory to continue from
    init: str | None = None           # HuggingFace folder to fine-tune from (its weights and tokenizer): any family
    overwrite: bool = False           # start a new run in a folder that already holds one (its metrics are replaced)
    compile: str = ""                  # torch.compile backend for the model ("inductor"); "" = eager
    tensorboard: bool = True          # also log to TensorBoard when it is installed
    expert_parallel: int = 0          # shard the routed experts over E ranks (of N = torchrun --nproc_per_node);
                                      # data parallel over N / E; 0 = no expert parallelism
    pipeline_parallel: int = 0        # split the blocks into P pipeline stages (torchrun: P x dp x ep processes);
                                      # 0 or 1 = no pipeline
    schedule: str = "1f1b"            # the pipeline schedule: "1f1b", "gpipe" or "interleaved" (2 stages a rank)
    microbatches: int = 0             # pipeline micro-batches per micro-batch (each a share of its rows); 0 = P
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more time
    dist_timeout_s: float = 120.0     # several processes: a rank that died or hung fails the others after this long
    esft: str = ""                    # Expert-Specialized Fine-Tuning (arXiv 2407.01906) of an --init model: train
                                      # only the experts chosen by "gate" (average gate score) or "token" (token
                                      # selection ratio) on the run's data; "" = off (dsmoe.esft)
    esft_top_p: float = 0.2           # ESFT: each MoE layer keeps its top experts until their scores sum to this
    esft_score_batches: int = 8       # ESFT: training batches scored before the run
    esft_train_shared: bool = False   # ESFT: the shared experts train too
    esft_train_rest: bool = False     # ESFT: everything but the routed and shared experts trains too (attention,
                                      # embeddings, norms, routers, dense FFNs, head, MTP modules)

    def __post_init__(self) -> None:
        _floats(self)
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
            _integer(self, name, 1)
        for name in ("seq_len", "warmup_steps", "eval_every", "save_every", "topk_start", "topk_anneal_steps",
                     "expert_parallel", "seed", "pipeline_parallel", "microbatches"):
            _integer(self, name, 0)
        _integer(self, "bpe_vocab_size", BPE_MIN_VOCAB)
        _check(self.seed < 2**63, "seed", self.seed, "must be < 2**63")
        if bool(self.topk_start) != bool(self.topk_anneal_steps):  # either alone is silently ignored
            name = "topk_anneal_steps" if self.topk_start else "topk_start"
            _check(False, name, getattr(self, name), "dynamic top-k needs topk_start and topk_anneal_steps both > 0")
        for name, choices in (("device", ("cpu", "cuda")), ("tokenizer", ("byte", "bpe")),
                              ("schedule", ("1f1b", "gpipe", "interleaved", "zb", "dualpipev"))):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"{name}={value!r} is not allowed; choose {' or '.join(map(repr, choices))}")
        _check(isinstance(self.preset, str), "preset", self.preset, "must be a string")
        for name in ("data", "out", "resume", "init"):  # paths: a pathlib.Path is kept as a string for config.json
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, value := os.fspath(value))
            _check(value is None or (isinstance(value, str) and value != ""), name, value,
                   "must be a path (a non-empty string) or None")
        _boolean(self, "tensorboard")
        _boolean(self, "doc_mask")
        _boolean(self, "overwrite")
        _boolean(self, "activation_checkpointing")
        self._check_esft()
        _check(isinstance(self.compile, str), "compile", self.compile,
               "must be a torch.compile backend name ('inductor', 'aot_eager', ...) or '' for eager")
        _check(_is_number(self.dist_timeout_s) and self.dist_timeout_s > 0, "dist_timeout_s", self.dist_timeout_s,
               "must be a finite number of seconds > 0")
        _check(_is_number(self.lr) and self.lr > 0, "lr", self.lr, "must be a finite number > 0")
        _check(_is_number(self.min_lr) and 0 <= self.min_lr <= self.lr, "min_lr", self.min_lr,
               f"must be a number in [0, lr={self.lr}]")
        for name in ("weight_decay", "grad_clip"):  # a negative clip flips the gradients' sign
            value = getattr(self, name)
            _check(_is_number(value) and value >= 0, name, value,
                   "must be a finite number >= 0" + (" (0 disables clipping)" if name == "grad_clip" else ""))
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check(_is_number(value) and 0 <= value < 1, name, value, "must be a number in [0, 1)")

    def _check_esft(self) -> None:
        _check(isinstance(self.esft, str) and self.esft in ("", "gate", "token"), "esft", self.esft,
               "choose 'gate' (average gate score), 'token' (token selection ratio) or '' (off)")
        _check(_is_number(self.esft_top_p) and 0 < self.esft_top_p <= 1, "esft_top_p", self.esft_top_p,
               "must be a number in (0, 1]: the score each MoE layer's kept experts sum to")
        _integer(self, "esft_score_batches", 1)
        for name in ("esft_train_shared", "esft_train_rest"):
            _boolean(self, name)
            _check(not getattr(self, name) or bool(self.esft), name, getattr(self, name),
                   "applies to ESFT only: set esft=gate or esft=token too")
        _check(not self.esft or self.init is not None, "esft", self.esft,
               "ESFT fine-tunes a pretrained model: give --init DIR (a HuggingFace MoE folder)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
