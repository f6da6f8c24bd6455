"""The HuggingFace MoE families besides DeepSeek's, as options of dsmoe's one model: which config.json fields
each reads (with its transformers config class's defaults), how it routes, its attention options and its weight
names. Dense Llama/Qwen2/Qwen3 read the same way, as models without MoE (what `dsmoe upcycle` starts from).

    family      routing                                  shared experts            attention
    qwen2_moe   softmax, top-k, norm_topk_prob           one, sigmoid-gated        GQA, qkv bias
    qwen3_moe   softmax, top-k, norm_topk_prob           none                      GQA, q/k RMSNorm per head
    mixtral     softmax, top-k, always renormalized      none                      GQA
    olmoe       softmax, top-k, norm_topk_prob           none                      q/k RMSNorm over the projection
    glm4_moe    sigmoid + bias, groups (top-2 sum),       n_shared_experts          GQA, partial rotary, qkv bias,
                norm_topk_prob, routed_scaling_factor                              optional q/k norm per head
    dots1       as glm4_moe                              n_shared_experts          GQA, q/k RMSNorm per head

Every family stores rotary dims as halves (Llama's rotate_half): `rope_interleave=False`. attention_bias puts biases
on q/k/v, and on o_proj too in Llama, Qwen3(-MoE), OLMoE and dots1 (`o_bias`). What dsmoe cannot
compute exactly (sliding-window attention, clip_qkv, another activation, MLP biases, rope scaling other than
yarn) is refused naming the field. GLM-4.5's multi-token-prediction layer is left out, as transformers leaves it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsmoe import hf
from dsmoe.config import ModelConfig, MoEConfig


@dataclass(frozen=True)
class Family:
    architecture: str                   # the transformers class config.json names
    experts: str = ""                   # the field counting the routed experts ("" = a dense model)
    expert_width: str = "moe_intermediate_size"  # the field of each routed expert's hidden width
    score_func: str = "softmax"
    always_norm: bool = False           # the family's code renormalizes the top-k weights whatever the config says
    moe: str = "mlp"                    # the MoE block's module name in the checkpoint
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared: str = ""                    # the shared experts' module name ("" = none)
    shared_width: str = ""              # the field of their width ("" = n_shared_experts x the expert width)
    qk_norm: str = ""                   # "head", "all" or "" (a "use_qk_norm" field turns "head" on)
    qkv_bias: str = "attention_bias"    # the field of the query/key/value biases
    o_bias: bool = False                # that field puts a bias on o_proj too (Llama, Qwen3, OLMoE, dots1)
    sparse_step: bool = False           # decoder_sparse_step and mlp_only_layers choose the dense blocks
    deepseek_routing: bool = False      # n_group, topk_group, routed_scaling_factor, first_k_dense_replace
    defaults: dict[str, Any] = field(default_factory=dict)  # transformers' class defaults of the fields read


_COMMON = dict(hidden_act="silu", tie_word_embeddings=False, attention_bias=False)
_QWEN = dict(_COMMON, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, decoder_sparse_step=1,
             mlp_only_layers=[], norm_topk_prob=False, use_sliding_window=False)
FAMILIES: dict[str, Family] = {
    "qwen2_moe": Family("Qwen2MoeForCausalLM", "num_experts", shared="shared_expert",
                        shared_width="shared_expert_intermediate_size", qkv_bias="qkv_bias", sparse_step=True,
                        defaults=dict(_QWEN, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                                      shared_expert_intermediate_size=5632, num_hidden_layers=24,
                                      num_attention_heads=16, num_key_value_heads=16, num_experts=60,
                                      num_experts_per_tok=4, qkv_bias=True)),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", "num_experts", qk_norm="head", sparse_step=True, o_bias=True,
                        defaults=dict(_QWEN, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                      num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4,
                                      num_experts=128, num_experts_per_tok=8)),
    "mixtral": Family("MixtralForCausalLM", "num_local_experts", "intermediate_size", always_norm=True, qkv_bias="",
                      moe="block_sparse_moe", expert_names=("w1", "w3", "w2"),
                      defaults=dict(_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=1e6,
                                    num_local_experts=8, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2)),
    "olmoe": Family("OlmoeForCausalLM", "num_experts", "intermediate_size", qk_norm="all", o_bias=True,
                    defaults=dict(_COMMON, vocab_size=50304, hidden_size=2048, intermediate_size=2048,
                                  num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                                  max_position_embeddings=4096, rms_norm_eps=1e-5, num_experts=64,
                                  num_experts_per_tok=8, norm_topk_prob=False, eos_token_id=50279, pad_token_id=1)),
    "glm4_moe": Family("Glm4MoeForCausalLM", "n_routed_experts", score_func="sigmoid", shared="shared_experts",
                       deepseek_routing=True,
                       defaults=dict(_COMMON, vocab_size=151552, hidden_size=4096, intermediate_size=10944,
                                     moe_intermediate_size=1408, num_hidden_layers=46, num_attention_heads=96,
                                     num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                     partial_rotary_factor=0.5, use_qk_norm=False, n_routed_experts=128,
                                     num_experts_per_tok=8, n_shared_experts=1, n_group=1, topk_group=1,
                                     routed_scaling_factor=1.0, norm_topk_prob=True, first_k_dense_replace=1)),
    "dots1": Family("Dots1ForCausalLM", "n_routed_experts", score_func="sigmoid", shared="shared_experts",
                    qk_norm="head", deepseek_routing=True, o_bias=True,
                    defaults=dict(_COMMON, vocab_size=152064, hidden_size=4608, intermediate_size=10944,
                                  moe_intermediate_size=1408, num_hidden_layers=62, num_attention_heads=32,
                                  num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                                  n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
                                  first_k_dense_replace=0)),
    # dense models, the starting points of `dsmoe upcycle`
    "llama": Family("LlamaForCausalLM", o_bias=True, defaults=dict(_COMMON, vocab_size=32000, hidden_size=4096,
                                                      intermediate_size=11008, num_hidden_layers=32,
                                                      num_attention_heads=32, max_position_embeddings=2048,
                                                      rms_norm_eps=1e-6, mlp_bias=False, bos_token_id=1,
                                                      eos_token_id=2)),
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias="", defaults=dict(_QWEN, hidden_size=4096, intermediate_size=22016,
                                                                    num_hidden_layers=32, num_attention_heads=32)),
    "qwen3": Family("Qwen3ForCausalLM", qk_norm="head", o_bias=True,
                    defaults=dict(_QWEN, hidden_size=4096, head_dim=128, intermediate_size=22016, num_hidden_layers=32,
                                  num_attention_heads=32)),
}
MOE_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.experts)


# the names transformers' config classes map onto each other (attribute_map): a folder may use any of them
EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def with_defaults(d: dict) -> dict:
    """config.json's fields, with its family's class defaults where a field is absent or null."""
    fam = FAMILIES[d["model_type"]]
    given = {k: v for k, v in d.items() if v is not None}
    for name in EXPERT_FIELDS:
        if fam.experts and name in given:
            given[fam.experts] = given.pop(name)
    merged = {**fam.defaults, **given}
    params = given.get("rope_parameters") or {}
    for key in ("rope_theta", "partial_rotary_factor"):  # the folder's own, wherever it keeps it (transformers 5:
        if key not in given and isinstance(params, dict) and key in params:  # in rope_parameters)
            merged[key] = params[key]
    return merged


# ---- config.json -> ModelConfig ------------------------------------------------------------------------------


def _refuse(d: dict, max_len: int) -> None:
    """The fields that would make dsmoe compute something other than the release: an error naming each."""
    if d.get("hidden_act") != "silu":
        raise ValueError(f"hidden_act={d.get('hidden_act')!r} is not supported; dsmoe supports 'silu'")
    if d.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported: dsmoe's FFNs have no biases")
    if d.get("clip_qkv") is not None:
        raise ValueError(f"clip_qkv={d['clip_qkv']!r} is not supported: dsmoe does not clip queries, keys and "
                         "values (OLMoE's released models set it null)")
    kinds = d.get("layer_types") or []
    window = d.get("sliding_window")
    sliding = [i for i, kind in enumerate(kinds) if kind != "full_attention"]
    mt = d["model_type"]
    if mt == "dots1" and not kinds and window is not None:  # its config class: sliding from max_window_layers on
        first = d.get("max_window_layers", 62)
        sliding = list(range(first, d["num_hidden_layers"])) if isinstance(first, int) else []
        kinds = ["sliding_attention"] * bool(sliding)
    if d.get("use_sliding_window"):
        where = f"use_sliding_window=true (sliding_window={window!r})"
    elif sliding:
        where = f"layer_types (layers {sliding[:4]} are {sorted(set(kinds) - {'full_attention'})})"
    elif mt == "mixtral" and window is not None:  # Qwen3's window applies only with use_sliding_window
        where = f"sliding_window={window!r}"
    else:
        return
    if not (isinstance(window, int) and window >= max_len):  # a window as long as the context is no window
        raise ValueError(f"{where}: sliding-window attention is not supported; dsmoe attends to the whole context")


def _dense_layers(d: dict, fam: Family, n_layers: int) -> tuple[int, list[int]]:
    """(first_k_dense, further dense block indices) of a family's config."""
    if fam.deepseek_routing:
        k = hf._int("first_k_dense_replace", d.get("first_k_dense_replace", 0), 0)
        if k > n_layers:
            raise ValueError(f"first_k_dense_replace={k} is invalid: must be <= num_hidden_layers={n_layers}")
        return k, []
    if not fam.sparse_step:
        return 0, []
    step = hf._int("decoder_sparse_step", d["decoder_sparse_step"], 1)
    only = d.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and 0 <= i < n_layers for i in only):
        raise ValueError(f"mlp_only_layers={only!r} is invalid: must be a list of layer indices < num_hidden_layers")
    return 0, sorted({i for i in range(n_layers) if i in only or (i + 1) % step})


