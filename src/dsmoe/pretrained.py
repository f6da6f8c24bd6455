"""Whole DeepSeek-V2/V3-family checkpoints: `from_pretrained(path)` loads a HuggingFace folder into dsmoe's
model, `save_pretrained(model, path)` writes one that transformers' AutoModelForCausalLM loads.

A folder holds config.json and model.safetensors, or shards listed by model.safetensors.index.json.
Experts are per-expert keys on disk (`mlp.experts.{e}.gate_proj.weight`, ...); transformers 5's fused
`mlp.experts.gate_up_proj` / `down_proj` are accepted too. Multi-token-prediction modules live at
`model.layers.{num_hidden_layers + i}` (enorm, hnorm, eh_proj, shared_head.norm, a full block, and copies
of the embedding and output head, which dsmoe shares with the main model) and are kept.

Loading never holds two copies of the weights: the model is built on the meta device, allocated once in
the checkpoint's dtype (bf16 stays bf16 unless `dtype` says otherwise; the balancing bias is fp32), and
filled tensor by tensor from each shard; an FP8 release's weights are dequantized as they are read (see FP8
releases below). Every key and shape is checked against the config before any
tensor is read, so a missing, extra or mis-shaped key is an error naming it and nothing half-loaded is
returned.

A folder is untrusted input: every file read from it must lie inside it (no '..', absolute name or link out
of it, but for huggingface_hub's cache links from a snapshot to its blobs), every config.json field is checked
by type and range, the model's size is checked against the machine before anything is built, and every tensor
is checked finite as it is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from dsmoe import families, hf
from dsmoe.attention import Attention
from dsmoe.config import TOKEN_ID_FIELDS, ModelConfig
from dsmoe.memory import available_memory, size_text
from dsmoe.model import Block, MoETransformer, MTPModule
from dsmoe.moe import MoE, moe_layers
from dsmoe.paths import folder_file

INDEX = "model.safetensors.index.json"
ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
SUPPORTED = (*hf.MODEL_TYPES, *hf.V3_ALIASES, *families.FAMILIES)  # the model_types from_pretrained reads


class PretrainedError(ValueError):
    """A HuggingFace folder that is missing something, holds something unexpected, or is not supported."""


# ---- config ----------------------------------------------------------------------------------------------
# Every field dsmoe reads from config.json is checked by type and range here, naming the HF field: an int field
# given 260.7 is an error (8.0 is 8), and a 0 or a string is never replaced by a default (only an absent or null
# field takes one). dsmoe.hf reads the MoE fields the same way.

_REQUIRED = object()  # the default of a field config.json must hold


def _field(d: dict, key: str, default: Any = _REQUIRED) -> Any:
    """d[key]; `default` where it is absent or null, an error naming it when it is required."""
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise PretrainedError(f"config.json lacks the required field {key}")
        return default
    return value


def _object(key: str, value: Any) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise PretrainedError(f"HF config field {key}={value!r} is invalid: must be a JSON object or null")
    return value


def _rope(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, yarn scaling or None) from either the releases' rope_theta/rope_scaling or transformers
    5's rope_parameters."""
    params = _object("rope_parameters", d.get("rope_parameters")) or {}
    theta = d["rope_theta"] if d.get("rope_theta") is not None else params.get("rope_theta")
    theta = 10000.0 if theta is None else hf._float("rope_theta", theta, above=0)
    where, scaling = "rope_scaling", _object("rope_scaling", d.get("rope_scaling"))
    if scaling is None and params.get("rope_type", "default") != "default":
        where, scaling = "rope_parameters", params
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "yarn":
        raise PretrainedError(f"rope scaling {kind!r} is not supported; dsmoe supports yarn (or none)")
    # ModelConfig checks the values (and rope_theta > 1 under yarn); 4096.0 is read as 4096 here
    original = hf._int(f"{where}.original_max_position_embeddings", scaling.get("original_max_position_embeddings"), 1)
    keys = ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
    return theta, {"rope_type": "yarn", "original_max_position_embeddings": original,
                   **{k: scaling[k] for k in keys if scaling.get(k) is not None}}


