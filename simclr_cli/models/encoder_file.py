"""The encoder file: one encoder (and its projection head) that describes itself, and the reading of every
encoder source the tool accepts.

The native file (ENCODER_FORMAT) holds the encoder's description (`describe()`: what rebuilds it), the image
size and normalisation it was trained with, its weights, its projection head and its provenance. A run's
checkpoint carries the same description beside its model (`encoder_meta`, written by `train.state`), so an
encoder is read out of a checkpoint as it is out of its own file. `load_encoder` takes either, a
torchvision-style ResNet state dict, or the original design's `nn.Sequential(*list(resnet18.children())[:-1])`
state dict, or a safetensors export. What a file is, and the keys it holds, `artifacts` decides and spells
(`identify`, `EncoderFile`, `Checkpoint`); this module builds and checks the encoder each kind holds. Every
file loads with `torch.load(path, weights_only=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simclr_cli import __version__
from simclr_cli.config import Config, ModelConfig, config_digest, config_from_dict
from simclr_cli.errors import CheckpointError, UserError
from simclr_cli.artifacts import (Artifact, Checkpoint, ClassifierFile, EncoderFile, Foreign, OnnxExport,
                                  SafetensorsExport, StateDict, TorchScriptExport, first_line, identify, of_content, what)
from simclr_cli.files import safe_load
from simclr_cli.models import encoder_from_spec, family_of
from simclr_cli.models.heads import EncoderWithHead, ProjectionHead
from simclr_cli.models.resnet import infer_resnet, sequential_to_torchvision
from simclr_cli.models.spec import DescriptionError, check_description
from simclr_cli.models.warm import mismatch, shape_of

# Plain state dicts carry no image size or normalisation; the original design trained on CIFAR-10 at 32 px.
DEFAULT_IMAGE_SIZE = 32
DEFAULT_NORMALIZATION = "cifar10"


def _normalization_of(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A dataset's normalisation, for the files that do not record their own (state dicts, a checkpoint of
    simclr-cli 0.1): the data wing is imported for them alone, not for every encoder file read."""
    from simclr_cli.data import normalization_for

    return normalization_for(dataset)


def _weights(part: nn.Module | dict) -> dict:
    state = part.state_dict() if isinstance(part, nn.Module) else part
    return {k: v.detach().cpu() for k, v in state.items()}


def encoder_meta(encoder: nn.Module, cfg: Config, head: ProjectionHead | None, mean, std, **provenance: Any) -> dict:
    """Everything but the weights: what rebuilds the encoder and its head, its input, where it came from."""
    return {
        **encoder.describe(),
        "image_size": cfg.data.image_size,
        "mean": list(mean) if mean is not None else None,
        "std": list(std) if std is not None else None,
        "head": None if head is None else {"hidden": cfg.model.head_hidden, "out": cfg.model.head_out,
                                           "layers": cfg.model.head_layers},
        "provenance": {"simclr_cli": __version__, "method": cfg.method.name, "dataset": cfg.data.dataset,
                       "seed": cfg.train.seed, "config_digest": config_digest(cfg),
                       **({"init": cfg.model.init} if cfg.model.init else {}), **provenance},
    }


def encoder_payload(encoder: nn.Module, cfg: Config, head: ProjectionHead | None = None, mean=None, std=None,
                    **provenance: Any) -> dict:
    """The native encoder file of a built encoder (and head); `cfg` is the config they were built from."""
    meta = encoder_meta(encoder, cfg, head, mean, std, **provenance)
    return EncoderFile.payload(meta, _weights(encoder), _weights(head) if head is not None else None)


@dataclass
class LoadedEncoder:
    """An encoder ready for feature extraction, with what it expects as input and where it came from."""

    encoder: nn.Module  # eval mode, on the CPU
    image_size: int  # pixels, side of the square input
    mean: tuple[float, ...]  # per-channel mean of pixel/255
    std: tuple[float, ...]  # per-channel std of pixel/255
    kind: str  # the format recognised, in words
    head: ProjectionHead | None = None  # projection head g, when the file has one (eval mode)
    provenance: dict = field(default_factory=dict)  # epoch, step, dataset, seed, config digest, source
    notes: list[str] = field(default_factory=list)  # assumptions made while loading
    head_spec: dict | None = None  # the head's hidden, out and layers, when there is a head

    def describe(self) -> dict:
        return {**self.encoder.describe(), "kind": self.kind, "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std),
                "head_layers": self.head.layers if self.head is not None else None,
                "provenance": self.provenance, "notes": self.notes}

    @property
    def feature_dim(self) -> int:
        return self.encoder.feature_dim

    def payload(self) -> dict:
        """This encoder as a native encoder file (what `simclr extract` writes)."""
        meta = {**self.encoder.describe(), "image_size": self.image_size, "mean": list(self.mean),
                "std": list(self.std), "provenance": dict(self.provenance), "head": self.head_spec}
        return EncoderFile.payload(meta, _weights(self.encoder), _weights(self.head) if self.head is not None else None)


