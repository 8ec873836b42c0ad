"""What a file is, decided once, and the keys of the project's own files, spelled once.

`open_artifact(path)` says what a file is and returns it typed: a run's `Checkpoint`, a native
`EncoderFile`, a `ClassifierFile` (`simclr finetune`), a bare `StateDict` of tensors (torchvision's, timm's,
the original design's: warm start and the encoder readers take them), or a portable export
(`TorchScriptExport`, `OnnxExport`, `SafetensorsExport`). Anything else is one line. The portable files are
recognised before any torch.load: safetensors and TorchScript by their content, ONNX by its name (protobuf
has no signature to read). Torch files are read through `files.safe_load` (`torch.load(weights_only=True)`);
`of_content(obj, path)` types what a caller already read, for the readers that take torch files alone.

The keys of a checkpoint ("model", "optimizer", "encoder", "config", ...), of an encoder file and of a
classifier file are written by each kind's `payload` and read through its accessors, nowhere else. The
wings build on this: `models.encoder_file` turns a kind into an encoder, `train.state` a checkpoint into
a run, and the export formats of `registry.EXPORTS` (`ExportFormat`) write these files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from simclr_cli import __version__
from simclr_cli.errors import CheckpointError
from simclr_cli.files import (CHECKPOINT_FORMAT, CLASSIFIER_FORMAT, ENCODER_FORMAT, is_safetensors, is_torchscript,
                              safe_load)

PORTABLE_KEY = "simclr-cli"  # where an exported file keeps its description (exports.portable writes it)


def what(obj: Any) -> str:
    """An object's type in words, for a refusal: "a list", "an empty dict"."""
    return "an empty dict" if obj == {} else f"a {type(obj).__name__}"


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return " ".join(text.split()) if len(text) < 200 else text.splitlines()[0][:200]


@dataclass
class Artifact:
    """A file of a known kind. `kind`: its name in words, as the one-line messages say it."""

    path: Path
    kind: ClassVar[str] = "file"

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path)}


@dataclass
class Checkpoint(Artifact):
    """A run's checkpoint.pt (`train.state` writes and restores it): `data` is the dict torch.load gave."""

    data: dict
    kind: ClassVar[str] = "pretraining checkpoint"
    FORMAT: ClassVar[str] = CHECKPOINT_FORMAT

    @staticmethod
    def payload(*, config: dict, model: dict, method: dict, optimizer: dict, scheduler: dict, scaler: dict | None,
                epoch: int, step: int, history: list, epoch_losses: list, rng: dict, world_size: int,
                train_images: int, encoder: dict) -> dict:
        return {"format": CHECKPOINT_FORMAT, "simclr_cli": __version__, "config": config, "model": model,
                "method": method, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "epoch": epoch,
                "step": step, "history": history, "epoch_losses": epoch_losses, "rng": rng,
                "world_size": world_size, "train_images": train_images, "encoder": encoder}

    # A missing key raises KeyError where the run cannot go on without it (the callers word the line);
    # the keys a file of simclr-cli 0.1 lacks have the default that version meant.
    config = property(lambda self: self.data["config"])
    has_config = property(lambda self: isinstance(self.data.get("config"), dict))
    model = property(lambda self: self.data["model"])
    method = property(lambda self: self.data.get("method", {}))
    optimizer = property(lambda self: self.data["optimizer"])
    scheduler = property(lambda self: self.data["scheduler"])
    scaler = property(lambda self: self.data.get("scaler"))
    epoch = property(lambda self: self.data["epoch"])
    step = property(lambda self: self.data["step"])
    history = property(lambda self: self.data.get("history", []))
    epoch_losses = property(lambda self: self.data.get("epoch_losses", []))
    rng = property(lambda self: self.data["rng"])
    world_size = property(lambda self: self.data.get("world_size", 1))
    version = property(lambda self: self.data.get("simclr_cli"))

    def train_images(self, default: int) -> int:
        return self.data.get("train_images", default)

    @property
    def encoder(self) -> dict | None:
        """The description of the encoder inside "model"; None in a checkpoint of simclr-cli 0.1."""
        return self.data["encoder"] if isinstance(self.data.get("encoder"), dict) else None

    def position(self) -> dict:
        """{"epoch", "step"} where it was saved, None where the file does not say (a provenance)."""
        return {"epoch": self.data.get("epoch"), "step": self.data.get("step")}


