"""The pretraining loop: data on the device, batched views, the method's loss, checkpoints, exact resume.

`pretrain(cfg, resume=..., callback=...)` runs under the CLI, a test or a notebook alike; it reports
through `callback(event, data)` and never prints. Events: start, notice, log, epoch, eval, checkpoint, end.
The loss is read back to the host every `train.log_every` steps, not every step, so the device never
waits on the host in between. The run directory's files are `rundir.RunDir`'s, the method's networks and
loss `methods/`'s, the kNN monitor `evaluate.Monitor`'s.

Longer than 300 lines: the loop with its stop, read-ahead and monitor hooks, until the regrouping splits the
run state from it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from simclr_cli.augment import Augmenter, describe_views, view_size_at
from simclr_cli.checkpoint import checkpoint_payload
from simclr_cli.config import Config
from simclr_cli.data import load_train_set, normalization_for
from simclr_cli.encoder_file import encoder_payload
from simclr_cli.evaluate import Monitor, load_monitor
from simclr_cli.interrupt import RankAgreedStop, StopFlag, StopRequested, stop_guard
from simclr_cli.methods import build_method, convert_sync_batchnorm
from simclr_cli.optim import build_optimizer, build_scheduler
from simclr_cli.readahead import BatchStream
from simclr_cli.readback import LossWindow, NonFiniteLoss, advice, check_finite_weights, read_back  # noqa: F401
from simclr_cli.resume import RunState, restore
from simclr_cli.rundir import RunDir, check_world, preflight
from simclr_cli.runtime import (Callback, autocast, configure_cuda, describe_device, init_distributed,
                               resolve_precision, shutdown_distributed)


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The same permutation on every rank, made once per epoch and moved to the device once (a per-step
    index copy would make the device wait on the host): the global batch is cut from it, then split."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(device)


class Trainer:
    """Holds one run's objects; `run()` trains from the current state to `train.epochs`."""

    def __init__(self, cfg: Config, callback: Callback | None = None):
        self.cfg, self.emit = cfg, callback or (lambda event, data: None)
        self.dist, self.device = init_distributed(cfg.train.device, cfg.train.dist_timeout_min)
        check_world(cfg, self.dist.world_size, self.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.cuda_settings = configure_cuda(self.device, self.precision, training=True)
        self.rundir = RunDir(cfg.train.output_dir)
        if self.dist.is_main:
            self.rundir.check_writable()
            self.rundir.remove_stale_temps()
        self.data = load_train_set(cfg, self.dist, self.emit).to(self.device)  # a mapped folder stays on disk
        self.mean, self.std = normalization_for(cfg.data.dataset)
        a = cfg.augment
        # Views may be smaller than the images (fewer pixels per step); the encoder is still probed and
        # embeds at data.image_size, which the average pool allows.
        self.augment = Augmenter(a.preset, a.view_size or cfg.data.image_size, self.mean, self.std,
                                 a.crop_scale_min, a.jitter_strength)
        self.generator = torch.Generator(device=self.device)
        layout = torch.channels_last if cfg.train.channels_last else torch.preserve_format
        # Seeded here, after the data: decoding a folder draws from the global generator (DataLoader seeds),
        # a mapped cache does not, and the initial weights must not depend on which happened.
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.method = build_method(cfg).to(self.device, layout)
        self.model = self.method.model
        self.local_batch = cfg.train.batch_size // self.dist.world_size
        self.steps_per_epoch = len(self.data) // cfg.train.batch_size
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o.name, o.lr, o.weight_decay, o.momentum, o.nesterov, tuple(o.betas),
                                         grad_scaler=self.precision == "fp16")
        self.scheduler = build_scheduler(self.optimizer, o.schedule, cfg.train.epochs * self.steps_per_epoch,
                                         round(o.warmup_epochs * self.steps_per_epoch), o.min_lr,
                                         o.plateau_factor, o.plateau_patience)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.net = self._wrap()
        self.state = RunState()
        self.saved_step: int | None = None  # step of the state in checkpoint.pt, when this run wrote or read it
        self.saved_epoch: int | None = None  # its epoch, when it was written at an epoch's end (for keep_last)
        self.stop: StopFlag | RankAgreedStop | None = None  # what run() asks between steps and monitor batches
        self.monitor: Monitor | None | bool = False  # False: not loaded yet; None: no labelled test split
        self.last_knn: float | None = None  # the monitor's latest kNN top-1

    def _wrap(self) -> torch.nn.Module:
        """The model as the step runs it: DDP across ranks (after SyncBatchNorm when asked), then compiled."""
        if self.dist.enabled and self.cfg.model.sync_bn:
            convert_sync_batchnorm(self.method)
            self.model = self.method.model
        net = self.model
        if self.dist.enabled:
            net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(net) if self.cfg.train.compile else net

    def describe(self) -> dict:
        cfg, ranks = self.cfg, f"rank{'s' if self.dist.enabled else ''}"
        cuda = {"cuda": self.cuda_settings} if self.cuda_settings else {}
        return {**describe_device(self.device, self.precision), **cuda,
                "dataset": f"{self.data.name}, {len(self.data)} images {tuple(self.data.images.shape[1:])}",
                "method": cfg.method.name,
                "model": f"{cfg.model.arch} ({cfg.model.stem} stem, width {cfg.model.width}), "
                         f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters",
                "batch": f"{cfg.train.batch_size} global = {self.dist.world_size} {ranks} x {self.local_batch}, "
                         f"{self.steps_per_epoch} steps/epoch",
                "views": describe_views(cfg.augment, cfg.data.image_size, self.view_size()),
                "optimizer": f"{cfg.optim.name}, lr {cfg.optim.lr}, {cfg.optim.schedule} schedule",
                "run directory": str(self.rundir.path)}

    def resume(self, ckpt: dict) -> None:
        """Continue from a loaded checkpoint (see `resume.restore`); refuses one that does not fit this run."""
        restore(self, ckpt)

    def train_step(self, x: torch.Tensor) -> torch.Tensor:
        """One optimiser step on uint8 images (b, 3, H, W); returns the loss as a device tensor (no sync)."""
        v1, v2 = self.augment(x, self.generator, self.view_size())  # (b, 3, S, S) each
        views = torch.cat([v1, v2])  # (2b, 3, S, S)
        a, small = self.cfg.augment, None
        if a.small_crops:  # multi-crop: (small_crops * b, 3, s, s), drawn after both views
            small = self.augment.small(x, self.generator, a.small_crops, a.small_crop_size, tuple(a.small_crop_scale))
        if self.cfg.train.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
            small = small.contiguous(memory_format=torch.channels_last) if small is not None else None
        ctx = autocast(self.device, self.precision)
        loss = self.method.loss(self.net, views, ctx) if small is None else self.method.loss(self.net, views, ctx, small)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step_batch()
        self.method.after_step(self.state.step + 1, self.scheduler.total_steps)  # EMA, enqueue: before the next
        return loss.detach()

    def view_size(self) -> int:
        """This step's view size, from the step and the schedule's end (the same at the same step on resume)."""
        return view_size_at(self.cfg.augment, self.cfg.data.image_size, self.state.step, self.scheduler.total_steps)

    def _read(self, order: torch.Tensor, i: int) -> torch.Tensor:
        """This rank's rows of batch i: cut on the device when the images are there; read from the map of a
        folder on the host, into pinned memory when a GPU will take them."""
        start = i * self.cfg.train.batch_size + self.dist.rank * self.local_batch
        x = self.data.images[order[start:start + self.local_batch]]
        return x.pin_memory() if self.data.mapped and self.device.type == "cuda" else x

    def _move(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)  # pinned: the copy overlaps the work queued before it

    def batches(self, order: torch.Tensor, first: int) -> BatchStream:
        """Batches first.. of the epoch in order; a mapped folder's read `data.read_ahead` batches ahead."""
        depth = self.cfg.data.read_ahead if self.data.mapped else 0
        return BatchStream(lambda i: self._read(order, i), range(first, self.steps_per_epoch), depth, self._move)

    def _batch(self, order: torch.Tensor, i: int) -> torch.Tensor:
        """Batch i, read now (benchmarks and tests time single steps with it)."""
        return self._move(self._read(order, i))

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _why(self) -> str:
        return advice(self.precision, self.cfg.optim.lr, self.saved_step, self.rundir.checkpoint)

    def _read_back(self, window: LossWindow) -> list[float]:
        return read_back(window, self.dist.world_size, self._why)

    def run_epoch(self, epoch: int, stop) -> float:
        """Steps to the end of `epoch`; returns its mean loss. A stop request is honoured before every step
        (every rank agrees on it there), so it is taken within one step of the signal.

        Log windows end at multiples of log_every within the epoch. A stop between them reads the open window
        back (so only finite losses are saved) without logging it; the checkpoint carries the epoch's losses
        so far, and a resumed run finishes that window and the epoch mean exactly as an unstopped run would.
        """
        cfg, s = self.cfg, self.state
        order = epoch_order(len(self.data), cfg.train.seed, epoch,
                            torch.device("cpu") if self.data.mapped else self.device)  # where the images are
        first = s.step - epoch * self.steps_per_epoch
        if first == 0:  # mid-epoch resumes continue the saved generator instead
            self.generator.manual_seed(cfg.train.seed * 1_000_003 + epoch * 7919 + self.dist.rank)
            s.epoch_losses = []
        self.net.train()
        open_steps = first % cfg.train.log_every  # steps of the window a stop left open: they go back in
        window = LossWindow(s.step - open_steps, self.device, s.epoch_losses[len(s.epoch_losses) - open_steps:])
        del s.epoch_losses[len(s.epoch_losses) - open_steps:]
        with self.batches(order, first) as batches:
            for i in range(first, self.steps_per_epoch):
                if stop.check():
                    s.epoch_losses += self._read_back(window)  # the open window: only finite losses are saved
                    raise StopRequested(stop.signal_name)
                lr = self.lr()  # the lr this step uses
                window.add(self.train_step(next(batches)), lr)
                s.step += 1
                if (i + 1) % cfg.train.log_every == 0 or i == self.steps_per_epoch - 1:
                    self._log_window(epoch, window)
                    window = LossWindow(s.step, self.device)
        return sum(s.epoch_losses) / max(len(s.epoch_losses), 1)

    def _log_window(self, epoch: int, window: LossWindow) -> None:
        chunk = self._read_back(window)
        self.state.epoch_losses += chunk
        timed = len(chunk) - window.restored  # a resumed window's first steps ran before the stop, untimed
        rate = 2 * self.cfg.train.batch_size * timed / (time.perf_counter() - window.t0)
        self._log({"kind": "step", "epoch": epoch + 1, "step": self.state.step, "loss": sum(chunk) / len(chunk),
                   "lr": self.lr(), "views_per_s": rate})

    def _log(self, record: dict, event: str = "log") -> None:
        if self.dist.is_main:
            self.rundir.append(record)
        self.emit(event, record)

    def save_checkpoint(self) -> None:
        """Replace checkpoint.pt atomically; with keep_last, the one it replaces is kept as checkpoint-epochNNNN.pt."""
        check_finite_weights(self.model, self.state.step, self.lr(), self._why)  # every rank: all stop together
        s = self.state
        if self.dist.is_main:
            extra = {"world_size": self.dist.world_size, "history": s.history, "epoch_losses": list(s.epoch_losses),
                     "train_images": len(self.data), "method": self.method.state_dict()}
            payload = checkpoint_payload(self.model, self.optimizer, self.scheduler, self.scaler, self.cfg, s.epoch,
                                         s.step, self.generator, extra)
            path = self.rundir.save_checkpoint(payload, self.cfg.train.keep_last, self.saved_epoch)
            self.emit("checkpoint", {"path": str(path), "epoch": s.epoch, "step": s.step})
        self.saved_step = s.step
        self.saved_epoch = s.epoch if s.step == s.epoch * self.steps_per_epoch else None

    def evaluate(self) -> float | None:
        """The kNN monitor's top-1 on the labelled held-out split, logged; None without one, and on ranks other
        than 0 (each extracts its share of the images; rank 0 votes). A stop is agreed between batches."""
        if self.monitor is False:
            self.monitor, why = load_monitor(self.cfg, self.data, self.mean, self.std, self.device, self.precision,
                                             self.dist)
            if why and self.dist.is_main:
                self.emit("notice", {"message": why})
        if self.monitor is None:
            return None
        t0, s = time.perf_counter(), self.state
        self.last_knn = self.monitor(self.model.encoder, self.stop)
        if self.dist.is_main:
            self._log({"kind": "eval", "epoch": s.epoch, "step": s.step, "knn_top1": self.last_knn,
                       "split": self.cfg.train.eval_split, "eval_s": time.perf_counter() - t0}, "eval")
        return self.last_knn

    def write_encoder(self):
        s = self.state
        payload = encoder_payload(self.model.encoder, self.cfg, self.model.head, self.mean, self.std,
                                  epoch=s.epoch, step=s.step, source=str(self.rundir.checkpoint))
        return self.rundir.write_encoder(payload)

    def run(self, stop: StopFlag | None = None) -> dict:
        """Train to train.epochs. `stop` is the flag of a `stop_guard()` the caller holds; None installs one."""
        if stop is None:
            with stop_guard() as stop:
                return self.run(stop)
        if self.dist.enabled and not isinstance(stop, RankAgreedStop):  # a rank stops only when all do
            stop = RankAgreedStop(stop, self.dist.control)
        self.stop = stop
        cfg, s = self.cfg, self.state
        if self.dist.is_main:
            self.rundir.start(cfg, new=s.step == 0)
        try:
            if stop.check():  # a signal while the data or model was being set up
                raise StopRequested(stop.signal_name)
            self.emit("start", {"info": self.describe(), "epochs": cfg.train.epochs, "start_epoch": s.epoch,
                                "steps_per_epoch": self.steps_per_epoch, "step": s.step})
            for epoch in range(s.epoch, cfg.train.epochs):
                self._finish_epoch(epoch, self.run_epoch(epoch, stop))
        except StopRequested as request:
            saved = s.step != (self.saved_step or 0)  # anything trained since the last checkpoint (or start)?
            if saved:
                self.save_checkpoint()
            raise StopRequested(request.signal_name, str(self.rundir.checkpoint) if self.saved_step is not None
                                else None, s.epoch, s.step, saved) from None
        encoder_path = self.write_encoder() if self.dist.is_main else None
        summary = {"epochs": s.epoch, "steps": s.step, "final_loss": s.history[-1]["loss"] if s.history else None,
                   "encoder": str(encoder_path), "checkpoint": str(self.rundir.checkpoint), "knn_top1": self.last_knn,
                   "knn_split": cfg.train.eval_split}
        self.emit("end", summary)
        return summary

    def _finish_epoch(self, epoch: int, loss: float) -> None:
        """After the last step of `epoch`: schedule, log, checkpoint and monitor as the config says."""
        cfg, s = self.cfg.train, self.state
        s.epoch = epoch + 1
        self.scheduler.step_epoch(loss)
        record = {"kind": "epoch", "epoch": s.epoch, "step": s.step, "loss": loss, "lr": self.lr()}
        s.history.append(record)
        self._log(record, "epoch")
        if s.epoch % cfg.checkpoint_every == 0 or s.epoch == cfg.epochs:
            self.save_checkpoint()
        if s.epoch == cfg.epochs or (cfg.eval_every and s.epoch % cfg.eval_every == 0):
            self.evaluate()  # every rank: each extracts its share