_what, _first_line = what, first_line  # their old names


def _load_strict(module: torch.nn.Module, state: Any, path: Path, what: str) -> None:
    """load_state_dict(strict=True) with one line naming the first mismatch; BN counters may be absent."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the {what} weights are {_what(state)}, not a state dict")
    state, missing, unexpected, wrong = mismatch(module, state)
    problems = [f"missing {missing[0]}"] if missing else []
    problems += [f"unexpected {unexpected[0]}"] if unexpected else []
    problems += [f"{wrong[0]} has shape {shape_of(state[wrong[0]])}, expected "
                 f"{tuple(module.state_dict()[wrong[0]].shape)}"] if wrong else []
    if problems:
        count = len(missing) + len(unexpected) + len(wrong)
        raise CheckpointError(f"{path}: the {what} weights do not fit ({'; '.join(problems)}; {count} keys in all): "
                              "the file is damaged or from another architecture")
    module.load_state_dict(state, strict=True)


def check_file_description(meta: Any, path: Path, kind: str) -> None:
    """A file's description of its model, checked whole before anything is built (`models.spec`): a
    keyword, type or size it may not ask for is one line naming the field."""
    try:
        check_description(meta, meta.get("image_size") if isinstance(meta, dict) else None, input_too=True)
    except DescriptionError as err:
        raise CheckpointError(f"{path}: this {kind}'s model description is refused ({err}): use a file `simclr "
                              "extract` wrote, or write this one again with it") from None


def _build(meta: dict, weights: dict, head_weights: dict | None, path: Path, kind: str, notes: list[str]) -> LoadedEncoder:
    """An encoder (and head) from a description and its weights, both checked."""
    check_file_description(meta, path, kind)
    try:
        encoder = encoder_from_spec(meta, int(meta["image_size"]))
        _load_strict(encoder, weights, path, "encoder")
        head, head_spec = None, meta.get("head")
        if head_spec and head_weights is not None:
            head_spec = {k: head_spec[k] for k in ("hidden", "out", "layers")}
            head = ProjectionHead(encoder.feature_dim, head_spec["hidden"], head_spec["out"], head_spec["layers"])
            _load_strict(head, head_weights, path, "projection head")
            head.eval()
        mean, std = meta.get("mean"), meta.get("std")
        if mean is None or std is None:
            dataset = (meta.get("provenance") or {}).get("dataset", DEFAULT_NORMALIZATION)
            mean, std = _normalization_of(dataset)
            notes.append(f"no normalisation in the file: used {dataset}'s")
        return LoadedEncoder(encoder.eval(), int(meta["image_size"]), tuple(map(float, mean)),
                             tuple(map(float, std)), kind, head, dict(meta.get("provenance") or {}), notes,
                             head_spec if head is not None else None)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, UserError) as err:
        raise CheckpointError(f"{path} is a damaged {kind} ({type(err).__name__}: {_first_line(err)}): write it "
                              "again with `simclr extract`") from None


def _from_native(native: EncoderFile, kind: str = "native encoder file") -> LoadedEncoder:
    description, path = native.description, native.path
    check_file_description(description, path, kind)  # a head that is no mapping, before its weights are read
    return _build(description, native.weights, native.head_weights, path, kind, [])


def _checkpoint_meta(ckpt: Checkpoint) -> dict:
    """The encoder description of a checkpoint written before checkpoints carried one (simclr-cli 0.1): read
    from its config as it is, without today's validation, so a tightened rule never stops an old file."""
    raw = ckpt.config
    model, data = {**vars(ModelConfig()), **raw.get("model", {})}, raw.get("data", {})
    stem = model["stem"] if model["stem"] != "auto" else "cifar"
    dataset = data.get("dataset", "cifar10")
    mean, std = _normalization_of(dataset)  # not recorded then: the dataset's, as training used
    try:
        digest = config_digest(config_from_dict(raw))
    except UserError:  # a rule tightened since: the digest is not worth refusing the file for
        digest = None
    head = {"hidden": model["head_hidden"], "out": model["head_out"], "layers": model["head_layers"]}
    return {"arch": model["arch"], "stem": stem, "width": model["width"], "kwargs": model.get("kwargs") or {},
            "image_size": data.get("image_size", 32),
            "mean": mean, "std": std, "head": head,
            "provenance": {"simclr_cli": ckpt.version, "method": raw.get("method", {}).get("name", "simclr"),
                           "dataset": dataset, "seed": raw.get("train", {}).get("seed", 0), "config_digest": digest}}


