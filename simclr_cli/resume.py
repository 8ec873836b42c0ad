"""Continuing a run: a checkpoint's state into a freshly built Trainer, so the run goes on as if it had
never stopped (weights, optimiser, schedule, scaler, counters, losses of the open epoch, RNG streams).

What a resume may change (`rundir.RESUMABLE_KEYS`) is stated as a notice; a changed train.epochs moves the
schedule's end. On another kind of device the augmentation generator's state does not fit, so only that
stream is reseeded (with a notice); everything else continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from simclr_cli.errors import CheckpointError
from simclr_cli.rundir import check_resume_config
from simclr_cli.runtime import restore_rng

if TYPE_CHECKING:
    from simclr_cli.train import Trainer


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    history: list[dict] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)  # losses read back so far in the unfinished epoch


def restore(trainer: Trainer, ckpt: dict) -> None:
    """Load `ckpt` into `trainer`; a checkpoint that does not fit this run is one CheckpointError line."""
    try:
        _load_state(trainer, ckpt)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{trainer.rundir.checkpoint} does not fit this run ({reason}): resume it with the "
                              "config it was written with, or start a new run with another --output-dir") from None


def _load_state(t: Trainer, ckpt: dict) -> None:
    for change in check_resume_config(ckpt["config"], t.cfg):
        t.emit("notice", {"message": f"resume changes {change}"})
    saved_images = ckpt.get("train_images", len(t.data))
    if saved_images != len(t.data):
        raise ValueError(f"the training set now has {len(t.data)} images, the checkpoint's had {saved_images}")
    t.model.load_state_dict(ckpt["model"])
    t.method.load_state_dict(ckpt.get("method", {}))  # target network, queue and pointer
    t.optimizer.load_state_dict(ckpt["optimizer"])
    t.scheduler.load_state_dict(ckpt["scheduler"])
    total = t.cfg.train.epochs * t.steps_per_epoch
    old_total = t.scheduler.set_total_steps(total)
    if old_total is not None and t.cfg.optim.schedule == "cosine":
        t.emit("notice", {"message": f"the cosine schedule now ends at step {total} instead of {old_total}"})
    if t.scaler is not None and ckpt.get("scaler"):
        t.scaler.load_state_dict(ckpt["scaler"])
    t.state = RunState(ckpt["epoch"], ckpt["step"], ckpt.get("history", []), ckpt.get("epoch_losses", []))
    t.saved_step = ckpt["step"]
    t.saved_epoch = ckpt["epoch"] if ckpt["step"] == ckpt["epoch"] * t.steps_per_epoch else None
    if ckpt["epoch"] >= t.cfg.train.epochs:
        t.emit("notice", {"message": f"the checkpoint has already completed {ckpt['epoch']} epochs; raise "
                                     "train.epochs to train further"})
    _restore_streams(t, ckpt)
    if t.dist.is_main:
        t.rundir.truncate_metrics(ckpt["step"])
        t.rundir.append({"kind": "resume", "epoch": ckpt["epoch"], "step": ckpt["step"]})  # the report marks it


def _restore_streams(t: Trainer, ckpt: dict) -> None:
    # The saved augmentation stream is rank 0's: it fits rank 0 of the same world size only. Other ranks
    # (and other world sizes) take a fresh stream of their own; each epoch start reseeds them all anyway.
    same_stream = ckpt.get("world_size", 1) == t.dist.world_size and t.dist.is_main
    if not restore_rng(ckpt["rng"], t.generator if same_stream else None):
        same_stream = False  # saved on another kind of device: its generator state does not fit this one
        t.emit("notice", {"message": f"resumed on {t.device.type} from a checkpoint saved on "
                                     f"{ckpt['rng'].get('augment_device', 'another device')}: weights, optimiser, "
                                     "schedule and data order continue exactly; the augmentation stream is "
                                     "reseeded, so views differ from an unbroken run"})
    if not same_stream:
        rank_seed = 104_729 * (t.dist.rank + 1)
        t.generator.manual_seed(t.cfg.train.seed * 1_000_003 + ckpt["step"] * 7919 + rank_seed)
