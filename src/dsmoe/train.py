"""Train a DeepSeekMoE language model: `dsmoe train [--preset NAME] [--set key=value ...]`.

One loop, read top to bottom: AdamW with warmup + cosine decay, gradient accumulation, clipping, the
auxiliary-loss-free bias update once per optimizer step, an optional dynamic top-k schedule, periodic
evaluation (validation loss, perplexity, MaxVio_global), metrics JSONL, atomic checkpoints, exact resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from dsmoe import checkpoint, parallel
from dsmoe.config import ModelConfig, MoEConfig, PRESETS, preset as get_preset


@dataclass
class TrainConfig:
    """Everything about a run except the model."""

    preset: str = "tiny"              # model preset the run started from (see dsmoe.config.PRESETS)
    steps: int = 2500                 # optimizer steps
    batch_size: int = 16              # sequences per micro-batch
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

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "log_every", "bpe_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
        for name in ("seq_len", "warmup_steps", "eval_every", "save_every", "topk_start", "topk_anneal_steps",
                     "expert_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 0")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is not allowed; choose 'cpu' or 'cuda'")
        if self.tokenizer not in ("byte", "bpe"):
            raise ValueError(f"tokenizer={self.tokenizer!r} is not allowed; choose 'byte' or 'bpe'")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"lr={self.lr!r}, min_lr={self.min_lr!r} are invalid: need lr > 0 and 0 <= min_lr <= lr")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


# ---- configuration ----------------------------------------------------------------------------------

def _parse_value(text: str, current):
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
    model_changes, moe_changes, train_changes = {}, {}, {}
    for item in sets or []:
        key, sep, text = item.partition("=")
        key = key.strip()
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
        model_changes["moe"] = model_cfg.moe.replace(**moe_changes)
    if "dim" in model_changes and model_cfg.moe is not None:  # keep the MoE width in step with the model
        model_changes["moe"] = model_changes.get("moe", model_cfg.moe).replace(dim=model_changes["dim"])
    if model_changes:
        model_cfg = dataclasses.replace(model_cfg, **model_changes)
    return model_cfg, dataclasses.replace(train_cfg, **train_changes)


def build_configs(preset: str, sets: list[str] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """(ModelConfig, TrainConfig) of a preset with `--set key=value` overrides applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = preset.removesuffix("-dense")
    defaults = PRESET_TRAIN.get(base, {})
    return apply_sets(get_preset(preset), TrainConfig(preset=preset, **defaults), sets or [])


# Per-preset training defaults (the rest come from TrainConfig): sized so `debug` takes seconds and
# `tiny` about 4-5 minutes on 2 CPU cores.
PRESET_TRAIN = {
    "debug": dict(steps=200, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=20, eval_every=100,
                  eval_batches=8, save_every=0, log_every=10),
    "small": dict(steps=3000, batch_size=16, lr=1.5e-3, min_lr=1.5e-4, warmup_steps=200, eval_every=500,
                  save_every=500),
}


# ---- pieces of the loop -----------------------------------------------------------------------------

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


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()


@torch.no_grad()
def evaluate(model, corpus, batch_size: int, seq_len: int, batches: int, device: str = "cpu",
             split: str = "val") -> dict:
    """Validation loss, perplexity and MaxVio_global (Loss-Free Balancing §4.1) from the load summed over the whole pass.

    Windows are spread evenly over the split (validation unless asked otherwise) (no RNG, so evaluating never shifts training).
    The model runs in eval mode under no_grad, so the balancing counts are untouched. Under torch.distributed
    (expert parallelism) every rank evaluates its share of each batch and the sums are all-reduced.
    """
    was_training = model.training
    model.eval()
    n = batches * batch_size
    starts = torch.linspace(0, len(getattr(corpus, split)) - seq_len - 1, n).long()
    total_loss = torch.zeros((), device=device)
    load_LE = None
    for i in range(0, n, batch_size):
        x, y = corpus.windows(split, starts[i:i + batch_size], seq_len)
        x, y = parallel.local_batch(x, y)
        with autocast(device):
            _, loss = model(x.to(device), y.to(device))
        total_loss += loss.float() * len(x)
        stats = model.routing_stats()
        if stats:
            load_LE = stats["tokens_per_expert"] if load_LE is None else load_LE + stats["tokens_per_expert"]
    model.train(was_training)
    from dsmoe.metrics import max_violation
    parallel.all_reduce_(total_loss, mean=False)
    if load_LE is not None:
        parallel.all_reduce_(load_LE, mean=False)
    loss = (total_loss / n).item()
    out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "maxvio_global": [], "load": []}
    if load_LE is not None:
        out["maxvio_global"] = max_violation(load_LE).tolist()
        out["load"] = load_LE.tolist()
    return out


