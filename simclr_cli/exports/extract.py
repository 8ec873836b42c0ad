"""`simclr extract`: the encoder of a pretraining checkpoint, alone, in one of the formats of
`registry.EXPORTS` (each an `artifacts.ExportFormat`: suffix, what it takes, writer, reader, load hint).

native: the self-describing encoder file (description, input, weights, projection head, provenance).
torchvision: the plain state dict that torchvision's model loads with strict=True, its classifier set to
nn.Identity() (and a built-in ResNet's stem as trained). timm: the state dict of a timm model, which
`timm.create_model(NAME, num_classes=0, **kwargs)` loads with strict=True. These load with
`torch.load(path, weights_only=True)`; which state dicts an encoder has, and the line that loads them, its
backbone family says (`models.library.LibraryFamily`). onnx, torchscript, safetensors: for other runtimes,
each written with the preprocessing it needs and checked against the PyTorch encoder before it is kept
(`portable.py`, `onnx.py`, `portable_files.py`). Every file is written atomically.

A new format: an `ExportFormat` in a file of its own (its `write(LoadedEncoder, path, options) -> {facts}`
writes the file atomically), one line in `registry.EXPORTS` or an entry point of the group
`simclr_cli.exports`, and its tests (copy tests/test_exports.py's round trip).
"""

from __future__ import annotations

from pathlib import Path

from simclr_cli.artifacts import (Artifact, Checkpoint, ClassifierFile, EncoderFile, ExportFormat, StateDict,
                                  of_content)
from simclr_cli.errors import CheckpointError
from simclr_cli.exports.onnx import OPSET
from simclr_cli.files import atomic_save, check_output_path, safe_load
from simclr_cli.models import family_of
from simclr_cli.models.classifier import as_encoder, load_classifier
from simclr_cli.models.encoder_file import LoadedEncoder, encoder_of
from simclr_cli.registry import EXPORTS


def library_state(encoder, fmt: str) -> dict:
    """The state dict of library format `fmt` (torchvision, timm), as the encoder's family lays it out; a
    family that has no such state dict is one line naming the formats it has."""
    arch = encoder.describe()["arch"]
    family = family_of(arch)
    if fmt not in family.formats:
        raise CheckpointError(f"{arch} is not a {fmt} model: use --format native"
                              + "".join(f" or --format {other}" for other in family.formats))
    return family.library_state(encoder, fmt)


def load_line(path: Path) -> str:
    return f"load_state_dict(torch.load('{path}', weights_only=True), strict=True)"


def library_format(name: str, help: str) -> ExportFormat:
    """A library's own state dict (torch.save): `name` is one of the `formats` a backbone family declares."""
    def write(loaded: LoadedEncoder, path: Path, options: dict) -> dict:
        atomic_save(library_state(loaded.encoder, name), path)
        return {}

    def hint(encoder, path: Path) -> str:
        return family_of(encoder.describe()["arch"]).load_hint(encoder, name, load_line(path))

    return ExportFormat(name, "pth", help, write, hint, reads_as=StateDict)


def _write_native(loaded: LoadedEncoder, path: Path, options: dict) -> dict:
    atomic_save(loaded.payload(), path)
    return {}


NATIVE = ExportFormat("native", "pth", "self-describing encoder file with head and provenance", _write_native,
                      lambda encoder, path: None, reads_as=EncoderFile, with_head=True)
TORCHVISION = library_format("torchvision", "torchvision's own state dict (a built-in ResNet: width 64)")
TIMM = library_format("timm", "timm's own state dict")


def formats() -> list[ExportFormat]:
    """Every export format that imports (a plugin that does not is a warning, and left out)."""
    return [f for f in (EXPORTS.load(entry) for entry in EXPORTS.entries()) if f is not None]


def _listed(names: list[str], last: str) -> str:
    return ", ".join(names[:-1]) + f" {last} {names[-1]}" if len(names) > 1 else "".join(names)


def _check_source(artifact: Artifact, export: ExportFormat) -> None:
    """The file is one `export` takes (a checkpoint, or an encoder or classifier file), or one line."""
    path, taking = artifact.path, lambda kind: [f.name for f in formats() if kind in f.takes]
    if isinstance(artifact, ClassifierFile):
        if ClassifierFile not in export.takes:
            raise CheckpointError(f"{path} is a classifier file (simclr finetune): it exports with --format "
                                  f"{_listed(taking(ClassifierFile), 'or')}; the .pth itself is what simclr predict reads")
    elif isinstance(artifact, EncoderFile):
        if EncoderFile not in export.takes:
            raise CheckpointError(f"{path} is already an encoder file; use it directly (probe and embed take it), or "
                                  f"export it with --format {_listed(taking(EncoderFile), 'or')}")
    elif not isinstance(artifact, Checkpoint):
        raise CheckpointError(f"{path} is not a checkpoint that `simclr pretrain` wrote: give a run's checkpoint.pt"
                              f" (or, for {_listed(taking(EncoderFile), 'and')}, its encoder.pth)")


def extract_encoder(checkpoint_path: str | Path, out_path: str | Path, fmt: str = "native",
                    opset: int = OPSET) -> dict:
    """Write the encoder of a pretraining checkpoint alone, atomically, in format `fmt` (`opset`: ONNX's);
    the portable formats also take a native encoder file. Returns a summary."""
    path, out = Path(checkpoint_path), Path(out_path).expanduser()
    if fmt not in EXPORTS:
        raise CheckpointError(f"unknown encoder format {fmt!r}: use {', '.join(EXPORTS)}")
    export: ExportFormat = EXPORTS[fmt]
    check_output_path(out, f"encoder.{export.suffix}")
    export.needs()  # one line naming the extra, before the checkpoint is read
    artifact = of_content(safe_load(path), path)
    _check_source(artifact, export)
    if out.resolve() == path.resolve():
        raise CheckpointError(f"-o {out} would overwrite the checkpoint itself: choose another output path")
    # the weights fit the architecture, or one line
    loaded = as_encoder(load_classifier(path, artifact.data)) if isinstance(artifact, ClassifierFile) else \
        encoder_of(artifact)
    facts = export.write(loaded, out, {"opset": opset})
    return {**facts, "path": str(out), "format": fmt, "has_head": export.with_head and loaded.head is not None,
            "bytes": out.stat().st_size,
            **loaded.encoder.describe(), "image_size": loaded.image_size, "mean": list(loaded.mean),
            "std": list(loaded.std), "provenance": loaded.provenance, "load": export.hint(loaded.encoder, out)}


def load_hint(encoder, fmt: str, path: Path) -> str | None:
    """The Python line that loads the written file into its library's own model (None for the native file)."""
    return EXPORTS[fmt].hint(encoder, path)
