"""The encoders, in one registry, and what is built on them: projection heads, the encoder file, features.

`model.arch` names an encoder: a built-in ResNet (`resnet18`, `resnet34`, `resnet50`, with `model.width` and
`model.stem`), or FAMILY:NAME for a family of ENCODERS (`torchvision:mobilenet_v3_small`,
`timm:vit_tiny_patch16_224`), built with `model.kwargs`. Every encoder returns h (B, feature_dim) and says
in `describe()` what rebuilds it; the encoder file records that, so an encoder is rebuilt from the file
alone (`encoder_from_spec`). `model.init` warm-starts it (`models.warm`).

A new family: a file here with an object that has `prefix`, `names()`, `check(name)`, `check_kwargs(name,
kwargs)` and `build(name, kwargs, stem, image_size, pretrained)`, and declares its policy as
`library.LibraryFamily` does (`formats`, `classifier_keys`, `library_state`, `from_library_keys`,
`warm_state`, `load_hint`), one line in `registry.ENCODERS` (or an entry point of the group
`simclr_cli.encoders`), and its tests (copy the family cases of tests/test_backbones.py). A new built-in architecture: a module in resnet.py's way, and a name in BUILT_IN.
"""

from __future__ import annotations

import difflib

from torch import nn

from simclr_cli.config import ModelConfig
from simclr_cli.errors import ConfigError
from simclr_cli.models.heads import EncoderWithHead, ProjectionHead
from simclr_cli.models.library import LibraryEncoder, family_of
from simclr_cli.models.resnet import ResNetEncoder
from simclr_cli.models.spec import DescriptionError, check_description
from simclr_cli.models.warm import PRETRAINED, built_in_pretrained, warm_start
from simclr_cli.registry import ENCODERS  # model.arch FAMILY:NAME -> the family that builds NAME

BUILT_IN: dict[str, type[nn.Module]] = {"resnet18": ResNetEncoder, "resnet34": ResNetEncoder, "resnet50": ResNetEncoder}


def check_encoder(arch: str) -> None:
    """An unknown `model.arch` is one line naming the closest encoders (a family's names are asked only when
    its prefix is given; timm's need timm installed)."""
    family, sep, name = arch.partition(":")
    if sep and family in ENCODERS:
        ENCODERS[family].check(name)
        return
    if sep or arch not in BUILT_IN:
        close = difflib.get_close_matches(arch, [*BUILT_IN, *(f"{f}:" for f in ENCODERS)], n=2)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(f"'model.arch' must be one of {', '.join(BUILT_IN)} or FAMILY:NAME with FAMILY one of "
                          f"{', '.join(ENCODERS)}; got {arch!r}{hint}")


def check_spec(spec: dict, image_size: int | None = None) -> None:
    """What may be built, before anything is: the description's keywords, types and sizes (`models.spec`),
    the name, and the keywords the family's constructor declares. DescriptionError names the field."""
    check_description(spec, image_size)
    check_encoder(spec["arch"])
    family, sep, name = spec["arch"].partition(":")
    if sep:
        ENCODERS[family].check_kwargs(name, spec.get("kwargs") or {})


def encoder_from_spec(spec: dict, image_size: int = 32, pretrained: bool = False) -> nn.Module:
    """The encoder a description gives (`describe()` of the one that was saved, or the config's), untrained,
    after `check_spec`."""
    check_spec(spec, image_size)
    family, sep, name = spec["arch"].partition(":")
    if sep:
        return ENCODERS[family].build(name, dict(spec.get("kwargs") or {}), spec["stem"], image_size, pretrained)
    return BUILT_IN[spec["arch"]](spec["arch"], spec["stem"], int(spec["width"]))


def _config_spec(model_cfg: ModelConfig) -> dict:
    stem = "cifar" if model_cfg.stem == "auto" else model_cfg.stem
    return {"arch": model_cfg.arch, "stem": stem, "width": model_cfg.width, "kwargs": model_cfg.kwargs}


def _in_config_terms(err: DescriptionError) -> ConfigError:
    name = "data.image_size" if err.field == "image_size" else f"model.{err.field}"
    return ConfigError(f"'{name}' {err.problem}")


def check_model(model_cfg: ModelConfig, image_size: int) -> None:
    """`check_spec` on the config, in its own names (model.kwargs.NAME): before any data is read."""
    try:
        check_spec(_config_spec(model_cfg), image_size)
    except DescriptionError as err:
        raise _in_config_terms(err) from None


def build_encoder(model_cfg: ModelConfig, image_size: int = 32) -> nn.Module:
    """`model.arch` at `model.stem` (and `model.width`, `model.kwargs`), warm-started as `model.init` says. A
    stem of "auto" is left only in a ModelConfig built outside `load_config` (which knows the image size and
    resolves it): small images, the CIFAR stem."""
    try:
        encoder = encoder_from_spec(_config_spec(model_cfg), image_size, pretrained=model_cfg.init == PRETRAINED)
    except DescriptionError as err:
        raise _in_config_terms(err) from None
    if model_cfg.init == PRETRAINED and model_cfg.arch in BUILT_IN:
        built_in_pretrained(encoder)
    elif model_cfg.init and model_cfg.init != PRETRAINED:
        warm_start(encoder, model_cfg.init)
    return encoder


def build_model(model_cfg: ModelConfig, image_size: int = 32) -> EncoderWithHead:
    """ModelConfig -> encoder + projection head."""
    encoder = build_encoder(model_cfg, image_size)
    head = ProjectionHead(encoder.feature_dim, model_cfg.head_hidden, model_cfg.head_out, model_cfg.head_layers)
    return EncoderWithHead(encoder, head)


def is_convolutional(encoder: nn.Module) -> bool:
    """channels_last pays for convolutions only: not for a ViT, whose one convolution is its patch embedding."""
    return getattr(encoder, "convolutional", True)


__all__ = ["BUILT_IN", "ENCODERS", "EncoderWithHead", "LibraryEncoder", "ProjectionHead", "ResNetEncoder",
           "build_encoder", "build_model", "check_encoder", "check_model", "check_spec", "encoder_from_spec",
           "family_of", "is_convolutional"]
