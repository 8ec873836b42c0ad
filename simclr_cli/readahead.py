"""The batches of an epoch, in order, read ahead on a background thread while the current step runs.

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
