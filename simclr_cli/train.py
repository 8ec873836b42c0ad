"""The pretraining loop: data on the device, batched views, NT-Xent, checkpoints, exact resume, interruption.

`pretrain(cfg, resume=..., callback=...)` runs under the CLI, a test or a notebook alike; it reports
through `callback(event, data)` and never prints. Events: start, notice, log, epoch, eval, checkpoint, end.
The loss is read back to the host every `train.log_every` steps, not every step, so the device never
waits on the host in between.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from simclr_cli.augment import Augmenter
from simclr_cli.checkpoint import (CheckpointError, atomic_save, checkpoint_payload, encoder_payload,
                                   load_checkpoint, restore_rng)
from simclr_cli.config import Config, ConfigError, config_to_dict, dump_config
from simclr_cli.data import ImageSet, load_dataset, normalization_for
from simclr_cli.interrupt import StopRequested, stop_guard
from simclr_cli.loss import nt_xent
from simclr_cli.model import build_model
from simclr_cli.optim import build_optimizer, build_scheduler
from simclr_cli.runtime import DistInfo, autocast, describe_device, init_distributed, resolve_precision

Callback = Callable[[str, dict], None]

# Keys a resumed run may change; anything else would make "resume" a different run.
RESUMABLE_KEYS = {"train.epochs", "train.log_every", "train.checkpoint_every", "train.keep_last",
                  "train.eval_every", "train.output_dir", "train.device", "data.root", "data.num_workers",
                  "data.download"}


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left as it was."""


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    history: list[dict] = field(default_factory=list)


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


def prepare_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output directory {path} is not writable ({err.strerror}): choose another --output-dir")