@dataclass
class EncoderFile(Artifact):
    """The native encoder file (`models.encoder_file`): description, input, weights, head, provenance."""

    data: dict
    kind: ClassVar[str] = "native encoder file"
    FORMAT: ClassVar[str] = ENCODER_FORMAT

    @classmethod
    def payload(cls, meta: dict, weights: dict, head_weights: dict | None = None) -> dict:
        """The file of an encoder described by `meta` (its "head": the head's spec, or None)."""
        payload = {"format": cls.FORMAT, "format_version": 1, **meta, "state_dict": weights}
        if head_weights is not None:
            payload["head"] = {**meta["head"], "state_dict": head_weights}
        else:
            payload.pop("head", None)
        return payload

    weights = property(lambda self: self.data.get("state_dict"))
    head = property(lambda self: self.data.get("head") or None)  # the head's spec and "state_dict", or None
    head_weights = property(lambda self: self.head.get("state_dict") if self.head else None)  # once head is a mapping

    @property
    def description(self) -> dict:
        return {**self.data, "head": self.head}


@dataclass
class ClassifierFile(EncoderFile):
    """The classifier file (`models.classifier`): a native encoder file with a "classifier" section."""

    kind: ClassVar[str] = "classifier file"
    FORMAT: ClassVar[str] = CLASSIFIER_FORMAT

    @staticmethod
    def with_section(encoder_payload: dict, section: dict) -> dict:
        return {**encoder_payload, "format": CLASSIFIER_FORMAT, "classifier": section}

    section = property(lambda self: self.data.get("classifier"))

    def encoder_part(self) -> EncoderFile:
        return EncoderFile(self.path, {**self.data, "format": ENCODER_FORMAT})


@dataclass
class StateDict(Artifact):
    """A bare state dict of tensors, keyed as its library keys it; what model it is, its keys say."""

    state: dict
    kind: ClassVar[str] = "state dict"

    @property
    def sequential(self) -> bool:
        """The original design's `nn.Sequential(*list(resnet18.children())[:-1])`: keys "0.weight", "4.0...."."""
        return all(k.split(".", 1)[0].isdigit() for k in self.state)


@dataclass
class TorchScriptExport(Artifact):
    kind: ClassVar[str] = "TorchScript file"

    def refuse(self) -> CheckpointError:
        return CheckpointError(f"{self.path} is a TorchScript file, for torch.jit.load without simclr-cli: give "
                               "simclr the encoder.pth it came from, or an .onnx or .safetensors export")


@dataclass
class OnnxExport(Artifact):
    kind: ClassVar[str] = "ONNX file"  # run through onnxruntime (`exports.onnx.OnnxEncoder`)


@dataclass
class SafetensorsExport(Artifact):
    kind: ClassVar[str] = "safetensors file"

    def read(self) -> tuple[dict, dict]:
        """(its description under PORTABLE_KEY, checked for the fields a reader needs; its weights, keyed as the
        model's library keys them)."""
        from safetensors import safe_open

        path = self.path
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get(PORTABLE_KEY) or "null")
                weights = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(err)})") from None
        if not isinstance(meta, dict) or "model" not in meta:
            raise CheckpointError(f"{path} carries no simclr-cli description: export it with `simclr extract --format "
                                  "safetensors`")
        missing = [k for k in ("image_size", "mean", "std") if k not in meta]
        if not isinstance(meta["model"], dict) or missing:
            field = f"'{missing[0]}' is missing" if missing else f"'model' is {what(meta['model'])}, not a mapping"
            raise CheckpointError(f"{path}: its {PORTABLE_KEY} description is damaged ({field}): export it again with "
                                  "`simclr extract --format safetensors`")
        return meta, weights


