"""`simclr embed` over tar shards: IMAGES names shards (a URL such as s3://bucket/train-{0000..0099}.tar, a
local .tar or brace pattern, or a folder `simclr shards` wrote), and the rows follow the shards in the order
named and each shard's samples in the order its tar holds them. A row is named `URL#KEY` (the shard and the
sample's key; `--paths` writes these names, the csv format's first column too), so the vectors can be joined
back to the samples without a path per image.

The number of rows is known before the first is written: the shards' counts (the index beside them, else
counted from the tar headers once and cached; `stream_io.shard_counts`). Bad samples (no image member, an
image that does not decode) follow the folder rules of `embed.each_decoded`: every one is reported and
nothing is written, or `--skip-bad` leaves them out. A shard that cannot be read is one line.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

import torch

from simclr_cli.data.images import decode_bytes
from simclr_cli.data.stream_io import DEFAULT_TIMEOUT, expand_urls, local_path, read_samples, shard_counts
from simclr_cli.data.shardindex import INDEX_NAME
from simclr_cli.errors import BadImagesError, DatasetError, ImageDecodeError
from simclr_cli.runtime import Callback


def is_shards(images: str) -> bool:
    """True when IMAGES names tar shards rather than image files: a URL with a scheme other than file://, a
    path or brace pattern ending in .tar, or a folder holding a shard index."""
    text = str(images).strip()
    if "://" in text and not text.startswith("file://"):
        return True
    if text.lower().endswith(".tar") or text.lower().endswith(".tar}"):
        return True
    path = local_path(text)
    return path is not None and os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX_NAME))


def shard_samples(urls: Sequence[str], counts: Sequence[int], size: int, batch_size: int,
                  timeout: float = DEFAULT_TIMEOUT) -> Iterator[tuple[list[str], list[torch.Tensor], list]]:
    """Batches of ([row name], [uint8 (3, size, size)], [(row name, reason) of bad samples]) in shard order."""
    names, images, bad = [], [], []
    for url, count in zip(urls, counts):
        for raw in read_samples(url, count, timeout):
            name = f"{url}#{raw.key}"
            if raw.image is None:
                bad.append((name, "no image member"))
            else:
                try:
                    images.append(decode_bytes(raw.image, size, f"{name}.{raw.suffix}"))
                    names.append(name)
                except ImageDecodeError as e:
                    bad.append((name, str(e)))
            if len(images) == batch_size:
                yield names, images, bad
                names, images, bad = [], [], []
    if names or bad:
        yield names, images, bad


def shards_of(images: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[list[str], list[int]]:
    """(the shard URLs IMAGES names, the samples of each): the rows to come, before any is written."""
    urls = expand_urls(str(images))
    counts = shard_counts(urls, timeout=timeout)
    if sum(counts) == 0:
        raise DatasetError(f"the {len(urls)} shards of {images} hold no samples: check how they were written")
    return urls, counts


def each_shard_decoded(shards: tuple[list[str], list[int]], size: int,
                       handle: Callable[[list[str], torch.Tensor], None], *, batch_size: int = 256,
                       skip_bad: bool = False, callback: Callback | None = None,
                       timeout: float = DEFAULT_TIMEOUT) -> tuple[list[str], list[tuple[str, str]]]:
    """`embed.each_decoded` for shards (`shards_of`): each batch's good images to `handle(names, images_u8)`,
    in shard order. Returns (kept row names, failures)."""
    callback = callback or (lambda event, data: None)
    urls, counts = shards
    total = sum(counts)
    kept: list[str] = []
    failures: list[tuple[str, str]] = []
    done = 0
    for names, decoded, bad in shard_samples(urls, counts, size, batch_size, timeout):
        for name, why in bad:
            failures.append((name, why))
            callback("bad", {"path": name, "reason": why})
        if names and (skip_bad or not failures):
            handle(names, torch.stack(decoded))
            kept += names
        done += len(names) + len(bad)
        callback("progress", {"done": done, "total": total, "bad": len(failures)})
    if failures and not skip_bad:
        raise BadImagesError(failures, total)
    if not kept:
        raise DatasetError(f"none of the {total} samples of the {len(urls)} shards could be decoded: check them")
    return kept, failures