def load_train_set(cfg: Config, dist_info: DistInfo) -> ImageSet:
    d = cfg.data
    data = load_dataset(d.dataset, "train", d.root, download=d.download, image_size=d.image_size,
                        num_workers=d.num_workers, synthetic_size=d.synthetic_size, seed=cfg.train.seed)
    if d.size_dataset_train:
        data = data.subset(d.size_dataset_train, seed=cfg.train.seed)
    if cfg.train.batch_size % dist_info.world_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must divide evenly over "
                          f"{dist_info.world_size} processes: pick a multiple of {dist_info.world_size}")
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
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.out = Path(cfg.train.output_dir)
        if self.dist.is_main:
            prepare_output_dir(self.out)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.data = load_train_set(cfg, self.dist).to(self.device)
        self.mean, self.std = normalization_for(cfg.data.dataset)
        a = cfg.augment
        self.augment = Augmenter(a.preset, cfg.data.image_size, self.mean, self.std, a.crop_scale_min, a.jitter_strength)
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

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.dist.enabled:
            if self.cfg.model.sync_bn:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.train.compile:
            model = torch.compile(model)
        return model

    def resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        for change in check_resume_config(ckpt["config"], self.cfg):
            self.emit("notice", {"message": f"resume changes {change}"})
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState(ckpt["epoch"], ckpt["step"], ckpt.get("history", []))
        restore_rng(ckpt["rng"], self.generator if ckpt.get("world_size", 1) == self.dist.world_size else None)
        if self.dist.is_main:
            self._truncate_metrics(ckpt["step"])

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint, so the resumed run's lines follow on cleanly."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            path.write_text("".join(ln + "\n" for ln in lines))

    def describe(self) -> dict:
        cfg = self.cfg
        return {**describe_device(self.device, self.precision),
                "dataset": f"{self.data.name}, {len(self.data)} images {tuple(self.data.images.shape[1:])}",
                "model": f"{cfg.model.arch} ({cfg.model.stem} stem, width {cfg.model.width}), "
                         f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters",
                "batch": f"{cfg.train.batch_size} global = {self.dist.world_size} x {self.local_batch}, "
                         f"{self.steps_per_epoch} steps/epoch",
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

    def _read_back(self, losses: list[torch.Tensor], first_step: int) -> list[float]:
        values = torch.stack(losses).float().cpu().tolist()  # the one host sync per log window
        for j, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"loss became {value} at step {first_step + j + 1} (lr {self.lr():.4g}); the last good checkpoint "
                    "is kept. Lower optim.lr, or use precision bf16 or fp32 instead of fp16, then --resume")
        return values

    def run_epoch(self, epoch: int, stop) -> dict:
        cfg, s = self.cfg, self.state
        order = epoch_order(len(self.data), cfg.train.seed, epoch)
        start_in_epoch = s.step - epoch * self.steps_per_epoch
        if start_in_epoch == 0:  # mid-epoch resumes continue the saved generator instead
            self.generator.manual_seed(cfg.train.seed * 1_000_003 + epoch * 7919 + self.dist.rank)
        self.net.train()
        window, values, t0 = [], [], time.perf_counter()
        for i in range(start_in_epoch, self.steps_per_epoch):
            window.append(self.train_step(self._batch(order, i)))
            s.step += 1
            if len(window) == cfg.train.log_every or i == self.steps_per_epoch - 1 or stop.requested:
                chunk = self._read_back(window, s.step - len(window))
                values += chunk
                rate = 2 * cfg.train.batch_size * len(chunk) / (time.perf_counter() - t0)
                self._log({"kind": "step", "epoch": epoch + 1, "step": s.step, "loss": sum(chunk) / len(chunk), "lr": self.lr(),
                           "views_per_s": rate})
                window, t0 = [], time.perf_counter()
            if stop.requested:
                raise StopRequested(stop.signal_name)
        return {"loss": sum(values) / max(len(values), 1)}

    def _log(self, record: dict, event: str = "log") -> None:
        if self.dist.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        self.emit(event, record)

    def save_checkpoint(self) -> None:
        if not self.dist.is_main:
            return
        s = self.state
        payload = checkpoint_payload(self.model, self.optimizer, self.scheduler, self.scaler, self.cfg, s.epoch, s.step,
                                     self.generator, {"world_size": self.dist.world_size, "history": s.history})
        path = atomic_save(payload, self.out / "checkpoint.pt")
        if self.cfg.train.keep_last and s.step % self.steps_per_epoch == 0:
            atomic_save(payload, self.out / f"checkpoint-epoch{s.epoch:04d}.pt")
            old = sorted(self.out.glob("checkpoint-epoch*.pt"))[: -self.cfg.train.keep_last]
            for p in old:
                p.unlink(missing_ok=True)
        self.emit("checkpoint", {"path": str(path), "epoch": s.epoch, "step": s.step})

    def write_encoder(self) -> Path:
        s = self.state
        payload = encoder_payload(self.model.encoder, self.cfg, self.model.head, self.mean, self.std,
                                  epoch=s.epoch, step=s.step, source=str(self.out / "checkpoint.pt"))
        return atomic_save(payload, self.out / "encoder.pth")

    def run(self) -> dict:
        cfg, s = self.cfg, self.state
        if self.dist.is_main:
            (self.out / "config.yaml").write_text(dump_config(cfg))
        self.emit("start", {"info": self.describe(), "epochs": cfg.train.epochs, "start_epoch": s.epoch,
                            "steps_per_epoch": self.steps_per_epoch, "step": s.step})
        with stop_guard() as stop:
            try:
                for epoch in range(s.epoch, cfg.train.epochs):
                    result = self.run_epoch(epoch, stop)
                    s.epoch = epoch + 1
                    self.scheduler.step_epoch(result["loss"])
                    record = {"kind": "epoch", "epoch": s.epoch, "step": s.step, "loss": result["loss"], "lr": self.lr()}
                    s.history.append(record)
                    self._log(record, "epoch")
                    if s.epoch % cfg.train.checkpoint_every == 0 or s.epoch == cfg.train.epochs:
                        self.save_checkpoint()
            except StopRequested:
                self.save_checkpoint()
                raise
        encoder_path = self.write_encoder() if self.dist.is_main else None
        summary = {"epochs": s.epoch, "steps": s.step, "final_loss": s.history[-1]["loss"] if s.history else None,
                   "encoder": str(encoder_path), "checkpoint": str(self.out / "checkpoint.pt")}
        self.emit("end", summary)
        return summary


def pretrain(cfg: Config, resume: bool = False, callback: Callback | None = None) -> dict:
    """Train SimCLR as `cfg` says; with `resume`, continue from the run directory's checkpoint.pt."""
    trainer = Trainer(cfg, callback)
    if resume:
        path = trainer.out / "checkpoint.pt"
        if not path.exists():
            raise CheckpointError(f"nothing to resume: {path} does not exist (drop --resume to start a new run)")
        trainer.resume(path)
    return trainer.run()
