"""The pretraining loop: data on the device, the method's views and loss, checkpoints, the kNN monitor.

`pretrain(cfg, resume=..., callback=...)` (`start.py`: new run or resume, the process group, then this
Trainer) runs under the CLI, a test or a notebook alike; it reports
through `callback(event, data)` and never prints. Events: start, notice, cache, log, epoch, eval,
checkpoint, end. The loss is read back to the host every `train.log_every` steps, not every step, so the
device never waits on the host in between. What the step computes is the method's (`methods/`), what a
checkpoint holds and how a resume restores it `state.py`'s, where the files go `rundir.RunDir`'s, and
every logged record also goes to the live loggers of `train.loggers` (`loggers.py`).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from simclr_cli.artifacts import Checkpoint
from simclr_cli.augment import Augmenter, view_size_at
from simclr_cli.config import Config
from simclr_cli.data import load_train_set, normalization_for, train_batches
from simclr_cli.methods import build_networks
from simclr_cli.models.encoder_file import encoder_meta, encoder_payload
from simclr_cli.rundir import RunDir
from simclr_cli.runtime import (Callback, DistInfo, autocast, broadcast_buffers, configure_cuda, init_distributed,
                                resolve_precision, wrap_ddp)
from simclr_cli.train.agree import together
from simclr_cli.train.interrupt import RankAgreedStop, StopFlag, StopRequested, stop_guard
from simclr_cli.train.loggers import Loggers, open_loggers
from simclr_cli.train.monitor import Monitor, load_monitor
from simclr_cli.train.optim import build_optimizer, build_scheduler
from simclr_cli.train.panel import end_summary, start_panel
from simclr_cli.train.preflight import check_names, check_resume_config, check_world
from simclr_cli.train.readback import LossWindow, advice, check_finite_weights, read_back
from simclr_cli.train.state import Parts, RunState, check_same_step, checkpoint, rank_streams, restore


def optimization(cfg: Config, model: torch.nn.Module, steps_per_epoch: int, precision: str, device: torch.device):
    """(optimizer, scheduler, GradScaler or None) as `optim` says; the scaler for fp16 only."""
    o = cfg.optim
    optimizer = build_optimizer(model, o.name, o.lr, o.weight_decay, o.momentum, o.nesterov, tuple(o.betas),
                                grad_scaler=precision == "fp16")
    scheduler = build_scheduler(optimizer, o.schedule, cfg.train.epochs * steps_per_epoch,
                                round(o.warmup_epochs * steps_per_epoch), o.min_lr, o.plateau_factor,
                                o.plateau_patience)
    return optimizer, scheduler, torch.amp.GradScaler(device.type) if precision == "fp16" else None


def wrap_for_step(method, cfg: Config, ranks: DistInfo, device: torch.device) -> torch.nn.Module:
    """The model as the step runs it: DDP across ranks (after SyncBatchNorm when asked), then compiled."""
    if ranks.enabled and cfg.model.sync_bn:
        method.convert_sync_batchnorm()
    net = wrap_ddp(method.model, device) if ranks.enabled else method.model
    return torch.compile(net) if cfg.train.compile else net


def update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, loss: torch.Tensor,
           before_update) -> None:
    """Backward, then `before_update()` on the gradients as the optimiser will read them (unscaled: clipping),
    then the optimiser step. With fp16's scaler a step whose gradients overflowed is skipped, the scale lowered."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        before_update()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    before_update()
    scaler.step(optimizer)
    scaler.update()


