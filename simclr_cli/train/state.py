"""The run state: counters, the losses of the unfinished epoch, and the checkpoint, one flat dict built and
restored here and nowhere else, so a resumed run goes on as if it had never stopped (weights, optimiser,
schedule, scaler, method state, counters, losses of the open epoch, RNG streams):

    {format, simclr_cli, config, model, method, optimizer, scheduler, scaler, epoch, step, history,
     epoch_losses, rng, world_size, train_images, encoder}

The keys are spelled once, in `artifacts.Checkpoint` (`payload` writes them, its accessors read them).
"encoder" describes the encoder inside "model" (`models.encoder_file.encoder_meta`: what rebuilds it, its
input, its provenance), so an encoder is read out of a checkpoint as out of its own file. What a resume may
change is `train.preflight`'s; a changed train.epochs moves the schedule's end. On another kind of device the
augmentation generator's state does not fit, so only that stream is reseeded (with a notice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from simclr_cli.artifacts import Checkpoint, ClassifierFile, EncoderFile, of_content
from simclr_cli.config import Config, config_to_dict
from simclr_cli.errors import CheckpointError
from simclr_cli.files import safe_load
from simclr_cli.methods import Method
from simclr_cli.rundir import RunDir
from simclr_cli.runtime import DistInfo, capture_rng, restore_rng
from simclr_cli.train.optim import Schedule
from simclr_cli.train.readback import LossWindow


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    history: list[dict] = field(default_factory=list)  # the epoch records
    epoch_losses: list[float] = field(default_factory=list)  # losses read back so far in the unfinished epoch
    saved_step: int | None = None  # step of the state in checkpoint.pt, when this run wrote or read it
    saved_epoch: int | None = None  # its epoch, when it was written at an epoch's end (for keep_last)

    def reopen_window(self, first: int, log_every: int, device: torch.device) -> LossWindow:
        """The log window a stop left open `first` steps into the epoch: the losses it read back before the
        stop go back into it, so the resumed run logs that window and the epoch's mean as an unstopped run."""
        kept = len(self.epoch_losses) - first % log_every
        window = LossWindow(self.step - first % log_every, device, self.epoch_losses[kept:])
        del self.epoch_losses[kept:]
        return window

    def epoch_mean(self) -> float:
        return sum(self.epoch_losses) / max(len(self.epoch_losses), 1)

    @property
    def unsaved(self) -> bool:
        """Anything trained since the last checkpoint (or since the start)?"""
        return self.step != (self.saved_step or 0)

    def mark_saved(self, steps_per_epoch: int) -> None:
        self.saved_step = self.step
        self.saved_epoch = self.epoch if self.step == self.epoch * steps_per_epoch else None


@dataclass
class Parts:
    """What learns and what steers it: a checkpoint saves them, a resume restores them."""

    model: torch.nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: Schedule
    scaler: torch.amp.GradScaler | None
    generator: torch.Generator


def rank_streams(ranks: DistInfo, generator: torch.Generator) -> list[torch.Tensor] | None:
    """Every rank's augmentation generator state, on every rank (collective: each rank draws views of its own,
    so a resume mid-epoch needs each one's); None in one process."""
    if not ranks.enabled:
        return None
    states: list = [None] * ranks.world_size
    dist.all_gather_object(states, generator.get_state(), group=ranks.control)
    return states


