"""Progress reporting: TensorBoard scalars (rank 0) + one console line per log step.

The trainer measures host wall time only; tensors are turned into floats on logging steps
(the only host syncs of the loop), so nothing here runs on the other steps.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import psutil
import torch

__all__ = ["TAGS", "StepClock", "MetricsWriter", "memory_metrics", "console", "collapse_warning", "COLLAPSE_SPREAD"]

# Every scalar tag a pretraining run writes (the TensorBoard test checks all of them).
TAGS = (
    "loss/total",
    "loss/mrr",
    "loss/mcc",
    "mcc/top1",
    "mcc/ndcg10",
    "repr/spread",
    "optim/lr",
    "optim/grad_norm",
    "throughput/windows_per_s",
    "throughput/windows_per_s_per_worker",
    "throughput/tokens_per_s",
    "time/step_ms",
    "time/data_wait_fraction",
)


# ``repr/spread`` below this = the encoder gives (almost) the same representation to every window.
# Healthy runs measured 0.7-2.1 (native and BERT encoders); a collapsed one 1e-5 -> 1e-7 (float32 rounding).
COLLAPSE_SPREAD = 1e-3


def collapse_warning(step: int, spread: float, mcc_top1: float, vocab_size: int) -> Optional[str]:
    """The console warning for a collapsed encoder (``repr/spread < COLLAPSE_SPREAD``), else None."""
    if not (spread < COLLAPSE_SPREAD):  # NaN spread: not a collapse verdict
        return None
    chance = 1.0 / vocab_size
    mcc = (f"MCC top-1 {mcc_top1:.3f} is at chance ({chance:.3f}), so nothing opposes the collapse"
           if mcc_top1 < 3 * chance else f"MCC top-1 {mcc_top1:.3f}")
    return (f"warning: step {step}: the encoder has collapsed (repr/spread {spread:.1e} < {COLLAPSE_SPREAD:g}: "
            f"every window gets almost the same representation; {mcc}). Probes of it will be poor; "
            "stop the run and change the encoder init, lr or objective (docs/RESULTS.md, MiniLM)")


def console(line: str) -> None:
    """One line to stdout (not ``print``: Ray Train's print patch would show it twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def memory_metrics(device: torch.device) -> dict[str, float]:
    """``memory/max_allocated_mb`` on GPU, else the process's ``memory/rss_mb``."""
    if device.type == "cuda":
        return {"memory/max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"memory/rss_mb": psutil.Process(os.getpid()).memory_info().rss / 2**20}


class StepClock:
    """Host-side timing between log steps: total wall time and time spent waiting for data."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._t0 = time.perf_counter()
        self._data_s = 0.0
        self._steps = 0
        self._windows = 0

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (e.g. a linear probe) out of the current window's wall time."""
        self._t0 += seconds

    def data_wait(self, seconds: float) -> None:
        self._data_s += seconds

    def step_done(self, windows: int) -> None:
        self._steps += 1
        self._windows += windows

    def window(self, world_size: int, tokens_per_window: int) -> dict[str, float]:
        """Throughput/time scalars since the last reset (``windows`` counted on this rank)."""
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        per_worker = self._windows / elapsed
        out = {
            "throughput/windows_per_s": per_worker * world_size,
            "throughput/windows_per_s_per_worker": per_worker,
            "throughput/tokens_per_s": per_worker * world_size * tokens_per_window,
            "time/step_ms": 1000.0 * elapsed / max(self._steps, 1),
            "time/data_wait_fraction": self._data_s / elapsed,
        }
        return out


class MetricsWriter:
    """Writes scalars to TensorBoard under ``log_dir`` and prints console lines (rank 0 only)."""

    def __init__(
        self,
        log_dir: Optional[str | Path],
        *,
        total_steps: int,
        enabled: bool = True,
        console: bool = True,
        hparams: Optional[dict[str, Any]] = None,
    ) -> None:
        self.enabled = enabled
        self.console = console and enabled
        self.total_steps = total_steps
        self._writer = None
        self._t_start = time.perf_counter()
        self._start_step: Optional[int] = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(log_dir))
            if hparams is not None:
                text = "```\n" + json.dumps(hparams, indent=2, default=str) + "\n```"
                self._writer.add_text("hparams", text, 0)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._start_step is None:  # the ETA averages from here on (start-up excluded)
            self._start_step = step
            self._t_start = time.perf_counter()
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, float(value), step)
            self._writer.flush()
        if self.console:
            console(self.format_line(step, scalars))

    def log_eval(self, step: int, scalars: dict[str, float]) -> None:
        """Evaluation scalars (e.g. ``eval/linear_val_acc``): TensorBoard + one console line."""
        if not self.enabled:
            return
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, float(value), step)
            self._writer.flush()
        if self.console:
            console(f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}  "
                    + "  ".join(f"{tag} {value:.4f}" for tag, value in scalars.items()))

    def eta_seconds(self, step: int, s: dict[str, float]) -> float:
        """Seconds left: the mean wall time per step since the first logged step (checkpoints and
        probes included) times the steps left; on the first log line, the window's ``time/step_ms``."""
        left = self.total_steps - step
        done = step - self._start_step if self._start_step is not None else 0
        if done > 0:
            return (time.perf_counter() - self._t_start) / done * left
        return s.get("time/step_ms", math.nan) / 1e3 * left

    def format_line(self, step: int, s: dict[str, float]) -> str:
        eta = self.eta_seconds(step, s)
        width = len(str(self.total_steps))
        return (
            f"step {step:>{width}}/{self.total_steps}"
            f"  loss {s.get('loss/total', math.nan):.4f}"
            f" (mrr {s.get('loss/mrr', math.nan):.4f} mcc {s.get('loss/mcc', math.nan):.4f})"
            f"  top1 {s.get('mcc/top1', math.nan):.3f}"
            f"  lr {s.get('optim/lr', math.nan):.2e}"
            f"  {s.get('throughput/windows_per_s', math.nan):,.0f} win/s"
            f"  data {100 * s.get('time/data_wait_fraction', math.nan):.1f}%"
            f"  eta {_fmt_seconds(eta)}"
        )

    def summary(self, text: str) -> None:
        if self.console:
            console(text)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
