"""Checkerboards as a simclr-cli data source: labelled images made in memory, `data.checkerboards.*`.

Class c is a checkerboard of 2 + c squares a side in two random colours, shifted by a random offset; the
split is drawn from (seed, split), so train and test hold different images of the same classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simclr_cli.data import ImageSet, Source
from simclr_cli.data.source import NORMALIZATION


@dataclass
class CheckerboardOptions:
    images: int = 256  # images per split
    classes: int = 4  # square counts 2 .. classes + 1 a side


def load(d, split: str, size: int, seed: int, progress=None, notice=None) -> ImageSet:
    o: CheckerboardOptions = d.options
    g = torch.Generator().manual_seed(seed * 2 + (split == "test"))
    labels = torch.randint(o.classes, (o.images,), generator=g)
    pixel = torch.arange(size, dtype=torch.float32) / size  # (S,) in [0, 1)
    squares = (2 + labels).view(-1, 1, 1).float()  # (N, 1, 1) squares a side
    shift = torch.rand(o.images, 2, 1, 1, generator=g)  # (N, 2, 1, 1) of a square
    rows = (pixel.view(1, -1, 1) * squares + shift[:, 0]).floor()  # (N, S, 1)
    cols = (pixel.view(1, 1, -1) * squares + shift[:, 1]).floor()  # (N, 1, S)
    board = ((rows + cols) % 2).unsqueeze(1)  # (N, 1, S, S): 0 or 1
    colours = torch.rand(o.images, 2, 3, 1, 1, generator=g)  # (N, 2, 3, 1, 1)
    images = colours[:, 0] + (colours[:, 1] - colours[:, 0]) * board  # (N, 3, S, S) in [0, 1]
    return ImageSet((images * 255).round().to(torch.uint8), labels, [f"{k + 2}x{k + 2}" for k in range(o.classes)],
                    f"checkerboards/{split}")


CHECKERBOARDS = Source(load, NORMALIZATION["imagenet"], "checkerboards of 2..N squares, made in memory (a plugin)",
                       uses_root=False, Options=CheckerboardOptions,
                       RULES=(("images", lambda v: v >= 2, ">= 2"), ("classes", lambda v: v >= 2, ">= 2")))
