"""Warm start (`model.init`): an encoder begins from weights instead of a random initialisation.

`model.init: PATH` loads, strictly, the encoder weights of any of: this project's encoder file, a run's
checkpoint, a torchvision or timm state dict of the same model (its classifier's keys are left out, as the
classifier is), or a built-in ResNet's torchvision state dict. A key missing, unexpected or of another
shape is one line listing them. `model.init: pretrained` takes the library's own weights (torchvision's
`weights="DEFAULT"`, timm's `pretrained=True`; for a built-in ResNet, torchvision's of the same name),
which needs the network: offline, one line says what could not be fetched. What the file is, `artifacts`
says; how a state dict's keys map onto the encoder and which are its classifier's, the encoder's backbone
family (`warm_state`).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from simclr_cli.artifacts import Checkpoint, ClassifierFile, EncoderFile, Foreign, StateDict, of_content
from simclr_cli.errors import CheckpointError, ConfigError
from simclr_cli.files import safe_load
from simclr_cli.models.heads import EncoderWithHead
from simclr_cli.models.library import fetch_failed, family_of

PRETRAINED = "pretrained"


def _encoder_state(obj: object, path: Path, encoder: nn.Module) -> dict:
    """The weights in a file, keyed as `encoder.state_dict()` keys them."""
    artifact = of_content(obj, path)
    if isinstance(artifact, Foreign) and artifact.why == "empty":
        raise CheckpointError(f"model.init {path} holds no weights: give an encoder file, a checkpoint or a state dict")
    if isinstance(artifact, EncoderFile) and not isinstance(artifact, ClassifierFile):
        return artifact.weights
    if isinstance(artifact, Checkpoint):
        return EncoderWithHead.split_state(artifact.model)[0]
    if not isinstance(artifact, StateDict):
        raise CheckpointError(f"model.init {path} is not a state dict of tensors")
    return family_of(encoder.describe()["arch"]).warm_state(artifact.state, encoder, path)


def mismatch(module: nn.Module, state: dict) -> tuple[dict, list[str], list[str], list[str]]:
    """(`state` with the batch-norm counters it may lack filled in, the keys it misses, the keys it has that
    `module` has not, the keys whose value is not a tensor of `module`'s shape): what a strict load checks.
    A state read from a file has no `_metadata` (the submodules' state versions, which a plain dict drops):
    it gets `module`'s own, the layout it was written in, as MNASNet's loader needs one."""
    expected = module.state_dict()
    metadata = getattr(state, "_metadata", None) or getattr(expected, "_metadata", None)
    state = OrderedDict({**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **state})
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and (not isinstance(state[k], torch.Tensor)
                                                    or state[k].shape != expected[k].shape)]
    return state, missing, unexpected, wrong


def shape_of(value: object) -> tuple:
    return tuple(getattr(value, "shape", ()))


def load_strict(encoder: nn.Module, state: dict, source: str) -> None:
    """load_state_dict(strict=True), with one line listing what does not fit (BN counters may be absent)."""
    state, missing, unexpected, wrong = mismatch(encoder, state)
    expected = encoder.state_dict()
    wrong = [f"{k} {shape_of(state[k])} (expected {tuple(expected[k].shape)})" for k in wrong]
    if missing or unexpected or wrong:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                 f"another shape: {few(wrong)}" if wrong else ""]
        raise CheckpointError(f"{source} does not fit {describe(encoder)} ({'; '.join(p for p in parts if p)}): give "
                              "weights of the same model (a built-in ResNet from ImageNet weights needs model.stem "
                              "imagenet and width 64)")
    encoder.load_state_dict(state, strict=True)


def describe(encoder: nn.Module) -> str:
    d = encoder.describe()
    return f"{d['arch']} ({d['stem']} stem" + (f", width {d['width']})" if "width" in d else ")")


def warm_start(encoder: nn.Module, path: str | Path) -> None:
    """`model.init: PATH`: the encoder's weights from a file, loaded strictly."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.init {path} is not a file: give a weights file, 'pretrained', or null")
    load_strict(encoder, _encoder_state(safe_load(path), path, encoder), f"model.init {path}")


def built_in_pretrained(encoder: nn.Module) -> None:
    """`model.init: pretrained` for a built-in ResNet: torchvision's ImageNet weights of the same name."""
    import torchvision

    arch = encoder.describe()["arch"]
    try:
        state = torchvision.models.get_model_weights(arch).DEFAULT.get_state_dict(progress=False)
    except (OSError, RuntimeError) as err:  # no network: URLError is an OSError
        raise fetch_failed(arch, err) from None
    load_strict(encoder, {k: v for k, v in state.items() if not k.startswith("fc.")}, f"torchvision's {arch} weights")