@dataclass
class Foreign(Artifact):
    """A torch file that is none of the kinds above. `why`: "empty" (not a dict, or an empty one), "format" (a
    "format" this version does not read) or "mixed" (a dict that is not all tensors)."""

    obj: Any
    why: str
    kind: ClassVar[str] = "unknown file"

    def refuse(self) -> CheckpointError:
        if self.why == "format":
            return CheckpointError(f"{self.path} has format {self.obj['format']!r}, which simclr-cli {__version__} "
                                   "does not read")
        held = f"holds {what(self.obj)}" if self.why == "empty" else "is neither a simclr-cli file nor a state dict of tensors"
        return CheckpointError(f"{self.path} {held}: give a checkpoint.pt, an encoder.pth, a classifier.pth, a "
                               "state dict or an export of `simclr extract`")


KINDS: tuple[type[EncoderFile] | type[Checkpoint], ...] = (Checkpoint, ClassifierFile, EncoderFile)  # by "format"


def of_content(obj: Any, path: str | Path) -> Artifact:
    """The kind of what `files.safe_load(path)` returned."""
    path = Path(path)
    if not isinstance(obj, dict) or not obj:
        return Foreign(path, obj, "empty")
    fmt = obj.get("format")
    for kind in KINDS:
        if fmt == kind.FORMAT:
            return kind(path, obj)
    if isinstance(fmt, str):
        return Foreign(path, obj, "format")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return Foreign(path, obj, "mixed")
    return StateDict(path, obj)


def identify(path: str | Path) -> Artifact:
    """The kind of the file at `path`, a foreign one included: portable exports by their content (ONNX by its
    name), every other file through `safe_load` (a missing, empty or unsafe file is its one line)."""
    path = Path(path)
    if path.is_file() and is_safetensors(path):
        return SafetensorsExport(path)
    if path.is_file() and is_torchscript(path):
        return TorchScriptExport(path)
    if path.suffix.lower() == ".onnx":  # onnxruntime says what is wrong with it, a missing file included
        return OnnxExport(path)
    return of_content(safe_load(path), path)


def open_artifact(path: str | Path) -> Artifact:
    """What the file at `path` is, typed; a file of no kind simclr-cli reads is one line."""
    artifact = identify(path)
    if isinstance(artifact, Foreign):
        raise artifact.refuse()
    return artifact


@dataclass(frozen=True)
class ExportFormat:
    """An export format: an entry of `registry.EXPORTS`, what `simclr extract --format NAME` writes.

    `write(loaded, path, options)` writes the encoder (`models.encoder_file.LoadedEncoder`) to `path`
    atomically and returns facts to show (options: {"opset": N}, ONNX's); `hint(encoder, path)` is the Python
    line that loads the written file elsewhere (None: simclr-cli's own file). `takes` are the kinds it exports
    from; `reads_as` the kind `open_artifact` gives for its file (None: a plain file only its library reads);
    `needs()` checks what it needs installed, before any file is read."""

    name: str
    suffix: str  # the file name's ending, without the dot
    help: str  # one line for `simclr extract --help`
    write: Callable[[Any, Path, dict], dict]
    hint: Callable[[Any, Path], str | None]
    takes: tuple[type[Artifact], ...] = (Checkpoint,)
    reads_as: type[Artifact] | None = None
    needs: Callable[[], None] = lambda: None
    with_head: bool = False  # the written file carries the projection head

    def recognise(self, path: str | Path) -> bool:
        """Is the file at `path` one this format wrote (as far as its kind tells)?"""
        return self.reads_as is not None and isinstance(identify(path), self.reads_as)

    def read(self, path: str | Path) -> Artifact:
        artifact = open_artifact(path)
        if self.reads_as is None or not isinstance(artifact, self.reads_as):
            raise CheckpointError(f"{path} is a {artifact.kind}, not a file of the {self.name} format")
        return artifact
