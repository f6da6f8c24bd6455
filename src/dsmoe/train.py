"""Train a DeepSeekMoE language model.

`build_run` sets a run up (distributed context, tokenizer and corpus, model, AdamW with warmup + cosine
decay, resume), `train_step` does one optimizer step (gradient accumulation, gradient reduction and
clipping, the update, and the auxiliary-loss-free bias update on counts summed over every rank), and
`train` is the loop: log points (one host sync each), evaluation (validation loss, perplexity,
MaxVio_global), atomic checkpoints, a clean stop on Ctrl-C or SIGTERM, exact resume.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from tqdm import tqdm

from dsmoe import checkpoint, esft
from dsmoe.config import ModelConfig, TrainConfig
from dsmoe.data import Corpus, build_tokenizer, load_corpus, parse_data
from dsmoe.esft import Selection as ESFTSelection
from dsmoe.evaluate import autocast, evaluate
from dsmoe.memory import rank_memory, step_memory
from dsmoe.model import Block, MoETransformer
from dsmoe.moe import MoE, moe_layers
from dsmoe.parallel.context import Context, init_context, launch_world, layout_for_launch
from dsmoe.parallel.fsdp import init_optimizer_state, local, training_tensors
from dsmoe.parallel.pipeline import describe_split, n_stages, split_layers
from dsmoe.prepare import is_prepared
from dsmoe.presets import apply_sets, build_configs
from dsmoe.pretrained import hf_model_config, load_hf_weights, save_pretrained
from dsmoe.runtime import MetricsLog, RunLock, StopFlag
from dsmoe.tokenizer import Tokenizer, load_tokenizer


class TrainingDiverged(RuntimeError):
    """The loss (or the weights about to be saved) became NaN or inf."""


class Stopped(KeyboardInterrupt):
    """A Ctrl-C or SIGTERM stopped the run after the same step on every rank, with a checkpoint."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at the last step (a multiplier of lr)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return (cfg.min_lr + (cfg.lr - cfg.min_lr) * cosine) / cfg.lr


def top_k_at(step: int, cfg: TrainConfig, final_k: int) -> int:
    """Dynamic top-k: start at topk_start and anneal linearly to the final K (off when topk_start is 0)."""
    if not cfg.topk_start or step >= cfg.topk_anneal_steps:
        return final_k
    return round(cfg.topk_start + (final_k - cfg.topk_start) * step / cfg.topk_anneal_steps)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms' gains are not decayed (the bias is a buffer)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all parameters; the per-parameter loop costs an MoE model ~8% of a CPU step
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Activation checkpointing, in place: each block keeps only its input and recomputes its activations in
    backward (torch.utils.checkpoint, non-reentrant). The recomputation does not count tokens for the
    balancing bias a second time. Parameter names stay those of the model."""
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        contexts = functools.partial(lambda layers: (nullcontext(), _Recomputing(layers)), moe_layers(block))
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward,  # type: ignore[method-assign]
                                          use_reentrant=False, context_fn=contexts)


class _Recomputing:
    """Marks the MoE layers as recomputing while a checkpointed block reruns its forward. Re-enterable: a
    zero-bubble schedule's weight pass recomputes a block a second time with the same context."""

    def __init__(self, layers: list[MoE]):
        self.layers = layers

    def __enter__(self) -> None:
        for m in self.layers:
            m.recomputing = True

    def __exit__(self, *exc: object) -> None:
        for m in self.layers:
            m.recomputing = False


