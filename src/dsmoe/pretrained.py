"""Whole DeepSeek-V2/V3-family checkpoints: `from_pretrained(path)` loads a HuggingFace folder into dsmoe's
model, `save_pretrained(model, path)` writes one that transformers' AutoModelForCausalLM loads.

A folder holds config.json and model.safetensors, or shards listed by model.safetensors.index.json.
Experts are per-expert keys on disk (`mlp.experts.{e}.gate_proj.weight`, ...); transformers 5's fused
`mlp.experts.gate_up_proj` / `down_proj` are accepted too. Multi-token-prediction modules live at
`model.layers.{num_hidden_layers + i}` (enorm, hnorm, eh_proj, shared_head.norm, a full block, and copies
of the embedding and output head, which dsmoe shares with the main model) and are kept.

Loading never holds two copies of the weights: the model is built on the meta device, allocated once in
the checkpoint's dtype (bf16 stays bf16 unless `dtype` says otherwise; the balancing bias is fp32), and
filled tensor by tensor from each shard. Every key and shape is checked against the config before any
tensor is read, so a missing, extra or mis-shaped key is an error naming it and nothing half-loaded is
returned.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsmoe import hf
from dsmoe.config import ModelConfig
from dsmoe.model import Block, MoETransformer, MTPModule
from dsmoe.moe import MoE, moe_layers

INDEX = "model.safetensors.index.json"
ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


class PretrainedError(ValueError):
    """A HuggingFace folder that is missing something, holds something unexpected, or is not supported."""


# ---- config ----------------------------------------------------------------------------------------------

def _rope(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, yarn scaling or None) from either the releases' rope_theta/rope_scaling or transformers
    5's rope_parameters."""
    params = d.get("rope_parameters") or {}
    theta = float(d.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = d.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "yarn":
        raise PretrainedError(f"rope scaling {kind!r} is not supported; dsmoe supports yarn (or none)")
    keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
    return theta, {"rope_type": "yarn", **{k: scaling[k] for k in keys if scaling.get(k) is not None}}


def model_config_from_hf(d: dict, semantics: str = "deepseek") -> ModelConfig:
    """dsmoe's ModelConfig of a DeepSeek-V2/V3 config.json dict (the MoE part: dsmoe.hf.moe_config_from_hf)."""
    if not isinstance(d, dict):
        raise PretrainedError(f"config.json must hold a JSON object, got {type(d).__name__}")
    moe = hf.moe_config_from_hf(d, semantics)
    unsupported = {"hidden_act": ("silu",), "attention_bias": (False, None), "moe_layer_freq": (1, None)}
    for key, allowed in unsupported.items():
        if d.get(key) not in allowed:
            raise PretrainedError(f"{key}={d.get(key)!r} is not supported; dsmoe supports {allowed[0]!r}")
    if not d.get("kv_lora_rank"):
        raise PretrainedError("kv_lora_rank is missing or 0: DeepSeek-V2/V3 models use Multi-head Latent Attention")
    theta, scaling = _rope(d)
    return ModelConfig(
        vocab_size=int(d["vocab_size"]), dim=moe.dim, n_layers=int(d["num_hidden_layers"]),
        n_heads=int(d["num_attention_heads"]), n_kv_heads=int(d["num_attention_heads"]),
        max_seq_len=int(d.get("max_position_embeddings") or 4096),
        first_k_dense=int(d.get("first_k_dense_replace") or 0), dense_hidden=int(d["intermediate_size"]),
        moe=moe, tie_embeddings=bool(d.get("tie_word_embeddings", False)), rope_theta=theta,
        norm_eps=float(d.get("rms_norm_eps") or 1e-6), kv_lora_rank=int(d["kv_lora_rank"]),
        q_lora_rank=int(d.get("q_lora_rank") or 0), qk_nope_head_dim=int(d["qk_nope_head_dim"]),
        qk_rope_head_dim=int(d["qk_rope_head_dim"]), v_head_dim=int(d["v_head_dim"]),
        rope_interleave=bool(d.get("rope_interleave", True)), rope_scaling=scaling,
        mtp_layers=int(d.get("num_nextn_predict_layers") or 0))


def model_config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json of a model: DeepSeek-V3's format for sigmoid gates, V2's for softmax."""
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
        "moe_layer_freq": 1, "torch_dtype": str(dtype).removeprefix("torch."),
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


def _slot(t: torch.Tensor, write: Writer | None = None, copy_on_read: bool = False) -> Slot:
    return Slot(tuple(t.shape), write or (lambda x: t.copy_(x)), (lambda: t.clone()) if copy_on_read else (lambda: t))


def _block_keys(prefix: str, block: Block) -> dict[str, Slot]:
    """The HF keys of one decoder block (`model.layers.N.`)."""
    tensors: dict[str, torch.Tensor] = {f"{prefix}input_layernorm.weight": block.attn_norm.weight,
               f"{prefix}post_attention_layernorm.weight": block.ffn_norm.weight}
    for name, p in block.attn.named_parameters():  # MLA's parameter names are the checkpoints'
        tensors[f"{prefix}self_attn.{name}"] = p
    ffn = block.ffn
    if isinstance(ffn, MoE):
        moe_targets = hf._targets(ffn)
        for key in hf.expected_shapes(ffn.cfg):
            tensors[f"{prefix}mlp.{key}"] = moe_targets[key]
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
    for i, block in enumerate(model.layers):
        assert isinstance(block, Block)
        out |= _block_keys(f"model.layers.{i}.", block)
    for d, mtp in enumerate(model.mtp):
        assert isinstance(mtp, MTPModule)
        prefix = f"model.layers.{cfg.n_layers + d}."
        out |= _block_keys(prefix, mtp.block)
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


# ---- loading -----------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PretrainedError(f"{path} is missing (a HuggingFace folder needs config.json and safetensors)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path} is not valid JSON ({e})") from None


def _shards(path: Path) -> list[Path]:
    index = path / INDEX
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PretrainedError(f"{index} has no weight_map")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = [path / "model.safetensors"]
    missing = [str(f) for f in files if not f.exists()]
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


def hf_model_config(path: str | Path, semantics: str = "deepseek") -> ModelConfig:
    """The ModelConfig of a HuggingFace folder: its config.json, with multi-token prediction only when the
    weights hold the MTP modules (transformers drops them when it saves, config.json still names them)."""
    path = Path(path)
    d = _read_json(path / "config.json")
    if not isinstance(d, dict):
        raise PretrainedError(f"{path / 'config.json'} must hold a JSON object, got {type(d).__name__}")
    try:
        cfg = model_config_from_hf(d, semantics)
    except (KeyError, TypeError) as e:
        raise PretrainedError(f"{path / 'config.json'}: a required field is missing or malformed ({e})") from None
    if cfg.mtp_layers and not any(k.startswith(f"model.layers.{cfg.n_layers}.") for k in _headers(_shards(path))):
        cfg = dataclasses.replace(cfg, mtp_layers=0)
    return cfg


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                    semantics: str = "deepseek") -> MoETransformer:
    """Load a HuggingFace DeepSeek-V2/V3 folder into dsmoe's model (eval mode). `semantics`: which code's
    routing a config is read with (see dsmoe.hf)."""
    path = Path(path)
    cfg = hf_model_config(path, semantics)
    headers = _headers(_shards(path))
    with torch.device("meta"):
        model = MoETransformer(cfg)
    _check_keys(path, headers, _writers(model, set(headers)))  # before a byte is allocated or read
    file_dtype = _DTYPES.get(headers["model.embed_tokens.weight"][2], torch.float32)
    model.to(dtype or file_dtype).to_empty(device=device or "cpu")
    _init_buffers(model)
    load_hf_weights(model, path)
    return model.eval()


def load_hf_weights(model: MoETransformer, path: str | Path) -> None:
    """Fill a built model from a HuggingFace folder, shard by shard, every key and shape checked first."""
    path = Path(path)
    headers = _headers(_shards(path))
    writers = _writers(model, set(headers))
    _check_keys(path, headers, writers)
    shared = {k for k in headers if k.endswith((".embed_tokens.weight", ".shared_head.head.weight"))
              and k != "model.embed_tokens.weight"}  # checked against the model's own once it is loaded
    files = list(dict.fromkeys(f for f, _, _ in headers.values()))
    with torch.no_grad():
        for late in (False, True):
            for file in files:
                with safe_open(str(file), "pt") as f:
                    for key in (k for k in f.keys() if (k in shared) == late):
                        writers[key].write(f.get_tensor(key))


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


def _init_buffers(model: MoETransformer) -> None:
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
def save_pretrained(model: MoETransformer, path: str | Path, max_shard_size: int = 5 * 2**30) -> Path:
    """Write a HuggingFace folder (config.json, safetensors shards of at most max_shard_size bytes with an
    index when there is more than one, per-expert keys) that transformers and from_pretrained load."""
    path = Path(path)
    dtype = model.embed.weight.dtype
    config = model_config_to_hf(model.cfg, dtype)  # raises for what the format cannot hold, before any write
    for layer in moe_layers(model):
        if config["model_type"] == "deepseek_v2" and layer.gate.bias.any():
            raise PretrainedError("the balancing bias is nonzero, but DeepSeek-V2 (softmax) checkpoints have no "
                                  "e_score_correction_bias to hold it: the exported model would route differently")
    path.mkdir(parents=True, exist_ok=True)
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
