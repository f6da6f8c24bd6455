"""Configuration: the layer, the model and the run, as dataclasses with a comment per field, validated at
construction (the error names the field and what is allowed), plus one registry of named presets and the
`key=value` overrides of `dsmoe train --set`."""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any

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


def _choice(name: str, value: object, enum: type[StrEnum]) -> StrEnum:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(e.value) for e in enum)
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {allowed}") from None


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
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

    def __post_init__(self) -> None:
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

    def __post_init__(self) -> None:
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

    def dense_twin(self) -> ModelConfig:
        """Every block dense, FFN width = the MoE's active width: the same active parameters but the router."""
        return dataclasses.replace(self, moe=None, first_k_dense=self.n_layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



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
    data: str | None = None           # text file or folder; None = the Python standard library
    tokenizer: str = "byte"           # "byte" or "bpe" (trained locally, saved with the checkpoint)
    bpe_vocab_size: int = 2048        # vocabulary of the BPE tokenizer
    out: str | None = None            # run directory; None = runs/<preset>
    topk_start: int = 0               # dynamic top-k: start with this many experts per token (0 = off) ...
    topk_anneal_steps: int = 0        # ... and anneal linearly to the preset's top_k over this many steps
    resume: str | None = None         # checkpoint (or run) directory to continue from
    tensorboard: bool = True          # also log to TensorBoard when it is installed
    expert_parallel: int = 0          # shard the routed experts over N ranks (torchrun --nproc_per_node N); 0 = off

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "log_every", "bpe_vocab_size"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, name, value, "must be a positive integer")
        for name in ("seq_len", "warmup_steps", "eval_every", "save_every", "topk_start", "topk_anneal_steps",
                     "expert_parallel"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 0, name, value, "must be an integer >= 0")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is not allowed; choose 'cpu' or 'cuda'")
        if self.tokenizer not in ("byte", "bpe"):
            raise ValueError(f"tokenizer={self.tokenizer!r} is not allowed; choose 'byte' or 'bpe'")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"lr={self.lr!r}, min_lr={self.min_lr!r} are invalid: need lr > 0 and 0 <= min_lr <= lr")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- presets ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    """A named starting point: the model and the run's defaults."""

    model: ModelConfig
    train: TrainConfig


def _moe_model(dim: int, n_layers: int, n_heads: int, seq: int, experts: int, expert_dim: int, top_k: int,
               shared: int) -> ModelConfig:
    """V3-style gates (sigmoid, normalized top-k, loss-free bias u=1e-3) at laptop scale."""
    moe = MoEConfig(dim=dim, n_routed_experts=experts, expert_dim=expert_dim, top_k=top_k, n_shared_experts=shared,
                    score_func="sigmoid", norm_topk_prob=True, bias_update_speed=1e-3)
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads, max_seq_len=seq,
                       first_k_dense=1, moe=moe)


def _presets() -> dict[str, Preset]:
    """debug takes seconds, tiny about 4-5 minutes on 2 CPU cores (the demo), small longer; each has a
    `-dense` twin with the same active parameters and the same run."""
    base = {
        "debug": Preset(_moe_model(64, 2, 4, 64, experts=16, expert_dim=16, top_k=2, shared=1),
                        TrainConfig(preset="debug", steps=200, batch_size=8, warmup_steps=20, eval_every=100,
                                    eval_batches=8, save_every=0)),
        "tiny": Preset(_moe_model(128, 4, 4, 128, experts=32, expert_dim=64, top_k=2, shared=1),
                       TrainConfig(preset="tiny")),
        "small": Preset(_moe_model(256, 6, 8, 256, experts=64, expert_dim=64, top_k=6, shared=2),
                        TrainConfig(preset="small", steps=3000, lr=1.5e-3, min_lr=1.5e-4, warmup_steps=200)),
    }
    twins = {f"{name}-dense": Preset(p.model.dense_twin(), dataclasses.replace(p.train, preset=f"{name}-dense"))
             for name, p in base.items()}
    return base | twins


PRESETS: dict[str, Preset] = _presets()


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def preset(name: str) -> ModelConfig:
    """A copy of a preset's model."""
    return _preset(name).model


# ---- `--set key=value` overrides --------------------------------------------------------------------

def _parse_value(text: str, current: object) -> bool | int | float | str | None:
    """Parse a --set value against the type of the field's current value."""
    low = text.lower()
    if low in ("none", "null"):
        return None
    if isinstance(current, bool):
        if low not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return low in ("true", "1")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if current is None:  # optional field: guess
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
    return text


def apply_sets(model_cfg: ModelConfig, train_cfg: TrainConfig, sets: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """Apply `key=value` overrides; keys are TrainConfig fields, ModelConfig fields, or moe.<field>."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"moe"}
    moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
    model_changes: dict[str, Any] = {}
    moe_changes: dict[str, Any] = {}
    train_changes: dict[str, Any] = {}
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip()
        obj: object  # the config that holds the field: the MoE's, the run's or the model's
        if not sep:
            raise ValueError(f"--set {item!r} must look like key=value")
        if key.startswith("moe."):
            name, target, obj = key[4:], moe_changes, model_cfg.moe
            if obj is None:
                raise ValueError(f"--set {key}: this model has no MoE layers (a dense preset)")
            ok = name in moe_fields
        elif key in train_fields:
            name, target, obj, ok = key, train_changes, train_cfg, True
        else:
            name, target, obj, ok = key, model_changes, model_cfg, key in model_fields
        if not ok:
            allowed = sorted(train_fields) + sorted(model_fields) + [f"moe.{f}" for f in sorted(moe_fields)]
            raise ValueError(f"unknown --set key {key!r}; allowed keys: {', '.join(allowed)}")
        try:
            target[name] = _parse_value(text.strip(), getattr(obj, name))
        except ValueError as e:
            raise ValueError(f"--set {key}: {e}") from None
    if moe_changes:
        assert model_cfg.moe is not None
        model_changes["moe"] = model_cfg.moe.replace(**moe_changes)
    if "dim" in model_changes and model_cfg.moe is not None:  # keep the MoE width in step with the model
        model_changes["moe"] = model_changes.get("moe", model_cfg.moe).replace(dim=model_changes["dim"])
    if model_changes:
        model_cfg = dataclasses.replace(model_cfg, **model_changes)
    return model_cfg, dataclasses.replace(train_cfg, **train_changes)


def build_configs(name: str, sets: list[str] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """(ModelConfig, TrainConfig) of a preset with `--set key=value` overrides applied."""
    p = _preset(name)
    return apply_sets(p.model, p.train, sets or [])