def pretrain(cfg: Config, resume: bool = False, callback: Callback | None = None) -> dict:
    """Train as `cfg` says; with `resume`, continue from the run directory's checkpoint.pt.

    `rundir.preflight` decides new vs resume before any data or model is built, so a wrong resume fails in
    a second. Ctrl-C / SIGTERM from here on raise StopRequested: during set-up at once, during training
    once the current step is done and the checkpoint written.
    """
    ckpt = preflight(cfg, resume)
    owns_group = not (dist.is_available() and dist.is_initialized())  # else a caller's group: leave it up
    try:
        with stop_guard() as stop:
            try:
                with stop.at_once():  # set-up has nothing to save: a signal ends it where it is
                    trainer = Trainer(cfg, callback)
            except StopRequested as request:
                if ckpt is None:
                    raise
                raise StopRequested(request.signal_name, str(Path(cfg.train.output_dir) / "checkpoint.pt"),
                                    ckpt["epoch"], ckpt["step"]) from None
            if ckpt is not None:
                trainer.resume(ckpt)
            summary = trainer.run(stop)
        if owns_group and dist.is_initialized():
            dist.barrier()  # leave together: a rank tearing down while another still sends can abort it
        return summary
    finally:
        if owns_group:  # NCCL warns on every rank at exit about a group never destroyed
            shutdown_distributed()
