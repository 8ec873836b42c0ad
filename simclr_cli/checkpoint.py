"""Checkpoints and encoder files: atomic writes, safe loading, and the self-describing encoder format.

Every load goes through `torch.load(weights_only=True)`: a file carrying a pickled object that would run
code is refused before anything in it runs. Every write goes to a temporary file in the same folder, is
fsync'ed, then renamed over the target, so a crash or `kill -9` never leaves a torn file behind.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from simclr_cli import __version__
from simclr_cli.config import Config, config_digest, config_from_dict, config_to_dict
from simclr_cli.model import ProjectionHead, ResNetEncoder, SimCLR

CHECKPOINT_FORMAT = "simclr-cli/checkpoint"
ENCODER_FORMAT = "simclr-cli/encoder"


class CheckpointError(ValueError):
    """A file that cannot be used as asked; the message is one line naming the fix."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def safe_load(path: str | Path) -> Any:
    """torch.load with weights_only=True, turning every failure into a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): was it written completely?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path} holds pickled Python objects that could run code; refused (only tensors and plain "
                "data are loaded). Re-save it as a plain state dict from a source you trust"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch file this tool can read ({err})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is truncated or not a PyTorch file ({reason})") from None


def capture_rng(generator: torch.Generator | None = None) -> dict:
    import random

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["augment"] = generator.get_state()
    return state


def restore_rng(state: dict, generator: torch.Generator | None = None) -> None:
    import random

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "augment" in state:
        generator.set_state(state["augment"])


def load_checkpoint(path: str | Path) -> dict:
    obj = safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        kind = "an encoder file" if isinstance(obj, dict) and obj.get("format") == ENCODER_FORMAT else "not a checkpoint"
        raise CheckpointError(f"{path} is {kind}: give the checkpoint.pt that `simclr pretrain` wrote")
    return obj


def encoder_payload(encoder: ResNetEncoder, cfg: Config, head: ProjectionHead | None = None,
                    mean=None, std=None, **provenance: Any) -> dict:
    """The native encoder file: everything needed to rebuild and use the encoder, plus where it came from."""
    payload = {
        "format": ENCODER_FORMAT,
        "format_version": 1,
        **encoder.describe(),
        "image_size": cfg.data.image_size,
        "mean": list(mean) if mean is not None else None,
        "std": list(std) if std is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        "provenance": {"simclr_cli": __version__, "dataset": cfg.data.dataset,
                       "config_digest": config_digest(cfg), **provenance},
    }
    if head is not None:
        payload["head"] = {"hidden": cfg.model.head_hidden, "out": cfg.model.head_out,
                           "layers": cfg.model.head_layers,
                           "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}}
    return payload


def model_from_checkpoint(ckpt: dict) -> tuple[SimCLR, Config]:
    from simclr_cli.model import build_model

    cfg = config_from_dict(ckpt["config"])
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["model"])
    return model, cfg


def checkpoint_payload(model: SimCLR, optimizer, scheduler, scaler, cfg: Config, epoch: int, step: int,
                       generator: torch.Generator | None, extra: dict | None = None) -> dict:
    """The resumable state of a run: weights, optimiser, schedule, scaler, counters, RNG and config."""
    return {
        "format": CHECKPOINT_FORMAT,
        "simclr_cli": __version__,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,  # epochs completed
        "step": step,  # optimiser steps completed
        "rng": capture_rng(generator),
        "config": config_to_dict(cfg),
        **(extra or {}),
    }
