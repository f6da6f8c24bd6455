"""What each study trains: its variants of the preset's model, and the constants that shape them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dsmoe.config import ModelConfig, MoEConfig
from dsmoe.upcycle import UpcycleConfig, upcycled_config

STUDIES = ("balance", "balance-core", "shared", "segmentation", "segmentation-core", "specialization", "upcycle")

# Training steps per run when --steps is not given. debug: the whole `study all` (58 runs at 2 seeds)
# takes ~15-25 minutes on 2 shared CPU cores; tiny: a longer, more convincing run (hours on a CPU).
DEFAULT_STEPS = {"debug": 1200, "tiny": 1500}

# Segmentation baseline (DeepSeekMoE §3.1): N experts of width F_base, top-K, derived from the preset so
# that the N*F_base total routed width equals the preset's E*F. K=2 as in GShard, the paper's baseline.
BASE_TOP_K = 2
SEGMENTS = (1, 2, 4, 8)
SHARED_COUNTS = (0, 1, 2, 4)
SHARED_STUDY_M = 4          # the shared-expert study sits at the m=4 point of the segmentation family


@dataclass
class Variant:
    """One configuration of a study; trained once per seed."""

    label: str                  # row name in the table
    group: str                  # section of the table (gate, shared / no shared, ...)
    model: ModelConfig          # what is trained
    info: dict = field(default_factory=dict)  # shape facts shown in the table (m, routed, top_k, ...)


def _moe(model: ModelConfig, **changes: Any) -> ModelConfig:
    assert model.moe is not None
    return dataclasses.replace(model, moe=model.moe.replace(**changes))


# The balance study's subset that answers the papers' claims (`dsmoe study balance-core`, for the bigger
# presets): (gate, label) of balance_variants, most important first (runs train in this order, so a study
# stopped early has the papers' own comparison: loss-free vs the aux loss at alpha 1e-3, sigmoid gate).
BALANCE_CORE = (
    ("sigmoid", "loss-free u=1e-3"),
    ("sigmoid", "aux loss 1e-3 (normalized P)"),
    ("sigmoid", "aux loss 1e-2 (normalized P)"),
    ("sigmoid", "aux loss 1e-2 (raw P)"),
    ("sigmoid", "no balancing"),
    ("softmax", "loss-free proportional u=1e-3"),
    ("softmax", "aux loss 1e-2"),
)


def _aux_methods(gate: str) -> list[tuple[str, dict[str, Any]]]:
    """The expert-level aux loss at alpha 1e-3 and 1e-2. With a sigmoid gate, in both forms of P_i: scores
    normalized per token (Megatron, the default) and raw (dsmoe's first form); with softmax the
    two coincide."""
    if gate == "softmax":
        return [(f"aux loss {a}", dict(aux_loss_alpha=float(a))) for a in ("1e-3", "1e-2")]
    return [(f"aux loss {a} ({how} P)", dict(aux_loss_alpha=float(a), aux_loss_scores=how))
            for how in ("normalized", "raw") for a in ("1e-3", "1e-2")]


def balance_variants(base: ModelConfig) -> list[Variant]:
    """Balancing methods x gates. Every other knob stays the preset's."""
    off = dict(bias_update_speed=0.0, aux_loss_alpha=0.0, seq_aux_loss_alpha=0.0)
    out = []
    for gate in ("sigmoid", "softmax"):
        # V3 normalizes the top-k sigmoid weights; DeepSeekMoE / V2 use the raw softmax weights.
        gated = _moe(base, score_func=gate, norm_topk_prob=gate == "sigmoid", **off)
        methods: list[tuple[str, dict[str, Any]]] = [
            ("no balancing", {}),
            *_aux_methods(gate),
            ("loss-free u=1e-4", dict(bias_update_speed=1e-4)),
            ("loss-free u=1e-3", dict(bias_update_speed=1e-3)),
            ("loss-free u=1e-2", dict(bias_update_speed=1e-2)),
        ]
        if gate == "softmax":  # the rule the Loss-Free paper pairs with softmax gates
            methods.append(("loss-free proportional u=1e-3",
                            dict(bias_update_speed=1e-3, bias_update_rule="proportional")))
        methods.append(("loss-free u=1e-3 + seq aux 1e-4", dict(bias_update_speed=1e-3, seq_aux_loss_alpha=1e-4)))
        out += [Variant(label, gate, _moe(gated, **changes), {"gate": gate}) for label, changes in methods]
    return out


def balance_core_variants(base: ModelConfig) -> list[Variant]:
    """The BALANCE_CORE subset of balance_variants: the same configurations, so their runs are shared."""
    by_key = {(v.group, v.label): v for v in balance_variants(base)}
    return [by_key[key] for key in BALANCE_CORE]


def _segment_base(base: ModelConfig) -> tuple[int, int, int]:
    """(N, K, F_base): N = E/2 experts of width 2F, top-2, so N*F_base is the preset's routed width E*F."""
    moe = base.moe
    assert moe is not None
    return max(2, moe.n_routed_experts // 2), BASE_TOP_K, 2 * moe.expert_dim


def segmented_model(base: ModelConfig, m: int, n_shared: int) -> Variant:
    """The preset's model with its MoE replaced by the m-times segmented baseline, n_shared fine experts shared."""
    N, K, F_base = _segment_base(base)
    seg = MoEConfig.segmented(base.dim, N, K, F_base, m, n_shared)
    model = dataclasses.replace(  # the first dense layers keep the active width K*F_base in every variant
        _moe(base, n_routed_experts=seg.n_routed_experts, n_shared_experts=seg.n_shared_experts,
             top_k=seg.top_k, expert_dim=seg.expert_dim), dense_hidden=K * F_base)
    info = {"m": m, "shared": n_shared, "routed": seg.n_routed_experts, "top_k": seg.top_k,
            "expert_dim": seg.expert_dim}
    return Variant(f"m={m}, {n_shared} shared + {seg.n_routed_experts} routed, top-{seg.top_k}",
                   {0: "no shared expert", 1: "with a shared expert"}.get(n_shared, f"with {n_shared} shared experts"),
                   model, info)


def dense_models(base: ModelConfig) -> list[Variant]:
    """Dense models with the MoE family's active width, and with its total width spread over every layer."""
    N, K, F_base = _segment_base(base)
    n_moe = base.n_moe_layers
    n_dense = base.n_layers - n_moe
    total = (n_dense * K * F_base + n_moe * N * F_base) / base.n_layers
    widths = {"dense, same active params": K * F_base, "dense, same total params": 8 * round(total / 8)}
    return [Variant(label, "dense", dataclasses.replace(base, moe=None, first_k_dense=base.n_layers, dense_hidden=w),
                    {"m": 0, "shared": 0, "routed": 0, "top_k": 0, "expert_dim": w})
            for label, w in widths.items()]


def segmentation_variants(base: ModelConfig) -> list[Variant]:
    return [segmented_model(base, m, s) for s in (0, 1) for m in SEGMENTS] + dense_models(base)


# The subset of segmentation + shared that answers DeepSeekMoE's claims at the bigger presets
# (`dsmoe study segmentation-core`): (m, shared experts), most important first (runs train in this order);
# m=0 is the dense model of the same active size. Left out: m=8 (at tiny, 128 experts of width 16, top-16: the
# slowest runs), 4 shared experts, and the dense model of the same total size.
SEGMENTATION_CORE = ((1, 0), (4, 0), (4, 1), (0, 0), (2, 0), (4, 2))


def segmentation_core_variants(base: ModelConfig) -> list[Variant]:
    dense = dense_models(base)[0]  # same active parameters
    return [dense if m == 0 else segmented_model(base, m, s) for m, s in SEGMENTATION_CORE]


def shared_variants(base: ModelConfig) -> list[Variant]:
    variants = [segmented_model(base, SHARED_STUDY_M, s) for s in SHARED_COUNTS]
    for v in variants:
        fine, active = v.info["routed"] + v.info["shared"], v.info["top_k"] + v.info["shared"]
        v.group = f"m={SHARED_STUDY_M}, {fine} fine experts, {active} active"
    return variants


def specialization_variants(base: ModelConfig) -> list[Variant]:
    """The checkpoints examined: the preset itself, and GShard-like vs DeepSeekMoE-like models of equal size."""
    main = Variant("preset (loss-free sigmoid)", "specialization", base)
    gshard = segmented_model(base, 1, 0)
    gshard.label = f"GShard-like: {gshard.label}"
    deepseek = segmented_model(base, SHARED_STUDY_M, 1)
    deepseek.label = f"DeepSeekMoE-like: {deepseek.label}"
    return [main, gshard, deepseek]


def upcycle_setup(base: ModelConfig) -> tuple[ModelConfig, UpcycleConfig]:
    """(the dense model, how it is upcycled) for a preset's MoE model: the dense twin in Llama's format, upcycled
    back into the preset's MoE shape in every block."""
    moe = base.moe
    if moe is None or base.mla:
        raise ValueError("the upcycle study starts from a preset's MoE model with MHA/GQA attention (its dense twin "
                         "is the dense model; Llama's format has no latent attention)")
    dense = dataclasses.replace(base.dense_twin(), family="llama", rope_interleave=False,
                                n_kv_heads=max(1, base.n_heads // 2))
    spec = UpcycleConfig(experts=moe.n_routed_experts, top_k=moe.top_k, granularity=moe.top_k + moe.n_shared_experts,
                         shared=moe.n_shared_experts)
    return dense, spec


def upcycle_variants(base: ModelConfig) -> list[Variant]:
    """The dense pretraining, then the four arms of the upcycle study (dsmoe.studies.upcycle): (a) the upcycled MoE
    continued, (b) the MoE from scratch on the extra tokens, (c) the dense model continued, (d) the MoE from scratch
    on as many tokens as (a) saw in all."""
    dense, spec = upcycle_setup(base)
    assert base.moe is not None
    moe = upcycled_config(dense, spec)
    assert moe.moe is not None
    moe = dataclasses.replace(moe, moe=moe.moe.replace(bias_update_speed=base.moe.bias_update_speed))
    return [Variant("dense, pretrained", "dense", dense, {"arm": "pretrain"}),
            Variant("(a) upcycled MoE, continued", "upcycled MoE", moe, {"arm": "upcycled"}),
            Variant("(b) MoE from scratch, extra tokens only", "MoE from scratch", moe, {"arm": "scratch"}),
            Variant("(c) dense, continued", "dense, continued", dense, {"arm": "dense"}),
            Variant("(d) MoE from scratch, as many tokens as (a)", "MoE from scratch", moe, {"arm": "scratch-all"})]


# study name -> its variants of a base model (the specialization study examines its checkpoints after training)
VARIANTS = {"balance": balance_variants, "balance-core": balance_core_variants, "shared": shared_variants,
            "segmentation": segmentation_variants, "segmentation-core": segmentation_core_variants,
            "specialization": specialization_variants, "upcycle": upcycle_variants}
