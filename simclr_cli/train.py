"""The pretraining loop: data on the device, batched views, NT-Xent, checkpoints, exact resume, interruption.

`pretrain(cfg, resume=..., callback=...)` runs under the CLI, a test or a notebook alike; it reports
through `callback(event, data)` and never prints. Events: start, notice, log, epoch, eval, checkpoint, end.
The loss is read back to the host every `train.log_every` steps, not every step, so the device never
waits on the host in between.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from simclr_cli.augment import Augmenter
from simclr_cli.checkpoint import (CheckpointError, atomic_save, atomic_write_text, checkpoint_payload, encoder_payload,
                                   load_checkpoint, restore_rng)
from simclr_cli.config import Config, ConfigError, config_to_dict, dump_config
from simclr_cli.data import DatasetError, ImageSet, load_dataset, normalization_for
from simclr_cli.evaluate import extract_features, knn_accuracy
from simclr_cli.interrupt import StopFlag, StopRequested, stop_guard
from simclr_cli.loss import nt_xent
from simclr_cli.model import build_model
from simclr_cli.optim import build_optimizer, build_scheduler
from simclr_cli.runtime import (DistInfo, RuntimeSetupError, autocast, describe_device, init_distributed,
                               resolve_precision, shutdown_distributed)

Callback = Callable[[str, dict], None]

# Keys a resumed run may change; anything else would make "resume" a different run.
RESUMABLE_KEYS = {"train.epochs", "train.log_every", "train.checkpoint_every", "train.keep_last",
                  "train.eval_every", "train.output_dir", "train.device", "data.root", "data.num_workers",
                  "data.download"}


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left as it was."""


class RankAgreedStop:
    """The stop flag of a distributed run, agreed by all ranks at each loss read-back.

    A signal reaches each rank at a slightly different step; if one rank acted on its own flag it would
    leave the others waiting in a collective it never joins. So each read-back also all-reduces (max) the
    signal number, and every rank stops at the same step: at most `train.log_every` steps after the signal.
    """

    def __init__(self, local, device: torch.device):
        self.local, self.device, self.signal_name = local, device, None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def sync(self) -> None:
        """Collective: every rank calls it at the same step."""
        local = signal.Signals[self.local.signal_name].value if self.local.requested else 0
        signum = torch.tensor([local], device=self.device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        if signum.item():
            self.signal_name = signal.Signals(int(signum.item())).name


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    history: list[dict] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)  # losses read back so far in the unfinished epoch


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume_config(saved: dict, cfg: Config) -> list[str]:
    """Changed keys between the checkpoint's config and this run's; refuse any that are not safe."""
    old, new = _flatten(saved), _flatten(config_to_dict(cfg))
    changed = sorted(k for k in new if old.get(k) != new[k])
    unsafe = [k for k in changed if k not in RESUMABLE_KEYS]
    if unsafe:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in unsafe)
        raise ConfigError(f"resume refused, the config changed ({diffs}); only {', '.join(sorted(RESUMABLE_KEYS))} "
                          "may change on resume: start a new run with another --output-dir instead")
    return [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed]


