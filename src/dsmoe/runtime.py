"""What a training run needs around its loop: the metrics log, the run directory's lock, the stop flag, a
thread count that fits a busy machine, and a C allocator that keeps freed memory."""

from __future__ import annotations

import ctypes
import fcntl
import importlib
import json
import math
import os
import platform
import signal
import threading
from pathlib import Path
from types import FrameType


def optional_import(name: str, needed_for: str):
    """A module of the `cli` extra (matplotlib, tokenizers), or an ImportError that says how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(f"{needed_for} needs the {name.split('.')[0]} package, which dsmoe's `cli` extra installs: "
                          "pip install 'dsmoe[cli]'") from None


def threads_for_load(threads: int, cpus: int | None = None, load: float | None = None) -> int:
    """Torch threads that fit the cores other processes leave free (at most `threads`, at least 1), from the
    1-minute load average. On a 2-core machine beside one busy process, torch's 2 threads made a training
    step about 100x slower (every parallel region of a small op waits a scheduler slice for the thread that
    shares its core), while 1 thread kept its full speed."""
    cpus = cpus or os.cpu_count() or 1
    load = os.getloadavg()[0] if load is None else load
    return max(1, min(threads, cpus - math.floor(load + 0.5)))


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
freed_memory_kept = False  # whether keep_freed_memory() changed this process's allocator (benchmarks report it)


def chooses_allocator(env_var: str) -> bool:
    """Whether an environment variable is the user's own malloc choice, which keep_freed_memory leaves alone."""
    return env_var.startswith("MALLOC_") or env_var in ("GLIBC_TUNABLES", "LD_PRELOAD")


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it to the system: tensors up to
    `mmap_threshold` bytes come from the heap, and up to `trim_threshold` bytes of free heap stay mapped.

    PyTorch has no caching allocator on CPU. By default glibc gives blocks of a few MB back to the kernel
    when they are freed (its trim threshold starts at 2x the largest freed block), so every training step
    faults the pages of its activations and gradients in again: 30% of an MoE layer's backward at the tiny
    preset's shape. The limits must be set together (setting one fixes the other at its small default). Older
    glibc refuses an mmap threshold above 32 MiB on 64-bit machines; then 32 MiB it is.
    A process-wide setting, so the `dsmoe` command calls this, never the library. Skipped, returning False,
    off glibc or where the environment already chooses (MALLOC_* or GLIBC_TUNABLES, or a preloaded allocator).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(map(chooses_allocator, os.environ)):
        return False
    global freed_memory_kept
    libc = ctypes.CDLL(None)
    mmap_set = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) or libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    freed_memory_kept = bool(mmap_set and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return freed_memory_kept


class MetricsLog:
    """RUN/metrics.jsonl, one JSON row per log point or evaluation (and TensorBoard scalars when installed)."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():  # drop rows written after the checkpoint
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= resume_step]
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

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _step(line: str) -> float:
    """A metrics row's step; infinity for a line that is not a whole row (torn by a crash or a full disk),
    which a resume drops like the rows written after its checkpoint."""
    try:
        return float(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return math.inf


class RunLock:
    """An exclusive lock on a directory (DIR/.lock, flock): two trainings never write one run, two `prepare`s
    never one corpus. `wait`: block until the other one is done instead of refusing."""

    def __init__(self, run_dir: Path, what: str = "training", wait: bool = False):
        self.file = (run_dir / ".lock").open("a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            self.file.close()
            raise ValueError(f"another {what} is writing to {run_dir} (it holds {run_dir / '.lock'}); "
                             "wait for it or choose another --out") from None

    def release(self) -> None:
        self.file.close()  # closing the file drops the lock


class StopFlag:
    """Inside `with StopFlag() as stop:`, Ctrl-C (SIGINT) and SIGTERM (what schedulers send) only set
    `stop.requested`; the training loop reads it where it synchronizes anyway (its log points, where the
    flag travels with the loss in one all-reduce, so every rank stops after the same step) and then saves
    a checkpoint. A second signal puts the previous handlers back, so that a third quits at once (Ctrl-C:
    KeyboardInterrupt) without a checkpoint.

    Only handlers still at Python's defaults are replaced (an ignored or custom handler is left alone), and
    only in the main thread, the one that may set them; the previous handlers come back on exit.
    """

    DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, object] = {}

    def _catch(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # a second signal: the way out without a checkpoint is a third
            print("\nstopping at the next log point with a checkpoint; signal once more to quit without one",
                  flush=True)
            self.__exit__()
        self.requested = True

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig, default in self.DEFAULTS.items():
                if signal.getsignal(sig) is default:
                    self.previous[sig] = signal.signal(sig, self._catch)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self.previous.clear()
