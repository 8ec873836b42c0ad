"""Starting a pretraining run (`pretrain`): who decides new run or resume, joining the process group, the
set-up under a stop that ends it at once, and leaving the group; the loop itself is `loop.Trainer`'s."""

from __future__ import annotations

import os

import torch.distributed as dist

from simclr_cli.artifacts import Checkpoint
from simclr_cli.config import Config
from simclr_cli.errors import UserError
from simclr_cli.rundir import RunDir
from simclr_cli.runtime import Callback, init_distributed, is_main_process, shutdown_distributed
from simclr_cli.train.interrupt import StopRequested, stop_guard
from simclr_cli.train.loop import Trainer
from simclr_cli.train.preflight import check_names, preflight, start_together


def pretrain(cfg: Config, resume: bool = False, callback: Callback | None = None) -> dict:
    """Train as `cfg` says; with `resume`, continue from the run directory's checkpoint.pt.

    `preflight` decides new vs resume before any data or model is built, so a wrong resume fails in a
    second. On several ranks rank 0 decides, from the files as its node sees them, and every rank starts as
    it decided (`start_together`: its config, whether to resume, and from which step). Ctrl-C / SIGTERM
    from here on raise StopRequested: during set-up at once, during training once the current step is done
    and the checkpoint written. The run's last collective is the barrier at the end of `Trainer.run`, so
    the ranks leave together: a rank tearing down while another still sends can abort it.
    """
    several = int(os.environ.get("WORLD_SIZE", 1)) > 1
    ckpt, refusal = None, None
    if is_main_process():  # the other ranks read the checkpoint once rank 0 has decided
        try:
            ckpt = preflight(cfg, resume)
        except UserError as err:
            if not several:
                raise
            refusal = err  # said on every rank once they have joined, not on rank 0 alone
    owns_group = not (dist.is_available() and dist.is_initialized())  # else a caller's group: leave it up
    try:
        with stop_guard() as stop:
            try:
                with stop.at_once():  # set-up has nothing to save: a signal ends it where it is
                    check_names(cfg)  # before joining the group, on every rank alike
                    joined = init_distributed(cfg.train.device, cfg.train.dist_timeout_min)
                if joined[0].enabled:  # (a signal meanwhile is taken on entering the set-up below)
                    cfg, ckpt = start_together(joined[0], cfg, resume, ckpt, refusal)
                with stop.at_once():
                    trainer = Trainer(cfg, callback, resuming=ckpt is not None, joined=joined)
            except StopRequested as request:
                if ckpt is None:
                    raise
                saved = Checkpoint(RunDir(cfg.train.output_dir).checkpoint, ckpt)
                raise StopRequested(request.signal_name, str(saved.path), saved.epoch, saved.step) from None
            if ckpt is not None:
                trainer.resume(ckpt)
            return trainer.run(stop)
    finally:
        if owns_group:  # NCCL warns on every rank at exit about a group never destroyed
            shutdown_distributed()