class Trainer:
    """One run's objects, built from the config; `run()` trains from the current state to `train.epochs`."""

    def __init__(self, cfg: Config, callback: Callback | None = None, resuming: bool = False,
                 joined: tuple[DistInfo, torch.device] | None = None):
        """`joined`: what `init_distributed` returned when the caller joined the group already."""
        self.cfg, self.emit = cfg, callback or (lambda event, data: None)
        check_names(cfg)  # before minutes of data loading
        self.ranks, self.device = joined or init_distributed(cfg.train.device, cfg.train.dist_timeout_min)
        check_world(cfg, self.ranks.world_size, self.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.cuda_settings = configure_cuda(self.device, self.precision, training=True)
        self.rundir = RunDir(cfg.train.output_dir)
        if self.ranks.is_main:
            self.rundir.check_writable()
            self.rundir.remove_stale_temps()
        # The networks before the data: a setting they refuse (MAE on a convnet) is its one line before minutes
        # of loading. Decoding a folder draws from the global generator (DataLoader seeds), a mapped cache does
        # not: the generator is put back as the build left it, so training does not depend on which happened.
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.method, nhwc = build_networks(cfg, self.device, resuming)
        built = torch.get_rng_state()
        self.data = load_train_set(cfg, self.ranks, self.emit).to(self.device)  # a mapped folder stays on disk
        torch.set_rng_state(built)
        self.mean, self.std = normalization_for(cfg.data.dataset)
        self.method.check_data(self.data)  # settings that depend on the training set: one line, before any step
        a = cfg.augment  # views may be smaller than the images (probes: image_size)
        self.augment = Augmenter(a.preset, a.view_size or cfg.data.image_size, self.mean, self.std, a.crop_scale_min,
                                 a.jitter_strength, torch.channels_last if nhwc else torch.contiguous_format)
        self.generator = torch.Generator(device=self.device)
        self.local_batch = cfg.train.batch_size // self.ranks.world_size
        self.steps_per_epoch = len(self.data) // cfg.train.batch_size
        self.batches = train_batches(self.data, cfg, self.ranks, self.local_batch, self.device,
                                     lambda message: self.emit("notice", {"message": message}))
        self.optimizer, self.scheduler, self.scaler = optimization(cfg, self.model, self.steps_per_epoch,
                                                                   self.precision, self.device)
        self.net = wrap_for_step(self.method, cfg, self.ranks, self.device)
        self.state = RunState()
        self.stop: StopFlag | RankAgreedStop | None = None  # what run() asks between steps and monitor batches
        self.monitor: Monitor | None | bool = False  # False: not loaded yet; None: no labelled held-out split
        self.last_knn: float | None = None  # the monitor's latest kNN top-1
        self.loggers = Loggers()  # the live loggers beside metrics.jsonl, open while run() trains

    @property
    def model(self) -> torch.nn.Module:
        return self.method.model

    def parts(self) -> Parts:
        return Parts(self.model, self.method, self.optimizer, self.scheduler, self.scaler, self.generator)

    def resume(self, ckpt: dict) -> None:
        """Continue from a loaded checkpoint; one line refuses a checkpoint that does not fit this run."""
        for change in check_resume_config(Checkpoint(self.rundir.checkpoint, ckpt).config, self.cfg):
            self.emit("notice", {"message": f"resume changes {change}"})
        self.state = together(self.ranks, lambda: restore(
            ckpt, self.cfg, self.parts(), ranks=self.ranks, rundir=self.rundir, train_images=len(self.data),
            steps_per_epoch=self.steps_per_epoch, emit=self.emit))
        check_same_step(self.ranks, self.state.step, self.rundir.checkpoint)  # every rank goes on from one step

    def train_step(self, x: torch.Tensor) -> torch.Tensor:
        """One optimiser step on uint8 images (b, 3, H, W); returns the loss as a device tensor (no sync)."""
        if self.ranks.enabled:
            broadcast_buffers(self.model)  # rank 0's batch norm statistics, once a step (see wrap_ddp)
        views = self.method.views(self.augment, x, self.generator, self.view_size())
        loss = self.method.loss(self.net, views, autocast(self.device, self.precision))
        update(self.optimizer, self.scaler, loss,
               lambda: self.method.before_update(self.state.step, self.scheduler.total_steps))
        self.scheduler.step_batch()
        self.method.after_step(self.state.step + 1, self.scheduler.total_steps)  # EMA, enqueue: before the next
        return loss.detach()

    def view_size(self) -> int:
        """This step's view size, from the step and the schedule's end (the same at the same step on resume)."""
        return view_size_at(self.cfg.augment, self.cfg.data.image_size, self.state.step, self.scheduler.total_steps)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _why(self) -> str:
        """The rest of a non-finite loss's line: what is kept, what to change (built only when needed)."""
        return advice(self.precision, self.cfg.optim.lr, self.state.saved_step, self.rundir.checkpoint)

    def run_epoch(self, epoch: int, stop: StopFlag | RankAgreedStop) -> float:
        """Steps to the end of `epoch`; returns its mean loss."""
        cfg, s = self.cfg.train, self.state
        order = self.batches.order(cfg.seed, epoch)  # the same on every rank
        first = s.step - epoch * self.steps_per_epoch  # > 0: a resumed run goes on mid-epoch
        if first == 0:  # (a mid-epoch resume continues the saved augmentation stream instead)
            self.generator.manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + self.ranks.rank)
            s.epoch_losses = []
        window = s.reopen_window(first, cfg.log_every, self.device)
        self.net.train()
        with self.batches.stream(order, range(first, self.steps_per_epoch)) as batches:
            for i in range(first, self.steps_per_epoch):
                if stop.check():  # before every step, agreed by every rank: a stop is taken within a step
                    # the open window, read back so that only finite losses are saved
                    s.epoch_losses += read_back(window, self.ranks.world_size, self._why)
                    raise StopRequested(stop.signal_name)
                lr = self.lr()  # the lr this step uses
                window.add(self.train_step(window.next_batch(batches)), lr)
                s.step += 1
                if (i + 1) % cfg.log_every == 0 or i == self.steps_per_epoch - 1:  # a log window ends
                    self._log_window(epoch, window)
                    window = LossWindow(s.step, self.device)
        return s.epoch_mean()

    def _log_window(self, epoch: int, window: LossWindow) -> None:
        chunk = read_back(window, self.ranks.world_size, self._why)
        self.state.epoch_losses += chunk
        self._log(window.record(chunk, epoch + 1, self.state.step, self.lr(),
                              self.method.views_per_image * self.cfg.train.batch_size))

    def _log(self, record: dict, event: str = "log") -> None:
        if self.ranks.is_main:
            self.rundir.append(record)
            self.loggers.write(record)
        self.emit(event, record)

    def save_checkpoint(self) -> None:
        """Replace checkpoint.pt atomically; with keep_last, the one it replaces is kept as checkpoint-epochNNNN.pt."""
        s = self.state
        check_finite_weights(self.model, s.step, self.lr(), self._why)  # every rank: all stop together
        streams = rank_streams(self.ranks, self.generator)  # every rank's views, for a resume mid-epoch
        if self.ranks.is_main:
            meta = encoder_meta(self.model.encoder, self.cfg, self.model.head, self.mean, self.std)
            payload = checkpoint(self.cfg, s, self.parts(), world_size=self.ranks.world_size,
                                 train_images=len(self.data), encoder=meta, streams=streams)
            path = self.rundir.save_checkpoint(payload, self.cfg.train.keep_last, s.saved_epoch)
            self.emit("checkpoint", {"path": str(path), "epoch": s.epoch, "step": s.step})
        s.mark_saved(self.steps_per_epoch)

    def evaluate(self) -> float | None:
        """The kNN monitor's top-1 on the labelled held-out split, logged; None without one, and on ranks other
        than 0 (each extracts its share of the images; rank 0 votes). A stop is agreed between batches."""
        if self.monitor is False:
            self.monitor, why = load_monitor(self.cfg, self.data, self.mean, self.std, self.device, self.precision,
                                             self.ranks, self.rundir.records() if self.ranks.is_main else [])
            if why and self.ranks.is_main:
                self.emit("notice", {"message": why})
        if self.monitor is None:
            return None
        t0, s, m = time.perf_counter(), self.state, self.model
        check_finite_weights(m, s.step, self.lr(), self._why)  # every rank, as before a save: not NaN features
        self.last_knn = self.monitor(m.encoder, self.stop, self.method.health_head(), self.augment)
        if self.ranks.is_main:
            self._log({"kind": "eval", "epoch": s.epoch, "step": s.step, "knn_top1": self.last_knn,
                       **(self.monitor.last_health or {}), "split": self.cfg.train.eval_split,
                       "eval_s": time.perf_counter() - t0}, "eval")
            if self.monitor.warning:
                self._log({"kind": "warning", "epoch": s.epoch, "step": s.step, "message": self.monitor.warning}, "notice")
        return self.last_knn

    def write_encoder(self):
        s = self.state
        payload = encoder_payload(self.model.encoder, self.cfg, self.model.head, self.mean, self.std,
                                  epoch=s.epoch, step=s.step, source=str(self.rundir.checkpoint))
        return self.rundir.write_encoder(payload)

    def run(self, stop: StopFlag | None = None) -> dict:
        """Train to train.epochs. `stop` is the flag of a `stop_guard()` the caller holds; None installs one.
        The live loggers close last: after a stop's checkpoint (torchrun's SIGKILL comes 30 s after SIGTERM)
        and after the closing barrier, the last collective (a slow upload keeps no rank waiting)."""
        if stop is None:
            with stop_guard() as stop:
                return self.run(stop)
        if self.ranks.enabled and not isinstance(stop, RankAgreedStop):  # a rank stops only when all do
            stop = RankAgreedStop(stop, self.ranks.control)
        self.stop, cfg, s = stop, self.cfg, self.state
        if self.ranks.is_main:
            self.rundir.start(cfg, new=s.step == 0)
        if stop.check():  # a signal while the data or model was being set up
            raise self._stopped(stop.signal_name)
        info = start_panel(self)
        with open_loggers(cfg, self.rundir, info, s.step, self.emit, self.ranks) as self.loggers:
            try:
                self.emit("start", {"info": {**info, **self.loggers.where()}, "epochs": cfg.train.epochs,
                                    "start_epoch": s.epoch, "steps_per_epoch": self.steps_per_epoch, "step": s.step})
                for epoch in range(s.epoch, cfg.train.epochs):
                    self._finish_epoch(epoch, self.run_epoch(epoch, stop))
            except StopRequested as request:
                raise self._stopped(request.signal_name) from None
            encoder_path = self.write_encoder() if self.ranks.is_main else None
            summary = end_summary(self, encoder_path)
            if self.ranks.enabled:
                dist.barrier()  # the last collective: every rank leaves together, then rank 0 closes its loggers
        self.emit("end", summary)
        return summary

    def _stopped(self, signal_name: str) -> StopRequested:
        """What a stop raises, once what was trained since the last checkpoint is saved."""
        s, saved = self.state, self.state.unsaved
        if saved:
            self.save_checkpoint()
        if self.ranks.enabled:  # every rank leaves once the checkpoint is whole (the first to exit ends the rest)
            dist.barrier()
        return StopRequested(signal_name, str(self.rundir.checkpoint) if s.saved_step is not None else None,
                             s.epoch, s.step, saved)

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

