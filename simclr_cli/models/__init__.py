"""The encoders, in one registry, and what is built on them: projection heads, the encoder file, features.

ENCODERS maps `model.arch` to a class built as cls(arch, stem, width) that returns h (B, feature_dim) and
says how to rebuild itself in `describe()` ({"arch", "stem", "width", "feature_dim"}): the encoder file
records that description, so an encoder is rebuilt from the file alone (`encoder_from_spec`).

A new backbone: a file here with its module, one line in ENCODERS, and its tests (copy tests/test_model.py's
shape and state-dict cases and the tiny pretrain -> extract -> probe chain of tests/test_extract_probe.py).
"""

from __future__ import annotations

import difflib

from torch import nn

from simclr_cli.config import ModelConfig
from simclr_cli.errors import ConfigError
from simclr_cli.models.heads import EncoderWithHead, ProjectionHead
from simclr_cli.models.resnet import ResNetEncoder

ENCODERS: dict[str, type[nn.Module]] = {"resnet18": ResNetEncoder, "resnet34": ResNetEncoder, "resnet50": ResNetEncoder}


def check_encoder(name: str) -> None:
    """An unknown `model.arch` is one line naming the closest encoder."""
    if name not in ENCODERS:
        close = difflib.get_close_matches(name, ENCODERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"'model.arch' must be one of {', '.join(ENCODERS)}; got {name!r}{hint}")


def encoder_from_spec(spec: dict) -> nn.Module:
    """The encoder an encoder file describes (`describe()` of the one that was saved), untrained."""
    check_encoder(spec["arch"])
    return ENCODERS[spec["arch"]](spec["arch"], spec["stem"], int(spec["width"]))


def build_encoder(model_cfg: ModelConfig) -> nn.Module:
    """`model.arch` at `model.stem` and `model.width`. A stem of "auto" is left only in a ModelConfig built
    outside `load_config` (which knows the image size and resolves it): 32-pixel images, the CIFAR stem."""
    stem = "cifar" if model_cfg.stem == "auto" else model_cfg.stem
    return encoder_from_spec({"arch": model_cfg.arch, "stem": stem, "width": model_cfg.width})


def build_model(model_cfg: ModelConfig) -> EncoderWithHead:
    """ModelConfig -> encoder + projection head."""
    encoder = build_encoder(model_cfg)
    head = ProjectionHead(encoder.feature_dim, model_cfg.head_hidden, model_cfg.head_out, model_cfg.head_layers)
    return EncoderWithHead(encoder, head)


__all__ = ["ENCODERS", "EncoderWithHead", "ProjectionHead", "ResNetEncoder", "build_encoder", "build_model",
           "check_encoder", "encoder_from_spec"]
