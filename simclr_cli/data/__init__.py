"""The data wing: datasets as one uint8 tensor each, from the data sources of `registry.SOURCES`.

Each source (`source.Source`) gives one split ("train" or "test") as an `ImageSet` (uint8 (N, 3, H, W),
labels, class names) and declares its own policy: normalisation, whether it needs data.root, has labels,
downloads, is a map or a stream. CIFAR comes from its pickle batches (`cifar.py`), an image folder through
its decoded cache (`folder.py`, `cache.py`, `images.py`), `synthetic` from a formula; `webdataset` streams tar
shards into pretraining (`streamed.py`, a `StreamSet` instead of an ImageSet). Nothing here runs per training
step but the batch reading of `batches.py` (and a stream's, of `stream.py`).

A new source: a file here (or in a plugin package) with its load function and its `Source`, one line in
registry.SOURCES (or an entry point in the group `simclr_cli.sources`), and its tests (copy
tests/test_data.py's cases for its splits, labels and bad input).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from simclr_cli.config import ConfigError, DataConfig
from simclr_cli.data.batches import Batches
from simclr_cli.data.cache import Progress
from simclr_cli.data.cifar import CIFAR_FOLDERS, default_data_root
from simclr_cli.data.folder import has_split_folders
from simclr_cli.data.imageset import ImageSet, split_validation
from simclr_cli.data.mapped import MappedImages
from simclr_cli.data.source import NORMALIZATION, Source
from simclr_cli.data.streamed import StreamBatches, StreamSet
from simclr_cli.data.synthetic import make_synthetic
from simclr_cli.errors import DatasetError
from simclr_cli.owned import checked_options
from simclr_cli.registry import SOURCES
from simclr_cli.runtime import Callback, DistInfo

SPLITS = ("train", "test")


@dataclass
class DataOptions:
    """The data an evaluation command reads (`simclr probe`, `simclr finetune`): --dataset, --data-root,
    --download, --num-workers and --synthetic-size, the DataConfig keys of the same names."""

    dataset: str = "cifar10"  # a name of registry.SOURCES
    root: str | None = None  # data.root; None -> the source's default place
    download: bool = False  # an evaluation fetches CIFAR only when asked (pretraining's data.download: true)
    synthetic_size: int = DataConfig.synthetic_size  # images per split of the synthetic dataset
    num_workers: int = DataConfig.num_workers  # image-decoding worker processes

    def data_config(self) -> DataConfig:
        """These settings over DataConfig's defaults; a source's own settings (data.NAME.*) at their defaults."""
        source = SOURCES[self.dataset] if self.dataset in SOURCES else None  # unknown: the caller's one line
        own = source.Options() if source is not None and source.Options is not None else None
        return DataConfig(dataset=self.dataset, root=None if self.root is None else str(self.root),
                          download=self.download, num_workers=self.num_workers, synthetic_size=self.synthetic_size,
                          options=own)


def check_source(name: str) -> None:
    """An unknown `data.dataset` is one line naming the closest source."""
    if name not in SOURCES:
        close = difflib.get_close_matches(name, SOURCES.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetError(f"unknown dataset {name!r}{hint}: choose one of {', '.join(SOURCES.names())}")


def source_for(name: str) -> Source:
    """The Source `data.dataset` names (an unknown name: `check_source`'s line)."""
    check_source(name)
    return SOURCES[name]


def sources() -> dict[str, Source]:
    """Every source that can be used, by name: a plugin that fails to import is warned about and left out."""
    return {e.name: s for e in SOURCES.entries() if (s := SOURCES.load(e)) is not None}


def normalization_for(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for a dataset name (or "imagenet")."""
    if name in NORMALIZATION:
        return NORMALIZATION[name]
    return source_for(name).normalization


def load_dataset(d: DataConfig, split: str, *, seed: int = 0, image_size: int | None = None,
                 progress: Progress | None = None, notice: Callable[[str], None] | None = None,
                 stream: bool = False) -> ImageSet:
    """One split ("train" or "test") of the dataset `d` names, as uint8 tensors at `image_size` pixels
    (default data.image_size). seed: picks the synthetic images and a flat folder's 80/20 split, so pass the
    same seed for both splits. progress(done, total, bad) while a folder's cache is built; notice(message)
    for what the user should know (the folder changed since it was cached). stream: the caller (pretraining)
    takes a stream source's `StreamSet`; other callers get its split whole (`Source.load_whole`)."""
    source = source_for(d.dataset)
    if source.Options is not None and not isinstance(d.options, source.Options):  # built outside load_config
        d = dataclasses.replace(d, options=checked_options(SOURCES, "data", d.dataset, d.options)[1])
    if source.kind != "map" and not stream and source.load_whole is None:
        raise DatasetError(f"the {d.dataset} source streams its data into pretraining; probe and finetune read a "
                           "whole split of a map source: use one of "
                           f"{', '.join(n for n, s in sources().items() if s.kind == 'map')}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: use 'train' or 'test'")
    size = image_size or d.image_size
    if size < 1 or d.num_workers < 0 or d.synthetic_size < 1:
        raise DatasetError(f"need image_size >= 1, num_workers >= 0, synthetic_size >= 1; got {size}, "
                           f"{d.num_workers}, {d.synthetic_size}")
    if source.kind != "map" and not stream:
        return source.load_whole(d, split, size, seed, progress, notice)
    return source.load(d, split, size, seed, progress, notice)


def load_train_set(cfg, dist_info: DistInfo, emit: Callback | None = None) -> ImageSet:
    """The training split a run's config names (subset, checked against the batch size). Under several
    processes, CIFAR is loaded (and downloaded) by local rank 0 first, so ranks never write the same archive
    at once; a folder needs no such turn: its cache build is locked on disk, so one process decodes while
    the others wait for it, without a collective that could time out on a large folder. Rank 0 alone
    reports the build."""
    d, emit = cfg.data, emit or (lambda event, data: None)
    shown = dist_info.is_main
    first = dist_info.enabled and source_for(d.dataset).downloads  # one writer per machine
    if first and dist_info.local_rank != 0:
        dist.barrier()
    try:
        progress = (lambda done, total, bad: emit("cache", {"done": done, "total": total, "bad": bad})) if shown else None
        notice = (lambda m: emit("notice", {"message": m})) if shown else None
        data = load_dataset(d, "train", seed=cfg.train.seed, progress=progress, notice=notice, stream=True)
    finally:  # released on failure too: the others then fail with the same one line, not a broken-pipe traceback
        if first and dist_info.local_rank == 0:
            dist.barrier()
    if d.size_dataset_train and isinstance(data, StreamSet):
        raise ConfigError(f"'data.size_dataset_train' keeps a subset of a whole split; the {d.dataset} source streams: "
                          f"set data.{d.dataset}.samples_per_epoch={d.size_dataset_train} instead")
    if d.size_dataset_train:
        data = data.subset(d.size_dataset_train, seed=cfg.train.seed)
    if len(data) < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is larger than the {len(data)} training images: "
                          "lower train.batch_size or use more data")
    return data


def train_batches(data: ImageSet | StreamSet, cfg, dist_info: DistInfo, local_batch: int, device: torch.device,
                  notice: Callable[[str], None] | None = None) -> Batches | StreamBatches:
    """This rank's batches of the training set, for the loop's `order` and `stream` calls: a map split's cut from
    its images, a stream's read from its shards (bad samples passed over, each given to `notice`)."""
    if isinstance(data, StreamSet):
        return data.batches(dist_info.rank, dist_info.world_size, local_batch, device, notice)
    return Batches(data.images, cfg.train.batch_size, dist_info.rank, local_batch, device, data.mapped,
                   cfg.data.read_ahead)


__all__ = ["CIFAR_FOLDERS", "NORMALIZATION", "SOURCES", "DataOptions", "ImageSet", "MappedImages", "Source",
           "check_source", "default_data_root", "has_split_folders", "load_dataset", "load_train_set",
           "make_synthetic", "normalization_for", "source_for", "sources", "split_validation", "train_batches"]
