"""A run directory: every file a run keeps, by name, and the reading and writing of its metrics.

RUN_DIR/config.yaml      the resolved config, written at the start of every (re)started run
RUN_DIR/metrics.jsonl    one JSON line per logged step, epoch and evaluation; after a resume, the lines past
                         the checkpoint are dropped so the file reads as if the run never stopped, but
                         for one {"kind": "resume"} line where it went on
RUN_DIR/checkpoint.pt    the latest checkpoint, replaced atomically; with keep_last, the one it replaces is
                         kept as checkpoint-epochNNNN.pt (a hard link: no copy)
RUN_DIR/encoder.pth      the encoder file, written at the end
RUN_DIR/loggers.json     with train.loggers: the W&B and MLflow runs a resume continues (train/loggers.py);
                         RUN_DIR/tensorboard/ and RUN_DIR/wandb/ hold those loggers' own files

The training loop writes them (rank 0 alone), `simclr report` and `simclr pretrain --nproc` read them; what
a start or a resume is allowed to do with them is `train.preflight`'s.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from simclr_cli.config import Config, config_from_dict, dump_config, read_yaml
from simclr_cli.errors import ConfigError, OptionError
from simclr_cli.files import atomic_save, atomic_write_text, remove_stale_temps, replace_with_link

FILES = ("checkpoint*.pt", "encoder.pth", "config.yaml", "metrics.jsonl", "loggers.json")  # what a run writes (globs)


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a line torn by a kill (or being written now) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


SCALAR_PREFIX = {"step": "train", "epoch": "epoch", "eval": "eval"}  # record kind -> tag prefix


def scalars(record: dict) -> dict[str, float]:
    """A record's numbers under the tags the live loggers and `simclr report --tensorboard` give them:
    train/KEY per log window, epoch/KEY per epoch, eval/KEY per evaluation (kNN, health); {} for others."""
    prefix = SCALAR_PREFIX.get(record.get("kind"))
    if prefix is None:
        return {}
    return {f"{prefix}/{key}": float(value) for key, value in record.items()
            if key not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)}


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

    def records(self) -> list[dict]:
        return read_metrics(self.metrics)

    def read_config(self) -> Config:
        """The run's config.yaml; a folder without one is not a run directory (one line naming the fix)."""
        if not self.path.is_dir() or not self.config.is_file():
            raise OptionError(f"{self.path} is not a run directory (no config.yaml): give the folder `simclr "
                              "pretrain` wrote, its train.output_dir")
        return config_from_dict(read_yaml(self.config))

    def latest_encoder_source(self) -> Path | None:
        """encoder.pth, else checkpoint.pt (a run still going or stopped), else None."""
        return next((p for p in (self.encoder, self.checkpoint) if p.is_file()), None)
