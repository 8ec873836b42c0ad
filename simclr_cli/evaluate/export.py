"""`simclr extract`: the encoder of a pretraining checkpoint, alone, in one of the formats of EXPORTS.

native: the self-describing encoder file (description, input, weights, projection head, provenance).
torchvision: the plain state dict that torchvision's model loads with strict=True, its classifier set to
nn.Identity() (and a built-in ResNet's stem as trained). timm: the state dict of a timm model, which
`timm.create_model(NAME, num_classes=0, **kwargs)` loads with strict=True. These load with
`torch.load(path, weights_only=True)`. onnx, torchscript, safetensors: for other runtimes, each written with
the preprocessing it needs and checked against the PyTorch encoder before it is kept (`portable.py`,
`export_onnx.py`, `export_portable.py`). Every file is written atomically.

A new format: a function (LoadedEncoder, path, options) -> {facts} that writes the file atomically, in a file here,
one line in EXPORTS, and its tests (copy tests/test_exports.py's round trip).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from simclr_cli.errors import CheckpointError
from simclr_cli.evaluate import export_onnx
from simclr_cli.evaluate.export_portable import write_safetensors, write_torchscript
from simclr_cli.files import (CHECKPOINT_FORMAT, CLASSIFIER_FORMAT, ENCODER_FORMAT, atomic_save, check_output_path,
                              safe_load)
from simclr_cli.models import LibraryEncoder
from simclr_cli.models.classifier import as_encoder, load_classifier
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


def saved(state: Callable[[LoadedEncoder], dict]) -> Callable[[LoadedEncoder, Path, dict], dict]:
    """A format that is what torch.save writes."""
    def write(loaded: LoadedEncoder, path: Path, options: dict) -> dict:
        atomic_save(state(loaded), path)
        return {}
    return write


# format -> write(loaded, path, options) -> facts; options: {"opset": N} (ONNX's)
EXPORTS: dict[str, Callable[[LoadedEncoder, Path, dict], dict]] = {
    "native": saved(native), "torchvision": saved(torchvision), "timm": saved(timm),
    "onnx": export_onnx.write, "torchscript": write_torchscript, "safetensors": write_safetensors,
}


def extract_encoder(checkpoint_path: str | Path, out_path: str | Path, fmt: str = "native",
                    opset: int = export_onnx.OPSET) -> dict:
    """Write the encoder of a pretraining checkpoint alone, atomically, in format `fmt` (`opset`: ONNX's);
    the portable formats also take a native encoder file. Returns a summary."""
    path, out = Path(checkpoint_path), Path(out_path).expanduser()
    if fmt not in EXPORTS:
        raise CheckpointError(f"unknown encoder format {fmt!r}: use {', '.join(EXPORTS)}")
    check_output_path(out, f"encoder.{SUFFIX.get(fmt, 'pth')}")
    if fmt == "onnx":
        export_onnx.require(*export_onnx.NEEDS)  # one line naming the extra, before the checkpoint is read
    obj = safe_load(path)
    kind = obj.get("format") if isinstance(obj, dict) else None
    if kind == ENCODER_FORMAT and fmt in ("native", "torchvision", "timm"):
        raise CheckpointError(f"{path} is already an encoder file; use it directly (probe and embed take it), or "
                              "export it with --format onnx, torchscript or safetensors")
    if kind == CLASSIFIER_FORMAT and fmt not in ("onnx", "torchscript"):
        raise CheckpointError(f"{path} is a classifier file (simclr finetune): it exports with --format onnx or "
                              "torchscript; the .pth itself is what simclr predict reads")
    if kind not in (CHECKPOINT_FORMAT, ENCODER_FORMAT, CLASSIFIER_FORMAT):
        raise CheckpointError(f"{path} is not a checkpoint that `simclr pretrain` wrote: give a run's checkpoint.pt"
                              " (or, for onnx, torchscript and safetensors, its encoder.pth)")
    if out.resolve() == path.resolve():
        raise CheckpointError(f"-o {out} would overwrite the checkpoint itself: choose another output path")
    # the weights fit the architecture, or one line
    loaded = as_encoder(load_classifier(path, obj)) if kind == CLASSIFIER_FORMAT else read_encoder(obj, path)
    facts = EXPORTS[fmt](loaded, out, {"opset": opset})
    return {**facts, "path": str(out), "format": fmt, "has_head": fmt == "native" and loaded.head is not None,
            "bytes": out.stat().st_size,
            **loaded.encoder.describe(), "image_size": loaded.image_size, "mean": list(loaded.mean),
            "std": list(loaded.std), "provenance": loaded.provenance, "load": load_hint(loaded.encoder, fmt, out)}


SUFFIX = {"onnx": "onnx", "torchscript": "pt", "safetensors": "safetensors"}  # for the hint of a folder given as -o


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
    if fmt == "onnx":
        return (f"onnxruntime.InferenceSession('{path}').run(None, {{'images': x}})[0], x float32 (N, 3, H, W) "
                "preprocessed as the file's 'simclr-cli' metadata says (README: Using the encoder elsewhere)")
    if fmt == "torchscript":
        return f"m = torch.jit.load('{path}'); h = m(x)  (torch alone; the metadata: _extra_files={{'simclr-cli.json': ''}})"
    if fmt == "safetensors":
        return f"safetensors.torch.load_file('{path}'), the model's own keys; `simclr embed --encoder {path}` reads it too"
    return None
