"""HuggingFace DeepSeek-V2 / V3 format (the DeepSeek-V2/V3 checkpoints' config.json and weight names): config
fields and the weights of one MoE block.

Shapes: E routed experts, D model dim, F expert hidden dim.

Routing semantics of each release, as their code computes the K weights w from the scores s[ids]:

    release       score    choice / group score                 weights
    deepseek_v2   softmax  greedy: no groups                    deepseek, deepseek-hub: K>1 and norm ? w/sum(w) : w*rsf
                           group_limited_greedy: max            transformers: w*rsf (norm_topk_prob ignored)
    deepseek_v3   sigmoid  noaux_tc: s+b, sum of top-2          deepseek, transformers: (norm ? w/sum(w) : w)*rsf
                                                                deepseek-hub: (K>1 and norm ? w/sum(w) : w)*rsf

rsf = routed_scaling_factor. `semantics` picks the code a config is read with:
- "deepseek" (default): DeepSeek's reference code. V2: `modeling_deepseek.py` of the DeepSeek-V2 releases
  (DeepSeek's only V2 code). V3: `inference/model.py` of the DeepSeek-V3 repository, whose Gate.forward
  normalizes sigmoid weights for every K, so one weight becomes 1 before route_scale. That code has no
  norm_topk_prob field (every V3 config sets it true); dsmoe honours norm_topk_prob=false as the other two do.
- "deepseek-hub": `modeling_deepseek.py` of the DeepSeek-V3 hub releases, which skips normalizing when
  K=1 (`if self.top_k > 1 and self.norm_topk_prob`). For V2 it is "deepseek".
- "transformers": transformers 5's DeepseekV2Moe / DeepseekV3MoE.
They agree on every released checkpoint (V2 and V2-Lite ship norm_topk_prob=false; V3 ships K=8) and
part only for a V2 config with norm_topk_prob=true, or a V3 config with K=1.

Auxiliary losses (training only; moe_config_from_hf sets them from aux_loss_alpha and seq_aux): V2's
sequence-wise loss counts the experts actually routed (`topk_idx`, group limit included; V2 eq. 24), V3's
the top-K of the unbiased scores (V3 eq. 18), so a V2 config with seq_aux gets seq_aux_experts="routed".
Masking also differs: DeepSeek's V3 hub code masks discarded groups with 0.0, which lets a negative
s+b pick experts in them; DeepSeek's inference/model.py, transformers and dsmoe mask with -inf. V2 has
no bias and softmax scores are > 0, so its 0.0 mask is the same as -inf.

Weights use the checkpoint layout (keys relative to `model.layers.N.mlp.`), one tensor per expert;
transformers 5 fuses the experts in memory (`fuse_experts` / `unfuse_experts` convert).
"""

from __future__ import annotations

import math

import torch

from dsmoe.config import GroupScore, MoEConfig, ScoreFunc, SeqAuxExperts

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
V3_ALIASES = ("kimi_k2",)  # model_types of releases built as DeepseekV3ForCausalLM (their config.json says so)
SEMANTICS = ("deepseek", "deepseek-hub", "transformers")  # see the module docstring
TOPK_METHODS = {"deepseek_v2": ("greedy", "group_limited_greedy"), "deepseek_v3": ("noaux_tc",)}
SCORE_FUNCS = {"deepseek_v2": "softmax", "deepseek_v3": "sigmoid"}

# Routing fields a config.json may leave out: each release's own defaults.
_DEFAULTS = {
    "deepseek_v2": dict(topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                        n_group=None, topk_group=None, n_shared_experts=2),
    "deepseek_v3": dict(topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
                        n_group=8, topk_group=4, n_shared_experts=1),
}
_REQUIRED = ("hidden_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")

# What transformers' DeepseekV2Config / DeepseekV3Config (5.x) give a field config.json leaves out, so that a folder
# reads as transformers reads it (a present null stays null: q_lora_rank null means no query compression).
_SHARED = dict(hidden_act="silu", kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
               v_head_dim=128, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False)