def _attention(d: dict) -> dict[str, Any]:
    """ModelConfig's Multi-head Latent Attention fields (DeepSeek-V2 §2.1)."""
    if not d.get("kv_lora_rank"):
        raise PretrainedError("kv_lora_rank is missing or 0: DeepSeek-V2/V3 models use Multi-head Latent Attention")
    rope = hf._int("qk_rope_head_dim", _field(d, "qk_rope_head_dim"), 2)
    if rope % 2:
        raise PretrainedError(f"HF config field qk_rope_head_dim={rope} is invalid: must be even (rotary pairs)")
    return dict(kv_lora_rank=hf._int("kv_lora_rank", d["kv_lora_rank"], 1),
                q_lora_rank=hf._int("q_lora_rank", _field(d, "q_lora_rank", 0), 0),
                qk_nope_head_dim=hf._int("qk_nope_head_dim", _field(d, "qk_nope_head_dim"), 0),
                qk_rope_head_dim=rope, v_head_dim=hf._int("v_head_dim", _field(d, "v_head_dim"), 1))


def model_config_from_hf(d: dict, semantics: str = "deepseek") -> ModelConfig:
    """dsmoe's ModelConfig of a DeepSeek-V2/V3 config.json dict (the MoE part: dsmoe.hf.moe_config_from_hf).

    Every field is checked by type and range; nothing is sized against the machine here (a real V3 config
    reads anywhere, and builds on the meta device): from_pretrained does that before it allocates."""
    if not isinstance(d, dict):
        raise PretrainedError(f"config.json must hold a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type in families.FAMILIES:
        return families.model_config(d, *_rope(families.with_defaults(d)))
    if model_type not in hf.MODEL_TYPES + hf.V3_ALIASES:
        raise PretrainedError(f"model_type={model_type!r} is not supported; choose one of {', '.join(SUPPORTED)}")
    d = hf.with_class_defaults(d)  # a field left out reads as transformers reads it
    moe = hf.moe_config_from_hf(d, semantics)
    unsupported = {"hidden_act": ("silu",), "attention_bias": (False, None), "moe_layer_freq": (1, None)}
    for key, allowed in unsupported.items():
        if d.get(key) not in allowed:
            raise PretrainedError(f"{key}={d.get(key)!r} is not supported; dsmoe supports {allowed[0]!r}")
    attention = _attention(d)
    theta, scaling = _rope(d)
    n_layers = hf._int("num_hidden_layers", _field(d, "num_hidden_layers"), 1)
    first_k_dense = hf._int("first_k_dense_replace", _field(d, "first_k_dense_replace", 0), 0)
    if first_k_dense > n_layers:
        raise PretrainedError(f"HF config field first_k_dense_replace={first_k_dense} is invalid: must be <= "
                              f"num_hidden_layers={n_layers}")
    n_heads = hf._int("num_attention_heads", _field(d, "num_attention_heads"), 1)
    return ModelConfig(
        vocab_size=hf._int("vocab_size", _field(d, "vocab_size"), 1), dim=moe.dim, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=n_heads,
        max_seq_len=hf._int("max_position_embeddings", _field(d, "max_position_embeddings", 4096), 1),
        first_k_dense=first_k_dense, dense_hidden=hf._int("intermediate_size", _field(d, "intermediate_size"), 1),
        moe=moe, tie_embeddings=hf._bool("tie_word_embeddings", _field(d, "tie_word_embeddings", False)),
        rope_theta=theta, norm_eps=hf._float("rms_norm_eps", _field(d, "rms_norm_eps", 1e-6), above=0),
        rope_interleave=hf._bool("rope_interleave", _field(d, "rope_interleave", True)), rope_scaling=scaling,
        mtp_layers=hf._int("num_nextn_predict_layers", _field(d, "num_nextn_predict_layers", 0), 0),
        token_ids={k: d[k] for k in TOKEN_ID_FIELDS if d.get(k) is not None} or None, **attention)


def model_config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json of a model: its family's format (dsmoe.families) when it was read from one, else
    DeepSeek-V3's format for sigmoid gates, V2's for softmax."""
    if cfg.family in families.FAMILIES:
        families.check_exportable(cfg)
        return families.config_to_hf(cfg) | {"torch_dtype": str(dtype).removeprefix("torch.")}
    if not cfg.mla or cfg.moe is None:
        raise PretrainedError("only MoE models with Multi-head Latent Attention (kv_lora_rank > 0) have a "
                              "DeepSeek-V2/V3 HuggingFace format")
    d = hf.moe_config_to_hf(cfg.moe)
    d.update({
        "architectures": [ARCHITECTURES[d["model_type"]]], "vocab_size": cfg.vocab_size,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads, "max_position_embeddings": cfg.max_seq_len,
        "first_k_dense_replace": cfg.first_k_dense, "intermediate_size": cfg.dense_hidden,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
        "kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank or None,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "rope_interleave": cfg.rope_interleave, "rope_scaling": cfg.rope_scaling,
        "num_nextn_predict_layers": cfg.mtp_layers, "hidden_act": "silu", "attention_bias": False,
        "moe_layer_freq": 1, "torch_dtype": str(dtype).removeprefix("torch."), **(cfg.token_ids or {}),
    })
    return d


# ---- the key map -------------------------------------------------------------------------------------------

Writer = Callable[[torch.Tensor], object]


class Slot(NamedTuple):
    """Where one checkpoint key lives in the model: its shape, how to write a checkpoint tensor into the
    model, and how to read the model's tensor for saving."""

    shape: tuple[int, ...]
    write: Writer
    read: Callable[[], torch.Tensor]
    target: torch.Tensor | None = None  # the model's tensor itself, when a stored tensor is simply copied into it


def _slot(t: torch.Tensor, write: Writer | None = None, copy_on_read: bool = False) -> Slot:
    return Slot(tuple(t.shape), write or (lambda x: t.copy_(x)), (lambda: t.clone()) if copy_on_read else (lambda: t),
                None if write else t)


def _block_keys(prefix: str, block: Block, family: families.Family | None) -> dict[str, Slot]:
    """The HF keys of one decoder block (`model.layers.N.`), in its family's names (None: DeepSeek's)."""
    tensors: dict[str, torch.Tensor] = {f"{prefix}input_layernorm.weight": block.attn_norm.weight,
               f"{prefix}post_attention_layernorm.weight": block.ffn_norm.weight}
    for name, p in block.attn.named_parameters():  # MLA's parameter names are the checkpoints'
        key = families.attention_key(name) if isinstance(block.attn, Attention) else name
        tensors[f"{prefix}self_attn.{key}"] = p
    ffn = block.ffn
    if isinstance(ffn, MoE):
        moe_targets = hf._targets(ffn)
        for key in hf.expected_shapes(ffn.cfg):
            name = families.moe_key(family, key) if family else f"mlp.{key}"
            tensors[prefix + name] = moe_targets[key]
    else:
        for name in ("gate_proj", "up_proj", "down_proj"):
            tensors[f"{prefix}mlp.{name}.weight"] = getattr(ffn, name).weight
    return {key: _slot(t) for key, t in tensors.items()}


def key_map(model: MoETransformer) -> dict[str, Slot]:
    """Every HF key of a model and its slot."""
    cfg = model.cfg
    main: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed.weight,
                                     "model.norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        main["lm_head.weight"] = model.head.weight
    out = {key: _slot(t) for key, t in main.items()}
    family = families.FAMILIES.get(cfg.family)
    for i, block in enumerate(model.layers):
        assert isinstance(block, Block)
        out |= _block_keys(f"model.layers.{i}.", block, family)
    for d, mtp in enumerate(model.mtp):
        assert isinstance(mtp, MTPModule)
        prefix = f"model.layers.{cfg.n_layers + d}."
        out |= _block_keys(prefix, mtp.block, family)
        own: dict[str, torch.Tensor] = {"enorm.weight": mtp.enorm.weight, "hnorm.weight": mtp.hnorm.weight,
               "eh_proj.weight": mtp.eh_proj.weight, "shared_head.norm.weight": mtp.norm.weight}
        out |= {prefix + key: _slot(t) for key, t in own.items()}
        for key, t in {"embed_tokens.weight": model.embed.weight, "shared_head.head.weight": model.head.weight}.items():
            out[prefix + key] = _slot(t, _same_as(prefix + key, t), copy_on_read=True)
    return out


def _same_as(key: str, shared: torch.Tensor) -> Writer:
    """The MTP modules' copies of the embedding and head: dsmoe shares the model's, so they must be equal."""
    def check(t: torch.Tensor) -> None:
        if not torch.equal(t.to(shared.dtype), shared.detach()):
            raise PretrainedError(f"{key} differs from the model's own tensor; dsmoe shares the embedding and "
                                  "output head with the multi-token-prediction modules (DeepSeek-V3 §2.2)")
    return check


def _fused(slots: dict[str, Slot], present: set[str]) -> dict[str, Slot]:
    """transformers 5's fused expert keys in place of the per-expert ones, for the layers that use them."""
    out = {}
    for key in [k for k in present if k.endswith(".mlp.experts.gate_up_proj")]:
        prefix = key.removesuffix("gate_up_proj")
        E = sum(1 for k in slots if k.startswith(prefix) and k.endswith(".gate_proj.weight"))
        F_, D = slots[f"{prefix}0.gate_proj.weight"].shape
        experts = [[slots.pop(f"{prefix}{e}.{name}.weight").write for name in ("gate_proj", "up_proj", "down_proj")]
                   for e in range(E)]

        def gate_up(t: torch.Tensor, experts: list[list[Writer]] = experts, F_: int = F_) -> None:
            for e, (gate, up, _) in enumerate(experts):
                gate(t[e, :F_])
                up(t[e, F_:])

        def down(t: torch.Tensor, experts: list[list[Writer]] = experts) -> None:
            for e, (_, _, write) in enumerate(experts):
                write(t[e])

        unreadable = lambda: torch.empty(0)  # noqa: E731  (loading only: dsmoe writes per-expert keys)
        out[key] = Slot((E, 2 * F_, D), gate_up, unreadable)
        out[prefix + "down_proj"] = Slot((E, D, F_), down, unreadable)
    return out


# ---- the folder's files -------------------------------------------------------------------------------------
# A folder may come from anywhere, so every file dsmoe reads from it goes through dsmoe.paths.folder_file.

MAX_JSON_BYTES = 64 * 2**20  # config.json and the index (DeepSeek-V3's, with every expert's keys, is a few MB)


def read_json(folder: str | Path, name: str) -> Any:
    """The JSON file `name` of a folder (config.json, the index), checked to be inside it and of sane size."""
    path = folder_file(folder, name)
    if not path.exists():
        raise PretrainedError(f"{path} is missing (a HuggingFace folder needs config.json and safetensors)")
    if not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
        raise PretrainedError(f"{path} is not a JSON file of at most {MAX_JSON_BYTES // 2**20} MiB")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path} is not valid JSON ({e})") from None


