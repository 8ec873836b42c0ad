"""`simclr extract`: the encoder of a pretraining checkpoint, alone, in one of the formats of EXPORTS.

native: the self-describing encoder file (description, input, weights, projection head, provenance).
torchvision: the plain state dict that torchvision's ResNet (stem adjusted, fc = nn.Identity()) loads with
strict=True. Every file is written atomically and loads with `torch.load(path, weights_only=True)`.

A new format: a function (LoadedEncoder) -> what torch.save writes, here, one line in EXPORTS, and its tests
(copy tests/test_extract_probe.py's round trip).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from simclr_cli.errors import CheckpointError
from simclr_cli.files import CHECKPOINT_FORMAT, ENCODER_FORMAT, atomic_save, safe_load
from simclr_cli.models.encoder_file import LoadedEncoder, read_encoder


def native(loaded: LoadedEncoder) -> dict:
    return loaded.payload()


def torchvision(loaded: LoadedEncoder) -> dict:
    spec = loaded.encoder.describe()
    if spec.get("width") != 64:
        raise CheckpointError(f"the torchvision format needs width 64 (torchvision's ResNet); this encoder has width "
                              f"{spec.get('width')}: use --format native")
    return {k: v.detach().cpu() for k, v in loaded.encoder.state_dict().items()}


EXPORTS: dict[str, Callable[[LoadedEncoder], dict]] = {"native": native, "torchvision": torchvision}


def extract_encoder(checkpoint_path: str | Path, out_path: str | Path, fmt: str = "native") -> dict:
    """Write the encoder of a pretraining checkpoint alone, atomically, in format `fmt`. Returns a summary."""
    path, out = Path(checkpoint_path), Path(out_path)
    if fmt not in EXPORTS:
        raise CheckpointError(f"unknown encoder format {fmt!r}: use {' or '.join(EXPORTS)}")
    obj = safe_load(path)
    if isinstance(obj, dict) and obj.get("format") == ENCODER_FORMAT:
        raise CheckpointError(f"{path} is already an encoder file; use it directly (probe and embed take it)")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint that `simclr pretrain` wrote: give a run's checkpoint.pt")
    if out.resolve() == path.resolve():
        raise CheckpointError(f"-o {out} would overwrite the checkpoint itself: choose another output path")
    loaded = read_encoder(obj, path)  # the weights fit the architecture, or one line
    atomic_save(EXPORTS[fmt](loaded), out)
    return {"path": str(out), "format": fmt, "has_head": fmt == "native" and loaded.head is not None,
            **loaded.encoder.describe(), "image_size": loaded.image_size, "mean": list(loaded.mean),
            "std": list(loaded.std), "provenance": loaded.provenance}
