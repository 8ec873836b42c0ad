"""The encoder file: a self-describing file holding one encoder (and its projection head), and the
loading of every encoder format the tool accepts.

`load_encoder` takes the native encoder file, a pretraining checkpoint (its encoder taken on the fly), a
torchvision-style ResNet state dict, or the original design's `nn.Sequential(*list(resnet18.children())[:-1])`
state dict; architecture, stem and width come from the weights. `extract_encoder` writes the native file or
a plain state dict for torchvision. Every file loads with `torch.load(path, weights_only=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from simclr_cli import __version__
from simclr_cli.checkpoint import CHECKPOINT_FORMAT, ENCODER_FORMAT, safe_load
from simclr_cli.config import Config, config_digest, config_from_dict
from simclr_cli.data import NORMALIZATION, normalization_for
from simclr_cli.errors import CheckpointError
from simclr_cli.files import atomic_save
from simclr_cli.model import ARCHS, ProjectionHead, ResNetEncoder, describe_encoder

EXPORT_FORMATS = ("native", "torchvision")
# Plain state dicts carry no image size or normalisation; the original design trained on CIFAR-10 at 32 px.
DEFAULT_IMAGE_SIZE = 32
DEFAULT_NORMALIZATION = "cifar10"


def _weights(part: torch.nn.Module | dict) -> dict:
    state = part.state_dict() if isinstance(part, torch.nn.Module) else part
    return {k: v.detach().cpu() for k, v in state.items()}


def encoder_payload(encoder: ResNetEncoder | dict, cfg: Config, head: ProjectionHead | dict | None = None,
                    mean=None, std=None, **provenance: Any) -> dict:
    """The native encoder file: everything needed to rebuild and use the encoder, plus where it came from.
    `encoder` and `head` are the modules or their state dicts; `cfg` is the config they were built from."""
    payload = {
        "format": ENCODER_FORMAT,
        "format_version": 1,
        **describe_encoder(cfg.model),
        "image_size": cfg.data.image_size,
        "mean": list(mean) if mean is not None else None,
        "std": list(std) if std is not None else None,
        "state_dict": _weights(encoder),
        "provenance": {"simclr_cli": __version__, "method": cfg.method.name, "dataset": cfg.data.dataset,
                       "seed": cfg.train.seed, "config_digest": config_digest(cfg), **provenance},
    }
    if head is not None:
        payload["head"] = {"hidden": cfg.model.head_hidden, "out": cfg.model.head_out,
                           "layers": cfg.model.head_layers, "state_dict": _weights(head)}
    return payload


@dataclass
class LoadedEncoder:
    """An encoder ready for feature extraction, with what it expects as input and where it came from."""

    encoder: ResNetEncoder  # eval mode, on the CPU
    image_size: int  # pixels, side of the square input
    mean: tuple[float, ...]  # per-channel mean of pixel/255
    std: tuple[float, ...]  # per-channel std of pixel/255
    kind: str  # the format recognised, in words
    head: ProjectionHead | None = None  # projection head g, when the file has one (eval mode)
    provenance: dict = field(default_factory=dict)  # epoch, step, dataset, seed, config digest, source
    notes: list[str] = field(default_factory=list)  # assumptions made while loading

    def describe(self) -> dict:
        return {**self.encoder.describe(), "kind": self.kind, "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std),
                "head_layers": self.head.layers if self.head is not None else None,
                "provenance": self.provenance, "notes": self.notes}


def _what(obj: Any) -> str:
    return "an empty dict" if obj == {} else f"a {type(obj).__name__}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return " ".join(text.split()) if len(text) < 200 else text.splitlines()[0][:200]


def _load_strict(module: torch.nn.Module, state: Any, path: Path, what: str) -> None:
    """load_state_dict(strict=True) with one line naming the first mismatch; BN counters may be absent."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the {what} weights are {_what(state)}, not a state dict")
    expected = module.state_dict()
    state = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **state}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and (not isinstance(state[k], torch.Tensor)
                                                    or state[k].shape != expected[k].shape)]
    problems = [f"missing {missing[0]}"] if missing else []
    problems += [f"unexpected {unexpected[0]}"] if unexpected else []
    problems += [f"{wrong[0]} has shape {tuple(getattr(state[wrong[0]], 'shape', ()))}, expected "
                 f"{tuple(expected[wrong[0]].shape)}"] if wrong else []
    if problems:
        count = len(missing) + len(unexpected) + len(wrong)
        raise CheckpointError(f"{path}: the {what} weights do not fit ({'; '.join(problems)}; {count} keys in all): "
                              "the file is damaged or from another architecture")
    module.load_state_dict(state, strict=True)