def moe_config(d: dict, fam: Family) -> MoEConfig:
    """The MoE layer of a family's config.json (class defaults applied)."""
    missing = [k for k in (fam.experts, "num_experts_per_tok", fam.expert_width) if d.get(k) is None]
    if missing:
        raise ValueError(f"config.json lacks the required field(s) {missing} (its config class has no default)")
    D = hf._int("hidden_size", d["hidden_size"], 1)
    E = hf._int(fam.experts, d[fam.experts], 1)
    F = hf._int(fam.expert_width, d[fam.expert_width], 1)
    shared: dict[str, Any] = dict(n_shared_experts=0)
    if fam.shared_width:  # one shared expert of its own width
        width = hf._int(fam.shared_width, d[fam.shared_width], 0)
        shared = dict(n_shared_experts=1 if width else 0, shared_expert_dim=width, shared_expert_gate=bool(width))
    elif fam.shared:
        shared = dict(n_shared_experts=hf._int("n_shared_experts", d.get("n_shared_experts") or 0, 0))
    routing: dict[str, Any] = {}
    if fam.deepseek_routing:
        n_group, topk_group = hf._int("n_group", d["n_group"], 1), hf._int("topk_group", d["topk_group"], 1)
        routing = dict(n_groups=n_group, topk_groups=topk_group, group_score="top2",
                       route_scale=hf._float("routed_scaling_factor", d["routed_scaling_factor"], above=0))
    norm = True if fam.always_norm else hf._bool("norm_topk_prob", d.get("norm_topk_prob", False))
    return MoEConfig(dim=D, n_routed_experts=E, top_k=hf._int("num_experts_per_tok", d["num_experts_per_tok"], 1),
                     expert_dim=F, score_func=fam.score_func, norm_topk_prob=norm, **shared, **routing)