CLASS_DEFAULTS = {
    "deepseek_v2": dict(_SHARED, vocab_size=102400, hidden_size=4096, intermediate_size=11008,
                        moe_intermediate_size=1407, num_hidden_layers=32, num_attention_heads=32, n_routed_experts=64,
                        first_k_dense_replace=0, max_position_embeddings=2048),
    "deepseek_v3": dict(_SHARED, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, n_routed_experts=256,
                        num_experts_per_tok=8, first_k_dense_replace=3, max_position_embeddings=4096,
                        rope_interleave=True, num_nextn_predict_layers=1),
}


def with_class_defaults(d: dict) -> dict:
    """config.json's fields, with transformers' defaults of its model_type for the ones it leaves out."""
    return {**CLASS_DEFAULTS[_model_type(d)], **d}


# ----------------------------------------------------------------------------- config


def _get(d: dict, key: str, model_type: str):
    """d[key], or the release default where the key is absent or null."""
    value = d.get(key)
    return _DEFAULTS[model_type].get(key) if value is None else value


def _int(key: str, value, minimum: int | None = None) -> int:
    """An integer field, >= minimum when one is given; 8.0 is 8, but 8.7 is an error, never silently 8."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"HF config field {key}={value!r} is invalid: must be an integer"
                         + (f" >= {minimum}" if minimum is not None else ""))
    if minimum is not None and value < minimum:
        raise ValueError(f"HF config field {key}={value!r} is invalid: must be an integer >= {minimum}")
    return value


def _bool(key: str, value) -> bool:
    """A boolean field: the string "false" is an error, never silently True."""
    if not isinstance(value, bool):
        raise ValueError(f"HF config field {key}={value!r} is invalid: must be true or false (a JSON boolean)")
    return value


def _float(key: str, value, above: float | None = None, at_least: float | None = None) -> float:
    """A finite number, > above or >= at_least when given (JSON allows NaN and Infinity; an int too large
    for a float is refused too)."""
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        ok = False
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    if not ok:
        bound = f" > {above:g}" if above is not None else f" >= {at_least:g}" if at_least is not None else ""
        raise ValueError(f"HF config field {key}={value!r} is invalid: must be a finite number{bound}")
    return float(value)


def _model_type(d: dict) -> str:
    model_type = d.get("model_type")
    if model_type in V3_ALIASES:
        if "DeepseekV3ForCausalLM" not in (d.get("architectures") or []):
            raise ValueError(f"model_type={model_type!r} is read as deepseek_v3 only with architectures "
                             '["DeepseekV3ForCausalLM"], which this config.json does not name')
        return "deepseek_v3"
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported; choose one of {MODEL_TYPES}")
    return model_type


def _norm_and_scale(model_type: str, semantics: str, K: int, norm: bool, scale: float) -> tuple[bool, float]:
    """dsmoe's (norm_topk_prob, route_scale), which always normalizes (if asked) and then scales."""
    if model_type == "deepseek_v2":
        if semantics == "transformers":  # transformers' V2 router never normalizes, always scales
            return False, scale
        if norm and K > 1:  # DeepSeek's V2 code normalizes OR scales, never both
            return True, 1.0
        return False, scale
    if semantics == "deepseek-hub":  # DeepSeek's V3 hub modeling code skips normalizing a single weight
        return norm and K > 1, scale
    return norm, scale  # DeepSeek-V3's inference/model.py and transformers normalize even one weight (to 1)


