"""The `webdataset` data source (`data.dataset: webdataset`): tar shards in the WebDataset layout, on local disk
or in an object store, streamed into pretraining without a copy on local disk (`stream`, `stream_io`).

Settings (`data.webdataset.*`): `urls`, the shards (brace ranges, s3:// gs:// https:// or local paths, or a
folder that `simclr shards` wrote, for its train series); `samples_per_epoch` (0: the shards' count, from their
index or counted once and cached); `buffer`, the shuffle buffer's samples; `timeout`, the seconds any remote
read may wait. Images are decoded in `data.num_workers` DataLoader workers at `data.image_size`, as a folder's.

The training set is a `StreamSet`: its length is the epoch's samples, and `StreamBatches` hands the loop the
batches of an epoch through the same `order` / `stream` calls as `batches.Batches`, so the loop, its resume and
its checkpoints do not ask which kind they read. An epoch's order is the seed's (shard order, then the buffer);
a run resumed mid-epoch skips, in each worker, the samples of the batches done and goes on with exactly the
samples the unbroken run would have seen next (the same `data.num_workers` and batch; `stream` says how). Bad
samples (no image, an image that does not decode) are passed over, each named in one notice; a shard that
cannot be read is one line that stops the run: it never trains silently on part of the data.

Probe and finetune hold a labelled split whole (`load_whole`): the train and test series of the index that
`simclr shards` writes (from a folder with train/ and test/), labels from `.cls`; `--split val` holds out the
fixed validation split of the train series, as for any source. A streamed pretraining run has no kNN monitor
(it would need that split decoded whole beside the stream), and `simclr report` draws its curves only.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from simclr_cli.config import DataConfig
from simclr_cli.data.images import decode_bytes
from simclr_cli.data.imageset import ImageSet
from simclr_cli.data.shardindex import INDEX_NAME
from simclr_cli.data.source import NORMALIZATION, Source
from simclr_cli.data.stream import ShardStream, stream_batches
from simclr_cli.data.stream_io import DEFAULT_TIMEOUT, expand_urls, read_index, read_samples, shard_counts
from simclr_cli.errors import DatasetError, ImageDecodeError


@dataclass
class WebDatasetOptions:
    urls: list[str] = field(default_factory=list)  # shard URLs, brace ranges expanded; or a `simclr shards` folder
    samples_per_epoch: int = 0  # samples an epoch counts; 0: every sample of the shards once
    buffer: int = 1000  # samples in each worker's shuffle buffer (0: shard order only)
    timeout: float = DEFAULT_TIMEOUT  # seconds a remote connect or read may wait before the shard is unreadable


RULES = (("urls", lambda v: all(isinstance(u, str) and u.strip() for u in v), "a list of shard URLs, none empty"),
         ("samples_per_epoch", lambda v: v >= 0, ">= 0"), ("buffer", lambda v: v >= 0, ">= 0"),
         ("timeout", lambda v: v > 0, "> 0"))


class StreamSet:
    """A training set of tar shards: `len` is an epoch's samples; nothing is read until `StreamBatches` streams.
    No labels or class names ahead of reading (`.cls` members are optional), so no kNN monitor."""

    labels = None
    classes = None
    mapped = False

    def __init__(self, urls: list[str], counts: list[int], image_size: int, options: WebDatasetOptions,
                 num_workers: int) -> None:
        self.urls, self.counts, self.image_size, self.options = urls, counts, image_size, options
        self.num_workers = num_workers
        self.name = f"webdataset, {len(urls)} shards"

    def __len__(self) -> int:
        return self.options.samples_per_epoch or sum(self.counts)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 3, self.image_size, self.image_size

    def to(self, device: torch.device | str) -> StreamSet:
        return self  # batches move to the device as they are made

    def batches(self, rank: int, world_size: int, local_batch: int, device: torch.device, notice) -> StreamBatches:
        return StreamBatches(self, rank, world_size, local_batch, device, notice)


class StreamBatches:
    """The loop's batches of a stream: `order(seed, epoch)` and `stream(order, indices)` as `Batches` has
    them; indices must run from the epoch's first step not yet taken to its end."""

    def __init__(self, data: StreamSet, rank: int, world_size: int, local_batch: int, device: torch.device,
                 notice) -> None:
        self.data, self.rank, self.world_size = data, rank, world_size
        self.local_batch, self.device, self.notice = local_batch, device, notice or (lambda message: None)

    def order(self, seed: int, epoch: int) -> tuple[int, int]:
        return seed, epoch  # the stream draws its own order from these

    def stream(self, order: tuple[int, int], indices) -> _Epoch:
        indices = list(indices)
        seed, epoch = order
        d = self.data
        stream = ShardStream(d.urls, d.counts, d.image_size, batch_size=self.local_batch, seed=seed, epoch=epoch,
                             rank=self.rank, world_size=self.world_size,
                             start=(indices[0] if indices else 0) * self.local_batch, buffer=d.options.buffer,
                             timeout=d.options.timeout, samples=d.options.samples_per_epoch)
        return _Epoch(stream, d.num_workers, self.device, self.notice, len(indices))