# ---- the run -------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a training run holds between steps."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    ctx: Context                  # the distributed context (dsmoe.parallel.SingleProcess does nothing)
    device: str
    run_dir: Path                 # this rank's: the run directory on rank 0
    checkpoint_dir: Path          # the run's checkpoint (every rank writes its shards there under a mesh)
    tokenizer: Tokenizer
    corpus: Corpus
    seq_len: int
    model: MoETransformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data_rng: torch.Generator
    log: MetricsLog
    lock: RunLock                 # held until the run ends: no second training writes this run directory
    step: int = 0                 # optimizer steps done
    init_eval: dict[str, float] | None = None  # the untrained model's validation loss and perplexity
    last_good: int | None = None  # step of the last checkpoint written (None: none yet)
    esft: ESFTSelection | None = None  # the experts an ESFT run trains (TrainConfig.esft)

    def evaluate(self) -> dict[str, Any]:
        ev = evaluate(self.model, self.corpus, self.cfg.batch_size, self.seq_len, self.cfg.eval_batches,
                      self.device, ctx=self.ctx, doc_mask=self.cfg.doc_mask)
        self.ctx.reshard(self.model)
        self.log.write({"kind": "eval", "step": self.step, "val_loss": ev["loss"], "val_ppl": ev["ppl"],
                        "maxvio_global": ev["maxvio_global"], "load": ev["load"]})
        return ev

    def save(self) -> None:
        """Checkpoint this step, never with non-finite weights or biases (every rank agrees before anyone
        writes): whole tensors in one process, each rank's DCP shards under a mesh."""
        floats = [local(t) for t in itertools.chain(self.model.parameters(), self.model.buffers())
                  if t.is_floating_point()]
        bad = torch.stack([t.detach().isfinite().all() for t in floats]).logical_not().any()  # the biases too
        if self.ctx.all_reduce_(bad.float()).item():
            raise TrainingDiverged(f"the weights at step {self.step} are not finite; not saving them. "
                                   + self.kept())
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "data_rng": self.data_rng.get_state(), "init_eval": self.init_eval,
                 "cuda_rng": torch.cuda.get_rng_state() if self.device == "cuda" else None}
        config = {"model": self.model_cfg.to_dict(), "train": self.cfg.to_dict(), "step": self.step}
        if self.ctx.sharded:
            checkpoint.save_sharded(self.checkpoint_dir, training_tensors(self.model, self.optimizer, self.ctx.mesh),
                                    config, state, self.tokenizer)
        else:
            state["optimizer"] = self.optimizer.state_dict()
            checkpoint.save(self.checkpoint_dir, self.model, config, state, self.tokenizer)
        self.last_good = self.step

    def kept(self) -> str:
        if self.last_good is None:
            return "No checkpoint had been written yet (lower lr, or set save_every)."
        return f"The last good checkpoint (step {self.last_good}) is kept in {self.checkpoint_dir}"


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb and key != "check_inputs":  # a runtime check, not part of the model
            diffs.append(f"{prefix}{key}: checkpoint {va!r} vs requested {vb!r}")
    return diffs


def run_configs(preset: str | None = None, sets: Sequence[str] = (), resume: str | None = None,
                init: str | None = None) -> tuple[ModelConfig, TrainConfig, list[str]]:
    """The configs of a run as `dsmoe train` resolves them, and lines that tell the user what was chosen:
    a preset (default tiny) with `key=value` overrides (dsmoe.presets.apply_sets); or a resumed run's own
    configs, in its own folder wherever it moved, on this launch's layout unless `sets` choose one; or a
    HuggingFace folder's architecture with the preset's run settings, where the gate's balancing bias trains
    loss-free at u = 1e-3 unless `sets` say otherwise: V3's e_score_correction_bias, or for a softmax gate (V2) a
    bias the release does not have, used for the choice of experts only (its HF format cannot hold it: the run
    keeps it in its dsmoe checkpoint)."""
    if resume:
        if preset or init:
            raise ValueError("--resume continues a run with its own model and settings: drop --preset/--init "
                             "(change settings with --set)")
        return _resume_configs(resume, sets)
    if init:
        model_cfg = hf_model_config(init)
        user_sets = list(sets)
        if model_cfg.moe is not None:
            sets = ["moe.bias_update_speed=0.001", *sets]
        _, train_cfg = build_configs(preset or "tiny")
        train_cfg = dataclasses.replace(train_cfg, init=init, out=f"runs/{Path(init).name}")
        model_cfg, train_cfg = apply_sets(model_cfg, train_cfg, list(sets))
        if train_cfg.esft and model_cfg.moe is not None and \
                not any(s.partition("=")[0].strip() == "moe.bias_update_speed" for s in user_sets):
            model_cfg = dataclasses.replace(model_cfg, moe=model_cfg.moe.replace(bias_update_speed=0.0))
        return model_cfg, train_cfg, []
    return *build_configs(preset or "tiny", list(sets)), []


