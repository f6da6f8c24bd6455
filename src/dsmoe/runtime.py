"""What a training run needs around its loop: the metrics log and the stop flag."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from types import FrameType


class MetricsLog:
    """RUN/metrics.jsonl, one JSON row per log point or evaluation (and TensorBoard scalars when installed)."""

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

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class StopFlag:
    """Inside `with StopFlag() as stop:`, Ctrl-C (SIGINT) and SIGTERM (what schedulers send) only set
    `stop.requested`; the training loop reads it where it synchronizes anyway (its log points, where the
    flag travels with the loss in one all-reduce, so every rank stops after the same step) and then saves
    a checkpoint. A second signal while the checkpoint is written changes nothing.

    Only handlers still at Python's defaults are replaced (an ignored or custom handler is left alone), and
    only in the main thread, the one that may set them; the previous handlers come back on exit.
    """

    DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, object] = {}

    def _catch(self, signum: int, frame: FrameType | None) -> None:
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