class _Epoch:
    """A context manager over the rest of an epoch's batches, moved to the device; the workers stop on exit."""

    def __init__(self, stream: ShardStream, num_workers: int, device: torch.device, notice, count: int) -> None:
        self.stream, self.num_workers, self.device, self.notice, self.count = stream, num_workers, device, notice, count
        self.source = None

    def __enter__(self) -> _Epoch:
        self.source = stream_batches(self.stream, self.num_workers, pin_memory=self.device.type == "cuda")
        return self

    def __exit__(self, *exc) -> None:
        if self.source is not None:
            self.source.close()  # ends the DataLoader's iterator: its workers shut down

    def __iter__(self) -> _Epoch:
        return self

    def __next__(self) -> torch.Tensor:
        if self.count <= 0:
            raise StopIteration
        batch = next(self.source, None)
        if batch is None:  # the stream's length is whole batches: running short is a bug, never silent
            raise DatasetError("the shard stream ended before the epoch's last step: the shards changed while "
                               "the run read them; write them again or restart the run")
        self.count -= 1
        for url, key, why in batch.skipped:
            self.notice(f"passed over sample {key} of {url}: {why}")
        return batch.images.to(self.device, non_blocking=True)


def load_webdataset(d: DataConfig, split: str, size: int, seed: int, progress=None, notice=None) -> StreamSet:
    """The training stream `data.webdataset` names: its URLs expanded and each shard's samples counted (the
    index beside them, else once from the tar headers into a cache)."""
    o = d.options
    if split != "train":
        raise DatasetError(f"the webdataset source streams the train split into pretraining, not the {split} split: "
                           "probe and finetune read the series of a `simclr shards` index whole (--data-dir)")
    if not o.urls:
        raise DatasetError("the webdataset source needs its shards: set data.webdataset.urls, e.g. "
                           "['/data/train-{000000..000099}.tar'] or the folder `simclr shards` wrote")
    urls = expand_urls(o.urls)
    counts = shard_counts(urls, Path(d.cache_dir).expanduser() / "shard-counts" if d.cache_dir else None, o.timeout)
    empty = [u for u, n in zip(urls, counts) if n < 1]
    if empty:
        raise DatasetError(f"shard {empty[0]} holds no samples: write it again or leave it out of data.webdataset.urls")
    return StreamSet(urls, counts, size, o, d.num_workers)


def load_whole(d: DataConfig, split: str, size: int, seed: int, progress=None, notice=None) -> ImageSet:
    """A labelled split held whole (probe, finetune): the `split` series ("train" or "test") of the index that
    `simclr shards` wrote in data.root (a folder or a URL prefix; else the one folder data.webdataset.urls
    names), its labels from each sample's .cls and its class names from the index. Decoded in data.num_workers
    threads, a shard each; a sample without a label, or an image that does not decode, is one line."""
    urls = d.options.urls
    root = (d.root or (urls[0] if len(urls) == 1 and "{" not in urls[0] else "")).rstrip("/")
    index = read_index(root, timeout=d.options.timeout) if root else None
    if index is None:
        raise DatasetError(f"no shard index ({INDEX_NAME}) in {root or 'data.root'}: probe and finetune read the train "
                           "and test series that `simclr shards` writes; pass --data-dir with its folder")
    series = ((index.get("series") or {}).get(split) or {}).get("shards")
    if not series or not index.get("classes"):
        what = f"no {split} series" if not series else "no classes (no class subfolders)"
        raise DatasetError(f"the shards in {root} have {what}: probe and finetune need labelled train and test "
                           "series; write them with `simclr shards` from DIR/train/<class>/ and DIR/test/<class>/")
    classes = list(index["classes"])
    jobs = [(f"{root}/{sh['name']}", int(sh["samples"])) for sh in series]
    with ThreadPoolExecutor(max(1, min(d.num_workers, len(jobs)))) as pool:
        parts = list(pool.map(lambda job: _labelled(*job, size, len(classes), d.options.timeout), jobs))
    images = [x for part in parts for x in part[0]]
    labels = [y for part in parts for y in part[1]]
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), classes, f"webdataset/{split}")


def _labelled(url: str, count: int, size: int, classes: int, timeout: float) -> tuple[list, list[int]]:
    """The decoded images of one shard (uint8 (3, size, size) each) and their class indices."""
    images, labels = [], []
    for raw in read_samples(url, count, timeout):
        text = raw.cls.decode("ascii", "replace").strip() if raw.cls is not None else ""
        if not text.isdigit() or int(text) >= classes:
            raise DatasetError(f"sample {raw.key} of {url} has no class label (.cls {text[:20]!r}, {classes} classes): "
                               "probe and finetune need one for every sample")
        if raw.image is None:
            raise DatasetError(f"sample {raw.key} of {url} has no image member: write the shard again")
        try:
            images.append(decode_bytes(raw.image, size, f"{url}:{raw.key}.{raw.suffix}"))
        except ImageDecodeError as e:
            raise DatasetError(f"{e}: write the shard again without it") from None
        labels.append(int(text))
    return images, labels


WEBDATASET = Source(load_webdataset, NORMALIZATION["imagenet"], "tar shards in the WebDataset layout (KEY.jpg, "
                    "KEY.cls), local or s3:// gs:// https://: pretraining streams data.webdataset.urls; probe and "
                    "finetune read the train and test series of a simclr shards folder (--data-dir)",
                    kind="stream", Options=WebDatasetOptions, RULES=RULES, load_whole=load_whole,
                    layout="DIR/index.json with train and test series (simclr shards)")
