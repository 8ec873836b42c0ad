"""The batches of an epoch: their order (`epoch_order`, the same on every rank), and their reading, in that
order, ahead on a background thread while the current step runs.

A mapped image folder (`cache.MappedImages`) is read from disk as a batch is indexed; read on the main
thread, the step waits for the disk (and, on a GPU, for the copy into pinned memory) before its work can be
queued. `BatchStream` reads the next `depth` batches on one thread while the step runs and hands them over
in exactly the order asked, so the data order, and with it exact resume, does not change; the thread only
reads rows and draws no random numbers. Images held in memory are cut on the main thread (depth 0):
indexing a tensor on the device queues work and returns at once.

`wait_s` sums the seconds the loop spent waiting for its batches: the share of a step that reading costs
(`benchmarks/folder.py` reports it with and without read-ahead).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import torch


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The same permutation on every rank, made once per epoch and moved to the device once (a per-step
    index copy would make the device wait on the host): the global batch is cut from it, then split."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(device)


class BatchStream:
    """`next()` gives `move(read(i))` for each i of `indices` in turn; with depth > 0, `read` runs on a
    thread up to `depth` batches ahead. Use as a context manager: leaving it (a stop mid-epoch, say) cancels
    the reads not started and waits for the one running."""

    def __init__(self, read: Callable[[int], torch.Tensor], indices: Sequence[int], depth: int = 0,
                 move: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> None:
        self.read, self.indices, self.depth, self.move = read, list(indices), depth, move
        self.next_index = 0  # position in `indices` of the next read to start
        self.pending: deque[Future] = deque()
        self.pool: ThreadPoolExecutor | None = None
        self.wait_s = 0.0  # seconds spent in next() waiting for a batch (reading it, when not read ahead)

    def __enter__(self) -> BatchStream:
        if self.depth > 0:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="simclr-read-ahead")
            self._fill()
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            for future in self.pending:
                future.cancel()
            self.pool.shutdown(wait=True)
            self.pool, self.pending = None, deque()

    def _fill(self) -> None:
        while len(self.pending) < self.depth and self.next_index < len(self.indices):
            self.pending.append(self.pool.submit(self.read, self.indices[self.next_index]))
            self.next_index += 1

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> torch.Tensor:
        t0 = time.perf_counter()
        if self.pool is None:
            if self.next_index >= len(self.indices):
                raise StopIteration
            x = self.read(self.indices[self.next_index])
            self.next_index += 1
        else:
            if not self.pending:
                raise StopIteration
            x = self.pending.popleft().result()
            self._fill()  # the next read starts now, while the caller's step runs
        x = self.move(x)
        self.wait_s += time.perf_counter() - t0
        return x


class Batches:
    """One rank's batches of a training set: the epoch's order, this rank's slice of each global batch, and
    where it goes. Images held on the device are cut there; a mapped folder's are read on the host (pinned
    when a GPU takes them) and, in `stream`, `read_ahead` batches ahead of the step."""

    def __init__(self, images, batch_size: int, rank: int, local_batch: int, device: torch.device,
                 mapped: bool, read_ahead: int) -> None:
        self.images, self.batch_size, self.rank, self.local_batch = images, batch_size, rank, local_batch
        self.device, self.mapped, self.read_ahead = device, mapped, read_ahead

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """The epoch's permutation, where the images are (on the host for a mapped folder)."""
        return epoch_order(len(self.images), seed, epoch, torch.device("cpu") if self.mapped else self.device)

    def read(self, order: torch.Tensor, i: int) -> torch.Tensor:
        start = i * self.batch_size + self.rank * self.local_batch
        x = self.images[order[start:start + self.local_batch]]
        return x.pin_memory() if self.mapped and self.device.type == "cuda" else x

    def move(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)  # pinned: the copy overlaps the work queued before it

    def get(self, order: torch.Tensor, i: int) -> torch.Tensor:
        """Batch i, read now (benchmarks and tests time single steps with it)."""
        return self.move(self.read(order, i))

    def stream(self, order: torch.Tensor, indices: Sequence[int]) -> BatchStream:
        """Batches `indices` of the epoch in order; a mapped folder's read ahead on a thread."""
        return BatchStream(lambda i: self.read(order, i), indices, self.read_ahead if self.mapped else 0, self.move)
