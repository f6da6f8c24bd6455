"""Training tokens/s of an MoE preset against its dense twin with the same active parameters.

Both models train side by side in one process: a full optimizer step each (forward, cross-entropy +
auxiliary loss, backward, AdamW, and for the MoE the loss-free bias update), on the same random token
batches, built as `dsmoe train` builds them (`dsmoe.train.as_trained`). Timed chunks of `chunk` steps
alternate between the two models (the order flips every round) so that load from other processes hits both
alike; tokens/s is the median over chunks. The dense twin
(`ModelConfig.dense_twin()`, presets "<name>-dense") makes every block a SwiGLU as wide as the MoE's
active experts, so a token costs both models the same matmul FLOPs except the router: the ratio of
tokens/s is the price of routing, dispatch and combine, and the params ratio what it buys.

With `compile`, both models also train under torch.compile (inductor), interleaved with the eager ones:
four trainees side by side. Compile warm-up is the first step of each compiled model in a fresh process
with an empty inductor cache (in one process the second model would reuse the first's kernels).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from dsmoe.config import ModelConfig
from dsmoe.model import MoETransformer
from dsmoe.presets import PRESETS, build_configs, preset
from dsmoe.train import as_trained


@dataclass
class Result:
    name: str
    params: int
    active_params: int
    tokens_per_s: float          # median over timed chunks
    tokens_per_s_spread: tuple   # (min, max) over timed chunks
    step_ms: float               # median milliseconds per optimizer step
    final_loss: float
    compiled: bool = False
    warmup_s: float = 0.0        # seconds of the untimed warm-up steps (compilation included, when compiled)


class Trainee:
    """A model, its optimizer and one timed training step."""

    def __init__(self, name: str, cfg: ModelConfig, device: torch.device, seed: int, compiled: bool = False):
        torch.manual_seed(seed)
        self.name, self.cfg, self.device, self.compiled = name, cfg, device, compiled
        self.model = MoETransformer(cfg).to(device).train()
        if compiled:
            self.model.compile()  # in place: parameter names and the optimizer are the eager model's
        # fused AdamW: one pass over each tensor for the whole update. The foreach version costs ~8x longer on
        # CPU, and it scales with total parameters (~5x the dense twin's), so it would time the optimizer
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
        self.last_loss = torch.tensor(float("nan"))

    def step(self, x_BS, y_BS) -> None:
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        with autocast:
            _, loss = self.model(x_BS, y_BS)
            loss = loss + self.model.aux_loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.update_biases()  # part of an MoE training step; a no-op for the dense twin
        self.last_loss = loss

    def timed(self, batches) -> float:
        """Seconds for one chunk of steps (the device synchronized at both ends)."""
        _sync(self.device)
        t = time.perf_counter()
        for x, y in batches:
            self.step(x, y)
        _sync(self.device)
        return time.perf_counter() - t


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batches(n, batch_size, seq_len, vocab, device, generator):
    """n (input, target) pairs of uniform random tokens: throughput does not depend on the text."""
    out = []
    for _ in range(n):
        seq = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=generator)
        out.append((seq[:, :-1].to(device), seq[:, 1:].to(device)))
    return out


def default_shape(name: str) -> tuple[int, int]:
    """(batch_size, seq_len) that `dsmoe train --preset name` trains with."""
    model_cfg, train_cfg = build_configs(name)
    return train_cfg.batch_size, train_cfg.seq_len or model_cfg.max_seq_len


def bench_train(name: str, steps: int = 40, chunk: int = 4, warmup: int = 3, batch_size: int | None = None,
                seq_len: int | None = None, device="cpu", seed: int = 0, compile: bool = False) -> list[Result]:
    """Results for the MoE preset `name` and its dense twin (eager, then compiled when `compile`), interleaved
    in chunks of `chunk` steps.

    batch_size and seq_len default to the preset's training shape.
    """
    device = torch.device(device)
    cfg = as_trained(preset(name))
    default_batch, default_seq = default_shape(name)
    batch_size = batch_size or default_batch
    if cfg.moe is None:
        raise ValueError(f"preset {name!r} is already dense; give an MoE preset "
                         f"({', '.join(n for n, c in PRESETS.items() if c.model.moe is not None)})")
    seq_len = seq_len or default_seq
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the preset's max_seq_len={cfg.max_seq_len}")
    if steps < chunk or warmup < 0:
        raise ValueError(f"--steps must be >= the chunk of {chunk} steps and warmup >= 0")
    models = [Trainee(n, c, device, seed, compiled) for compiled in ((False, True) if compile else (False,))
              for n, c in ((name, cfg), (f"{name}-dense", cfg.dense_twin()))]
    gen = torch.Generator().manual_seed(seed)
    batches = random_batches(chunk, batch_size, seq_len, cfg.vocab_size, device, gen)
    # warm-up: allocator, first-call overheads, and compilation, whose cold cost is measured apart (below)
    warmup_s = {id(m): m.timed(batches[:1] * max(warmup, 1 if m.compiled else 0)) for m in models}
    for m in models:
        if m.compiled:  # the second compiled model reuses the first's kernels here: its cold start, apart
            warmup_s[id(m)] = cold_compile_seconds(m.cfg, batches[0], device, seed)
    times: dict[int, list[float]] = {id(m): [] for m in models}
    for r in range(steps // chunk):
        for m in (models if r % 2 == 0 else models[::-1]):
            times[id(m)].append(m.timed(batches))
    tokens = chunk * batch_size * seq_len
    return [Result(m.name, m.cfg.num_params(), m.cfg.num_active_params(),
                   tokens / statistics.median(times[id(m)]),
                   (tokens / max(times[id(m)]), tokens / min(times[id(m)])),
                   1e3 * statistics.median(times[id(m)]) / chunk, m.last_loss.item(), m.compiled, warmup_s[id(m)])
            for m in models]


def cold_compile_seconds(cfg: ModelConfig, batch, device: torch.device, seed: int) -> float:
    """Seconds of a compiled model's first training step in a fresh process with an empty inductor cache:
    tracing and code generation from scratch, nothing reused from this process or earlier runs."""
    with tempfile.TemporaryDirectory(prefix="dsmoe-inductor-") as cache:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            job = pool.submit(_first_step_seconds, cfg, batch, str(device), seed, torch.get_num_threads(), cache)
            return job.result()


def _first_step_seconds(cfg: ModelConfig, batch, device: str, seed: int, threads: int, cache: str) -> float:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read when inductor first compiles, after this
    torch.set_num_threads(threads)
    return Trainee(cfg.__class__.__name__, cfg, torch.device(device), seed, compiled=True).timed([batch])


def loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:  # not on every platform
        return "n/a"


def format_table(results: list[Result]) -> str:
    lines = [f"{'model':<14} {'mode':<8} {'params':>10} {'active':>10} {'tokens/s':>10} {'(min-max)':>17} "
             f"{'ms/step':>8} {'warm-up s':>9}"]
    for r in results:
        lo, hi = r.tokens_per_s_spread
        lines.append(f"{r.name:<14} {'compiled' if r.compiled else 'eager':<8} {r.params:>10,} {r.active_params:>10,} "
                     f"{r.tokens_per_s:>10,.0f} {f'{lo:,.0f}-{hi:,.0f}':>17} {r.step_ms:>8.1f} {r.warmup_s:>9.1f}")
    moe, dense = results[:2]
    lines.append(f"\nMoE / dense: tokens/s {moe.tokens_per_s / dense.tokens_per_s:.3f}x eager"
                 + (f", {results[2].tokens_per_s / results[3].tokens_per_s:.3f}x compiled" if len(results) == 4 else "")
                 + f"; params {moe.params / dense.params:.2f}x, active params "
                 f"{moe.active_params / dense.active_params:.3f}x")
    if len(results) == 4:
        lines.append(f"compiled / eager: tokens/s {results[2].tokens_per_s / moe.tokens_per_s:.3f}x MoE, "
                     f"{results[3].tokens_per_s / dense.tokens_per_s:.3f}x dense; compile warm-up "
                     f"{results[2].warmup_s:.0f} s MoE, {results[3].warmup_s:.0f} s dense")
    return "\n".join(lines)