def moe_config_from_hf(d: dict, semantics: str = "deepseek") -> MoEConfig:
    """The MoE layer of a HuggingFace DeepSeek-V2 / V3 `config.json` dict.

    semantics="deepseek" reads the config as DeepSeek's reference code runs it (V3: inference/model.py),
    "deepseek-hub" as DeepSeek's hub modeling code, "transformers" as transformers 5 (they differ only for V2
    with norm_topk_prob, and V3 with K=1; see the module docstring). The auxiliary loss follows the release:
    V2's sequence-wise loss counts the routed experts. Training-only fields that HF does not store (bias
    update, capacity, ...) get dsmoe's defaults; change them with `.replace()`.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics={semantics!r} is not allowed; choose one of {SEMANTICS}")
    if not isinstance(d, dict):
        raise TypeError(f"HF config must be a dict (the parsed config.json), got {type(d).__name__}"
                        + ("; for a transformers config pass config.to_dict()" if hasattr(d, "to_dict") else ""))
    d = with_class_defaults(d)  # a field left out reads as transformers reads it
    model_type = _model_type(d)
    missing = [k for k in _REQUIRED if d.get(k) is None]
    if missing:
        raise ValueError(f"HF config for {model_type} lacks required fields {missing}")
    score_func = SCORE_FUNCS[model_type] if d.get("scoring_func") is None else d["scoring_func"]
    if score_func != SCORE_FUNCS[model_type]:  # both implementations support only this one
        raise ValueError(f"scoring_func={score_func!r} is not supported for {model_type}; "
                         f"allowed: {SCORE_FUNCS[model_type]!r}")
    method = _get(d, "topk_method", model_type)
    if method not in TOPK_METHODS[model_type]:
        raise ValueError(f"topk_method={method!r} is not supported for {model_type}; "
                         f"choose one of {TOPK_METHODS[model_type]}")
    K = _int("num_experts_per_tok", d["num_experts_per_tok"], 1)
    norm = _bool("norm_topk_prob", _get(d, "norm_topk_prob", model_type))
    scale = _float("routed_scaling_factor", _get(d, "routed_scaling_factor", model_type), above=0)
    norm, scale = _norm_and_scale(model_type, semantics, K, norm, scale)
    if method == "greedy":
        n_groups, topk_groups = 1, 1
    else:
        n_groups, topk_groups = _get(d, "n_group", model_type), _get(d, "topk_group", model_type)
        if n_groups is None or topk_groups is None:
            raise ValueError(f"topk_method={method!r} needs n_group and topk_group, "
                             f"got n_group={n_groups!r}, topk_group={topk_groups!r}")

    alpha = 0.0 if d.get("aux_loss_alpha") is None else _float("aux_loss_alpha", d["aux_loss_alpha"], at_least=0)
    # DeepSeek's config classes default to the sequence-wise loss
    seq_aux = True if d.get("seq_aux") is None else _bool("seq_aux", d["seq_aux"])
    return MoEConfig(
        dim=_int("hidden_size", d["hidden_size"], 1),
        n_routed_experts=_int("n_routed_experts", d["n_routed_experts"], 1),
        n_shared_experts=_int("n_shared_experts", _get(d, "n_shared_experts", model_type), 0),
        top_k=K,
        expert_dim=_int("moe_intermediate_size", d["moe_intermediate_size"], 1),
        score_func=score_func,
        norm_topk_prob=norm,
        route_scale=scale,
        n_groups=_int("n_group", n_groups, 1),
        topk_groups=_int("topk_group", topk_groups, 1),
        group_score="top2" if model_type == "deepseek_v3" else "max",
        aux_loss_alpha=0.0 if seq_aux else alpha,
        seq_aux_loss_alpha=alpha if seq_aux else 0.0,
        seq_aux_experts=_seq_aux_experts(model_type) if seq_aux and alpha else SeqAuxExperts.TOPK,
    )


def _seq_aux_experts(model_type: str) -> SeqAuxExperts:
    """What the release's sequence-wise loss counts: V2 the routed experts (eq. 24, `topk_idx` in its code),
    V3 the top-K of the unbiased scores (eq. 18)."""
    return SeqAuxExperts.ROUTED if model_type == "deepseek_v2" else SeqAuxExperts.TOPK


def hf_model_type(cfg: MoEConfig) -> str:
    """The release whose format holds this layer: sigmoid scores are V3's, softmax V2's (the weights of every
    family with a sigmoid gate hold its bias, e_score_correction_bias; a softmax family's have none)."""
    return "deepseek_v3" if cfg.score_func == ScoreFunc.SIGMOID else "deepseek_v2"


def moe_config_to_hf(cfg: MoEConfig) -> dict:
    """The HF config.json fields of this layer, written for the default semantics ("deepseek").

    Raises ValueError for routing HF cannot express. Fields that only matter in training and that HF
    does not store (bias update, device/comm/z losses, aux_loss_scores, capacity, check_inputs) are left
    out. With n_groups=1 group_score has no effect and is not stored. A V3 layer with top_k=1 and
    norm_topk_prob is written as such: DeepSeek-V3's inference code and transformers normalize its weight
    to 1; only DeepSeek's hub code (semantics="deepseek-hub") reads it without normalizing.
    """
    model_type = hf_model_type(cfg)
    want_group_score = GroupScore.TOP2 if model_type == "deepseek_v3" else GroupScore.MAX
    if cfg.n_groups > 1 and cfg.group_score != want_group_score:
        raise ValueError(f"group_score={str(cfg.group_score)!r} with score_func={str(cfg.score_func)!r} cannot "
                         f"be written: {model_type} scores groups by {want_group_score.value!r}")
    if cfg.uniform_routing:
        raise ValueError("uniform_routing=True is a debug mode that HF configs cannot express")
    if cfg.shared_expert_gate or cfg.shared_width != cfg.n_shared_experts * cfg.expert_dim:
        raise ValueError("a gated shared expert or one of its own width (Qwen2-MoE's) cannot be written in "
                         f"{model_type}'s format, whose shared experts are n_shared_experts x moe_intermediate_size")
    if cfg.aux_loss_alpha and cfg.seq_aux_loss_alpha:
        raise ValueError("HF configs hold one auxiliary loss (aux_loss_alpha with seq_aux); "
                         "set aux_loss_alpha or seq_aux_loss_alpha to 0")
    if cfg.norm_topk_prob and cfg.top_k == 1 and model_type == "deepseek_v2":
        raise ValueError("norm_topk_prob=True with top_k=1 (every weight 1) cannot be written for deepseek_v2, "
                         "whose code skips normalizing a single weight")
    if cfg.norm_topk_prob and cfg.route_scale != 1 and model_type == "deepseek_v2":
        raise ValueError(f"norm_topk_prob=True with route_scale={cfg.route_scale} cannot be written for "
                         "deepseek_v2 (softmax), whose code normalizes OR scales; use route_scale=1")
    if cfg.seq_aux_loss_alpha and cfg.seq_aux_experts != _seq_aux_experts(model_type):
        raise ValueError(f"seq_aux_experts={str(cfg.seq_aux_experts)!r} with seq_aux_loss_alpha > 0 cannot be "
                         f"written for {model_type}, whose sequence-wise loss counts "
                         f"{str(_seq_aux_experts(model_type))!r}")
    seq = bool(cfg.seq_aux_loss_alpha)
    return {
        "model_type": model_type,
        "hidden_size": cfg.dim,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.top_k,
        "moe_intermediate_size": cfg.expert_dim,
        "scoring_func": str(cfg.score_func),
        "topk_method": "noaux_tc" if model_type == "deepseek_v3" else
                       ("group_limited_greedy" if cfg.n_groups > 1 else "greedy"),
        "n_group": cfg.n_groups,
        "topk_group": cfg.topk_groups,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": float(cfg.route_scale),
        "aux_loss_alpha": float(cfg.seq_aux_loss_alpha if seq else cfg.aux_loss_alpha),
        "seq_aux": seq or not cfg.aux_loss_alpha,
    }


# ----------------------------------------------------------------------------- weights


def expected_shapes(cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Every key of one MoE block in the HF checkpoint layout, with its shape."""
    E, D, F = cfg.n_routed_experts, cfg.dim, cfg.expert_dim
    shapes: dict[str, tuple[int, ...]] = {"gate.weight": (E, D)}
    if hf_model_type(cfg) == "deepseek_v3":
        shapes["gate.e_score_correction_bias"] = (E,)
    for e in range(E):
        shapes |= {f"experts.{e}.gate_proj.weight": (F, D), f"experts.{e}.up_proj.weight": (F, D),
                   f"experts.{e}.down_proj.weight": (D, F)}
    if cfg.n_shared_experts:
        Fs = cfg.shared_width
        shapes |= {"shared_experts.gate_proj.weight": (Fs, D), "shared_experts.up_proj.weight": (Fs, D),
                   "shared_experts.down_proj.weight": (D, Fs)}
    if cfg.shared_expert_gate:  # Qwen2-MoE
        shapes["shared_expert_gate.weight"] = (1, D)
    return shapes


def _targets(layer) -> dict[str, torch.Tensor]:
    """HF key -> the dsmoe tensor (or expert slice) it lives in."""
    ex = layer.experts
    targets = {"gate.weight": layer.gate.weight, "gate.e_score_correction_bias": layer.gate.bias}
    for e in range(layer.cfg.n_routed_experts):
        targets |= {f"experts.{e}.gate_proj.weight": ex.w_gate[e], f"experts.{e}.up_proj.weight": ex.w_up[e],
                    f"experts.{e}.down_proj.weight": ex.w_down[e]}
    if layer.shared_experts is not None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            targets[f"shared_experts.{name}.weight"] = getattr(layer.shared_experts, name).weight
    if layer.shared_expert_gate is not None:
        targets["shared_expert_gate.weight"] = layer.shared_expert_gate.weight
    return targets


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


@torch.no_grad()
def load_hf_state_dict(layer, sd: dict[str, torch.Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
    """Copy one HF MoE block (keys relative to `mlp.`, per-expert or transformers' fused) into `layer`.

    Returns (missing, unexpected) keys; with strict=True any of them raises. A wrong shape always
    raises. The bias `gate.e_score_correction_bias` (V3) is dsmoe's balancing bias, kept in fp32.
    """
    if "experts.gate_up_proj" in sd or "experts.down_proj" in sd:
        sd = unfuse_experts(sd)
    shapes = expected_shapes(layer.cfg)
    missing = [k for k in shapes if k not in sd]
    unexpected = [k for k in sd if k not in shapes]
    if strict and (missing or unexpected):
        raise KeyError(f"HF state dict does not fit this {hf_model_type(layer.cfg)} layer: "
                       f"missing keys [{_short(missing)}]; unexpected keys [{_short(unexpected)}]")
    wrong = [f"{k}: got {tuple(sd[k].shape)}, expected {shapes[k]}"
             for k in shapes if k in sd and tuple(sd[k].shape) != shapes[k]]
    if wrong:
        raise ValueError("HF state dict has wrong shapes: " + "; ".join(wrong))
    targets = _targets(layer)
    for k in shapes:
        if k in sd:
            targets[k].copy_(sd[k])
    return missing, unexpected


@torch.no_grad()
def hf_state_dict(layer) -> dict[str, torch.Tensor]:
    """The layer's weights in the HF checkpoint layout: per-expert keys, separate tensors (safetensors-ready)."""
    shapes = expected_shapes(layer.cfg)
    if "gate.e_score_correction_bias" not in shapes and layer.gate.bias.any():
        raise ValueError("the balancing bias is nonzero, but deepseek_v2 (softmax) checkpoints have no "
                         "gate.e_score_correction_bias to hold it")
    targets = _targets(layer)
    return {k: targets[k].detach().clone() for k in shapes}


def fuse_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert keys -> transformers 5's in-memory layout.

    experts.gate_up_proj [E, 2F, D] (each expert's gate rows, then its up rows), experts.down_proj [E, D, F].
    """
    out = {k: v for k, v in sd.items() if not k.startswith("experts.")}
    E = len([k for k in sd if k.startswith("experts.") and k.endswith(".gate_proj.weight")])
    if E:
        out["experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"experts.{e}.gate_proj.weight"], sd[f"experts.{e}.up_proj.weight"]]) for e in range(E)])
        out["experts.down_proj"] = torch.stack([sd[f"experts.{e}.down_proj.weight"] for e in range(E)])
    return out


def unfuse_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's fused experts -> per-expert keys (the inverse of `fuse_experts`)."""
    out = {k: v for k, v in sd.items() if k not in ("experts.gate_up_proj", "experts.down_proj")}
    absent = [k for k in ("experts.gate_up_proj", "experts.down_proj") if k not in sd]
    if absent:
        raise ValueError(f"fused experts need experts.gate_up_proj and experts.down_proj; {absent[0]} is missing")
    gate_up_EXD, down_EDF = sd["experts.gate_up_proj"], sd["experts.down_proj"]
    E, F2, D = gate_up_EXD.shape if gate_up_EXD.dim() == 3 else (0, 1, 0)
    if F2 % 2 or tuple(down_EDF.shape) != (E, D, F2 // 2):
        raise ValueError(f"fused experts must be gate_up_proj [E, 2F, D] and down_proj [E, D, F], got "
                         f"{tuple(gate_up_EXD.shape)} and {tuple(down_EDF.shape)}")
    for e, (gate_up, down) in enumerate(zip(gate_up_EXD, down_EDF)):
        gate, up = gate_up.chunk(2)
        out |= {f"experts.{e}.gate_proj.weight": gate, f"experts.{e}.up_proj.weight": up,
                f"experts.{e}.down_proj.weight": down}
    return out
