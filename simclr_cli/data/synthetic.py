"""Synthetic labelled images: gratings of 10 learnable classes, for tests and demos; no file is read."""

from __future__ import annotations

import math

import torch

from simclr_cli.config import DataConfig
from simclr_cli.data.imageset import ImageSet
from simclr_cli.data.source import NORMALIZATION, Source


SYNTHETIC_CLASSES = 10


def make_synthetic(n: int, size: int, seed: int, split: str, chunk: int = 512) -> ImageSet:
    """`n` labelled images of 10 classes, balanced, deterministic from (seed, split).

    Class c is a sinusoidal grating between two colours, at orientation c * 18 degrees and 2 + c % 4 cycles
    per image. The class templates come from `seed` alone, so train and test share them; each image draws
    its own phase (a random shift along the grating), brightness (x0.85-1.15) and pixel noise (std 0.06 of
    full scale) from a split-specific stream, so the two splits hold different images.
    """
    templates = torch.Generator().manual_seed(seed * 3)
    colour_a = torch.rand(SYNTHETIC_CLASSES, 3, 1, 1, generator=templates)
    colour_b = torch.rand(SYNTHETIC_CLASSES, 3, 1, 1, generator=templates)
    angle = torch.arange(SYNTHETIC_CLASSES) * (math.pi / SYNTHETIC_CLASSES)  # radians
    cycles = 2.0 + torch.arange(SYNTHETIC_CLASSES) % 4  # grating periods across the image

    g = torch.Generator().manual_seed(seed * 3 + (1 if split == "train" else 2))
    labels = (torch.arange(n) % SYNTHETIC_CLASSES)[torch.randperm(n, generator=g)]
    phase = torch.rand(n, generator=g) * 2 * math.pi
    brightness = 0.85 + 0.3 * torch.rand(n, generator=g)
    coord = torch.arange(size, dtype=torch.float32) / size
    y, x = torch.meshgrid(coord, coord, indexing="ij")  # (S, S) each, in [0, 1)
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    for i in range(0, n, chunk):  # bounds the float intermediates to chunk x 3 x S x S
        c, sl = labels[i:i + chunk], slice(i, i + chunk)
        proj = x * angle[c].cos().view(-1, 1, 1) + y * angle[c].sin().view(-1, 1, 1)  # (B, S, S)
        t = 0.5 + 0.5 * torch.sin(2 * math.pi * cycles[c].view(-1, 1, 1) * proj + phase[sl].view(-1, 1, 1))
        img = colour_a[c] + (colour_b[c] - colour_a[c]) * t.unsqueeze(1)  # (B, 3, S, S)
        img = img * brightness[sl].view(-1, 1, 1, 1) + 0.06 * torch.randn(img.shape, generator=g)
        images[sl] = (img * 255).round_().clamp_(0, 255).to(torch.uint8)
    return ImageSet(images, labels, [f"class{k}" for k in range(SYNTHETIC_CLASSES)], f"synthetic/{split}")


def load_synthetic(d: DataConfig, split: str, size: int, seed: int, progress=None, notice=None) -> ImageSet:
    return make_synthetic(d.synthetic_size, size, seed, split)


# For synthetic data any statistics near mid-grey work: ImageNet's.
SYNTHETIC = Source(load_synthetic, NORMALIZATION["imagenet"], "10 classes of gratings made in memory, "
                   "data.synthetic_size a split (tests, demos)", uses_root=False)  # the entry of registry.SOURCES