def resolve_device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return name


def configs_from_checkpoint(ckpt) -> tuple[ModelConfig, TrainConfig]:
    """The configs saved with a checkpoint, or a CheckpointError saying why they are not valid."""
    config = checkpoint.read_config(ckpt)
    try:
        return ModelConfig(**config["model"]), TrainConfig(**config.get("train", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(f"checkpoint {str(ckpt)!r}: config.json is not a valid config ({e})") from None


def load_checkpoint(directory, device: str = "cpu"):
    """(model, model_cfg, train_cfg, tokenizer) from a checkpoint or run directory, in eval mode."""
    from dsmoe.data import load_tokenizer
    from dsmoe.model import MoETransformer

    ckpt = checkpoint.resolve(directory)
    model_cfg, train_cfg = configs_from_checkpoint(ckpt)
    model = MoETransformer(model_cfg)
    checkpoint.load_weights(ckpt, model)
    model.to(resolve_device(device)).eval()
    return model, model_cfg, train_cfg, load_tokenizer(ckpt)


def _config_diff(a: dict, b: dict, prefix="") -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb and key != "check_inputs":  # a runtime check, not part of the model
            diffs.append(f"{prefix}{key}: checkpoint {va!r} vs requested {vb!r}")
    return diffs


class MetricsLog:
    """metrics.jsonl (and TensorBoard scalars when installed)."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():  # drop rows written after the checkpoint
            rows = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if json.loads(r)["step"] <= resume_step]
            self.path.write_text("".join(r + "\n" for r in kept))
        elif resume_step is None:
            self.path.write_text("")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception:  # tensorboard not installed: JSONL only
                self.tb = None

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{row['kind']}/{key}", value, row["step"])
                elif key in ("maxvio", "maxvio_global"):
                    for layer, v in enumerate(value):
                        self.tb.add_scalar(f"{row['kind']}/{key}/layer{layer}", v, row["step"])

    def rows(self, kind: str) -> list[dict]:
        return [r for r in map(json.loads, self.path.read_text().splitlines()) if r["kind"] == kind]

    def close(self):
        if self.tb is not None:
            self.tb.close()


# ---- the loop ---------------------------------------------------------------------------------------

def _owns_ctrl_c() -> bool:
    """Whether Ctrl-C would raise KeyboardInterrupt here: in the main thread (the only one that can set
    handlers) with Python's default handler in place. An ignored or custom SIGINT is left alone."""
    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)


@contextmanager
def _ctrl_c_held():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise it when the block ends."""
    if not _owns_ctrl_c():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class _CtrlCAcrossRanks:
    """Expert parallelism: a Ctrl-C on any rank stops every rank after the same step, so that all of them
    enter the checkpoint's collectives together (a rank that stopped on its own would wait on the others
    until the process group's timeout). The handler only records the signal (torchrun sends each worker a
    second SIGINT of its own); `pending()`, a collective, is called once per step by every rank."""

    def __init__(self, device):
        self.device, self.caught = device, False
        self.previous = signal.signal(signal.SIGINT, self._catch) if _owns_ctrl_c() else None

    def _catch(self, *_):
        self.caught = True

    def pending(self) -> bool:
        flag = torch.tensor(float(self.caught), device=self.device)
        return parallel.all_reduce_(flag, mean=False).item() > 0

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, progress: bool = True) -> dict:
    """Train (or resume) a run; returns the summary also written to run_dir/summary.json."""
    from dsmoe.data import build_tokenizer, load_corpus, load_tokenizer
    from dsmoe.model import MoETransformer

    cfg = train_cfg
    if cfg.expert_parallel:  # expert parallelism (dsmoe.parallel): the process group first, then only rank 0 talks
        parallel.init_training(cfg.expert_parallel, cfg.batch_size)
        progress = progress and parallel.is_main()
    device = resolve_device(cfg.device)
    say = print if progress else (lambda *a, **k: None)
    run_dir = Path(cfg.out or f"runs/{cfg.preset}")
    if not parallel.is_main():  # expert parallel: only rank 0 writes the run directory
        run_dir = parallel.scratch_dir()
    model_cfg = dataclasses.replace(model_cfg)
    if model_cfg.moe is not None:  # the per-forward NaN check is a host sync; the loop checks the loss instead
        model_cfg.moe = model_cfg.moe.replace(check_inputs=False)

    # ---- resume: the checkpoint's tokenizer, its state, and a model config that must match ----------
    state, tokenizer = None, None
    if cfg.resume:
        ckpt = checkpoint.resolve(cfg.resume)
        saved = checkpoint.read_config(ckpt)
        tokenizer = load_tokenizer(ckpt)
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
        diffs = _config_diff(saved["model"], model_cfg.to_dict())
        if diffs:
            raise checkpoint.CheckpointError(f"checkpoint {str(ckpt)!r} was trained with another model config: "
                                             + "; ".join(diffs))
        state = checkpoint.load_state(ckpt)
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.tokenizer, cfg.data, cfg.bpe_vocab_size)
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    seq_len = cfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} is invalid: must be <= max_seq_len={model_cfg.max_seq_len}")
    corpus = load_corpus(cfg.data, tokenizer)
    corpus.check(seq_len)

    # ---- model, optimizer, schedule, RNG -------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = MoETransformer(model_cfg).to(device)
    if cfg.expert_parallel:  # shard the routed experts over the ranks (a resumed run's full weights first)
        if state is not None:
            checkpoint.load_weights(ckpt, model)
        parallel.apply_expert_parallel(model)
    final_k = model_cfg.moe.top_k if model_cfg.moe else 0
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    data_rng = torch.Generator().manual_seed(cfg.seed)
    start, init_eval = 0, None
    if state is not None:
        if not cfg.expert_parallel:
            checkpoint.load_weights(ckpt, model)
        hyper = [{"weight_decay": g["weight_decay"], "betas": g["betas"]} for g in optimizer.param_groups]
        optimizer.load_state_dict(parallel.shard_optimizer_state(model, optimizer, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        # this run's lr, betas and weight decay (--set on resume) win over the ones saved with the optimizer
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
        for group, h in zip(optimizer.param_groups, hyper):
            group.update(h, initial_lr=cfg.lr, lr=cfg.lr * lr_factor(state["step"], cfg))
        torch.set_rng_state(state["torch_rng"])
        data_rng.set_state(state["data_rng"])
        if device == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        start, init_eval = state["step"], state["init_eval"]
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"model": model_cfg.to_dict(), "train": cfg.to_dict()}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    log = MetricsLog(run_dir, start if state is not None else None, cfg.tensorboard)
    say(f"model: {model_cfg.num_params():,} parameters, {model_cfg.num_active_params():,} active per token "
        f"({len(model.moe_layers())} MoE layers) | data: {corpus.info['train_tokens']:,} train / "
        f"{corpus.info['val_tokens']:,} val tokens ({tokenizer.kind}) | device {device} | run dir {run_dir}")

    def save(step: int, rng_states) -> None:
        torch_rng, data_state = rng_states
        st = {"step": step, "optimizer": parallel.full_optimizer_state_dict(model, optimizer),  # experts gathered
              "scheduler": scheduler.state_dict(),
              "torch_rng": torch_rng, "data_rng": data_state, "init_eval": init_eval,
              "cuda_rng": torch.cuda.get_rng_state() if device == "cuda" else None}
        tensors = parallel.full_state_dict(model)  # expert parallel: every expert once, gathered from the ranks
        if parallel.is_main():
            checkpoint.save(run_dir / "checkpoint", model, {**config, "step": step}, st, tokenizer, tensors)

    def run_eval(step: int) -> dict:
        ev = evaluate(model, corpus, cfg.batch_size, seq_len, cfg.eval_batches, device)
        log.write({"kind": "eval", "step": step, "val_loss": ev["loss"], "val_ppl": ev["ppl"],
                   "maxvio_global": ev["maxvio_global"], "load": ev["load"]})
        return ev

    if init_eval is None:
        ev = run_eval(0)
        init_eval = {"loss": ev["loss"], "ppl": ev["ppl"]}
        say(f"step 0: val loss {ev['loss']:.4f}, ppl {ev['ppl']:.2f} (untrained)")

    # ---- train ---------------------------------------------------------------------------------------
    tokens_per_step = cfg.batch_size * seq_len * cfg.grad_accum
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, dynamic_ncols=True, desc="train")
    n_moe = len(model.moe_layers())
    # accumulated on the device between log points: read back with one host sync per log interval
    loss_sum, aux_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    maxvio_sum_L = torch.zeros(n_moe, device=device)
    load_LE = torch.zeros(n_moe, model_cfg.moe.n_routed_experts if n_moe else 0, device=device, dtype=torch.long)
    last_good = start if state is not None else None  # step of the last checkpoint written (None: none yet)
    t_log, n_since = time.perf_counter(), 0
    rng_at_step = (torch.get_rng_state(), data_rng.get_state())
    ev = None
    model.train()
    across_ranks = _CtrlCAcrossRanks(device) if cfg.expert_parallel else None
    step = completed = start
    try:
        for step in range(start, cfg.steps):
            rng_at_step = (torch.get_rng_state(), data_rng.get_state())  # what a Ctrl-C checkpoint resumes from
            k = top_k_at(step, cfg, final_k)
            if n_moe and k != model.moe_layers()[0].cfg.top_k:
                model.set_top_k(k)
            for _ in range(cfg.grad_accum):
                x, y = corpus.batch("train", cfg.batch_size, seq_len, data_rng)
                x, y = parallel.local_batch(x, y)  # expert parallel: this rank's slice of the global batch
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast(device):
                    _, loss = model(x, y)
                    aux = model.aux_loss()
                # aux losses are scaled like the main loss, or accumulation would inflate their weight
                ((loss + aux) / cfg.grad_accum).backward()
                loss_sum += loss.detach() / cfg.grad_accum
                aux_sum += aux.detach() / cfg.grad_accum
                if n_moe:
                    stats = model.routing_stats()
                    maxvio_sum_L += stats["maxvio"] / cfg.grad_accum
                    load_LE += stats["tokens_per_expert"]
            if cfg.expert_parallel:  # replicated gradients averaged over the ranks, expert gradients kept local
                parallel.sync_grads(model)
            if cfg.grad_clip and cfg.expert_parallel:  # the norm of the whole model, every rank's experts included
                parallel.clip_grad_norm_(model, cfg.grad_clip)
            elif cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            # the update, its step count and its log row happen together (a Ctrl-C waits), so that a
            # checkpoint written on Ctrl-C names the step its weights are at and the metrics have every step
            with _ctrl_c_held() if across_ranks is None else nullcontext():
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                # loss-free balancing: one bias step per optimizer step, on counts of all micro-batches
                model.update_biases()
                n_since += 1
                done = completed = step + 1

                if done % cfg.log_every == 0 or done == cfg.steps:
                    if cfg.expert_parallel:  # the global batch's loss and load
                        parallel.all_reduce_(loss_sum), parallel.all_reduce_(aux_sum)
                        parallel.all_reduce_(load_LE, mean=False)
                    loss_v = (loss_sum / n_since).item()  # the one host sync of this interval
                    if not math.isfinite(loss_v):
                        raise TrainingDiverged(f"training loss became {loss_v} by step {done}; stopping. "
                                               + _kept(last_good, run_dir))
                    dt = time.perf_counter() - t_log
                    tps = tokens_per_step * n_since / dt
                    maxvio_L = (maxvio_sum_L / n_since).tolist()
                    lr = scheduler.get_last_lr()[0]
                    log.write({"kind": "train", "step": done, "loss": loss_v, "aux_loss": (aux_sum / n_since).item(),
                               "lr": lr, "tokens_per_s": tps, "top_k": k, "maxvio": maxvio_L,
                               "load": load_LE.tolist()})
                    if bar is not None:
                        mv = sum(maxvio_L) / len(maxvio_L) if maxvio_L else 0.0
                        bar.set_postfix_str(f"loss {loss_v:.3f} | {tps:,.0f} tok/s | lr {lr:.2e} | MaxVio {mv:.2f}")
                        bar.update(n_since)
                    loss_sum.zero_(), aux_sum.zero_(), maxvio_sum_L.zero_(), load_LE.zero_()
                    n_since, t_log = 0, time.perf_counter()

            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                ev = run_eval(done)
                if bar is not None:
                    bar.write(f"step {done}: val loss {ev['loss']:.4f}, ppl {ev['ppl']:.2f}, "
                              f"MaxVio_global {_mean(ev['maxvio_global']):.3f}")
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                _check_finite(loss_sum, n_since, done, last_good, run_dir)
                save(done, (torch.get_rng_state(), data_rng.get_state()))
                last_good = done
            if across_ranks is not None and across_ranks.pending():  # every rank stops after this step
                raise KeyboardInterrupt
        step = cfg.steps
    except KeyboardInterrupt:
        # checkpoint the last completed step, with the RNG states from before the interrupted step
        if bar is not None:
            bar.close()
        _check_finite(loss_sum, max(n_since, 1), step, last_good, run_dir)
        if completed == step + 1:  # interrupted after the update (while logging, evaluating or saving)
            step, rng_at_step = completed, (torch.get_rng_state(), data_rng.get_state())
        save(step, rng_at_step)
        if parallel.is_main():  # the other ranks' run_dir is a scratch folder
            print(f"\ninterrupted: checkpoint of step {step} saved in {run_dir / 'checkpoint'}; "
                  f"continue with --resume {run_dir}")
        log.close()
        raise
    finally:
        if across_ranks is not None:
            across_ranks.close()
    if bar is not None:
        bar.close()

    # ---- final evaluation, checkpoint, summary --------------------------------------------------------
    save(cfg.steps, (torch.get_rng_state(), data_rng.get_state()))
    ev = run_eval(cfg.steps)
    log.close()
    train_rows = log.rows("train")
    maxvio_batch = [_mean(r["maxvio"]) for r in train_rows if r["maxvio"]]
    summary = {
        "run_dir": str(run_dir), "steps": cfg.steps, "val_loss": ev["loss"], "val_ppl": ev["ppl"],
        "init_val_loss": init_eval["loss"], "init_val_ppl": init_eval["ppl"],
        "maxvio_global": ev["maxvio_global"], "maxvio_global_mean": _mean(ev["maxvio_global"]),
        "maxvio_batch_mean": _mean(maxvio_batch),
        "dead_experts": int(sum(v == 0 for layer in ev["load"] for v in layer)),
        "tokens_per_s": _mean([r["tokens_per_s"] for r in train_rows[1:]] or [r["tokens_per_s"] for r in train_rows]),
        "num_params": model_cfg.num_params(), "num_active_params": model_cfg.num_active_params(),
        "train_loss": train_rows[-1]["loss"] if train_rows else float("nan"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _check_finite(loss_sum, n, step, last_good, run_dir) -> None:
    """Never overwrite a good checkpoint with a diverged model."""
    value = (loss_sum / max(n, 1)).item()
    if not math.isfinite(value):
        raise TrainingDiverged(f"training loss became {value} by step {step}; stopping without saving. "
                               + _kept(last_good, run_dir))


def _kept(last_good, run_dir) -> str:
    if last_good is None:
        return "No checkpoint had been written yet (lower lr, or set save_every)."
    return f"The last good checkpoint (step {last_good}) is kept in {run_dir / 'checkpoint'}"


# ---- CLI --------------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("--preset", default="tiny", help=f"model preset: {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, a ModelConfig field, or moe.<field> (repeatable)")
    p.add_argument("--out", help="run directory (default runs/<preset>)")
    p.add_argument("--data", metavar="PATH", help="a text file or a folder of text files (default: the stdlib)")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint or run directory")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default cpu; cuda uses bf16 autocast")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--expert-parallel", type=int, metavar="N",
                   help="shard the routed experts over N processes: torchrun --nproc_per_node N -m dsmoe train ...")


def configs_from_args(args) -> tuple[ModelConfig, TrainConfig]:
    flags = (("out", args.out), ("data", getattr(args, "data", None)), ("device", args.device),
             ("steps", args.steps), ("expert_parallel", getattr(args, "expert_parallel", None)))
    extra = [f"{k}={v}" for k, v in flags if v is not None]
    if args.resume:  # the checkpoint's configs, then the command line's overrides
        model_cfg, train_cfg = configs_from_checkpoint(checkpoint.resolve(args.resume))
        model_cfg, train_cfg = apply_sets(model_cfg, train_cfg, args.sets + extra)
        return model_cfg, dataclasses.replace(train_cfg, resume=args.resume)
    return build_configs(args.preset, args.sets + extra)


def run(args) -> int:
    try:
        model_cfg, train_cfg = configs_from_args(args)
        summary = train(model_cfg, train_cfg, progress=not args.quiet)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"dsmoe train: error: {e}")
        return 1
    if not parallel.is_main():  # expert parallel: rank 0 reports
        return 0
    print(f"val loss {summary['val_loss']:.4f}, perplexity {summary['val_ppl']:.2f} "
          f"(untrained {summary['init_val_ppl']:.2f}) | MaxVio_global {summary['maxvio_global_mean']:.3f} "
          f"(per layer {', '.join(f'{v:.3f}' for v in summary['maxvio_global'])}) | "
          f"{summary['tokens_per_s']:,.0f} tok/s\ncheckpoint: {summary['run_dir']}/checkpoint")
    return 0