def _shards(path: Path) -> list[Path]:
    """The safetensors files: those the index names (each inside the folder), else model.safetensors."""
    if not (path / INDEX).exists() and not (path / INDEX).is_symlink():
        files = [folder_file(path, "model.safetensors")]
    else:
        index = read_json(path, INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise PretrainedError(f"{path / INDEX} has no weight_map")
        first_key: dict[str, str] = {}  # each file once, in the index's order, with the first key naming it
        for key, name in weight_map.items():
            if not isinstance(name, str):
                raise PretrainedError(f"{path / INDEX}: weight_map[{key!r}] = {name!r} is invalid: must be the "
                                      "name of a safetensors file in the folder")
            first_key.setdefault(name, key)
        files = [folder_file(path, name, f"{INDEX} entry {key!r}: {name!r}") for name, key in first_key.items()]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise PretrainedError(f"missing safetensors file(s): {', '.join(missing)}")
    return files


def _headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """key -> (file, shape, dtype) from the shards' headers (no tensor is read)."""
    out = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    out[key] = (file, tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise PretrainedError(f"{file} is not a readable safetensors file ({e})") from None
    return out


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# ---- sizes against the machine -------------------------------------------------------------------------------
# Checked from config.json and the headers before a model, key map or rotary table is built, so that a config
# claiming 10**9 experts or 10**12 positions is an error naming the field, not many GB grown or an allocator's
# failure. The meta device allocates no weights, so a real V3 config still builds there on a small machine.

# model.py's rotary table holds 4R bytes a position (fp32 cos and sin of R/2 angles); while rotary_table()
# builds it, the angles (2R), their cos and sin (4R) and the stacked pair (4R) live at once, beside the table
# it replaces (.to(), to_empty() and init_buffers rebuild it) and the positions (12 bytes): 14R + 12 at the
# peak, 16R + 12 with room for the allocator.
ROTARY_BYTES_PER_DIM, ROTARY_BYTES_PER_POSITION = 16, 12


def rotary_bytes(cfg: ModelConfig) -> int:
    """Peak host memory of building the model's rotary table (see ROTARY_BYTES_PER_DIM)."""
    return (ROTARY_BYTES_PER_DIM * cfg.rope_dims + ROTARY_BYTES_PER_POSITION) * cfg.max_seq_len


def _check_rotary(cfg: ModelConfig) -> None:
    """The rotary table is built in host memory at max_seq_len positions, whatever the device."""
    need, available = rotary_bytes(cfg), available_memory("cpu")
    if available is not None and need > available:
        raise PretrainedError(f"HF config field max_position_embeddings={cfg.max_seq_len:,} is too large for this "
                              f"machine: the rotary table for it needs about {size_text(need)} of memory while it is "
                              f"built, and {size_text(available)} is available; lower it to the longest context you "
                              "will run")


def _check_stored(path: Path, cfg: ModelConfig, headers: dict[str, tuple[Path, tuple[int, ...], str]]) -> None:
    """Every parameter of the config is a number in the files (which may hold more: MTP modules, the V3 bias), so
    a config describing more than twice what they hold is not theirs, and is refused before its key map and
    meta model are built (their cost grows with the config: 3 entries an expert). A smaller mismatch, one
    wrong shape, passes here for _check_keys to name the key."""
    stored = sum(math.prod(shape) for _, shape, _ in headers.values())
    if cfg.num_params() > 2 * stored:
        raise PretrainedError(f"{path}: config.json describes {cfg.num_params():,} parameters (vocab_size, "
                              "hidden_size, num_hidden_layers, n_routed_experts, moe_intermediate_size, ...), but "
                              f"the safetensors files hold {stored:,} numbers: config.json does not fit the weights")


def _check_memory(path: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
    """The weights in `dtype` (and on cpu the rotary table) against the device's available memory."""
    if device.type == "meta":
        return
    need = cfg.num_params() * dtype.itemsize + (rotary_bytes(cfg) if device.type == "cpu" else 0)
    available = available_memory("cuda" if device.type == "cuda" else "cpu")
    if available is not None and need > available:
        moe = cfg.moe
        sizes = f"vocab_size={cfg.vocab_size}, hidden_size={cfg.dim}, num_hidden_layers={cfg.n_layers}"
        if moe is not None:
            sizes += f", n_routed_experts={moe.n_routed_experts}, moe_intermediate_size={moe.expert_dim}"
        raise PretrainedError(f"{path}: config.json describes a model of {cfg.num_params():,} parameters ({sizes}), "
                              f"about {size_text(need)} in {str(dtype).removeprefix('torch.')}, and {device.type} has "
                              f"{size_text(available)} available; load it with device='meta' to see its shapes, in a "
                              "smaller dtype, or on a machine with more memory")


# ---- loading -----------------------------------------------------------------------------------------------

LOAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LOAD_DEVICES = ("cpu", "cuda", "meta")


def _load_dtype(dtype: object) -> torch.dtype | None:
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype={dtype!r} is invalid: must be a torch.dtype (one of {LOAD_DTYPES}) or None")
    if dtype is not None and dtype not in LOAD_DTYPES:
        raise ValueError(f"dtype={dtype} is not allowed; choose one of {LOAD_DTYPES} or None (the file's)")
    return dtype


def _load_device(device: object) -> torch.device:
    if not isinstance(device, (str, torch.device, type(None))):
        raise TypeError(f"device={device!r} is invalid: must be a string such as 'cpu' or 'cuda:0', a "
                        "torch.device, or None (cpu)")
    try:
        parsed = torch.device("cpu" if device is None else device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in LOAD_DEVICES:
        raise ValueError(f"device={device!r} is not allowed; choose one of {LOAD_DEVICES} (cuda:N for a GPU)")
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device={device!r} is not available: this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")
    return parsed


def hf_model_config(path: str | Path, semantics: str = "deepseek") -> ModelConfig:
    """The ModelConfig of a HuggingFace folder: its config.json, with multi-token prediction only when the
    weights hold the MTP modules (transformers drops them when it saves, config.json still names them).
    Its rotary table is checked to fit in this machine's memory (everything that builds the model builds it)."""
    path = Path(path)
    if semantics not in hf.SEMANTICS:  # not the file's fault: no file name in this error
        raise ValueError(f"semantics={semantics!r} is not allowed; choose one of {hf.SEMANTICS}")
    d = read_json(path, "config.json")
    try:
        cfg = model_config_from_hf(d, semantics)
        _check_rotary(cfg)
    except (ValueError, TypeError) as e:
        raise PretrainedError(f"{path / 'config.json'}: {e}") from None
    if cfg.mtp_layers and not any(k.startswith(f"model.layers.{cfg.n_layers}.") for k in _headers(_shards(path))):
        cfg = dataclasses.replace(cfg, mtp_layers=0)
    return cfg


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                    semantics: str = "deepseek") -> MoETransformer:
    """Load a HuggingFace DeepSeek-V2/V3 folder into dsmoe's model (eval mode). `semantics`: which code's
    routing a config is read with (see dsmoe.hf). On device='meta' only the shapes are loaded: every key and
    shape is checked against the files' headers, no tensor is read."""
    path, dtype, device = Path(path), _load_dtype(dtype), _load_device(device)
    cfg = hf_model_config(path, semantics)
    headers, _ = _weights(path, cfg)
    _check_stored(path, cfg, headers)  # before the key map (3 entries an expert) or the model is built
    embed = headers.get("model.embed_tokens.weight")
    dtype = dtype or (_DTYPES.get(embed[2], torch.float32) if embed else torch.float32)
    _check_memory(path, cfg, dtype, device)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    _check_keys(path, headers, _writers(model, set(headers)))  # before a byte is allocated or read
    model.to(dtype).to_empty(device=device)
    init_buffers(model)
    if device.type != "meta":
        load_hf_weights(model, path)
    return model.eval()


def load_hf_weights(model: MoETransformer, path: str | Path) -> None:
    """Fill a built model from a HuggingFace folder, shard by shard, every key and shape checked first, every
    tensor checked finite as it is written (a NaN in a norm would make every loss NaN, silently)."""
    if not isinstance(model, MoETransformer):
        raise TypeError(f"model must be a dsmoe MoETransformer, got {type(model).__name__}")
    path = Path(path)
    headers, scales = _weights(path, model.cfg)
    writers = _writers(model, set(headers))
    _check_keys(path, headers, writers)
    shared = {k for k in headers if k.endswith((".embed_tokens.weight", ".shared_head.head.weight"))
              and k != "model.embed_tokens.weight"}  # checked against the model's own once it is loaded
    files = list(dict.fromkeys(f for f, _, _ in headers.values()))
    with torch.no_grad():
        for late in (False, True):
            for file in files:
                offsets = _data_offsets(file)
                with safe_open(str(file), "pt") as f, open(file, "rb") as raw:
                    for key in (k for k in f.keys() if k in headers and (k in shared) == late):
                        target = writers[key].target
                        if key not in scales.keys and _read_into(raw, offsets.get(key), target):
                            assert target is not None
                            _check_finite(file, key, target)
                            continue
                        t = f.get_tensor(key)
                        if key in scales.keys:
                            t = _dequantized(f, file, t, scales.keys[key], scales.block)
                        _check_finite(file, key, t)
                        writers[key].write(t)


def _data_offsets(file: Path) -> dict[str, tuple[str, int, int]]:
    """key -> (dtype, first byte, end byte) of each tensor's data in a safetensors file, from its JSON header; {}
    where the header cannot be read that way (safe_open then reads the file, and names what is wrong with it)."""
    try:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n > MAX_JSON_BYTES:
                return {}
            header, base = json.loads(fh.read(n)), 8 + n
        return {k: (v["dtype"], base + int(v["data_offsets"][0]), base + int(v["data_offsets"][1]))
                for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return {}


def _read_into(raw: Any, entry: tuple[str, int, int] | None, target: torch.Tensor | None) -> bool:
    """Read a stored tensor's bytes straight into the model's CPU tensor of the same dtype and size: no copy of
    it in between and no mapped pages of the file left in the process (what keeps loading's peak near the
    checkpoint's size). False where that does not apply (another dtype, a device, a slice, FP8)."""
    if entry is None or target is None or target.device.type != "cpu" or not target.is_contiguous():
        return False
    dtype, begin, end = entry
    if _DTYPES.get(dtype) != target.dtype or end - begin != target.numel() * target.element_size():
        return False
    raw.seek(begin)
    if raw.readinto(target.detach().reshape(-1).view(torch.uint8).numpy()) != end - begin:
        raise PretrainedError(f"{raw.name} ends inside tensor data: the file is truncated")
    return True


# ---- FP8 releases -------------------------------------------------------------------------------------------
# DeepSeek-V3, R1 and Kimi-K2 ship their linear weights as float8_e4m3fn with a float32 `weight_scale_inv` per
# block of weight_block_size (128 x 128) and a `quantization_config` in config.json. They are dequantized as
# they are read, tensor by tensor: the model holds them in the load dtype (bf16 by default, the embedding's), so a
# V3 release of 671B parameters takes 1.34 TB in bf16, and reading adds one weight in fp32 at a time.

SCALE = "_scale_inv"


@dataclasses.dataclass(frozen=True)
class Scales:
    """The quantized weights of a folder: weight key -> its scale tensor's key and file; the block size."""

    keys: dict[str, tuple[str, Path]]
    block: tuple[int, int]


def _fp8_scales(path: Path, headers: dict[str, tuple[Path, tuple[int, ...], str]]
                ) -> tuple[dict[str, tuple[Path, tuple[int, ...], str]], Scales]:
    """(headers without the scale tensors, the Scales); every FP8 weight must be 2-D with float scales of the
    shape its blocks give, and the folder's config.json a quantization_config that says fp8."""
    keys = {k[:-len(SCALE)]: k for k in headers if k.endswith(".weight" + SCALE)}
    fp8 = {k for k, (_, _, dtype) in headers.items() if dtype.startswith("F8")}
    if not keys and not fp8:
        return headers, Scales({}, (128, 128))
    config = _object("quantization_config", read_json(path, "config.json").get("quantization_config")) or {}
    if config.get("quant_method") != "fp8" or config.get("fmt", "e4m3") != "e4m3":
        raise PretrainedError(f"{path}: the weights are FP8 ({_short(sorted(fp8 or keys))}) but config.json's "
                              f"quantization_config is {config!r}; dsmoe reads quant_method 'fp8', fmt 'e4m3'")
    block = config.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise PretrainedError(f"{path}: quantization_config weight_block_size={block!r} is invalid: must be two "
                              "positive integers")
    if fp8 != keys.keys():
        odd = sorted(fp8 ^ keys.keys())
        raise PretrainedError(f"{path}: FP8 weights and their {SCALE} tensors do not pair up: {_short(odd)}")
    for weight, key in keys.items():
        (_, shape, _), (_, scale_shape, scale_dtype) = headers[weight], headers[key]
        need = tuple(-(-n // b) for n, b in zip(shape, block))
        if len(shape) != 2:
            raise PretrainedError(f"{path}: {weight} is FP8 with shape {shape}; dsmoe reads 2-D FP8 weights only")
        if scale_shape != need or scale_dtype not in _DTYPES:
            raise PretrainedError(f"{path}: {key} is {scale_dtype} {scale_shape}, but {weight} {shape} in blocks "
                                  f"of {block} needs float scales of shape {need}")
    scales = Scales({w: (k, headers[k][0]) for w, k in keys.items()}, (block[0], block[1]))
    return {k: v for k, v in headers.items() if k not in set(keys.values())}, scales


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """A block-quantized weight in fp32: w (FP8, [out, in]) times its block's entry of scale_inv (the factor that
    takes the stored numbers back: DeepSeek's weight_dequant). One fp32 copy of w, scaled in place by block."""
    (out, inp), (rows, cols) = w.shape, scale_inv.shape
    x = F.pad(w.float(), (0, cols * block[1] - inp, 0, rows * block[0] - out))
    x.view(rows, block[0], cols, block[1]).mul_(scale_inv.float()[:, None, :, None])
    return x[:out, :inp]


def _dequantized(f: Any, file: Path, t: torch.Tensor, scale: tuple[str, Path], block: tuple[int, int]) -> torch.Tensor:
    """t dequantized with its scales, read from the open shard f when they are in it (as releases keep them)."""
    key, scale_file = scale
    if scale_file == file:
        scale_inv = f.get_tensor(key)
    else:
        with safe_open(str(scale_file), "pt") as other:
            scale_inv = other.get_tensor(key)
    _check_finite(scale_file, key, scale_inv)
    return dequantize_fp8(t, scale_inv, block)


def has_non_finite(t: torch.Tensor) -> bool:
    """NaN or inf anywhere in a floating-point tensor: its min and max (NaN propagates through both) are one pass
    over it in memory, with no temporary of its size (isfinite().all() would allocate one and take ~10x longer)."""
    if not t.is_floating_point() or t.numel() == 0:
        return False
    lo_hi = torch.stack(torch.aminmax(t if t.element_size() > 1 else t.float()))  # float8: no aminmax on cpu
    return not bool(torch.isfinite(lo_hi).all())


def _check_finite(file: Path, key: str, t: torch.Tensor) -> None:
    if has_non_finite(t):
        bad = int((~torch.isfinite(t.float())).sum())
        raise PretrainedError(f"{file}: tensor {key} holds {bad:,} non-finite value(s) (NaN or inf) of {t.numel():,}; "
                              "the model would compute NaN: re-download or re-export the folder")


def _weights(path: Path, cfg: ModelConfig) -> tuple[dict[str, tuple[Path, tuple[int, ...], str]], Scales]:
    """The folder's tensors and FP8 scales. A family's layers past num_hidden_layers (GLM-4.5's multi-token-
    prediction layer) are left out, as transformers leaves them out."""
    headers = _headers(_shards(path))
    if cfg.family:
        def layer(key: str) -> int:
            parts = key.split(".")
            return int(parts[2]) if key.startswith("model.layers.") and parts[2].isdigit() else -1
        headers = {k: v for k, v in headers.items() if layer(k) < cfg.n_layers}
    return _fp8_scales(path, headers)


def _writers(model: MoETransformer, present: set[str]) -> dict[str, Slot]:
    slots = key_map(model)
    return slots | _fused(slots, present)


def _check_keys(path: Path, headers: dict[str, tuple[Path, tuple[int, ...], str]], keys: dict[str, Slot]) -> None:
    missing = sorted(set(keys) - set(headers))
    unexpected = sorted(set(headers) - set(keys))
    wrong = [f"{k}: file {headers[k][1]} vs config {keys[k].shape}" for k in sorted(keys)
             if k in headers and headers[k][1] != keys[k].shape]
    if missing or unexpected or wrong:
        parts = ([f"missing keys [{_short(missing)}]"] if missing else []) + \
            ([f"unexpected keys [{_short(unexpected)}]"] if unexpected else []) + wrong[:6]
        raise PretrainedError(f"{path} does not fit its config.json: " + "; ".join(parts))


def init_buffers(model: MoETransformer) -> None:
    """What to_empty leaves undefined and no checkpoint holds: the tied output head, the rotary table, the
    balancing biases (fp32, zero unless the checkpoint has them: V3's e_score_correction_bias), the token
    counts and every layer's last-forward statistics."""
    device = model.embed.weight.device
    if model.cfg.tie_embeddings:  # to_empty gave the head a parameter of its own
        model.head.weight = model.embed.weight
    model.rot = model.rotary().to(device)
    model.mtp_loss = torch.zeros((), device=device)
    for layer in moe_layers(model):  # the MTP modules' too
        E = layer.cfg.n_routed_experts
        layer.gate.bias = torch.zeros(E, dtype=torch.float32, device=device)
        layer.counts = torch.zeros(E, dtype=torch.long, device=device)
        layer.tokens_per_expert = torch.zeros(E, dtype=torch.long, device=device)
        layer.maxvio, layer.aux_loss = torch.zeros((), device=device), torch.zeros((), device=device)
        layer.dropped = torch.zeros((), dtype=torch.long, device=device)


# ---- saving ------------------------------------------------------------------------------------------------

@torch.no_grad()
def save_pretrained(model: MoETransformer, path: str | Path, max_shard_size: int = 5 * 2**30,
                    eos_id: int | None = None) -> Path:
    """Write a HuggingFace folder (config.json, generation_config.json with the model's token ids, safetensors
    shards of at most max_shard_size bytes with an index when there is more than one, per-expert keys) that
    transformers and from_pretrained load. eos_id: the EOS of a model without a release's token ids (a dsmoe-
    trained one: its tokenizer's), so that transformers' generate stops there."""
    path = Path(path)
    dtype = model.embed.weight.dtype
    config = model_config_to_hf(model.cfg, dtype)  # raises for what the format cannot hold, before any write
    for layer in moe_layers(model):
        if "gate.e_score_correction_bias" not in hf.expected_shapes(layer.cfg) and layer.gate.bias.any():
            raise PretrainedError(f"the balancing bias is nonzero, but {config['model_type']} (softmax) checkpoints "
                                  "have no e_score_correction_bias to hold it: the exported model would route "
                                  "differently")
    path.mkdir(parents=True, exist_ok=True)
    token_ids = model.cfg.token_ids or ({"eos_token_id": eos_id} if eos_id is not None else None)
    if token_ids:  # what transformers' generate stops on (else its class default, token 1 or 2)
        config |= token_ids
        (path / "generation_config.json").write_text(json.dumps({"_from_model_config": True, **token_ids}, indent=2))
    else:
        (path / "generation_config.json").unlink(missing_ok=True)  # an earlier export's would not be this model's
    (path / "config.json").write_text(json.dumps(config, indent=2))
    readers = {k: slot.read for k, slot in key_map(model).items()}
    shards: list[list[str]] = [[]]
    size = 0
    for key, read in readers.items():
        nbytes = math.prod(read().shape) * read().element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        save_file({k: readers[k]().detach().contiguous().cpu() for k in shard}, str(path / name),
                  metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    if len(shards) > 1:
        total = sum(math.prod(readers[k]().shape) * readers[k]().element_size() for k in readers)
        (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path
