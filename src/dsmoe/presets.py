"""Named presets (a model and its run's defaults) and the `key=value` overrides of `dsmoe train --set`."""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from dsmoe.config import ModelConfig, MoEConfig, TrainConfig


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
    # The same models with DeepSeek's Multi-head Latent Attention (as many attention parameters, head dims
    # qk = nope + rope = 32 where the widths allow): their runs end as HuggingFace DeepSeek-V3 folders (RUN/hf)
    mla: dict[str, dict[str, Any]] = {
        "debug": dict(kv_lora_rank=48, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16),
        "tiny": dict(kv_lora_rank=96, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32),
        "small": dict(kv_lora_rank=192, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32)}
    latent = {f"{name}-mla": Preset(dataclasses.replace(base[name].model, **dims),
                                    dataclasses.replace(base[name].train, preset=f"{name}-mla"))
              for name, dims in mla.items()}
    return base | twins | latent


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
        try:
            return int(text)
        except ValueError:
            number = _float_or_none(text)  # 1e3 is an integer too
            if number is None or not number.is_integer():
                raise ValueError(f"expected an integer, got {text!r}") from None
            return int(number)
    if isinstance(current, float):
        number = _float_or_none(text)
        if number is None:
            raise ValueError(f"expected a number, got {text!r}")
        return number
    if current is None:  # optional field: guess
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
    return text


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# Names other libraries use for dsmoe's --set keys: a near miss of one of them suggests the dsmoe key.
SET_ALIASES = {"learning_rate": "lr", "min_learning_rate": "min_lr", "batch": "batch_size", "epochs": "steps",
               "max_steps": "steps", "gradient_accumulation_steps": "grad_accum", "clip_grad": "grad_clip",
               "max_grad_norm": "grad_clip", "hidden_size": "dim", "num_layers": "n_layers",
               "num_heads": "n_heads", "context_length": "max_seq_len", "num_experts": "moe.n_routed_experts",
               "n_experts": "moe.n_routed_experts", "experts": "moe.n_routed_experts",
               "num_experts_per_tok": "moe.top_k", "topk": "moe.top_k", "n_shared": "moe.n_shared_experts"}


def _did_you_mean(key: str, allowed: list[str]) -> str:
    """' did you mean 'lr'?' for the closest allowed key (through SET_ALIASES and bare moe field names), or ''."""
    candidates = {k: k for k in allowed} | {k[4:]: k for k in allowed if k.startswith("moe.")}
    candidates |= {alias: k for alias, k in SET_ALIASES.items() if k in allowed}
    for probe in (key, key.lower().replace("-", "_")):
        match = difflib.get_close_matches(probe, list(candidates), n=1, cutoff=0.6)
        if match:
            return f" did you mean {candidates[match[0]]!r}?"
    return ""


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
            allowed = sorted(train_fields) + sorted(model_fields)
            allowed += [f"moe.{f}" for f in sorted(moe_fields)] if model_cfg.moe is not None else []
            raise ValueError(f"unknown --set key {key!r};{_did_you_mean(key, allowed)} "
                             f"allowed keys: {', '.join(allowed)}")
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