def _from_payload(payload: dict, path: Path, kind: str) -> LoadedEncoder:
    """A native encoder payload (as `encoder_payload` builds it) -> LoadedEncoder."""
    try:
        encoder = ResNetEncoder(payload["arch"], payload["stem"], int(payload["width"]))
        _load_strict(encoder, payload["state_dict"], path, "encoder")
        head = None
        if payload.get("head"):
            h = payload["head"]
            head = ProjectionHead(encoder.feature_dim, h["hidden"], h["out"], h["layers"])
            _load_strict(head, h["state_dict"], path, "projection head")
            head.eval()
        provenance = dict(payload.get("provenance") or {})
        notes = []
        if payload.get("mean") is None or payload.get("std") is None:
            mean, std = normalization_for(provenance.get("dataset", DEFAULT_NORMALIZATION))
            notes.append(f"no normalisation in the file: used {provenance.get('dataset', DEFAULT_NORMALIZATION)}'s")
        else:
            mean, std = payload["mean"], payload["std"]
        return LoadedEncoder(encoder.eval(), int(payload["image_size"]), tuple(map(float, mean)),
                             tuple(map(float, std)), kind, head, provenance, notes)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path} is a damaged {kind} ({type(err).__name__}: {_first_line(err)}): write it "
                              "again with `simclr extract`") from None


def _payload_from_checkpoint(ckpt: dict, path: Path) -> dict:
    """The native encoder payload of a pretraining checkpoint (encoder, projection head when the method has
    one, provenance), read from its state dict without building the model; `_from_payload` checks the weights
    when it builds the encoder. A method's other networks (byol's projector and predictor) stay behind."""
    try:
        cfg = config_from_dict(ckpt["config"])
        parts: dict[str, dict] = {}
        for key, value in ckpt["model"].items():
            part, _, name = key.partition(".")
            parts.setdefault(part, {})[name] = value
        if not parts.get("encoder"):
            raise ValueError("no encoder weights")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path} is a damaged or incomplete checkpoint ({type(err).__name__}: "
                              f"{_first_line(err)}): use another checkpoint of the run") from None
    mean, std = normalization_for(cfg.data.dataset)
    return encoder_payload(parts["encoder"], cfg, parts.get("head"), mean, std, epoch=ckpt.get("epoch"),
                           step=ckpt.get("step"), source=str(path))


def _sequential_to_torchvision(state: dict, path: Path) -> dict:
    """Keys of nn.Sequential(*list(resnet.children())[:-1]) -> torchvision's: the conv with 3 input channels
    is conv1, the batch norm after it bn1, and the four indices holding blocks (N.0.conv1.weight) layer1-4;
    found by content rather than fixed indices 0, 1, 4-7, so a copy that dropped the max-pool loads too."""
    indices = sorted({int(k.split(".", 1)[0]) for k in state})
    stages = [i for i in indices if f"{i}.0.conv1.weight" in state]
    convs = [i for i in indices if getattr(state.get(f"{i}.weight"), "ndim", 0) == 4]
    norms = [i for i in indices if f"{i}.running_mean" in state]
    if len(stages) != 4 or len(convs) != 1 or len(norms) != 1:
        raise CheckpointError(f"{path} has numbered keys but is not nn.Sequential(*list(resnet.children())[:-1]) "
                              f"(found {len(convs)} stem conv, {len(norms)} stem norm, {len(stages)} of 4 stages)")
    names = {convs[0]: "conv1", norms[0]: "bn1", **{i: f"layer{n + 1}" for n, i in enumerate(stages)}}
    out = {}
    for key, value in state.items():
        index, rest = key.split(".", 1)
        if int(index) not in names:
            raise CheckpointError(f"{path}: unexpected key {key} for a ResNet without its classifier")
        out[f"{names[int(index)]}.{rest}"] = value
    return out


def _infer_resnet(state: dict, path: Path) -> tuple[str, str, int]:
    """(arch, stem, width) of a torchvision-style ResNet state dict, from its shapes and block counts."""
    w = state["conv1.weight"]
    if w.ndim != 4 or w.shape[1] != 3:
        raise CheckpointError(f"{path}: conv1.weight has shape {tuple(w.shape)}; expected (width, 3, k, k)")
    stem = {3: "cifar", 7: "imagenet"}.get(w.shape[-1])
    if stem is None:
        raise CheckpointError(f"{path}: a {w.shape[-1]}x{w.shape[-1]} first conv is neither the CIFAR stem (3x3) "
                              "nor the ImageNet stem (7x7)")
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    depths = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    for arch, spec in ARCHS.items():
        if spec == (block, depths):
            return arch, stem, int(w.shape[0])
    raise CheckpointError(f"{path}: a ResNet with {depths} {block} blocks per stage is none of {', '.join(ARCHS)}")


