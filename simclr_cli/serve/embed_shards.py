"""`simclr embed` over tar shards: IMAGES names shards (a URL such as s3://bucket/train-{0000..0099}.tar, a
local .tar or brace pattern, or a folder `simclr shards` wrote), and the rows follow the shards in the order
named and each shard's samples in the order its tar holds them. A row is named `URL#KEY` (the shard and the
sample's key; `--paths` writes these names, the csv format's first column too), so the vectors can be joined
back to the samples without a path per image.

The number of rows is known before the first is written: the shards' counts (the index beside them, else
counted from the tar headers once and cached; `stream_io.shard_counts`). Bad samples (no image member, an
image that does not decode) follow the folder rules (`embed.handle_batches`): every one is reported and
nothing is written, or `--skip-bad` leaves them out. A shard that cannot be read is one line.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch

from simclr_cli.data.images import decode_bytes
from simclr_cli.data.stream_io import DEFAULT_TIMEOUT, expand_urls, local_path, read_samples, shard_counts
from simclr_cli.data.shardindex import INDEX_NAME
from simclr_cli.errors import DatasetError, ImageDecodeError


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
                  timeout: float = DEFAULT_TIMEOUT) -> Iterator[tuple[list[str], torch.Tensor | None, list]]:
    """Batches of ([row name], uint8 (B, 3, size, size) or None, [(row name, reason) of bad samples]) in shard
    order, for `embed.handle_batches`."""
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
                yield names, torch.stack(images), bad
                names, images, bad = [], [], []
    if names or bad:
        yield names, torch.stack(images) if images else None, bad


def shards_of(images: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[list[str], list[int]]:
    """(the shard URLs IMAGES names, the samples of each): the rows to come, before any is written."""
    urls = expand_urls(str(images))
    counts = shard_counts(urls, timeout=timeout)
    if sum(counts) == 0:
        raise DatasetError(f"the {len(urls)} shards of {images} hold no samples: check how they were written")
    return urls, counts
