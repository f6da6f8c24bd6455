"""`dsmoe plan CONFIG --gpus N --gpu-memory 80GB`: the pp x dp x ep layouts a model trains in on N GPUs, ranked by
the memory they leave free, with each GPU's memory split, the all-to-all volume and the pipeline bubble
(dsmoe.memory.plan, the estimate `dsmoe train` checks a run against)."""

from __future__ import annotations

import argparse
import re
import textwrap
from pathlib import Path

from dsmoe.cli.format import check_at_least
from dsmoe.config import ModelConfig, TrainConfig
from dsmoe.memory import GB, SCHEDULES, LayoutPlan, a2a_copies, layouts, plan

_SIZES = {"": GB, "b": 1, "kb": 10**3, "mb": 10**6, "gb": GB, "tb": 10**12, "k": 10**3, "m": 10**6, "g": GB,
          "t": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="a HuggingFace config.json, the folder holding it, or a dsmoe "
                                                    "preset name (debug, tiny, small, ...)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all: pp x dp x ep")
    p.add_argument("--gpu-memory", default="80GB", help="memory per GPU: 80GB, 141GB, 96GiB (a bare number is GB)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: 4096, or the model's max_seq_len "
                                               "when shorter)")
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step (default: 8 per GPU)")
    p.add_argument("--ac", choices=["none", "full"], default="full",
                   help="activation checkpointing: none, or full (each block recomputed in backward)")
    p.add_argument("--schedule", choices=list(SCHEDULES), default="1f1b",
                   help="pipeline schedule (torch.distributed.pipelining): gpipe, 1f1b, interleaved (Interleaved1F1B), "
                        "zb (ZBVZeroBubble), dualpipev")
    p.add_argument("--microbatches", type=int, help="micro-batches per step (default: one sequence per rank in each)")
    p.add_argument("--stages-per-rank", type=int, default=2, help="chunks per rank of the interleaved schedule")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: bf16 activations (autocast); cpu: fp32")
    p.add_argument("--top", type=int, default=10, help="layouts to print")
    p.add_argument("--show", metavar="PPxDPxEP", help="also print this layout, e.g. 16x2x64, wherever it ranks")


def run(args: argparse.Namespace) -> int:
    check_at_least(args, 1, "gpus", "seq_len", "global_batch", "microbatches", "stages_per_rank", "top")
    memory = parse_memory(args.gpu_memory)
    show = _parse_layout(args.show) if args.show else None
    model_cfg, source = load_model_config(args.config)
    train_cfg = TrainConfig(seq_len=args.seq_len or min(4096, model_cfg.max_seq_len),
                            batch_size=args.global_batch or 8 * args.gpus, device=args.device,
                            activation_checkpointing=args.ac == "full")

    def candidates() -> list[LayoutPlan]:
        return layouts(model_cfg, train_cfg, args.gpus, args.schedule, args.microbatches, args.stages_per_rank)

    fits = plan(model_cfg, train_cfg, args.gpus, memory, schedule=args.schedule, microbatches=args.microbatches,
                stages_per_rank=args.stages_per_rank)
    shown = fits[:args.top]
    if show is not None and not any((p.pp, p.dp, p.ep) == show for p in shown):
        shown.append(_find(candidates(), show, args.gpus))
    print(header(model_cfg, train_cfg, source, args, memory))
    print(f"{len(fits)} of {len(candidates())} layouts fit; the first {min(args.top, len(fits))}"
          f"{' and ' + args.show if len(shown) > args.top else ''}:\n")
    print(table(shown, memory, fits))
    if text := notes(model_cfg, shown):
        print("\n" + text)
    return 0


