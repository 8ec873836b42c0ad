"""Datasets as one uint8 tensor each: CIFAR-10/100 from their pickle batches, image folders, synthetic images.

`load_dataset` returns an `ImageSet` whose `images` are uint8 (N, 3, H, W), ready to move to the training
device once and be augmented there in batches; nothing here runs per training step. Image-file decoding
(shared with `simclr embed`) lives in `images.py` and is re-exported here; CIFAR's pickles are `cifar.py`'s.
An image folder is decoded once into the on-disk cache (`cache.py`) and its images are then read from the
map as batches ask for them (`MappedImages`), unless `FolderOptions.cache` is off.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from simclr_cli.config import DATASETS, ConfigError
from simclr_cli.errors import DatasetError, ImageDecodeError  # noqa: F401  (re-exported)
from simclr_cli.cache import MappedImages, Progress, load_cached
from simclr_cli.cifar import CIFAR_FOLDERS, load_cifar  # noqa: F401  (CIFAR_FOLDERS re-exported)
from simclr_cli.runtime import Callback, DistInfo
from simclr_cli.images import (IMAGE_EXTENSIONS, DecodedBatch, ImageFolderDataset,  # noqa: F401
                               decode_all, decode_image, folder_split, has_split_folders, iter_decoded,
                               list_images)

SPLITS = ("train", "test")

# Per-channel mean and std of pixel/255 over each training set. CIFAR-10's std is over all pixels
# (0.247, ...); the often-copied (0.2023, 0.1994, 0.2010) is the mean of per-image stds (0.201, 0.199,
# 0.201 on the offline copy), which understates the spread the encoder sees.
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

FOLDER_TEST_FRACTION = 0.2  # share of each class held out as "test" when a folder has no train/ and test/


@dataclass
class FolderOptions:
    """How an image folder is read: `data.cache`, `data.cache_dir`, `data.skip_bad`, and where progress goes."""

    cache: bool = True  # decode once into the cache and map it; False: decode into memory on every load
    cache_dir: str | Path | None = None  # None: $SIMCLR_CACHE_DIR or ~/.cache/simclr-cli/folders
    skip_bad: bool = False  # leave out files that do not decode instead of failing
    progress: Progress | None = None  # (done, total, bad) while the cache is built
    notice: Callable[[str], None] | None = None  # e.g. "the folder changed since it was cached"

    @classmethod
    def of(cls, data_cfg, progress: Progress | None = None, notice: Callable[[str], None] | None = None):
        return cls(data_cfg.cache, data_cfg.cache_dir, data_cfg.skip_bad, progress, notice)


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
    def mapped(self) -> bool:
        """True when the images stay on disk: batches are read (and moved to a device) one at a time."""
        return isinstance(self.images, MappedImages)

    def to(self, device: torch.device | str) -> ImageSet:
        """On `device`; mapped images stay mapped (their batches move, see `train.Trainer._batch`)."""
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


def default_data_root() -> Path:
    """$SIMCLR_DATA_DIR if set, else ~/.cache/simclr-cli/data."""
    env = os.environ.get("SIMCLR_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "simclr-cli" / "data"


def normalization_for(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for a dataset name. Folders and synthetic images get ImageNet's: folders
    are usually photos, and for synthetic data any stats near mid-grey work."""
    if name in NORMALIZATION:
        return NORMALIZATION[name]
    if name in ("folder", "synthetic"):
        return NORMALIZATION["imagenet"]
    known = ", ".join([*NORMALIZATION, "folder", "synthetic"])
    raise DatasetError(f"no normalization for {name!r}: use one of {known}")