def model_config(d: dict, theta: float, scaling: dict | None) -> ModelConfig:
    """dsmoe's ModelConfig of a family's config.json dict (its rope read by dsmoe.pretrained)."""
    mt = d["model_type"]
    fam = FAMILIES[mt]
    d = with_defaults(d)
    n_layers = hf._int("num_hidden_layers", d["num_hidden_layers"], 1)
    max_len = hf._int("max_position_embeddings", d["max_position_embeddings"], 1)
    _refuse(d, max_len)
    D = hf._int("hidden_size", d["hidden_size"], 1)
    n_heads = hf._int("num_attention_heads", d["num_attention_heads"], 1)
    n_kv = hf._int("num_key_value_heads", d.get("num_key_value_heads") or n_heads, 1)
    hd = hf._int("head_dim", d["head_dim"], 2) if d.get("head_dim") else D // n_heads  # transformers' floor
    factor = hf._float("partial_rotary_factor", d.get("partial_rotary_factor", 1.0), above=0)
    if factor > 1:
        raise ValueError(f"partial_rotary_factor={factor} is invalid: must be in (0, 1]")
    qk_norm = "head" if mt == "glm4_moe" and hf._bool("use_qk_norm", d["use_qk_norm"]) else fam.qk_norm
    first_k_dense, dense_layers = _dense_layers(d, fam, n_layers) if fam.experts else (n_layers, [])
    moe = moe_config(d, fam) if fam.experts else None
    if moe is not None and first_k_dense + len(dense_layers) == n_layers:
        moe = None  # no block routes
    token_ids = {k: d[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if d.get(k) is not None}
    qkv_bias = True if mt == "qwen2" else hf._bool(fam.qkv_bias, d.get(fam.qkv_bias, False))
    return ModelConfig(
        vocab_size=hf._int("vocab_size", d["vocab_size"], 1), dim=D, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=hd, max_seq_len=max_len, qkv_bias=qkv_bias, o_bias=qkv_bias and fam.o_bias,
        qk_norm=qk_norm, rope_dim=int(hd * factor) if factor < 1 else 0, rope_interleave=False,
        first_k_dense=min(first_k_dense, n_layers) if moe else n_layers, dense_layers=dense_layers if moe else [],
        dense_hidden=hf._int("intermediate_size", d["intermediate_size"], 1) if fam.expert_width !=
        "intermediate_size" else (moe.top_k * moe.expert_dim if moe else 1),
        moe=moe, tie_embeddings=hf._bool("tie_word_embeddings", d["tie_word_embeddings"]), rope_theta=theta,
        norm_eps=hf._float("rms_norm_eps", d["rms_norm_eps"], above=0), rope_scaling=scaling,
        token_ids=token_ids or None, family=mt)


# ---- ModelConfig -> config.json -----------------------------------------------------------------------------


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json fields of a model read from a family (what config.json needs to rebuild it there)."""
    mt, moe = cfg.family, cfg.moe
    fam = FAMILIES[mt]
    hd = cfg.attn_head_dim
    d: dict[str, Any] = {
        "model_type": mt, "architectures": [fam.architecture], "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": hd, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "intermediate_size": cfg.dense_hidden, **(cfg.token_ids or {}),
    }
    if fam.qkv_bias:
        d[fam.qkv_bias] = cfg.qkv_bias
    if mt == "glm4_moe":
        d |= {"partial_rotary_factor": cfg.rope_dims / hd, "use_qk_norm": cfg.qk_norm == "head"}
    if moe is None:
        return d
    d |= {fam.experts: moe.n_routed_experts, "num_experts_per_tok": moe.top_k, fam.expert_width: moe.expert_dim,
          "norm_topk_prob": moe.norm_topk_prob}
    if fam.shared_width:
        d[fam.shared_width] = moe.shared_width
    elif fam.shared:
        d["n_shared_experts"] = moe.n_shared_experts
    if fam.sparse_step:
        d |= {"decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(cfg.n_layers) if not cfg.is_moe(i)]}
    if fam.deepseek_routing:
        d |= {"n_group": moe.n_groups, "topk_group": moe.topk_groups, "routed_scaling_factor": moe.route_scale,
              "first_k_dense_replace": cfg.first_k_dense}
    return d


def check_exportable(cfg: ModelConfig) -> None:
    """What a family's format cannot hold, named (before any file is written)."""
    fam, moe = FAMILIES[cfg.family], cfg.moe
    qk_norms = ("", "head") if cfg.family == "glm4_moe" else (fam.qk_norm,)
    checks = [(cfg.mla, "Multi-head Latent Attention"), (cfg.mtp_layers > 0, "multi-token prediction"),
              (cfg.rope_interleave, "rope_interleave=True (the family stores rotary dims as halves)"),
              (cfg.qk_norm not in qk_norms, f"qk_norm={cfg.qk_norm!r}"),
              (cfg.rope_dim > 0 and cfg.family != "glm4_moe", f"rope_dim={cfg.rope_dim}"),
              (cfg.o_bias != (cfg.qkv_bias and fam.o_bias), f"o_bias={cfg.o_bias} with qkv_bias={cfg.qkv_bias}"),
              (cfg.moe is None and bool(fam.experts), "a model without MoE blocks (a MoE family)")]
    if moe is not None:
        dense_blocks = cfg.first_k_dense > 0 or cfg.dense_layers
        checks += [(not fam.experts, "an MoE FFN (it is a dense family)"),
                   (str(moe.score_func) != fam.score_func, f"score_func={str(moe.score_func)!r}"),
                   (fam.always_norm and not moe.norm_topk_prob, "norm_topk_prob=False"),
                   (not fam.deepseek_routing and (moe.n_groups > 1 or moe.route_scale != 1),
                    "expert groups or route_scale != 1"),
                   (moe.n_shared_experts > 0 and not fam.shared, "shared experts"),
                   (moe.n_shared_experts > 0 and moe.shared_expert_gate != bool(fam.shared_width),
                    f"shared_expert_gate={moe.shared_expert_gate}"),
                   (bool(dense_blocks) and not (fam.sparse_step or fam.deepseek_routing), "dense FFN blocks"),
                   (bool(cfg.dense_layers) and fam.deepseek_routing, f"dense_layers={cfg.dense_layers}")]
    problems = [what for bad, what in checks if bad]
    if problems:
        raise ValueError(f"a {cfg.family} checkpoint cannot hold " + ", ".join(problems))


# ---- weight names -------------------------------------------------------------------------------------------


def moe_key(fam: Family, key: str) -> str:
    """A DeepSeek-format MoE key (relative to `mlp.`, as dsmoe.hf names them) in the family's names, relative
    to the block (`model.layers.N.`)."""
    if key.startswith("experts.") and fam.expert_names != ("gate_proj", "up_proj", "down_proj"):
        _, e, name, tail = key.split(".")
        key = f"experts.{e}.{fam.expert_names[('gate_proj', 'up_proj', 'down_proj').index(name)]}.{tail}"
    elif key.startswith("shared_experts.") and fam.shared:
        key = fam.shared + key.removeprefix("shared_experts")
    return f"{fam.moe}.{key}"


ATTENTION_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}


def attention_key(name: str) -> str:
    """dsmoe's MHA/GQA parameter name (wq.weight, q_norm.weight, ...) in the HuggingFace names."""
    module, _, tail = name.partition(".")
    return f"{ATTENTION_NAMES.get(module, module)}.{tail}"
