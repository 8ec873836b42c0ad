"""Reading the loss back from the device: one host sync per log window, the same numbers on every rank,
and a stop at the first non-finite value with one line saying what is kept and what to change.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist


class NonFiniteLoss(RuntimeError):
    """The loss (or the weights) became NaN or Inf; the last good checkpoint is left as it was."""


class LossWindow:
    """The steps since the last read-back: their losses still on the device, and the lr each step used."""

    def __init__(self, first_step: int, device: torch.device, restored: list[float] = ()) -> None:
        self.first_step, self.t0 = first_step, time.perf_counter()  # the step before the window's first
        self.losses = [torch.tensor(v, device=device) for v in restored]  # read back before a stop: finite
        self.lrs = [math.nan] * len(restored)
        self.restored = len(restored)  # steps done before a stop: not timed from t0, so not in the rate
        self.wait = 0.0  # seconds the host spent waiting for its next batch (read, decode, copy to the device)

    def next_batch(self, batches: Iterator[torch.Tensor]) -> torch.Tensor:
        """The next batch, its wait added to `wait`: a data loader that starves the step shows here."""
        t = time.perf_counter()
        batch = next(batches)
        self.wait += time.perf_counter() - t
        return batch

    def add(self, loss: torch.Tensor, lr: float) -> None:
        self.losses.append(loss)
        self.lrs.append(lr)

    def record(self, losses: list[float], epoch: int, step: int, lr: float, views_per_step: int) -> dict:
        """The window's metrics line: its mean loss (`losses`, read back), the lr now, views/s over its timed
        steps, and the share of its wall time spent waiting for batches."""
        elapsed = time.perf_counter() - self.t0
        timed = len(losses) - self.restored  # a resumed window's first steps ran before the stop, untimed
        return {"kind": "step", "epoch": epoch, "step": step, "loss": sum(losses) / len(losses), "lr": lr,
                "views_per_s": views_per_step * timed / elapsed, "data_wait": self.wait / elapsed}


def advice(precision: str, lr: float, saved_step: int | None, checkpoint: Path) -> str:
    """What a non-finite run leaves behind and what to change; the rest of NonFiniteLoss's one line."""
    fix = ("use train.precision=bf16 (or fp32) instead of fp16, or lower optim.lr" if precision == "fp16"
           else f"lower optim.lr (now {lr:g})")
    if saved_step is None:
        return f"no checkpoint was written. Hint: {fix} and run again"
    return (f"{checkpoint} (step {saved_step}) is kept. Hint: {fix} and start a new run with another "
            "--output-dir (a changed config cannot --resume)")


def read_back(window: LossWindow, world_size: int, why: Callable[[], str]) -> list[float]:
    """The window's losses as floats, averaged over ranks (each rank's loss covers its own rows: their mean
    is the global batch's), so every rank logs, checks and schedules on the same numbers. `why()` gives the
    rest of the error's line, built only when a value is not finite (not once per log window)."""
    if not window.losses:  # the same on every rank: the loop runs in step
        return []
    stacked = torch.stack(window.losses).float()
    if world_size > 1:
        dist.all_reduce(stacked)
        stacked /= world_size
    values = stacked.cpu().tolist()  # the one host sync per log window
    for j, value in enumerate(values):
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss became {value} at step {window.first_step + j + 1} (lr {window.lrs[j]:.4g}); "
                                f"{why()}")
    return values


def check_finite_weights(model: torch.nn.Module, step: int, lr: float, why: Callable[[], str]) -> None:
    """A finite last loss does not prove the last update was finite: check before anything is saved."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteLoss(f"weights became non-finite ({name}) by step {step} (lr {lr:.4g}); {why()}")