def load_dataset(name: str, split: str, root: str | Path | None = None, *, download: bool = False,
                 image_size: int = 32, num_workers: int = 2, synthetic_size: int = 2000,
                 seed: int = 0, folder: FolderOptions | None = None) -> ImageSet:
    """Load one split ("train" or "test") of a dataset as uint8 tensors.

    root: folder holding cifar-10-batches-py/ or cifar-100-python/ (None: `default_data_root()`), or the
    image folder itself for "folder". image_size: output side in pixels; CIFAR is resized from 32 only when
    it differs. seed: picks the synthetic images and a folder's 80/20 split, so pass the same seed for
    both splits. folder: how an image folder is read (default: through the cache).
    """
    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetError(f"unknown dataset {name!r}{hint}: choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: use 'train' or 'test'")
    if image_size < 1 or num_workers < 0 or synthetic_size < 1:
        raise DatasetError(f"need image_size >= 1, num_workers >= 0, synthetic_size >= 1; got {image_size}, "
                           f"{num_workers}, {synthetic_size}")
    if name == "synthetic":
        return make_synthetic(synthetic_size, image_size, seed, split)
    if name == "folder":
        if root is None:
            raise DatasetError("the folder dataset needs a root: set data.root to a folder of images")
        return _load_folder(Path(root).expanduser(), split, image_size, num_workers, seed, folder or FolderOptions())
    root = default_data_root() if root is None else Path(root).expanduser()
    images, labels, classes = load_cifar(name, split, root, download)
    if image_size != images.shape[-1]:
        images = _resize_uint8(images, image_size)
    return ImageSet(images, labels, classes, f"{name}/{split}")


def load_train_set(cfg, dist_info: DistInfo, emit: Callback | None = None) -> ImageSet:
    """The training split a run's config names (subset, checked against the batch size). Under several
    processes, CIFAR is loaded (and downloaded) by local rank 0 first, so ranks never write the same archive
    at once; a folder needs no such turn: its cache build is locked on disk, so one process decodes while
    the others wait for it, without a collective that could time out on a large folder. Rank 0 alone
    reports the build."""
    d, emit = cfg.data, emit or (lambda event, data: None)
    shown = dist_info.is_main
    first = dist_info.enabled and d.dataset in CIFAR_FOLDERS
    if first and dist_info.local_rank != 0:
        dist.barrier()
    try:
        folder = FolderOptions.of(d, (lambda done, total, bad: emit("cache", {"done": done, "total": total, "bad": bad}))
                                  if shown else None, (lambda m: emit("notice", {"message": m})) if shown else None)
        data = load_dataset(d.dataset, "train", d.root, download=d.download, image_size=d.image_size,
                            num_workers=d.num_workers, synthetic_size=d.synthetic_size, seed=cfg.train.seed,
                            folder=folder)
    finally:  # released on failure too: the others then fail with the same one line, not a broken-pipe traceback
        if first and dist_info.local_rank == 0:
            dist.barrier()
    if d.size_dataset_train:
        data = data.subset(d.size_dataset_train, seed=cfg.train.seed)
    if len(data) < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is larger than the {len(data)} training images: "
                          "lower train.batch_size or use more data")
    return data


def _load_folder(root: Path, split: str, size: int, num_workers: int, seed: int, opts: FolderOptions) -> ImageSet:
    """One split of an image folder. Through the cache, the split is a view of the whole folder's map (bad
    files left out when skip_bad); without it, the split's images are decoded into memory."""
    paths, keep, labels, classes = folder_split(root, split, seed, FOLDER_TEST_FRACTION)
    if opts.cache:
        mapped, kept = load_cached(root, paths, size, cache_dir=Path(opts.cache_dir).expanduser() if opts.cache_dir
                                   else None, num_workers=num_workers, skip_bad=opts.skip_bad,
                                   progress=opts.progress, notice=opts.notice)
        row = {position: r for r, position in enumerate(kept)}  # position in `paths` -> row of `mapped`
        keep = [i for i in keep if i in row]
        if not keep:
            raise DatasetError(f"none of the images of the {split} split of {root} could be decoded: check the files")
        images: torch.Tensor | MappedImages = mapped.select(np.array([row[i] for i in keep], dtype=np.int64))
    else:
        images = decode_all([paths[i] for i in keep], size, num_workers)
    tensor_labels = None if labels is None else torch.tensor([labels[i] for i in keep], dtype=torch.int64)
    return ImageSet(images, tensor_labels, classes, f"folder/{split}")


def _resize_uint8(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> (N, 3, size, size), bilinear with antialias, in chunks to bound float memory."""
    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        out[i:i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


# --- synthetic -------------------------------------------------------------------------------------------

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
