"""The run checkpoint: what a resumed run needs, written by the loop, read back safely.

Every load goes through `torch.load(weights_only=True)`: a file carrying a pickled object that would run
code is refused before anything in it runs. Writes go through `files.atomic_save`, so a crash or `kill -9`
never leaves a torn checkpoint behind. The encoder file format lives in `encoder_file.py`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from simclr_cli import __version__
from simclr_cli.config import Config, config_to_dict
from simclr_cli.errors import CheckpointError
from simclr_cli.runtime import capture_rng

CHECKPOINT_FORMAT = "simclr-cli/checkpoint"
ENCODER_FORMAT = "simclr-cli/encoder"


def safe_load(path: str | Path) -> Any:
    """torch.load with weights_only=True, turning every failure into a one-line CheckpointError."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a file: give the encoder.pth or checkpoint.pt inside it")
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): was it written completely?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # the file names a Python callable: loading it could run code
            raise CheckpointError(
                f"{path} holds pickled Python objects that could run code; refused (only tensors and plain "
                "data are loaded). Re-save it as a plain state dict from a source you trust"
            ) from None
        with path.open("rb") as f:
            raw_pickle = f.read(1) == b"\x80"  # pickle's PROTO opcode; torch.save writes a zip archive
        if raw_pickle:
            raise CheckpointError(f"{path} is a raw pickle stream, not a torch.save file; refused (a pickle can run "
                                  "code). Re-save it with torch.save from a source you trust") from None
        raise CheckpointError(f"{path} is truncated or not a PyTorch file (no checkpoint could be read)") from None
    except Exception as err:  # torch's readers raise RuntimeError, EOFError, BadZipFile, KeyError, ... on junk
        reason = str(err).strip().splitlines()[0].split(". ")[0][:160] if str(err).strip() else "no message"
        raise CheckpointError(f"{path} is truncated or not a PyTorch file ({type(err).__name__}: {reason}): "
                              "give a file that torch.save wrote (an encoder.pth or checkpoint.pt)") from None


def load_checkpoint(path: str | Path) -> dict:
    obj = safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        kind = "an encoder file" if isinstance(obj, dict) and obj.get("format") == ENCODER_FORMAT else "not a checkpoint"
        raise CheckpointError(f"{path} is {kind}: give the checkpoint.pt that `simclr pretrain` wrote")
    return obj


def checkpoint_payload(model: torch.nn.Module, optimizer, scheduler, scaler, cfg: Config, epoch: int, step: int,
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