def _from_checkpoint(ckpt: Checkpoint) -> LoadedEncoder:
    """The encoder of a pretraining checkpoint, read from its model's state dict; a method's other networks
    (byol's projector and predictor) stay behind."""
    path = ckpt.path
    try:
        meta = ckpt.encoder if ckpt.encoder is not None else _checkpoint_meta(ckpt)
        weights, head_weights = EncoderWithHead.split_state(ckpt.model)
        if not weights:
            raise ValueError("no encoder weights")
        provenance = {**meta["provenance"], **ckpt.position(), "source": str(path)}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path} is a damaged or incomplete checkpoint ({type(err).__name__}: "
                              f"{_first_line(err)}): use another checkpoint of the run") from None
    return _build({**meta, "provenance": provenance}, weights, head_weights or None, path, "pretraining checkpoint", [])


def _from_state_dict(artifact: StateDict) -> LoadedEncoder:
    state, path = artifact.state, artifact.path
    if "conv1.weight" in state:
        kind = "torchvision state dict"
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier is not the encoder
    elif artifact.sequential:
        kind = "original design state dict (nn.Sequential of resnet18 children)"
        state = sequential_to_torchvision(state, path)
    else:
        raise CheckpointError(f"{path} is a state dict but not of a ResNet (keys like {', '.join(list(state)[:3])}): "
                              "give an encoder.pth, a checkpoint.pt or a torchvision ResNet state dict")
    arch, stem, width = infer_resnet(state, path)
    notes = [f"this {kind.split(' (')[0]} carries no image size or normalisation: assumed {DEFAULT_IMAGE_SIZE} px and "
             "CIFAR-10's mean/std", f"{arch}, {stem} stem inferred from the {state['conv1.weight'].shape[-1]}x"
             f"{state['conv1.weight'].shape[-1]} first conv, width {width}"]
    mean, std = _normalization_of(DEFAULT_NORMALIZATION)
    meta = {"arch": arch, "stem": stem, "width": width, "image_size": DEFAULT_IMAGE_SIZE, "mean": mean, "std": std}
    return _build(meta, state, None, path, kind, notes)


def _from_safetensors(export: SafetensorsExport) -> LoadedEncoder:
    """A safetensors file `simclr extract --format safetensors` wrote: the model's own keys (its family's
    layout) and, under PORTABLE_KEY, its description."""
    meta, weights = export.read()
    spec = dict(meta["model"])
    family = family_of(spec.get("arch"))
    if family is not None:  # None: no arch a family owns, which the description check refuses by name
        weights = family.from_library_keys(weights)
    desc = {**spec, "image_size": meta["image_size"], "mean": meta["mean"], "std": meta["std"], "head": None,
            "provenance": meta.get("provenance")}
    return _build(desc, weights, None, export.path, "safetensors file", [])


def load_encoder(path: str | Path) -> LoadedEncoder:
    """Any accepted encoder file -> LoadedEncoder: a native encoder file, a pretraining checkpoint, a
    safetensors file `simclr extract` wrote (recognised by its content, not its name), a torchvision-style
    ResNet state dict (fc.* ignored), or the original design's state dict of
    nn.Sequential(*list(resnet18.children())[:-1]). What to build comes from the file (the last two: from
    the weights' shapes); what the file is, `artifacts.identify`."""
    artifact = identify(path)
    if isinstance(artifact, OnnxExport):  # onnxruntime runs it (`serve.inference`); here it is read as a torch
        artifact = of_content(safe_load(artifact.path), artifact.path)  # file, as any other name is
    return encoder_of(artifact)


def read_encoder(obj: Any, path: Path, kind: str = "native encoder file") -> LoadedEncoder:
    """`load_encoder` on what `files.safe_load(path)` returned; `kind`: a native file's name in its lines."""
    return encoder_of(of_content(obj, path), kind)


def encoder_of(artifact: Artifact, kind: str = "native encoder file") -> LoadedEncoder:
    """The encoder in a file of any kind that holds one, or one line saying what to give instead."""
    path = artifact.path
    if isinstance(artifact, SafetensorsExport):
        return _from_safetensors(artifact)
    if isinstance(artifact, TorchScriptExport):
        raise artifact.refuse()
    if isinstance(artifact, ClassifierFile):
        raise CheckpointError(f"{path} is a classifier file (simclr finetune): use it with simclr predict, or give the "
                              "encoder file it was fine-tuned from")
    if isinstance(artifact, EncoderFile):
        return _from_native(artifact, kind)
    if isinstance(artifact, Checkpoint):
        return _from_checkpoint(artifact)
    if isinstance(artifact, StateDict):
        return _from_state_dict(artifact)
    if isinstance(artifact, Foreign) and artifact.why == "empty":
        raise CheckpointError(f"{path} holds {_what(artifact.obj)}, not an encoder: give an encoder.pth, a "
                              "checkpoint.pt or a ResNet state dict")
    if isinstance(artifact, Foreign) and artifact.why == "format":
        raise artifact.refuse()
    raise CheckpointError(f"{path} is not an encoder: neither a simclr-cli file nor a state dict of tensors")