def check_output_dir(path: Path) -> None:
    """Refuse an output directory that cannot be written, without creating it: a run that fails on its data
    or model afterwards leaves no empty run directory behind (`run()` creates it)."""
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ConfigError(f"output directory {path}: {existing} is a file, not a folder: choose another --output-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {path} is not writable (no write permission on {existing}): choose "
                          "another --output-dir")


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Delete temporary files a killed run left behind (`kill -9` mid-write); they are never read as checkpoints."""
    stale = [p for pattern in (".checkpoint*.pt.*.tmp", ".encoder.pth.*.tmp", ".config.yaml.*.tmp",
                               ".metrics.jsonl.*.tmp") for p in path.glob(pattern)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_world(cfg: Config, world_size: int, device: torch.device) -> None:
    """Refuse what cannot run on `world_size` processes; `simclr pretrain --nproc` asks before it starts any."""
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must divide evenly over "
                          f"{world_size} processes: pick a multiple of {world_size}")
    if cfg.model.sync_bn and world_size > 1 and device.type != "cuda":
        # torch's SyncBatchNorm raises on CPU tensors ("expected input tensor to be on GPU"): refuse up front.
        raise RuntimeSetupError(f"model.sync_bn needs CUDA GPUs; SyncBatchNorm has no {device.type} path: "
                                "set model.sync_bn=false (each rank then normalises over its own views)")


def load_train_set(cfg: Config, dist_info: DistInfo) -> ImageSet:
    d = cfg.data
    # Local rank 0 loads (and downloads) first, so ranks never write the same archive at once.
    if dist_info.enabled and dist_info.local_rank != 0:
        dist.barrier()
    try:
        data = load_dataset(d.dataset, "train", d.root, download=d.download, image_size=d.image_size,
                            num_workers=d.num_workers, synthetic_size=d.synthetic_size, seed=cfg.train.seed)
    finally:  # released on failure too: the others then fail with the same one line, not a broken-pipe traceback
        if dist_info.enabled and dist_info.local_rank == 0:
            dist.barrier()
    if d.size_dataset_train:
        data = data.subset(d.size_dataset_train, seed=cfg.train.seed)
    if len(data) < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is larger than the {len(data)} training images: "
                          "lower train.batch_size or use more data")
    return data


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The same permutation on every rank: the global batch is cut from it, then split across ranks."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class Trainer:
    """Holds one run's objects; `run()` trains from the current state to `train.epochs`."""

    def __init__(self, cfg: Config, callback: Callback | None = None):
        self.cfg, self.emit = cfg, callback or (lambda event, data: None)
        self.dist, self.device = init_distributed(cfg.train.device)
        check_world(cfg, self.dist.world_size, self.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.out = Path(cfg.train.output_dir)
        if self.dist.is_main:
            check_output_dir(self.out)
            remove_stale_temp_files(self.out)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.data = load_train_set(cfg, self.dist).to(self.device)
        self.mean, self.std = normalization_for(cfg.data.dataset)
        a = cfg.augment
        # Views may be smaller than the images (fewer pixels per step); the encoder is still probed and
        # embeds at data.image_size, which the average pool allows.
        self.augment = Augmenter(a.preset, a.view_size or cfg.data.image_size, self.mean, self.std,
                                 a.crop_scale_min, a.jitter_strength)
        self.generator = torch.Generator(device=self.device)
        self.model = build_model(cfg.model).to(self.device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.local_batch = cfg.train.batch_size // self.dist.world_size
        self.steps_per_epoch = len(self.data) // cfg.train.batch_size
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o.name, o.lr, o.weight_decay, o.momentum, o.nesterov, tuple(o.betas))
        self.scheduler = build_scheduler(self.optimizer, o.schedule, cfg.train.epochs * self.steps_per_epoch,
                                         round(o.warmup_epochs * self.steps_per_epoch), o.min_lr,
                                         o.plateau_factor, o.plateau_patience)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.net = self._wrap(self.model)
        self.state = RunState()
        self.saved_step: int | None = None  # step of the state in checkpoint.pt, when this run wrote or read it
        self.saved_epoch: int | None = None  # its epoch, when it was written at an epoch's end (for keep_last)
        self.agreed_stop: RankAgreedStop | None = None
        self.monitor_set: ImageSet | None = None  # labelled test split for the kNN monitor, loaded on first use
        self.last_knn: float | None = None  # the monitor's latest kNN top-1

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.dist.enabled:
            if self.cfg.model.sync_bn:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.train.compile:
            model = torch.compile(model)
        return model

    def resume(self, ckpt: dict | Path) -> None:
        """Continue from a checkpoint (a loaded dict or its path); refuses files that do not fit this run."""
        path = self.out / "checkpoint.pt"
        if not isinstance(ckpt, dict):
            path, ckpt = Path(ckpt), load_checkpoint(ckpt)
        try:
            self._load_state(ckpt)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{path} does not fit this run ({reason}): resume it with the config it was "
                                  "written with, or start a new run with another --output-dir") from None

    def _load_state(self, ckpt: dict) -> None:
        for change in check_resume_config(ckpt["config"], self.cfg):
            self.emit("notice", {"message": f"resume changes {change}"})
        saved_images = ckpt.get("train_images", len(self.data))
        if saved_images != len(self.data):
            raise ValueError(f"the training set now has {len(self.data)} images, the checkpoint's had {saved_images}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self._fit_schedule_length()
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState(ckpt["epoch"], ckpt["step"], ckpt.get("history", []), ckpt.get("epoch_losses", []))
        self.saved_step = ckpt["step"]
        self.saved_epoch = ckpt["epoch"] if ckpt["step"] == ckpt["epoch"] * self.steps_per_epoch else None
        if ckpt["epoch"] >= self.cfg.train.epochs:
            self.emit("notice", {"message": f"the checkpoint has already completed {ckpt['epoch']} epochs; raise "
                                            "train.epochs to train further"})
        # The saved augmentation stream is rank 0's: it fits rank 0 of the same world size only. Other ranks
        # (and other world sizes) take a fresh stream of their own; each epoch start reseeds them all anyway.
        same_stream = ckpt.get("world_size", 1) == self.dist.world_size and self.dist.is_main
        if not restore_rng(ckpt["rng"], self.generator if same_stream else None):
            same_stream = False  # saved on another kind of device: its generator state does not fit this one
            self.emit("notice", {"message": f"resumed on {self.device.type} from a checkpoint saved on "
                                            f"{ckpt['rng'].get('augment_device', 'another device')}: weights, "
                                            "optimiser, schedule and data order continue exactly; the "
                                            "augmentation stream is reseeded, so views differ from an unbroken run"})
        if not same_stream:
            rank_seed = 104_729 * (self.dist.rank + 1)
            self.generator.manual_seed(self.cfg.train.seed * 1_000_003 + ckpt["step"] * 7919 + rank_seed)
        if self.dist.is_main:
            self._truncate_metrics(ckpt["step"])

    def _fit_schedule_length(self) -> None:
        """A changed train.epochs moves the cosine schedule's end to the new last step (the lr follows from here)."""
        per_step, total = self.scheduler.per_step, self.cfg.train.epochs * self.steps_per_epoch
        if per_step.total_steps == total:
            return
        if self.cfg.optim.schedule == "cosine":
            self.emit("notice", {"message": f"the cosine schedule now ends at step {total} instead of "
                                            f"{per_step.total_steps}"})
        per_step.total_steps = total
        if self.scheduler.plateau is None or per_step.step_count < per_step.warmup_steps:
            for group, base_lr in zip(self.optimizer.param_groups, per_step.base_lrs):
                group["lr"] = per_step.lr_at(per_step.step_count, base_lr)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint (and a line torn by a kill), so the resumed run's
        lines follow on as in a run that never stopped."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
        atomic_write_text("".join(kept), path)

    def describe(self) -> dict:
        cfg = self.cfg
        return {**describe_device(self.device, self.precision),
                "dataset": f"{self.data.name}, {len(self.data)} images {tuple(self.data.images.shape[1:])}",
                "model": f"{cfg.model.arch} ({cfg.model.stem} stem, width {cfg.model.width}), "
                         f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters",
                "batch": f"{cfg.train.batch_size} global = {self.dist.world_size} rank{'s' if self.dist.enabled else ''} "
                         f"x {self.local_batch}, {self.steps_per_epoch} steps/epoch",
                "optimizer": f"{cfg.optim.name}, lr {cfg.optim.lr}, {cfg.optim.schedule} schedule",
                "run directory": str(self.out)}

    def train_step(self, x: torch.Tensor) -> torch.Tensor:
        """One optimiser step on uint8 images (b, 3, H, W); returns the loss as a device tensor (no sync)."""
        v1, v2 = self.augment(x, self.generator)  # (b, 3, S, S) each
        views = torch.cat([v1, v2])  # (2b, 3, S, S): one forward, BN sees both views
        if self.cfg.train.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            _, z = self.net(views)  # (2b, head_out)
        loss = nt_xent(z[: len(x)], z[len(x):], self.cfg.loss.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step_batch()
        return loss.detach()

    def _batch(self, order: torch.Tensor, i: int) -> torch.Tensor:
        start = i * self.cfg.train.batch_size + self.dist.rank * self.local_batch
        return self.data.images[order[start:start + self.local_batch].to(self.device)]

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _read_back(self, losses: list[torch.Tensor], first_step: int, lrs: list[float] | None = None) -> list[float]:
        stacked = torch.stack(losses).float()
        if self.dist.enabled:  # each rank's loss covers its own rows: their mean is the global batch's loss
            dist.all_reduce(stacked)  # every rank then logs, checks and schedules on the same numbers
            stacked /= self.dist.world_size
            if self.agreed_stop is not None:
                self.agreed_stop.sync()
        values = stacked.cpu().tolist()  # the one host sync per log window
        for j, value in enumerate(values):
            if not math.isfinite(value):
                lr = lrs[j] if lrs else self.lr()
                raise NonFiniteLoss(f"loss became {value} at step {first_step + j + 1} (lr {lr:.4g}); {self._advice()}")
        return values

    def _advice(self) -> str:
        """What a non-finite run leaves behind and what to change; the rest of NonFiniteLoss's one line."""
        fix = ("use train.precision=bf16 (or fp32) instead of fp16, or lower optim.lr" if self.precision == "fp16"
               else f"lower optim.lr (now {self.cfg.optim.lr:g})")
        if self.saved_step is None:
            return f"no checkpoint was written. Hint: {fix} and run again"
        return (f"{self.out / 'checkpoint.pt'} (step {self.saved_step}) is kept. Hint: {fix} and start a new run "
                "with another --output-dir (a changed config cannot --resume)")

    def check_finite_weights(self) -> None:
        """A finite last loss does not prove the last update was finite: check before anything is saved."""
        for name, t in self.model.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteLoss(f"weights became non-finite ({name}) by step {self.state.step} "
                                    f"(lr {self.lr():.4g}); {self._advice()}")

    def run_epoch(self, epoch: int, stop) -> dict:
        """Steps to the end of `epoch`; a stop request is honoured between steps.

        Log windows end at multiples of log_every within the epoch. A stop between them reads the open window
        back (so only finite losses are saved) without logging it; the checkpoint carries the epoch's losses
        so far, and a resumed run finishes that window and the epoch mean exactly as an unstopped run would.
        """
        cfg, s = self.cfg, self.state
        order = epoch_order(len(self.data), cfg.train.seed, epoch)
        start_in_epoch = s.step - epoch * self.steps_per_epoch
        if start_in_epoch == 0:  # mid-epoch resumes continue the saved generator instead
            self.generator.manual_seed(cfg.train.seed * 1_000_003 + epoch * 7919 + self.dist.rank)
            s.epoch_losses = []
        self.net.train()
        open_steps = start_in_epoch % cfg.train.log_every  # steps of the open window before the stop
        values = s.epoch_losses[:len(s.epoch_losses) - open_steps]  # read back and logged
        window = [torch.tensor(v, device=self.device) for v in s.epoch_losses[len(values):]]  # finite: checked
        lrs, t0 = [math.nan] * len(window), time.perf_counter()
        s.epoch_losses = values
        for i in range(start_in_epoch, self.steps_per_epoch):
            if stop.requested:
                raise StopRequested(stop.signal_name)
            lrs.append(self.lr())
            window.append(self.train_step(self._batch(order, i)))
            s.step += 1
            if (i + 1) % cfg.train.log_every == 0 or i == self.steps_per_epoch - 1:
                chunk = self._read_back(window, s.step - len(window), lrs)
                values += chunk
                rate = 2 * cfg.train.batch_size * len(chunk) / (time.perf_counter() - t0)
                self._log({"kind": "step", "epoch": epoch + 1, "step": s.step, "loss": sum(chunk) / len(chunk), "lr": self.lr(),
                           "views_per_s": rate})
                window, lrs, t0 = [], [], time.perf_counter()
            elif stop.requested:
                s.epoch_losses = values + self._read_back(window, s.step - len(window), lrs)
        return {"loss": sum(values) / max(len(values), 1)}

    def _log(self, record: dict, event: str = "log") -> None:
        if self.dist.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        self.emit(event, record)

    def save_checkpoint(self) -> None:
        """Replace checkpoint.pt atomically; with keep_last, the one it replaces is kept as checkpoint-epochNNNN.pt."""
        self.check_finite_weights()  # on every rank (same weights), so all of them stop together
        s = self.state
        if self.dist.is_main:
            extra = {"world_size": self.dist.world_size, "history": s.history, "epoch_losses": list(s.epoch_losses),
                     "train_images": len(self.data)}
            payload = checkpoint_payload(self.model, self.optimizer, self.scheduler, self.scaler, self.cfg, s.epoch,
                                         s.step, self.generator, extra)
            path = self.out / "checkpoint.pt"
            if self.cfg.train.keep_last and self.saved_epoch is not None and path.exists():
                self._keep_epoch_copy(path, self.saved_epoch)
            atomic_save(payload, path)
            for _, old in self._epoch_copies()[: -self.cfg.train.keep_last or None]:
                old.unlink(missing_ok=True)
            self.emit("checkpoint", {"path": str(path), "epoch": s.epoch, "step": s.step})
        self.saved_step = s.step
        self.saved_epoch = s.epoch if s.step == s.epoch * self.steps_per_epoch else None

    def _keep_epoch_copy(self, path: Path, epoch: int) -> None:
        """checkpoint.pt -> checkpoint-epochNNNN.pt as a hard link (no copy, no extra space), then renamed in."""
        dest = self.out / f"checkpoint-epoch{epoch:04d}.pt"
        if dest.exists() and dest.samefile(path):  # kept already (a kill came before the replace); rename of a
            return  # file onto its own hard link would do nothing and leave the temporary name behind
        tmp = self.out / f".{dest.name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def _epoch_copies(self) -> list[tuple[int, Path]]:
        found = [(int(m.group(1)), p) for p in self.out.glob("checkpoint-epoch*.pt")
                 if (m := re.fullmatch(r"checkpoint-epoch(\d+)\.pt", p.name))]
        return sorted(found)

    def _load_monitor_set(self) -> ImageSet | None:
        d = self.cfg.data
        if self.data.labels is None:
            return None
        try:
            return load_dataset(d.dataset, "test", d.root, download=d.download, image_size=d.image_size,
                                num_workers=d.num_workers, synthetic_size=d.synthetic_size, seed=self.cfg.train.seed)
        except DatasetError as err:
            self.emit("notice", {"message": f"kNN monitor off: no labelled test split ({err})"})
            return None

    def monitor(self) -> float | None:
        """kNN top-1 on the test split, the training images (no augmentation) as the labelled bank.

        Costs one forward pass over both sets: about a sixth of a training epoch's compute plus the test set.
        """
        if self.monitor_set is None:
            self.monitor_set = self._load_monitor_set() or ImageSet(self.data.images[:0], None, None, "none")
        test = self.monitor_set
        if test.labels is None:
            return None
        t0, c, t = time.perf_counter(), self.cfg, self.cfg.train
        bank, queries = (extract_features(self.model.encoder, images, self.mean, self.std, c.data.image_size,
                                          self.device, self.precision) for images in (self.data.images, test.images))
        top1 = knn_accuracy(bank, self.data.labels, queries, test.labels, len(test.classes), t.knn_k,
                            t.knn_temperature)
        s = self.state
        self.last_knn = top1
        self._log({"kind": "eval", "epoch": s.epoch, "step": s.step, "knn_top1": top1,
                   "eval_s": time.perf_counter() - t0}, "eval")
        return top1

    def write_encoder(self) -> Path:
        s = self.state
        payload = encoder_payload(self.model.encoder, self.cfg, self.model.head, self.mean, self.std,
                                  epoch=s.epoch, step=s.step, source=str(self.out / "checkpoint.pt"))
        return atomic_save(payload, self.out / "encoder.pth")

    def run(self, stop: StopFlag | None = None) -> dict:
        """Train to train.epochs. `stop` is the flag of a `stop_guard()` the caller holds; None installs one."""
        if stop is None:
            with stop_guard() as stop:
                return self.run(stop)
        if self.dist.enabled and not isinstance(stop, RankAgreedStop):  # a rank stops only when all do
            stop = self.agreed_stop = RankAgreedStop(stop, self.device)
        cfg, s = self.cfg, self.state
        if self.dist.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"cannot create output directory {self.out} ({err.strerror}): choose another "
                                  "--output-dir") from None
            if s.step == 0:  # a new run: lines from an earlier attempt that never reached a checkpoint go
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            atomic_write_text(dump_config(cfg), self.out / "config.yaml")
        try:
            if stop.requested:  # a signal while the data or model was being set up
                raise StopRequested(stop.signal_name)
            self.emit("start", {"info": self.describe(), "epochs": cfg.train.epochs, "start_epoch": s.epoch,
                                "steps_per_epoch": self.steps_per_epoch, "step": s.step})
            for epoch in range(s.epoch, cfg.train.epochs):
                result = self.run_epoch(epoch, stop)
                s.epoch = epoch + 1
                self.scheduler.step_epoch(result["loss"])
                record = {"kind": "epoch", "epoch": s.epoch, "step": s.step, "loss": result["loss"], "lr": self.lr()}
                s.history.append(record)
                self._log(record, "epoch")
                if s.epoch % cfg.train.checkpoint_every == 0 or s.epoch == cfg.train.epochs:
                    self.save_checkpoint()
                if self.dist.is_main and (s.epoch == cfg.train.epochs or
                                          (cfg.train.eval_every and s.epoch % cfg.train.eval_every == 0)):
                    self.monitor()
        except StopRequested as request:
            saved = s.step != (self.saved_step or 0)  # anything trained since the last checkpoint (or start)?
            if saved:
                self.save_checkpoint()
            path = self.out / "checkpoint.pt"
            raise StopRequested(request.signal_name, str(path) if self.saved_step is not None else None,
                                s.epoch, s.step, saved) from None
        encoder_path = self.write_encoder() if self.dist.is_main else None
        summary = {"epochs": s.epoch, "steps": s.step, "final_loss": s.history[-1]["loss"] if s.history else None,
                   "encoder": str(encoder_path), "checkpoint": str(self.out / "checkpoint.pt"),
                   "knn_top1": self.last_knn}
        self.emit("end", summary)
        return summary


def pretrain(cfg: Config, resume: bool = False, callback: Callback | None = None) -> dict:
    """Train SimCLR as `cfg` says; with `resume`, continue from the run directory's checkpoint.pt.

    The checkpoint is loaded (weights_only) and the config compared before any data or model is built, so a
    wrong resume fails in a second. A new run never replaces another run's checkpoint. Ctrl-C / SIGTERM
    from here on raise StopRequested once the current step is done and the checkpoint written.
    """
    path = Path(cfg.train.output_dir) / "checkpoint.pt"
    ckpt = None
    if resume:
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder, not a checkpoint: give --output-dir a run directory")
        if not path.is_file():
            raise CheckpointError(f"nothing to resume: {path} does not exist (drop --resume to start a new run)")
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt.get("config"), dict):
            raise CheckpointError(f"{path} holds no config: give the checkpoint.pt that `simclr pretrain` wrote")
        check_resume_config(ckpt["config"], cfg)
    elif path.exists():
        raise ConfigError(f"{path} already exists: add --resume to continue that run, or choose another --output-dir")
    owns_group = not (dist.is_available() and dist.is_initialized())  # else a caller's group: leave it up
    try:
        with stop_guard() as stop:
            trainer = Trainer(cfg, callback)
            if ckpt is not None:
                trainer.resume(ckpt)
            summary = trainer.run(stop)
        if owns_group and dist.is_initialized():
            dist.barrier()  # leave together: a rank tearing down while another still sends can abort it
        return summary
    finally:
        if owns_group:  # NCCL warns on every rank at exit about a group never destroyed
            shutdown_distributed()
