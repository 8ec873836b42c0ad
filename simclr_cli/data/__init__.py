"""The data wing: datasets as one uint8 tensor each, in one registry of sources.

SOURCES maps `data.dataset` to a `Source`: a function giving one split ("train" or "test") as an `ImageSet`
(uint8 (N, 3, H, W), labels, class names), and the per-channel normalisation of its training images. CIFAR
comes from its pickle batches (`cifar.py`), an image folder through its decoded cache (`folder.py`,
`cache.py`, `images.py`), `synthetic` from a formula. Nothing here runs per training step but the batch
reading of `batches.py`.

A new source: a file here with its load function, one line in SOURCES, and its tests (copy
tests/test_data.py's cases for its splits, labels and bad input).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist

from simclr_cli.config import ConfigError, DataConfig
from simclr_cli.data.cache import Progress
from simclr_cli.data.cifar import CIFAR_FOLDERS, default_data_root, loader as cifar_loader
from simclr_cli.data.folder import has_split_folders, load_folder
from simclr_cli.data.imageset import ImageSet, split_validation
from simclr_cli.data.mapped import MappedImages
from simclr_cli.data.synthetic import make_synthetic
from simclr_cli.errors import DatasetError
from simclr_cli.runtime import Callback, DistInfo

SPLITS = ("train", "test")
# Per-channel mean and std of pixel/255 over each training set. CIFAR-10's std is over all pixels
# (0.247, ...); the often-copied (0.2023, 0.1994, 0.2010) is the mean of per-image stds (0.201, 0.199,
# 0.201 on the offline copy), which understates the spread the encoder sees.
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass(frozen=True)
class Source:
    load: Callable[..., ImageSet]  # (data config, split, image size, seed, progress, notice) -> ImageSet
    normalization: tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel of pixel/255


def _synthetic(d: DataConfig, split: str, size: int, seed: int, progress=None, notice=None) -> ImageSet:
    return make_synthetic(d.synthetic_size, size, seed, split)


# Folders and synthetic images get ImageNet's statistics: folders are usually photos, and for synthetic data
# any statistics near mid-grey work.
SOURCES: dict[str, Source] = {
    "cifar10": Source(cifar_loader("cifar10"), NORMALIZATION["cifar10"]),
    "cifar100": Source(cifar_loader("cifar100"), NORMALIZATION["cifar100"]),
    "folder": Source(load_folder, NORMALIZATION["imagenet"]),
    "synthetic": Source(_synthetic, NORMALIZATION["imagenet"]),
}


def check_source(name: str) -> None:
    """An unknown `data.dataset` is one line naming the closest source."""
    if name not in SOURCES:
        close = difflib.get_close_matches(name, SOURCES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetError(f"unknown dataset {name!r}{hint}: choose one of {', '.join(SOURCES)}")


def normalization_for(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for a dataset name (or "imagenet")."""
    if name in NORMALIZATION:
        return NORMALIZATION[name]
    check_source(name)
    return SOURCES[name].normalization


def load_dataset(d: DataConfig, split: str, *, seed: int = 0, image_size: int | None = None,
                 progress: Progress | None = None, notice: Callable[[str], None] | None = None) -> ImageSet:
    """One split ("train" or "test") of the dataset `d` names, as uint8 tensors at `image_size` pixels
    (default data.image_size). seed: picks the synthetic images and a flat folder's 80/20 split, so pass the
    same seed for both splits. progress(done, total, bad) while a folder's cache is built; notice(message)
    for what the user should know (the folder changed since it was cached)."""
    check_source(d.dataset)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: use 'train' or 'test'")
    size = image_size or d.image_size
    if size < 1 or d.num_workers < 0 or d.synthetic_size < 1:
        raise DatasetError(f"need image_size >= 1, num_workers >= 0, synthetic_size >= 1; got {size}, "
                           f"{d.num_workers}, {d.synthetic_size}")
    return SOURCES[d.dataset].load(d, split, size, seed, progress, notice)


def load_train_set(cfg, dist_info: DistInfo, emit: Callback | None = None) -> ImageSet:
    """The training split a run's config names (subset, checked against the batch size). Under several
    processes, CIFAR is loaded (and downloaded) by local rank 0 first, so ranks never write the same archive
    at once; a folder needs no such turn: its cache build is locked on disk, so one process decodes while
    the others wait for it, without a collective that could time out on a large folder. Rank 0 alone
    reports the build."""
    d, emit = cfg.data, emit or (lambda event, data: None)
    shown = dist_info.is_main
    first = dist_info.enabled and d.dataset in CIFAR_FOLDERS  # a download: one writer per machine
    if first and dist_info.local_rank != 0:
        dist.barrier()
    try:
        progress = (lambda done, total, bad: emit("cache", {"done": done, "total": total, "bad": bad})) if shown else None
        notice = (lambda m: emit("notice", {"message": m})) if shown else None
        data = load_dataset(d, "train", seed=cfg.train.seed, progress=progress, notice=notice)
    finally:  # released on failure too: the others then fail with the same one line, not a broken-pipe traceback
        if first and dist_info.local_rank == 0:
            dist.barrier()
    if d.size_dataset_train:
        data = data.subset(d.size_dataset_train, seed=cfg.train.seed)
    if len(data) < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is larger than the {len(data)} training images: "
                          "lower train.batch_size or use more data")
    return data


__all__ = ["CIFAR_FOLDERS", "NORMALIZATION", "SOURCES", "ImageSet", "MappedImages", "Source", "check_source",
           "default_data_root", "has_split_folders", "load_dataset", "load_train_set", "normalization_for",
           "split_validation"]