def checkpoint(cfg: Config, state: RunState, parts: Parts, *, world_size: int, train_images: int,
               encoder: dict, streams: list[torch.Tensor] | None = None) -> dict:
    """The resumable state of a run (see the module's docstring); `encoder`: `encoder_meta` of the model's;
    `streams`: every rank's augmentation stream (`rank_streams`), kept beside rank 0's."""
    rng = capture_rng(parts.generator)
    if streams is not None:
        rng["augment_ranks"] = streams
    return Checkpoint.payload(
        config=config_to_dict(cfg),
        model={k: v.detach().cpu() for k, v in parts.model.state_dict().items()},
        method=parts.method.state_dict(),  # target network, queue and pointer
        optimizer=parts.optimizer.state_dict(),
        scheduler=parts.scheduler.state_dict(),
        scaler=parts.scaler.state_dict() if parts.scaler is not None else None,
        epoch=state.epoch,  # epochs completed
        step=state.step,  # optimiser steps completed
        history=state.history,
        epoch_losses=list(state.epoch_losses),
        rng=rng,
        world_size=world_size,
        train_images=train_images,
        encoder=encoder,
    )


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint.pt that `simclr pretrain` wrote, read with weights_only, as the dict it holds (read its
    keys through `artifacts.Checkpoint`); anything else is one line."""
    artifact = of_content(safe_load(path), path)
    if not isinstance(artifact, Checkpoint):
        plain_encoder = isinstance(artifact, EncoderFile) and not isinstance(artifact, ClassifierFile)
        kind = "an encoder file" if plain_encoder else "not a checkpoint"
        raise CheckpointError(f"{path} is {kind}: give the checkpoint.pt that `simclr pretrain` wrote")
    return artifact.data


def restore(ckpt: dict, cfg: Config, parts: Parts, *, ranks: DistInfo, rundir: RunDir, train_images: int,
            steps_per_epoch: int, emit: Callable[[str, dict], None]) -> RunState:
    """Load `ckpt` into freshly built parts and return the run state it holds; a checkpoint that does not fit
    this run is one CheckpointError line."""
    try:
        state = _restore(ckpt, cfg, parts, train_images, steps_per_epoch, emit)
        _restore_streams(ckpt, cfg, parts.generator, ranks, emit)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{rundir.checkpoint} does not fit this run ({reason}): resume it with the "
                              "config it was written with, or start a new run with another --output-dir") from None
    if ranks.is_main:
        saved = Checkpoint(rundir.checkpoint, ckpt)
        rundir.truncate_metrics(saved.step)
        rundir.append({"kind": "resume", "epoch": saved.epoch, "step": saved.step})  # the report marks it
    return state


def check_same_step(ranks: DistInfo, step: int | None, path: Path) -> None:
    """Every rank restored the same step (None: a new run), or every rank refuses with the same line: a node
    that read another checkpoint.pt (an older copy its shared file system still served) would train a replica
    of its own. Collective (one small message per rank); nothing to check in one process."""
    if not ranks.enabled:
        return
    steps: list = [None] * ranks.world_size
    dist.all_gather_object(steps, step, group=ranks.control)
    if len(set(steps)) > 1:
        each = ", ".join(f"rank {r} step {s}" for r, s in enumerate(steps))
        raise CheckpointError(f"the ranks read different checkpoints from {path} ({each}): every node must see the "
                              "checkpoint.pt rank 0 sees; on a shared file system that caches what it read (NFS), "
                              "start again once every node sees the same file")


def _restore(data: dict, cfg: Config, parts: Parts, train_images: int, steps_per_epoch: int,
             emit: Callable[[str, dict], None]) -> RunState:
    ckpt = Checkpoint(Path(), data)
    saved_images = ckpt.train_images(train_images)
    if saved_images != train_images:
        raise ValueError(f"the training set now has {train_images} images, the checkpoint's had {saved_images}")
    parts.model.load_state_dict(ckpt.model)
    parts.method.load_state_dict(ckpt.method)
    parts.optimizer.load_state_dict(ckpt.optimizer)
    parts.scheduler.load_state_dict(ckpt.scheduler)
    total = cfg.train.epochs * steps_per_epoch
    old_total = parts.scheduler.set_total_steps(total)
    if old_total is not None and cfg.optim.schedule == "cosine":
        emit("notice", {"message": f"the cosine schedule now ends at step {total} instead of {old_total}"})
    if parts.scaler is not None and ckpt.scaler:
        parts.scaler.load_state_dict(ckpt.scaler)
    state = RunState(ckpt.epoch, ckpt.step, ckpt.history, ckpt.epoch_losses)
    state.mark_saved(steps_per_epoch)
    if ckpt.epoch >= cfg.train.epochs:
        emit("notice", {"message": f"the checkpoint has already completed {ckpt.epoch} epochs; raise "
                                   "train.epochs to train further"})
    return state


def _restore_streams(data: dict, cfg: Config, generator: torch.Generator, ranks: DistInfo,
                     emit: Callable[[str, dict], None]) -> None:
    ckpt = Checkpoint(Path(), data)
    # Each rank continues its own augmentation stream in a run of the same world size (rank 0's is "augment",
    # every rank's "augment_ranks"; a checkpoint from before those were kept has rank 0's alone). Other world
    # sizes take a fresh stream on each rank; each epoch start reseeds them all anyway.
    saved, same_stream = ckpt.rng, ckpt.world_size == ranks.world_size
    if same_stream and "augment_ranks" in saved:
        saved = {**saved, "augment": saved["augment_ranks"][ranks.rank]}
    elif not ranks.is_main:
        same_stream = False
    if not restore_rng(saved, generator if same_stream else None):
        same_stream = False  # saved on another kind of device: its generator state does not fit this one
        emit("notice", {"message": f"resumed on {generator.device.type} from a checkpoint saved on "
                                   f"{ckpt.rng.get('augment_device', 'another device')}: weights, optimiser, "
                                   "schedule and data order continue exactly; the augmentation stream is "
                                   "reseeded, so views differ from an unbroken run"})
    if not same_stream:
        rank_seed = 104_729 * (ranks.rank + 1)
        generator.manual_seed(cfg.train.seed * 1_000_003 + ckpt.step * 7919 + rank_seed)
