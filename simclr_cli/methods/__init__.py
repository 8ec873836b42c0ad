"""Pretraining methods, one file each, in one registry: `registry.METHODS` maps `method.name` to a class that
builds its networks from the config (after torch.manual_seed), follows `methods.base.Method` and declares
its own options (`method.NAME.*`), their rules, whether it takes multi-crop and its health head.

simclr: NT-Xent over the batch. moco: an EMA key encoder and a queue of past keys as negatives (MoCo v2,
the momentum encoder of SimCLR v2). byol: an EMA target and a predictor, no negatives. dino: a student
against an EMA teacher's centred, sharpened prototypes, multi-crop's small views as its local views. mae: a
ViT on the visible patches and a decoder that predicts the hidden ones (`masked_vit.py`).

A new method: a file here with a `Method` subclass, one line in `registry.METHODS` (or an entry point in the
`simclr_cli.methods` group of another package), and its tests (copy tests/test_methods.py's loss oracle,
exact-resume and two-rank cases).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from simclr_cli.augment import view_sizes
from simclr_cli.config import Config
from simclr_cli.methods.base import Method, Views
from simclr_cli.models import LibraryEncoder, is_convolutional
from simclr_cli.registry import METHODS


def check_method(name: str) -> None:
    """An unknown `method.name` is one line naming the closest method."""
    METHODS.check(name)


def build_method(cfg: Config, warm_start: bool = True) -> Method:
    """The method `method.name` names, its networks built from `cfg.model` (call after torch.manual_seed);
    without `warm_start` (a resumed run, whose weights come from its checkpoint) model.init is not read."""
    check_method(cfg.method.name)
    if not warm_start and cfg.model.init:
        cfg = replace(cfg, model=replace(cfg.model, init=None))
    return METHODS[cfg.method.name](cfg)


def build_networks(cfg: Config, device: torch.device, resuming: bool) -> tuple[Method, bool]:
    """(the method's networks on the device, whether they run channels_last: convolutional ones only). A model
    built for one image size is refused here when the run's views take another."""
    method = build_method(cfg, warm_start=not resuming)
    encoder = method.model.encoder
    if isinstance(encoder, LibraryEncoder):
        encoder.check_sizes(view_sizes(cfg.augment, cfg.data.image_size) - {cfg.data.image_size}, "augment")
    nhwc = cfg.train.channels_last and is_convolutional(encoder)
    return method.to(device, torch.channels_last if nhwc else torch.preserve_format), nhwc


__all__ = ["METHODS", "Method", "Views", "build_method", "build_networks", "check_method"]
