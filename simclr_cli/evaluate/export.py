"""`simclr extract`: the encoder of a pretraining checkpoint, alone, in one of the formats of EXPORTS.

native: the self-describing encoder file (description, input, weights, projection head, provenance).
torchvision: the plain state dict that torchvision's model loads with strict=True, its classifier set to
nn.Identity() (and a built-in ResNet's stem as trained). timm: the state dict of a timm model, which
`timm.create_model(NAME, num_classes=0, **kwargs)` loads with strict=True. Every file is written atomically and loads with `torch.load(path, weights_only=True)`.

A new format: a function (LoadedEncoder) -> what torch.save writes, here, one line in EXPORTS, and its tests
(copy tests/test_extract_probe.py's round trip).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from simclr_cli.errors import CheckpointError
from simclr_cli.files import CHECKPOINT_FORMAT, ENCODER_FORMAT, atomic_save, safe_load
from simclr_cli.models import LibraryEncoder
from simclr_cli.models.encoder_file import LoadedEncoder, read_encoder
from simclr_cli.models.library import library_state_dict


def native(loaded: LoadedEncoder) -> dict:
    return loaded.payload()


def torchvision(loaded: LoadedEncoder) -> dict:
    """torchvision's own state dict: of a torchvision:NAME model (classifier removed), or of a built-in ResNet
    at width 64 (torchvision's ResNet with its stem as trained and fc = nn.Identity())."""
    encoder, spec = loaded.encoder, loaded.encoder.describe()
    if isinstance(encoder, LibraryEncoder):
        if not spec["arch"].startswith("torchvision:"):
            raise CheckpointError(f"{spec['arch']} is not a torchvision model: use --format native or "
                                  f"--format {spec['arch'].split(':')[0]}")
        return library_state_dict(encoder)
    if spec.get("width") != 64:
        raise CheckpointError(f"the torchvision format needs width 64 (torchvision's ResNet); this encoder has width "
                              f"{spec.get('width')}: use --format native")
    return {k: v.detach().cpu() for k, v in encoder.state_dict().items()}


def timm(loaded: LoadedEncoder) -> dict:
    """timm's own state dict of a timm:NAME model: `timm.create_model(NAME, num_classes=0, **kwargs)` loads it."""
    spec = loaded.encoder.describe()
    if not spec["arch"].startswith("timm:"):
        raise CheckpointError(f"{spec['arch']} is not a timm model: use --format native"
                              + (" or --format torchvision" if spec["arch"].startswith(("torchvision:", "resnet")) else ""))
    return library_state_dict(loaded.encoder)


EXPORTS: dict[str, Callable[[LoadedEncoder], dict]] = {"native": native, "torchvision": torchvision, "timm": timm}


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
            "std": list(loaded.std), "provenance": loaded.provenance, "load": load_hint(loaded.encoder, fmt, out)}


def load_hint(encoder, fmt: str, path: Path) -> str | None:
    """The Python line that loads the written file into its library's own model (None for the native file)."""
    spec, load = encoder.describe(), f"load_state_dict(torch.load('{path}', weights_only=True), strict=True)"
    family, _, name = spec["arch"].rpartition(":")
    kwargs = "".join(f", {k}={v!r}" for k, v in (spec.get("kwargs") or {}).items())
    stem = "  (trained with the small-image stem: see README Backbones)" if spec["stem"] == "cifar" else ""
    if fmt == "torchvision" and not family:  # a built-in ResNet
        cifar = ("; m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); m.maxpool = torch.nn.Identity()"
                 if spec["stem"] == "cifar" else "")
        return f"m = torchvision.models.{spec['arch']}(){cifar}; m.fc = torch.nn.Identity(); m.{load}"
    if fmt == "torchvision":
        return (f"m = torchvision.models.get_model({name!r}{kwargs}); m.{encoder.removed} = torch.nn.Identity(); "
                f"m.{load}{stem}")
    if fmt == "timm":
        return f"m = timm.create_model({name!r}, num_classes=0{kwargs}); m.{load}{stem}"
    return None