def parse_memory(text: str) -> int:
    """Bytes of a size like 80GB, 80 GB, 141G, 96GiB or 80 (GB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text)
    if m is None or m.group(2).lower() not in _SIZES or float(m.group(1)) <= 0:
        raise ValueError(f"--gpu-memory {text!r} is not a memory size: write a positive number and a unit, e.g. 80GB, "
                         "141GB or 96GiB (a bare number is GB)")
    return int(float(m.group(1)) * _SIZES[m.group(2).lower()])


def load_model_config(spec: str) -> tuple[ModelConfig, str]:
    """The ModelConfig of a config.json (or its folder: dsmoe.pretrained reads and checks it), else of a preset."""
    from dsmoe.presets import PRESETS, build_configs
    from dsmoe.pretrained import model_config_from_hf, read_json
    path = Path(spec)
    if path.is_dir() or path.is_file():
        folder, name = (path, "config.json") if path.is_dir() else (path.parent, path.name)
        d = read_json(folder, name)
        try:
            return model_config_from_hf(d), f"{folder / name} ({d.get('model_type')})"
        except (ValueError, TypeError) as e:
            raise ValueError(f"{folder / name}: {e}") from None
    if spec in PRESETS:
        return build_configs(spec)[0], f"the {spec} preset"
    raise ValueError(f"{spec!r} is neither a config.json, a folder holding one, nor a preset ({', '.join(PRESETS)})")


def header(model_cfg: ModelConfig, train_cfg: TrainConfig, source: str, args: argparse.Namespace,
           memory: int) -> str:
    cfg, moe = model_cfg, model_cfg.moe
    mtp = f" + {cfg.mtp_layers} MTP module(s)" if cfg.mtp_layers else ""
    without = f" ({_count(cfg.num_params(mtp=False))} without MTP)" if cfg.mtp_layers else ""
    lines = [f"{source}: {_count(cfg.num_params())} parameters{without}, "
             f"{_count(cfg.num_active_params(mtp=False))} active per token; {cfg.n_layers} blocks "
             f"({cfg.n_moe_layers} MoE){mtp}"]
    if moe is not None:
        groups = (f", {moe.n_groups} groups of which a token reaches {moe.topk_groups}" if moe.n_groups > 1 else
                  ", no group limit")
        lines.append(f"  {moe.n_routed_experts} routed experts, top-{moe.top_k}, {moe.n_shared_experts} shared"
                     f"{groups}")
    number = "bf16" if train_cfg.device == "cuda" else "fp32"
    micro = "one sequence per rank in each" if args.microbatches is None else f"{args.microbatches} per step"
    lines += [
        f"Run: {args.gpus} GPUs x {memory / GB:g} GB, seq_len {train_cfg.seq_len}, global batch {train_cfg.batch_size}"
        f" sequences, micro-batches: {micro}; schedule {args.schedule} (torch {SCHEDULES[args.schedule]}); "
        f"activation checkpointing (AC): {args.ac}.",
        "Per GPU, the busiest stage's: weights fp32 (the master copy; bf16 autocast casts per op), gradients fp32, "
        "AdamW's two moments fp32: 16 B a parameter, sharded by FSDP2 over the stage's dp x ep ranks (routed experts "
        "over ep, then dp); grads: those held at the GPU's peak. gathered: the full-size copies FSDP2 makes (one "
        "stage a GPU: the whole stage, and its gradients held at the peak, until the last micro-batch). act: one "
        f"micro-batch's activations ({number}; what autograd saves, and the output layer's backward) with and "
        "without AC; peak counts --ac's. pipeline: the schedule's other micro-batches in "
        "flight, and torch's receive buffers (one per micro-batch, fp32). a2a: one token's dispatch in one MoE "
        "layer with / without the group limit (at most one fp32 copy per rank reached), and the bytes the busiest "
        "GPU sends in a step (dispatch + combine; forward, backward, AC's recompute). GB = 10^9 bytes; the CUDA "
        "context and fragmentation are not counted.",
        "Ranked by free memory per GPU (whole GB), then a2a bytes per step, then bubble."]
    return "\n".join(textwrap.fill(line, 118, subsequent_indent="  ") for line in lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def table(shown: list[LayoutPlan], memory: int, fits: list[LayoutPlan]) -> str:
    """One row per layout: its rank among those that fit, the busiest GPU's memory split, a2a and bubble; memory
    in GB (MB for models whose every figure is below a GB)."""
    unit, name = (GB, "GB") if max(p.memory.total for p in shown) >= GB else (10**6, "MB")
    rows: list[tuple[str, ...]] = [("#", "pp x dp x ep", "blocks", "busiest", "params", "grads", "AdamW", "gathered",
                                    "act AC", "act no AC", "pipeline", "peak", "free", "a2a KB/token",
                                    f"a2a {name}/step", "bubble")]
    for p in shown:
        m = p.memory
        blocks = f"{min(p.stage_blocks)}-{max(p.stage_blocks)}" if p.uneven else str(p.stage_blocks[0])
        rows.append((str(fits.index(p) + 1) if p in fits else "-", f"{p.pp} x {p.dp} x {p.ep}", blocks,
                     f"stage {p.peak_stage}" if p.pp > 1 else "-",
                     *(f"{b / unit:.1f}" for b in (m.params, m.grads, m.adamw, m.gathered, m.activations_ac,
                                                   m.activations_no_ac, m.pipeline, m.total, memory - m.total)),
                     f"{p.a2a_token[0] / 1e3:.0f} / {p.a2a_token[1] / 1e3:.0f}", f"{p.a2a_step / unit:.0f}",
                     f"{100 * p.bubble:.1f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in (1, 2, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return f"memory per GPU in {name}\n" + "\n".join(lines)


def notes(model_cfg: ModelConfig, shown: list[LayoutPlan]) -> str:
    """How the pipelined layouts shown split the blocks, and what the group limit does to dsmoe's all-to-all."""
    lines = []
    for p in shown:
        if p.pp > 1:
            even = "uneven: " if p.uneven else ""
            lines.append(f"{p.pp} x {p.dp} x {p.ep}: blocks per {'chunk' if len(p.stage_blocks) > p.pp else 'stage'} "
                         f"{even}{' '.join(map(str, p.stage_blocks))} (embedding on the first, head"
                         f"{' and MTP' if model_cfg.mtp_layers else ''} on the last); {p.microbatches} micro-batches "
                         f"of {p.micro_batch} sequence{'s' if p.micro_batch > 1 else ''} per rank")
    moe = model_cfg.moe
    if moe is not None and moe.n_groups > 1:
        lines.append(f"Group limit: dsmoe's all-to-all sends a token once per rank (no per-node deduplication), so "
                     f"topk_groups={moe.topk_groups} of n_groups={moe.n_groups} cuts the copies only where "
                     f"{moe.topk_groups} groups hold fewer than top_k={moe.top_k} ranks (e.g. ep {moe.n_groups}: "
                     f"{a2a_copies(moe, moe.n_groups)} copies instead of {a2a_copies(moe, moe.n_groups, False)}).")
    return "\n".join(lines)


def _parse_layout(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*", text.lower())
    if m is None:
        raise ValueError(f"--show {text!r} is not a layout: write PPxDPxEP, e.g. 16x2x64")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def _find(candidates: list[LayoutPlan], layout: tuple[int, int, int], gpus: int) -> LayoutPlan:
    """--show's layout, among every candidate (it may not fit)."""
    text = "x".join(map(str, layout))
    for p in candidates:
        if (p.pp, p.dp, p.ep) == layout:
            if p.problem:
                raise ValueError(f"layout {text} cannot run: {p.problem}")
            return p
    raise ValueError(f"--show {text} is not a layout of {gpus} GPUs for this model (pp x dp x ep = GPUs, ep "
                     "dividing the routed experts, at least a block per stage)")
