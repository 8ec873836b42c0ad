"""A rank's share of an epoch of tar shards, decoded in DataLoader workers: `ShardStream` (the IterableDataset),
`epoch_length` (steps per epoch), `collate` and `stream_batches` (the DataLoader the trainer iterates).

Order. The epoch's shard order is a permutation seeded by (seed, epoch), the same on every rank; rank r takes
every world_size-th shard of it, and the rank's worker role w of W every W-th shard of those. A role reads its
shards in that order through a shuffle buffer seeded by (seed, epoch, rank, role), emptied (shuffled) at the
end of each pass over its shards, so one pass yields each of its samples once.

Length. Every rank yields `epoch_length(counts, world_size, batch_size * world_size) * batch_size` samples,
whatever its shards hold: the DDP ranks take the same number of steps. The rank's steps are shared among the
roles in proportion to the samples their shards hold (largest remainder), so every role yields whole batches
and the DataLoader never makes a short one. A role whose shards hold fewer samples than its share reads them
again (a new pass, shard order reseeded by the pass number), one with more stops at its share. What is seen:
with one rank and shard totals per role that are whole batches, every sample exactly once; otherwise each
role's first `share` good samples of its shuffled passes, so a sample is missed only past a role's share and
repeated only to fill it (at most a batch per role when the ranks' shards are even).

Bad samples. A sample with no image member, a `.cls` that is not a class index, or an image that does not
decode (`images.decode_bytes`: the folder decoder's limits and resize) is passed over and the role reads on,
so the epoch keeps its length. Each one is reported with the next sample the role yields: `Sample.skipped`,
then `StreamBatch.skipped`, as (shard URL, key, reason); the trainer sums and names them. A shard that cannot
be opened, is cut short, stalls past the timeout or holds no image: one DatasetError naming it (in workers,
`stream_batches` raises it in the main process, one line, not DataLoader's wrapped traceback).

Resume. The DataLoader hands over its workers' batches round robin, worker 0 first, passing over workers that
have run out; with the shares above the owner of every batch of the epoch is known (`batch_owners`). Resuming
at `start` (= steps done x batch_size) skips, in each role, the samples of its batches before that step, and
rotates the roles so that worker 0 plays the role owning the next batch. Given the same workers and
batch_size, the resumed stream is exactly the rest of the unbroken one, sample for sample: the buffer draws the
same numbers, and skipped samples are read but not decoded when `known_bad` lists the (shard URL, key) of every
bad sample reported in the batches already done (None: they are decoded to find the bad ones, exact but slower).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import Collection, Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from simclr_cli.data.images import decode_bytes, leave_signals_to_main
from simclr_cli.data.stream_io import DEFAULT_TIMEOUT, IMAGE_SUFFIXES, RawSample, read_samples
from simclr_cli.errors import DatasetError, ImageDecodeError, UserError

Skipped = tuple[str, str, str]  # (shard URL, key, reason) of a sample passed over


class Sample(NamedTuple):
    image: torch.Tensor  # uint8 (3, S, S)
    label: int  # the .cls class index, -1 without one
    key: str
    skipped: tuple[Skipped, ...]  # the bad samples the role passed over since the sample before this one


class StreamBatch(NamedTuple):
    images: torch.Tensor  # uint8 (B, 3, S, S)
    labels: torch.Tensor  # int64 (B,), -1 where a sample has no .cls
    keys: list[str]
    skipped: list[Skipped]  # bad samples passed over while this batch was read


def epoch_length(counts: Sequence[int], world_size: int, batch_size: int) -> int:
    """Steps per epoch: whole global batches (`batch_size` over all ranks) in the shards' samples, as a map
    dataset drops its last partial batch; each rank yields this many local batches."""
    if batch_size < world_size or batch_size % world_size:
        raise ValueError(f"the global batch {batch_size} is not a multiple of world_size {world_size}")
    return sum(counts) // batch_size


def worker_batches(steps: int, weights: Sequence[int]) -> list[int]:
    """`steps` batches shared in proportion to `weights` (largest remainder; ties to the lower index)."""
    total = sum(weights)
    if total == 0:
        return [0] * len(weights)
    share = [steps * w // total for w in weights]
    by_rest = sorted(range(len(weights)), key=lambda i: (-(steps * weights[i] % total), i))
    for i in by_rest[:steps - sum(share)]:
        share[i] += 1
    return share


def batch_owners(batches: Sequence[int]) -> list[int]:
    """The worker of each batch, in the order a DataLoader hands them over: round robin from worker 0 over
    the workers that still have batches."""
    left, owners = list(batches), []
    while any(left):
        for w, n in enumerate(left):
            if n:
                owners.append(w)
                left[w] -= 1
    return owners


def collate(samples: Sequence[Sample]) -> StreamBatch:
    """Samples -> one batch: images stacked to uint8 (B, 3, S, S), labels to int64 (B,)."""
    return StreamBatch(torch.stack([s.image for s in samples]),
                       torch.tensor([s.label for s in samples], dtype=torch.int64),
                       [s.key for s in samples], [x for s in samples for x in s.skipped])


class ShardStream(IterableDataset):
    """One rank's samples of one epoch (see the module docstring for order, length and resume). A new stream
    per epoch: workers copy it when the DataLoader starts.

    urls, counts: the shards and their samples (`expand_urls`, `shard_counts`), the same list on every rank.
    batch_size: the local batch the DataLoader makes (`stream_batches` uses it). start: samples this rank has
    taken this epoch already, whole batches. buffer: samples in the shuffle buffer (0: shard order only).
    timeout, options: seconds each remote read may wait, and extra fsspec storage options (credentials,
    endpoint_url). known_bad: (shard URL, key) of the bad samples reported before `start`, for a resume that
    does not decode what it skips. samples: the samples an epoch counts over every rank (0: the shards' total);
    more than the shards hold re-reads them, fewer stops each role at its share.
    """

    def __init__(self, urls: Sequence[str], counts: Sequence[int], image_size: int, *, batch_size: int,
                 seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1, start: int = 0,
                 buffer: int = 1000, timeout: float = DEFAULT_TIMEOUT, options: dict | None = None,
                 known_bad: Collection[tuple[str, str]] | None = None, samples: int = 0) -> None:
        if len(urls) != len(counts) or not 0 <= rank < world_size or batch_size < 1 or start % batch_size:
            raise ValueError("need a count per URL, 0 <= rank < world_size, batch_size >= 1 and start a multiple "
                             f"of batch_size; got {len(urls)} URLs, {len(counts)} counts, rank {rank} of "
                             f"{world_size}, batch_size {batch_size}, start {start}")
        empty = [u for u, n in zip(urls, counts) if n < 1]
        if empty:
            raise DatasetError(f"shard {empty[0]} holds no samples: write it again or leave it out")
        if len(urls) < world_size:
            raise DatasetError(f"{len(urls)} shards cannot be shared among {world_size} ranks: write the data into "
                               f"at least {world_size} shards (a smaller shard size)")
        self.urls, self.counts, self.image_size, self.batch_size = list(urls), list(counts), image_size, batch_size
        self.seed, self.epoch, self.rank, self.world_size, self.start = seed, epoch, rank, world_size, start
        self.buffer, self.timeout, self.options = buffer, timeout, options
        self.known_bad = None if known_bad is None else {tuple(b[:2]) for b in known_bad}
        self.steps = samples // (batch_size * world_size) if samples else epoch_length(counts, world_size,
                                                                                       batch_size * world_size)
        if self.steps == 0:
            held = f"an epoch of {samples} samples is" if samples else f"the {len(urls)} shards hold {sum(counts)} samples,"
            raise DatasetError(f"{held} fewer than one batch of {batch_size * world_size}: use a smaller batch or more "
                               "data")
        self.length = self.steps * batch_size  # samples this rank yields in a whole epoch
        order = random.Random(f"shards/{seed}/{epoch}").sample(range(len(urls)), len(urls))
        self.shards = order[rank::world_size]  # indices into urls, in reading order

    def __len__(self) -> int:
        """Samples still to come this epoch (after `start`)."""
        return max(0, self.length - self.start)

    def plan(self, workers: int) -> tuple[list[tuple[list[int], int, int]], int]:
        """([(shards, share, skip) per role], role of worker 0): each role's shards, the samples it yields in
        the whole epoch and those it skips to resume at `start`."""
        shards = [self.shards[w::workers] for w in range(workers)]
        batches = worker_batches(self.steps, [sum(self.counts[i] for i in s) for s in shards])
        owners = batch_owners(batches)
        done = Counter(owners[:self.start // self.batch_size])
        first = owners[self.start // self.batch_size] if self.start < self.length else 0
        b = self.batch_size
        return [(s, n * b, done[w] * b) for w, (s, n) in enumerate(zip(shards, batches))], first

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        roles, first = self.plan(workers)
        role = (worker + first) % workers
        return self._role(role, *roles[role])

    def _role(self, role: int, shards: list[int], share: int, skip: int) -> Iterator[Sample]:
        """The samples of one role: its passes through the buffer, good ones counted up to `share`, the first
        `skip` of them not yielded (and not decoded when `known_bad` is given)."""
        if share <= skip:
            return
        rng = random.Random(f"buffer/{self.seed}/{self.epoch}/{self.rank}/{role}")
        done, bad = 0, []
        for n in itertools.count():
            order = shards if n == 0 else random.Random(f"pass/{self.seed}/{self.epoch}/{self.rank}/{role}/{n}"
                                                        ).sample(shards, len(shards))
            before = done
            for raw in self._shuffled(order, rng):
                skipping = done < skip
                image, label, reason = self._check(raw, decode=not skipping or self.known_bad is None)
                if reason:
                    bad.append((raw.url, raw.key, reason))
                    continue
                done += 1
                if not skipping:
                    yield Sample(image, label, raw.key, tuple(bad))
                bad = []
                if done == share:
                    return
            if done == before:
                shown = "; ".join(f"{k} in {u} ({why})" for u, k, why in bad[:2])
                raise DatasetError(f"no sample of the {len(order)} shards {', '.join(self.urls[i] for i in order[:2])}"
                                   f"{' ...' if len(order) > 2 else ''} is usable ({shown}): check the shards")

    def _shuffled(self, order: list[int], rng: random.Random) -> Iterator[RawSample]:
        """One pass over the shards `order`, through the shuffle buffer, which is emptied at the end."""
        buf: list[RawSample] = []
        for i in order:
            for raw in read_samples(self.urls[i], self.counts[i], self.timeout, self.options):
                if len(buf) < self.buffer:
                    buf.append(raw)
                    continue
                if buf:
                    j = rng.randrange(len(buf))
                    buf[j], raw = raw, buf[j]
                yield raw
        rng.shuffle(buf)
        yield from buf

    def _check(self, raw: RawSample, decode: bool) -> tuple[torch.Tensor | None, int, str]:
        """(image, label, "") for a good sample, (None, -1, reason) for a bad one. Not decoding (a resume's
        skip), the image is None and a sample is bad when it has no image or `known_bad` lists it."""
        if raw.image is None:
            return None, -1, f"no image member ({', '.join(IMAGE_SUFFIXES[:4])}, ...)"
        label = -1
        if raw.cls is not None:
            text = raw.cls.decode("ascii", "replace").strip()
            if not text.isdigit():
                return None, -1, f".cls holds {text[:20]!r}, not a class index"
            label = int(text)
        if not decode:
            return None, label, "reported before the resume" if (raw.url, raw.key) in self.known_bad else ""
        try:
            return decode_bytes(raw.image, self.image_size, f"{raw.url}:{raw.key}.{raw.suffix}"), label, ""
        except ImageDecodeError as e:
            return None, -1, e.reason


class _Guarded(IterableDataset):
    """A stream whose user error, in a worker, becomes an item (the main process raises it as it was)."""

    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self):
        try:
            yield from self.stream
        except UserError as e:
            yield e


def _collate_or_error(items: list) -> StreamBatch | UserError:
    errors = [x for x in items if isinstance(x, UserError)]
    return errors[0] if errors else collate(items)


def stream_batches(stream: ShardStream, num_workers: int = 0, pin_memory: bool = False) -> Iterator[StreamBatch]:
    """The stream's batches of `stream.batch_size`, decoded in `num_workers` DataLoader workers (0: here), in
    the order resume relies on. A worker's DatasetError is raised here, its one line as it was."""
    loader = DataLoader(_Guarded(stream), batch_size=stream.batch_size, num_workers=num_workers,
                        collate_fn=_collate_or_error, pin_memory=pin_memory, worker_init_fn=leave_signals_to_main)
    for batch in loader:
        if isinstance(batch, UserError):
            raise batch
        yield batch
