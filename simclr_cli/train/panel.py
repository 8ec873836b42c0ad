"""What a run says about itself: the start panel's facts (the CLI shows them, the live loggers keep them
beside the config) and the summary it ends with."""

from __future__ import annotations

import os
from pathlib import Path

from simclr_cli.augment import describe_views
from simclr_cli.models.warm import describe as describe_encoder
from simclr_cli.runtime import describe_device
from simclr_cli.train.slurm import job_facts


def start_panel(t) -> dict:
    """What the start panel shows about the run of `t` (a `loop.Trainer`): device, precision, data, method,
    model, batch, views, optimiser, and the SLURM job it runs in."""
    cfg, ranks = t.cfg, f"rank{'s' if t.ranks.enabled else ''}"
    cuda = {"cuda": t.cuda_settings} if t.cuda_settings else {}
    return {**describe_device(t.device, t.precision), **cuda,
            "dataset": f"{t.data.name}, {len(t.data)} images {t.data.image_shape}",
            "method": cfg.method.name,
            "model": f"{describe_encoder(t.model.encoder)}, h of {t.model.encoder.feature_dim}, "
                     f"{sum(p.numel() for p in t.model.parameters()) / 1e6:.2f}M parameters"
                     + "".join(f"; {note}" for note in getattr(t.model.encoder, "notes", [])),
            "batch": f"{cfg.train.batch_size} global = {t.ranks.world_size} {ranks} x {t.local_batch}, "
                     f"{t.steps_per_epoch} steps/epoch",
            "views": describe_views(cfg.augment, cfg.data.image_size, t.view_size(), t.method.views_per_image),
            "optimizer": f"{cfg.optim.name}, lr {cfg.optim.lr}, {cfg.optim.schedule} schedule",
            "run directory": str(t.rundir.path), **job_facts(dict(os.environ))}


def end_summary(t, encoder_path: Path | None) -> dict:
    """What the finished run of `t` reports: epochs, steps, the last epoch's loss, its files and the last kNN top-1."""
    s = t.state
    return {"epochs": s.epoch, "steps": s.step, "final_loss": s.history[-1]["loss"] if s.history else None,
            "encoder": str(encoder_path), "checkpoint": str(t.rundir.checkpoint), "knn_top1": t.last_knn,
            "knn_split": t.cfg.train.eval_split}
