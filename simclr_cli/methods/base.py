"""What every method is: the networks it trains, the views it asks of a batch, its loss, its after-step.

A method also declares its policy, so nothing outside it lists methods or branches on their names:

    Options                             a dataclass of its own settings, `method.NAME.*` in the config (None:
                                        it has none); RULES checks them: (option, test, what it must be)
    multi_crop                          whether it takes multi-crop's small views (augment.small_crops)
    health_head()                       the network after the encoder that the health monitor reads

The training loop calls these and never branches on which method runs:

    method.model                        the module the optimiser trains; `.encoder` is exported, `.head`
                                        (None for byol) goes into the encoder file beside it
    method.views(augment, x, g, size)   the views of a uint8 batch (default: the pair, 2B views)
    method.loss(net, views, ctx)        the loss, forward passes inside `ctx` (autocast); `net` is `model`
                                        as wrapped (DDP, compile)
    method.before_update(step, total)   after backward, before optimiser step `step` (0-based) of `total`,
                                        gradients unscaled: clipping, a frozen layer's gradients dropped
    method.after_step(step, total)      after optimiser step `step` of `total`: EMA update, enqueue
    method.check_data(data)             the training set (`data.ImageSet`), once, before the first step
    method.views_per_image              views a step makes of each image, for the logged views/s
    Method.report_figure(config, state, images)   a figure of the method's own for `simclr report`, from
                                        a checkpoint's config and model state (mae: reconstructions)
    method.networks()                   every network it runs (SyncBatchNorm converts them all)
    method.state_dict() / load_state_dict()   what a checkpoint must carry beyond `model`
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from simclr_cli.augment import Augmenter


@dataclass
class Views:
    pair: torch.Tensor  # (2B, 3, S, S): view 1 of every image, then view 2
    small: torch.Tensor | None = None  # (m * B, 3, s, s): multi-crop's small views, when asked
    noise: torch.Tensor | None = None  # per-image random numbers a method draws with its views (mae: its masks)


@dataclass
class MethodFigure:
    """A figure of a method's own for `simclr report`: rows of images under column titles."""
    file: str  # its file name in the report folder
    caption: str  # what it shows, for the report's index
    columns: list[str]  # one title per column
    rows: list[list[Any]]  # uint8 numpy images (3, H, W), one list per row


def with_small_views(augment: Augmenter, x: torch.Tensor, generator: torch.Generator, size: int,
                     small_crops: tuple[int, int, tuple[float, float]]) -> Views:
    """The pair, then multi-crop's small views (n views of `small_size` px, crop areas in `scale`, from
    `small_crops` = (n, small_size, scale)), drawn after both; no small views when n is 0."""
    pair = augment.pair(x, generator, size)
    n, small_size, scale = small_crops
    return Views(pair, augment.small(x, generator, n, small_size, scale) if n else None)


class Method:
    model: torch.nn.Module
    Options: ClassVar[type | None] = None  # the dataclass of `method.NAME.*`; an instance is cfg.method.options
    RULES: ClassVar[list[tuple[str, Callable[[Any], bool], str]]] = []  # (option, test, what it must be)
    multi_crop: ClassVar[bool] = False  # takes augment.small_crops (its loss scores the small views)
    views_per_image: ClassVar[int] = 2  # views a step makes of each image (the pair), for the logged views/s

    def health_head(self) -> torch.nn.Module | None:
        """The network after the encoder whose outputs the health monitor reads (the exported head)."""
        return getattr(self.model, "head", None)

    def views(self, augment: Augmenter, x: torch.Tensor, generator: torch.Generator, size: int) -> Views:
        return Views(augment.pair(x, generator, size))

    def loss(self, net: torch.nn.Module, views: Views, ctx: contextlib.AbstractContextManager) -> torch.Tensor:
        raise NotImplementedError

    def networks(self) -> dict[str, torch.nn.Module]:
        """Every network the method runs, by attribute: what moves to the device and what SyncBatchNorm
        converts. The optimiser trains `model` alone."""
        return {"model": self.model}

    def to(self, device: torch.device, memory_format: torch.memory_format) -> Method:
        for name, net in self.networks().items():
            setattr(self, name, net.to(device, memory_format=memory_format))
        return self

    def convert_sync_batchnorm(self) -> None:
        """model.sync_bn: every BatchNorm of every network normalises over the global batch, the target
        network's too (left as it was, it would keep each rank's own batch statistics)."""
        for name, net in self.networks().items():
            setattr(self, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(net))

    @classmethod
    def report_figure(cls, config: dict, model_state: dict, images: torch.Tensor) -> MethodFigure | None:
        """None by default: a method that has a figure of its own draws it from a checkpoint's config and
        "model" state, for a few held-out uint8 images (B, 3, H, W)."""
        return None

    def check_data(self, data: Any) -> None:
        """Nothing by default: a method whose settings depend on the training set refuses it here, one line
        (a ConfigError), before the first step."""

    def before_update(self, step: int, total_steps: int) -> None:
        """Nothing by default: after backward (gradients averaged over ranks and unscaled), before the
        optimiser step `step` (0-based) of `total_steps`."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Nothing by default: a method with a second network updates it here."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"the checkpoint carries another method's state ({', '.join(state)})")