def _from_state_dict(state: dict, path: Path) -> LoadedEncoder:
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} is not an encoder: neither a simclr-cli file nor a state dict of tensors")
    if "conv1.weight" in state:
        kind = "torchvision state dict"
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier is not the encoder
    elif all(k.split(".", 1)[0].isdigit() for k in state):
        kind = "original design state dict (nn.Sequential of resnet18 children)"
        state = _sequential_to_torchvision(state, path)
    else:
        raise CheckpointError(f"{path} is a state dict but not of a ResNet (keys like {', '.join(list(state)[:3])}): "
                              "give an encoder.pth, a checkpoint.pt or a torchvision ResNet state dict")
    arch, stem, width = _infer_resnet(state, path)
    encoder = ResNetEncoder(arch, stem, width)
    _load_strict(encoder, state, path, "encoder")
    mean, std = NORMALIZATION[DEFAULT_NORMALIZATION]
    notes = [f"this {kind.split(' (')[0]} carries no image size or normalisation: assumed {DEFAULT_IMAGE_SIZE} px and "
             "CIFAR-10's mean/std", f"{arch}, {stem} stem inferred from the {state['conv1.weight'].shape[-1]}x"
             f"{state['conv1.weight'].shape[-1]} first conv, width {width}"]
    return LoadedEncoder(encoder.eval(), DEFAULT_IMAGE_SIZE, mean, std, kind, None, {}, notes)


def load_encoder(path: str | Path) -> LoadedEncoder:
    """Any accepted encoder file -> LoadedEncoder: a native encoder file, a pretraining checkpoint (extracted on
    the fly), a torchvision-style ResNet state dict (fc.* ignored), or the original design's state dict of
    nn.Sequential(*list(resnet18.children())[:-1]). Architecture, stem and width come from the weights."""
    path = Path(path)
    obj = safe_load(path)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds {_what(obj)}, not an encoder: give an encoder.pth, a checkpoint.pt "
                              "or a ResNet state dict")
    fmt = obj.get("format")
    if fmt == ENCODER_FORMAT:
        return _from_payload(obj, path, "native encoder file")
    if fmt == CHECKPOINT_FORMAT:
        return _from_payload(_payload_from_checkpoint(obj, path), path, "pretraining checkpoint")
    if isinstance(fmt, str):
        raise CheckpointError(f"{path} has format {fmt!r}, which simclr-cli {__version__} does not read")
    return _from_state_dict(obj, path)


def extract_encoder(checkpoint_path: str | Path, out_path: str | Path, fmt: str = "native") -> dict:
    """Write the encoder of a pretraining checkpoint alone, atomically. fmt "native": the self-describing
    encoder file (with the projection head and provenance); "torchvision": the plain state dict that
    torchvision's ResNet (stem adjusted, fc = nn.Identity()) loads with strict=True. Returns a summary."""
    path, out = Path(checkpoint_path), Path(out_path)
    if fmt not in EXPORT_FORMATS:
        raise CheckpointError(f"unknown encoder format {fmt!r}: use {' or '.join(EXPORT_FORMATS)}")
    obj = safe_load(path)
    if isinstance(obj, dict) and obj.get("format") == ENCODER_FORMAT:
        raise CheckpointError(f"{path} is already an encoder file; use it directly (probe and embed take it)")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint that `simclr pretrain` wrote: give a run's checkpoint.pt")
    if out.resolve() == path.resolve():
        raise CheckpointError(f"-o {out} would overwrite the checkpoint itself: choose another output path")
    payload = _payload_from_checkpoint(obj, path)
    _from_payload(payload, path, "pretraining checkpoint")  # the weights fit the architecture, or one line
    if fmt == "torchvision" and payload["width"] != 64:
        raise CheckpointError(f"the torchvision format needs width 64 (torchvision's ResNet); this encoder has width "
                              f"{payload['width']}: use --format native")
    atomic_save(payload["state_dict"] if fmt == "torchvision" else payload, out)
    keep = ("arch", "stem", "width", "feature_dim", "image_size", "mean", "std", "provenance")
    return {"path": str(out), "format": fmt, "has_head": fmt == "native" and "head" in payload,
            **{k: payload[k] for k in keep}}
