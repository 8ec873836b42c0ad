"""A run directory: the one policy for starting or resuming a run, and every file the run keeps there.

RUN_DIR/config.yaml      the resolved config, written at the start of every (re)started run
RUN_DIR/metrics.jsonl    one JSON line per logged step, epoch and evaluation; after a resume, the lines past
                         the checkpoint are dropped so the file reads as if the run never stopped, but
                         for one {"kind": "resume"} line where it went on
RUN_DIR/checkpoint.pt    the latest checkpoint, replaced atomically; with keep_last, the one it replaces is
                         kept as checkpoint-epochNNNN.pt (a hard link: no copy)
RUN_DIR/encoder.pth      the encoder file, written at the end

`resolve_config`, `check_world` and `preflight` are what `simclr pretrain` (in one process or under --nproc)
asks before any data or model is built, so a wrong start or resume fails in a second with one line.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from simclr_cli.checkpoint import load_checkpoint
from simclr_cli.config import (Config, config_from_dict, config_to_dict, dump_config, load_config,
                               merge_overrides, read_yaml)
from simclr_cli.errors import CheckpointError, ConfigError, RuntimeSetupError
from simclr_cli.files import atomic_save, atomic_write_text, remove_stale_temps, replace_with_link

# Keys a resumed run may change; anything else would make "resume" a different run.
RESUMABLE_KEYS = {"train.epochs", "train.log_every", "train.checkpoint_every", "train.keep_last",
                  "train.eval_every", "train.output_dir", "train.device", "train.dist_timeout_min", "data.root",
                  "data.num_workers", "data.cache", "data.cache_dir", "data.download", "data.read_ahead"}
FILES = ("checkpoint*.pt", "encoder.pth", "config.yaml", "metrics.jsonl")  # what a run writes (globs)


def resolve_config(config: str | Path | None, overrides: list[str], values: dict[str, Any], resume: bool,
                   auto_resume: bool = False) -> tuple[Config, bool]:
    """(the run's config, whether it resumes). The config: defaults < YAML < --set < flags. `--resume`
    without `--config` continues the run as it was configured: its own config.yaml, with this command's
    --set and flags on top. `--auto-resume` resumes when the run directory holds a checkpoint.pt and starts
    the run otherwise: what a restarted job (`torchrun --max-restarts`, a requeued cluster job) runs."""
    if resume and auto_resume:
        raise ConfigError("--resume and --auto-resume: give one (--auto-resume also starts a run that has no "
                          "checkpoint yet)")
    cfg = load_config(config, overrides, values)
    saved = Path(cfg.train.output_dir) / "config.yaml"
    if auto_resume:
        resume = (Path(cfg.train.output_dir) / "checkpoint.pt").exists()
    if config is None and resume and saved.is_file():
        cfg = config_from_dict(merge_overrides(read_yaml(saved), overrides, values))
    return cfg, resume


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume_config(saved: dict, cfg: Config) -> list[str]:
    """Changed keys between the checkpoint's config and this run's; refuse any that are not safe."""
    old, new, default = _flatten(saved), _flatten(config_to_dict(cfg)), _flatten(config_to_dict(Config()))
    # A key the saved config lacks (written before the key existed) had its default then.
    changed = sorted(k for k in new if old.get(k, default.get(k)) != new[k])
    unsafe = [k for k in changed if k not in RESUMABLE_KEYS]
    if unsafe:
        diffs = ", ".join(f"{k}: {old.get(k, default.get(k))!r} -> {new[k]!r}" for k in unsafe)
        raise ConfigError(f"resume refused, the config changed ({diffs}); only {', '.join(sorted(RESUMABLE_KEYS))} "
                          "may change on resume: start a new run with another --output-dir instead")
    return [f"{k}: {old.get(k, default.get(k))!r} -> {new[k]!r}" for k in changed]


def check_world(cfg: Config, world_size: int, device: torch.device) -> None:
    """Refuse what cannot run on `world_size` processes; `simclr pretrain --nproc` asks before it starts any."""
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must divide evenly over "
                          f"{world_size} processes: pick a multiple of {world_size}")
    if cfg.model.sync_bn and world_size > 1 and device.type != "cuda":
        # torch's SyncBatchNorm raises on CPU tensors ("expected input tensor to be on GPU"): refuse up front.
        raise RuntimeSetupError(f"model.sync_bn needs CUDA GPUs; SyncBatchNorm has no {device.type} path: "
                                "set model.sync_bn=false (each rank then normalises over its own views)")


def preflight(cfg: Config, resume: bool, load: bool = True) -> dict | None:
    """New run or resume, decided before anything is built: a new run never replaces another run's
    checkpoint; a resume needs a checkpoint whose config differs only in RESUMABLE_KEYS. Returns the
    loaded checkpoint (weights_only) for a resume, None for a new run or when `load` is False (the
    --nproc launcher: the ranks load it themselves)."""
    path = Path(cfg.train.output_dir) / "checkpoint.pt"
    if not resume:
        if path.exists():
            raise ConfigError(f"{path} already exists: add --resume to continue that run, or choose another "
                              "--output-dir")
        return None
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint: give --output-dir a run directory")
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: {path} does not exist (drop --resume to start a new run)")
    if not load:
        return None
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} holds no config: give the checkpoint.pt that `simclr pretrain` wrote")
    check_resume_config(ckpt["config"], cfg)
    return ckpt


class RunDir:
    """The files of one run directory; rank 0 alone calls the methods that write."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoint, self.encoder = self.path / "checkpoint.pt", self.path / "encoder.pth"
        self.config, self.metrics = self.path / "config.yaml", self.path / "metrics.jsonl"

    def check_writable(self) -> None:
        """Refuse a directory that cannot be written, without creating it: a run that fails on its data or
        model afterwards leaves no empty run directory behind (`start` creates it)."""
        existing = next(p for p in (self.path, *self.path.parents) if p.exists() or p == p.parent)
        if not existing.is_dir():
            raise ConfigError(f"output directory {self.path}: {existing} is a file, not a folder: choose another "
                              "--output-dir")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"output directory {self.path} is not writable (no write permission on {existing}): "
                              "choose another --output-dir")

    def remove_stale_temps(self) -> list[Path]:
        """Temporary files a killed run left behind (`kill -9` mid-write); nothing ever reads them."""
        return remove_stale_temps(self.path, FILES)

    def start(self, cfg: Config, new: bool) -> None:
        """Create the directory and write config.yaml; a new run drops the metrics of an earlier attempt that
        never reached a checkpoint."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create output directory {self.path} ({err.strerror}): choose another "
                              "--output-dir") from None
        if new:
            self.metrics.unlink(missing_ok=True)
        atomic_write_text(dump_config(cfg), self.config)

    def append(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint (and a line torn by a kill), so the resumed run's
        lines follow on as in a run that never stopped."""
        if not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
        atomic_write_text("".join(kept), self.metrics)

    def save_checkpoint(self, payload: dict, keep_last: int, replaced_epoch: int | None) -> Path:
        """Replace checkpoint.pt atomically. With keep_last, the checkpoint it replaces, when that one was
        written at the end of epoch `replaced_epoch`, is kept as checkpoint-epochNNNN.pt; only the newest
        keep_last such copies stay."""
        if keep_last and replaced_epoch is not None and self.checkpoint.exists():
            replace_with_link(self.checkpoint, self.path / f"checkpoint-epoch{replaced_epoch:04d}.pt")
        atomic_save(payload, self.checkpoint)
        for _, old in self.epoch_copies()[: -keep_last or None]:
            old.unlink(missing_ok=True)
        return self.checkpoint

    def epoch_copies(self) -> list[tuple[int, Path]]:
        found = [(int(m.group(1)), p) for p in self.path.glob("checkpoint-epoch*.pt")
                 if (m := re.fullmatch(r"checkpoint-epoch(\d+)\.pt", p.name))]
        return sorted(found)

    def write_encoder(self, payload: dict) -> Path:
        return atomic_save(payload, self.encoder)
