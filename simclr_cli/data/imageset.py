"""A whole split as one uint8 tensor (N, 3, H, W), in memory or mapped from disk, with its labels; and the
fixed validation split held out of a labelled training split."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simclr_cli.data.mapped import MappedImages


@dataclass
class ImageSet:
    """A whole split, in memory or (an image folder through the cache) mapped from disk. `labels` is None
    when the data has no labels (a flat image folder)."""

    images: torch.Tensor | MappedImages  # uint8 (N, 3, H, W), contiguous
    labels: torch.Tensor | None  # int64 (N,)
    classes: list[str] | None  # class names, index = label
    name: str  # e.g. "cifar10/train"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"ImageSet images must be uint8 (N, 3, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        self.images = self.images.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int, seed: int) -> ImageSet:
        """A fixed random `n` of the images (seeded, kept in their original order); n >= len -> self."""
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        if n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        return self.take(torch.randperm(len(self), generator=g)[:n].sort().values, f"{self.name}[{n}]")

    def take(self, idx: torch.Tensor, name: str) -> ImageSet:
        """The images at `idx` (int64, CPU), with their labels; mapped images stay mapped (a row view)."""
        labels = None if self.labels is None else self.labels[idx.to(self.labels.device)]
        images = self.images.select(idx) if self.mapped else self.images[idx.to(self.images.device)]
        return ImageSet(images, labels, self.classes, name)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(3, H, W) of each image."""
        return tuple(self.images.shape[1:])

    @property
    def mapped(self) -> bool:
        """True when the images stay on disk: batches are read (and moved to a device) one at a time."""
        return isinstance(self.images, MappedImages)

    def to(self, device: torch.device | str) -> ImageSet:
        """On `device`; mapped images stay mapped (their batches move, see `data.batches.Batches`)."""
        labels = None if self.labels is None else self.labels.to(device)
        return ImageSet(self.images.to(device), labels, self.classes, self.name)


VALIDATION_SEED = 0  # one fixed validation split for every recipe and every train.seed, so they compare


def split_validation(data: ImageSet, size: int) -> tuple[ImageSet, ImageSet]:
    """(the rest, the validation split) of a labelled training split: a fixed random `size` of its images
    (at most a tenth, at least one), each part in its original order. Choosing recipes on it leaves the
    test split for reporting, once per final recipe."""
    n = max(1, min(size, len(data) // 10))
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(VALIDATION_SEED))
    return data.take(perm[n:].sort().values, f"{data.name}:rest"), data.take(perm[:n].sort().values, f"{data.name}:val")