def _resume_configs(resume: str, sets: Sequence[str]) -> tuple[ModelConfig, TrainConfig, list[str]]:
    ckpt = checkpoint.resolve(resume)
    model_cfg, train_cfg = checkpoint.configs_from_checkpoint(ckpt)
    run_dir = ckpt.parent if ckpt.name.startswith("checkpoint") else ckpt
    train_cfg = dataclasses.replace(train_cfg, out=str(run_dir))  # the run's folder, wherever it moved
    model_cfg, train_cfg = apply_sets(model_cfg, train_cfg, list(sets))
    train_cfg = dataclasses.replace(train_cfg, resume=resume)
    notes = [f"resuming {ckpt} into {train_cfg.out}"]
    given = {item.partition("=")[0].strip() for item in sets}
    world, saved_pp, saved_ep = launch_world(), train_cfg.pipeline_parallel, train_cfg.expert_parallel
    if "pipeline_parallel" not in given:  # kept where the launch has a multiple of its stages, else none
        pp = saved_pp if saved_pp > 1 and world > 1 and world % saved_pp == 0 else 0
        train_cfg = dataclasses.replace(train_cfg, pipeline_parallel=pp)
    if "expert_parallel" not in given:
        ep = layout_for_launch(saved_ep, world // max(train_cfg.pipeline_parallel, 1))
        train_cfg = dataclasses.replace(train_cfg, expert_parallel=ep)
    for name, flag, saved in (("expert_parallel", "--expert-parallel", saved_ep),
                              ("pipeline_parallel", "--pipeline-parallel", saved_pp)):
        if name not in given and getattr(train_cfg, name) != saved:
            notes.insert(0, f"resuming on {world} process{'es' * (world > 1)} with {name}={getattr(train_cfg, name)} "
                            f"instead of the checkpoint's {saved} (it reshards to any layout; choose another with "
                            f"{flag})")
    return model_cfg, train_cfg, notes


def build_run(model_cfg: ModelConfig, cfg: TrainConfig) -> Run:
    """Set a run up: context, run directory (locked), tokenizer and corpus, model (sharded), optimizer,
    schedule, and the resumed checkpoint's weights, optimizer, schedule and RNG states."""
    esft.check_config(model_cfg, cfg)
    if cfg.pipeline_parallel > 1:  # enough blocks for the stages: refused before any group
        split_layers(model_cfg, n_stages(cfg.pipeline_parallel, cfg.schedule))
    ctx = init_context(cfg.expert_parallel, cfg.batch_size, cfg.device, cfg.dist_timeout_s,
                       settings={"model": model_cfg.to_dict(), "train": cfg.to_dict()},
                       pipeline_parallel=cfg.pipeline_parallel, schedule=cfg.schedule, microbatches=cfg.microbatches)
    try:  # refused here, not killed by the OOM killer later; every rank alike (the least memory of any)
        ctx.check_memory(model_cfg, cfg, ctx.least(rank_memory(cfg.device)))
    except ValueError:
        ctx.close()
        raise
    device = checkpoint.resolve_device(cfg.device)
    out = Path(cfg.out or f"runs/{cfg.preset}")
    run_dir = ctx.run_dir(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    try:
        return _build_run(model_cfg, cfg, ctx, device, out, run_dir, lock)
    except BaseException:
        lock.release()
        raise


def as_trained(model_cfg: ModelConfig) -> ModelConfig:
    """The model config a training run builds: the MoE layers' per-forward NaN check is a host sync per layer,
    so training turns it off and checks the loss at its log points instead."""
    if model_cfg.moe is None:
        return model_cfg
    return dataclasses.replace(model_cfg, moe=model_cfg.moe.replace(check_inputs=False))


def _build_run(model_cfg: ModelConfig, cfg: TrainConfig, ctx: Context, device: str, out: Path, run_dir: Path,
               lock: RunLock) -> Run:
    holds_run = (out / "metrics.jsonl").exists() or (out / "checkpoint").exists()  # every rank sees the same
    if holds_run and not cfg.resume and not cfg.overwrite:
        raise ValueError(f"{out} already holds a run: continue it with --resume {out}, choose another --out, "
                         "or --set overwrite=true to replace it")
    model_cfg, ckpt, state, tokenizer = _resumed(as_trained(model_cfg), cfg)
    model_cfg, tokenizer, corpus, seq_len = _data(model_cfg, cfg, tokenizer)

    torch.manual_seed(cfg.seed)
    model = MoETransformer(model_cfg).to(device)
    if ckpt is not None and not checkpoint.is_sharded(ckpt):
        checkpoint.load_weights(ckpt, model)  # the full weights, before sharding
    elif ckpt is None and cfg.init:
        load_hf_weights(model, cfg.init)
    selection = esft.selection_for_run(model, cfg, corpus, seq_len, device, run_dir, ctx.world) if cfg.esft else None
    partial = esft.freeze(model, selection) if selection is not None else []  # only the chosen experts train
    if cfg.activation_checkpointing:
        checkpoint_activations(model)
    model = ctx.shard(model)
    if cfg.compile:  # in place, so parameter names and checkpoints stay those of the eager model
        model.compile(backend=cfg.compile)
    optimizer = build_optimizer(model, cfg)
    esft.keep_frozen_rows(optimizer, partial, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    data_rng = torch.Generator().manual_seed(cfg.seed)
    (run_dir / "config.json").write_text(json.dumps({"model": model_cfg.to_dict(), "train": cfg.to_dict()}, indent=2))
    log = MetricsLog(run_dir, state["step"] if state else None, cfg.tensorboard)
    if selection is not None and state is None:
        log.write(esft.metrics_row(selection))
    run = Run(cfg, model_cfg, ctx, device, run_dir, out / "checkpoint", tokenizer, corpus, seq_len, model, optimizer,
              scheduler, data_rng, log, lock, esft=selection)
    if ckpt is not None and state is not None:
        _restore(run, ckpt, state)
    return run


def _resumed(model_cfg: ModelConfig, cfg: TrainConfig
             ) -> tuple[ModelConfig, Path | None, dict[str, Any] | None, Tokenizer | None]:
    """(model config, checkpoint, its state, its tokenizer) of a resumed run, the model config checked against
    the checkpoint's; (model_cfg, None, None, None) for a new one."""
    if not cfg.resume:
        return model_cfg, None, None, None
    ckpt = checkpoint.resolve(cfg.resume)
    tokenizer = load_tokenizer(ckpt)
    if not cfg.init:  # a fine-tuned model keeps its own vocabulary
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    saved_cfg, _ = checkpoint.configs_from_checkpoint(ckpt)  # with today's defaults for fields it predates
    diffs = _config_diff(saved_cfg.to_dict(), model_cfg.to_dict())
    if diffs:
        raise checkpoint.CheckpointError(f"checkpoint {str(ckpt)!r} was trained with another model config: "
                                         + "; ".join(diffs))
    state = checkpoint.load_state(ckpt)
    if state["step"] >= cfg.steps:
        raise ValueError(f"checkpoint {str(ckpt)!r} is at step {state['step']}: "
                         + ("the run is finished; give a larger --steps to train on" if state["step"] == cfg.steps
                            else f"past steps={cfg.steps}; give --steps above {state['step']} to continue it"))
    return model_cfg, ckpt, state, tokenizer


def _data(model_cfg: ModelConfig, cfg: TrainConfig, tokenizer: Tokenizer | None
          ) -> tuple[ModelConfig, Tokenizer, Corpus, int]:
    """(model config, tokenizer, corpus, seq_len): a resumed run's tokenizer, a HuggingFace folder's own (the
    byte tokenizer when it has none), a prepared folder's (the first of a mixture's), or one built for the data;
    the last two set the vocabulary. Every prepared folder must have been tokenized by the run's tokenizer."""
    if tokenizer is None and cfg.init:
        tokenizer = load_tokenizer(cfg.init)
    if tokenizer is None:
        paths = [path for path, _ in parse_data(cfg.data)]
        prepared = [path for path in paths if is_prepared(path)]
        tokenizer = (load_tokenizer(prepared[0]) if prepared else
                     build_tokenizer(cfg.tokenizer, paths[0], cfg.bpe_vocab_size))
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {model_cfg.vocab_size}")
    seq_len = cfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} is invalid: must be <= max_seq_len={model_cfg.max_seq_len}")
    corpus = load_corpus(cfg.data, tokenizer)
    corpus.check(seq_len, model_cfg.vocab_size)
    return model_cfg, tokenizer, corpus, seq_len


def _restore(run: Run, ckpt: Path, state: dict[str, Any]) -> None:
    """A resumed run's optimizer (and, from shards, its weights), schedule, RNG states and step."""
    cfg, optimizer = run.cfg, run.optimizer
    hyper = [{"weight_decay": g["weight_decay"], "betas": g["betas"]} for g in optimizer.param_groups]
    if checkpoint.is_sharded(ckpt):  # weights and moments, each rank its own pieces, whatever layout wrote them
        init_optimizer_state(optimizer)
        checkpoint.load_sharded(ckpt, training_tensors(run.model, optimizer, run.ctx.mesh))
    else:
        run.ctx.load_optimizer_state_dict(run.model, optimizer, state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    # this run's lr, betas and weight decay (--set on resume) win over the ones saved with the optimizer
    run.scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, h in zip(optimizer.param_groups, hyper):
        group.update(h, initial_lr=cfg.lr, lr=cfg.lr * lr_factor(state["step"], cfg))
    torch.set_rng_state(state["torch_rng"])
    run.data_rng.set_state(state["data_rng"])
    if run.device == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"])
    run.step = run.last_good = state["step"]
    run.init_eval = state["init_eval"]


# ---- one step and the loop -----------------------------------------------------------------------------

class Meter:
    """Loss, auxiliary loss, MaxVio_batch [L] and load [L, E] summed on the device between log points."""

    def __init__(self, model_cfg: ModelConfig, device: str, sets: int = 1):
        L, E = model_cfg.n_moe_layers, model_cfg.moe.n_routed_experts if model_cfg.moe else 0
        self.loss, self.aux = torch.zeros((), device=device), torch.zeros((), device=device)
        self.maxvio_L = torch.zeros(L, device=device)
        self.load_LE = torch.zeros(L, E, device=device, dtype=torch.long)
        self.steps, self.t0 = 0, time.perf_counter()
        self.mix = torch.zeros(sets, dtype=torch.long)  # windows drawn from each set of a mixture

    def add(self, loss: torch.Tensor, aux: torch.Tensor, stats: dict[str, torch.Tensor], grad_accum: int) -> None:
        """One micro-batch's numbers, its loss weighted already (no host sync)."""
        self.loss += loss.detach()
        self.aux += aux.detach() / grad_accum
        if stats:
            self.maxvio_L += stats["maxvio"] / grad_accum
            self.load_LE += stats["tokens_per_expert"]

    def read(self, ctx: Context, stop: bool) -> tuple[dict[str, Any], bool]:
        """The interval's means over the global batch, and whether any rank was asked to stop: one
        all-reduce of [loss, aux, stop] and the load, one host sync. Resets the meter."""
        n = self.steps
        packed = ctx.all_reduce_(torch.stack([self.loss, self.aux, torch.tensor(float(stop), device=self.loss.device)]))
        loss, aux, stops = (packed / ctx.data_ranks / n).tolist()
        row = {"loss": loss, "aux_loss": aux, "maxvio": (ctx.layer_mean_(self.maxvio_L) / n).tolist(),
               "mix": (self.mix / self.mix.sum().clamp(min=1)).tolist(),
               "load": ctx.all_reduce_(self.load_LE).tolist(), "seconds": time.perf_counter() - self.t0}
        for t in (self.loss, self.aux, self.maxvio_L, self.load_LE, self.mix):
            t.zero_()
        self.steps, self.t0 = 0, time.perf_counter()
        return row, stops > 0


def next_batch(run: Run, meter: Meter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This rank's rows of the next global batch: every rank draws the same window starts (so a resumed run, at
    any world size, sees the tokens the uninterrupted one would) and reads only its own windows."""
    starts_B = run.corpus.sample("train", run.cfg.batch_size, run.seq_len, run.data_rng)
    if len(run.corpus.sets) > 1:
        meter.mix += run.corpus.set_of("train", starts_B).bincount(minlength=len(run.corpus.sets))
    (local_B,) = run.ctx.local_batch(starts_B)
    docs: torch.Tensor | None = None
    if run.cfg.doc_mask:
        x, y, docs = run.corpus.windows_with_docs("train", local_B, run.seq_len)
    else:
        x, y = run.corpus.windows("train", local_B, run.seq_len)
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    return x, y, None if docs is None else docs.to(run.device, non_blocking=True)


def target_weights(run: Run, ys: list[torch.Tensor]) -> list[float] | None:
    """Per micro-batch, the factor on its mean loss that makes the step's loss the mean over every trained target
    of the global batch, whatever the world size and grad_accum: fine-tuning data's masks leave micro-batches
    and ranks with different counts (one all-reduce and one host sync per step). None without masks: every
    micro-batch has the same count, and the factor is 1/grad_accum."""
    if not run.corpus.has_masks:
        return None
    counts = torch.stack([(y != -1).sum() for y in ys]).float()
    total = run.ctx.all_reduce_layers_(counts.sum()).item()  # the ranks holding the same layers hold other rows
    return [c * run.ctx.data_ranks / max(total, 1.0) for c in counts.tolist()]


def train_step(run: Run, meter: Meter) -> int:
    """One optimizer step over grad_accum micro-batches of this rank's share of the global batch; returns
    the top-k it trained with."""
    cfg, model = run.cfg, run.model
    layers = model.moe_layers()
    k = top_k_at(run.step, cfg, run.model_cfg.moe.top_k if run.model_cfg.moe else 0)
    if layers and k != layers[0].cfg.top_k:
        model.set_top_k(k)
    batches = [next_batch(run, meter) for _ in range(cfg.grad_accum)]
    weights = target_weights(run, [y for _, y, _ in batches])
    for i, (x, y, docs) in enumerate(batches):
        # aux losses are scaled like the main loss, or accumulation would inflate their weight
        weight = 1 / cfg.grad_accum if weights is None else weights[i]
        weighted, aux = run.ctx.forward_backward(model, x, y, docs, weight, 1 / cfg.grad_accum,
                                                 functools.partial(autocast, run.device))
        meter.add(weighted, aux, run.ctx.routing_stats(model), cfg.grad_accum)
    run.ctx.reduce_grads(model)
    if cfg.grad_clip:
        run.ctx.clip_grad_norm_(model, cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    model.update_biases(run.ctx.all_reduce_layers_)  # loss-free balancing: once per step, counts of every rank
    run.step += 1
    meter.steps += 1
    return k


def train(model_cfg: ModelConfig, cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a run; returns the summary also written to run_dir/summary.json. A Ctrl-C or
    SIGTERM stops it at the next log point with a checkpoint, then raises KeyboardInterrupt (Stopped)."""
    run = build_run(model_cfg, cfg)
    ctx, lock, export = run.ctx, run.lock, _export_job(run)
    try:
        ending: BaseException | None = None
        try:
            summary = _loop(run, progress and ctx.is_main)
        except (Stopped, TrainingDiverged) as e:  # every rank ends here, after the same step
            ending = type(e)(*e.args)  # without the traceback, which holds the run
        except RuntimeError as e:
            if not _is_peer_failure(e):
                raise
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise RuntimeError(f"rank {ctx.rank}: a collective failed: another process died, or did not answer "
                               f"within dist_timeout_s={cfg.dist_timeout_s:g} s ({detail}). " + run.kept()) from None
        del run  # the model, optimizer and meshes first: a process group ends with the last reference to it
        ctx.close()
        if ending is not None:
            raise ending
        if export is not None:
            export()
        return summary
    finally:
        lock.release()


def _is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another process died or hung: NCCL raises a DistError, gloo a
    RuntimeError from its transport ("Timed out waiting ...", "Connection closed by peer")."""
    return isinstance(e, torch.distributed.DistError) or "gloo/transport" in str(e)


def _loop(run: Run, progress: bool) -> dict[str, Any]:
    cfg = run.cfg
    say = print if progress else (lambda *a, **k: None)
    _introduce(run, say)
    if run.init_eval is None:
        ev = run.evaluate()
        run.init_eval = {"loss": ev["loss"], "ppl": ev["ppl"]}
        say(f"step 0: val loss {ev['loss']:.4f}, ppl {ev['ppl']:.2f} (untrained)")

    bar = tqdm(total=cfg.steps, initial=run.step, dynamic_ncols=True, desc="train") if progress else None
    meter, stopped = Meter(run.model_cfg, run.device, len(run.corpus.sets)), False
    run.model.train()
    with StopFlag() as stop:
        while run.step < cfg.steps and not stopped:
            k = train_step(run, meter)
            done = run.step
            if done % cfg.log_every == 0 or done == cfg.steps:
                stopped = _log_point(run, meter, k, stop.requested, bar)
            if done < cfg.steps and not stopped and cfg.eval_every and done % cfg.eval_every == 0:
                ev = run.evaluate()
                if bar is not None:
                    bar.write(f"step {done}: val loss {ev['loss']:.4f}, ppl {ev['ppl']:.2f}, "
                              f"MaxVio_global {_mean(ev['maxvio_global']):.3f}")
            if (done < cfg.steps and cfg.save_every and done % cfg.save_every == 0) or stopped:
                run.save()
        if bar is not None:
            bar.close()
        if stopped and run.step < cfg.steps:  # a stop during the last interval just finishes the run
            if run.ctx.is_main:
                print(f"\ninterrupted: checkpoint of step {run.step} saved in {run.checkpoint_dir}; "
                      f"continue with --resume {run.run_dir}")
            run.log.close()
            raise Stopped  # on every rank after the same step (the flag travelled in an all-reduce)
        run.save()
    if run.esft is not None and run.cfg.init and run.ctx.is_main:  # the trained tensors alone, HF keys
        esft.save_adapter(run.model, run.esft, run.run_dir / "esft", run.cfg.init)
    ev = run.evaluate()
    run.log.close()
    return _summary(run, ev)


def _introduce(run: Run, say: Callable[..., None]) -> None:
    """The run's first lines: the model, the data, the device; what activation checkpointing saves."""
    cfg, model_cfg = run.cfg, run.model_cfg
    mtp = f", {model_cfg.mtp_layers} MTP module(s) included" if model_cfg.mtp_layers else ""
    say(f"model: {model_cfg.num_params():,} parameters, {model_cfg.num_active_params():,} active per token "
        f"({len(run.model.moe_layers())} MoE layers{mtp}) | data: {run.corpus.info['train_tokens']:,} train / "
        f"{run.corpus.info['val_tokens']:,} val tokens ({run.tokenizer.kind}) | device {run.device} | "
        f"run dir {run.run_dir}")
    if len(run.corpus.sets) > 1:
        say("data mixture: " + ", ".join(f"{folder} x {w / sum(run.corpus.weights):.2f}"
                                         for folder, w in zip(run.corpus.info["folders"], run.corpus.weights)))
    if run.esft is not None:
        say(run.esft.describe())
    if cfg.pipeline_parallel > 1:
        split = split_layers(model_cfg, n_stages(cfg.pipeline_parallel, cfg.schedule))
        even = "" if len({len(s) for s in split}) == 1 else " (uneven: balanced by parameters)"
        say(f"pipeline: {len(split)} stages on {cfg.pipeline_parallel} ranks, blocks {describe_split(split)}{even}, "
            f"schedule {cfg.schedule}, {cfg.microbatches or cfg.pipeline_parallel} micro-batches")
    if cfg.activation_checkpointing:
        B = cfg.batch_size // run.ctx.world
        with_ac, without = (step_memory(model_cfg, dataclasses.replace(cfg, activation_checkpointing=on),
                                        world=run.ctx.world, ep=run.ctx.ep)[1] * B for on in (True, False))
        say(f"activation checkpointing: ~{with_ac / 2**20:.0f} MiB of activations per micro-batch instead of "
            f"~{without / 2**20:.0f} MiB (estimated), for one more forward per step")


def _log_point(run: Run, meter: Meter, k: int, stop_requested: bool, bar: tqdm | None) -> bool:
    """The one host sync of a log interval: the metrics row (and the progress bar) of the steps since the last
    one; refuses a non-finite loss. Returns whether any rank asked to stop."""
    n, done = meter.steps, run.step
    m, stopped = meter.read(run.ctx, stop_requested)
    if not math.isfinite(m["loss"]):
        raise TrainingDiverged(f"training loss became {m['loss']} by step {done}; stopping. " + run.kept())
    tokens_per_step = run.cfg.batch_size * run.seq_len * run.cfg.grad_accum
    row = {"kind": "train", "step": done, "loss": m["loss"], "aux_loss": m["aux_loss"],
           "lr": run.scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_step * n / m["seconds"],
           "top_k": k, "maxvio": m["maxvio"], "load": m["load"]}
    mix = ""
    if len(run.corpus.sets) > 1:  # the realized share of each set of the mixture
        row["mix"] = m["mix"]
        mix = " | mix " + "/".join(f"{p:.2f}" for p in m["mix"])
    run.log.write(row)
    if bar is not None:
        bar.set_postfix_str(f"loss {row['loss']:.3f} | {row['tokens_per_s']:,.0f} tok/s | lr {row['lr']:.2e} | "
                            f"MaxVio {_mean(row['maxvio']):.2f}{mix}")
        bar.update(n)
    return stopped


def _export_job(run: Run) -> Callable[[], None] | None:
    """What writes RUN/hf after the run (on rank 0 of an MLA MoE model, or one read from a HuggingFace family),
    holding no reference to a sharded model: under a mesh rank 0 reads the whole model back from the shards the
    ranks wrote."""
    if not ((run.model_cfg.mla or run.model_cfg.family) and run.model_cfg.moe is not None and run.ctx.is_main):
        return None
    model = None if run.ctx.sharded else run.model
    return functools.partial(_export, run.model_cfg, model, run.checkpoint_dir, run.tokenizer, run.run_dir)


def _export(model_cfg: ModelConfig, model: MoETransformer | None, checkpoint_dir: Path, tokenizer: Tokenizer,
            run_dir: Path) -> None:
    """RUN/hf: the DeepSeek-format folder transformers loads (per-expert safetensors keys). A model the format
    cannot hold keeps its dsmoe checkpoint and says why; the run itself has succeeded."""
    if model is None:
        model = MoETransformer(model_cfg)
        checkpoint.load_weights(checkpoint_dir, model, alone=True)
    try:
        save_pretrained(model, run_dir / "hf", eos_id=tokenizer.eos_id)
        tokenizer.save(run_dir / "hf")
    except ValueError as e:
        shutil.rmtree(run_dir / "hf", ignore_errors=True)
        print(f"note: no HuggingFace folder written ({e}); the dsmoe checkpoint is in {checkpoint_dir}")


def _summary(run: Run, ev: dict[str, Any]) -> dict[str, Any]:
    train_rows = run.log.rows("train")
    assert run.init_eval is not None
    summary = {
        "run_dir": str(run.run_dir), "steps": run.cfg.steps, "val_loss": ev["loss"], "val_ppl": ev["ppl"],
        "init_val_loss": run.init_eval["loss"], "init_val_ppl": run.init_eval["ppl"],
        "maxvio_global": ev["maxvio_global"], "maxvio_global_mean": _mean(ev["maxvio_global"]),
        "maxvio_batch_mean": _mean(_mean(r["maxvio"]) for r in train_rows if r["maxvio"]),
        "dead_experts": int(sum(v == 0 for layer in ev["load"] for v in layer)),
        "tokens_per_s": _mean([r["tokens_per_s"] for r in train_rows[1:]] or [r["tokens_per_s"] for r in train_rows]),
        "num_params": run.model_cfg.num_params(), "num_active_params": run.model_cfg.num_active_params(),
        "train_loss": train_rows[-1]["loss"] if train_rows else float("nan"),
    }
    if run.esft is not None:
        summary["esft"] = run.esft.summary() | {"adapter": str(run.run_dir / "esft")}
    if len(run.corpus.sets) > 1:
        mixes = [r["mix"] for r in train_rows if "mix" in r]
        summary["mix_weights"] = run.corpus.weights
        summary["mix_realized"] = [_mean(m[i] for m in mixes) for i in range(len(run.corpus.sets))]
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0
