"""Graceful interruption: the first Ctrl-C or SIGTERM asks the loop to stop after the current step.

The loop then writes its checkpoint and raises `StopRequested`; the CLI prints how to resume and exits
130 (SIGINT) or 143 (SIGTERM), the shell's convention of 128 + signal number. A second signal raises
`ForcedStop` (a SystemExit with the same code) at once, wherever the main thread is: the previous checkpoint
is still intact because checkpoints are only ever replaced by rename, and a half-written temporary file is
removed on the way out.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import torch
import torch.distributed as dist

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class StopRequested(Exception):
    """Training stopped on a signal; `checkpoint` is the file holding the stopped state (None: none yet)."""

    def __init__(self, signal_name: str, checkpoint: str | None = None, epoch: int = 0, step: int = 0,
                 saved: bool = False):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = EXIT_CODES.get(signal_name, 1)
        self.checkpoint, self.epoch, self.step, self.saved = checkpoint, epoch, step, saved


class ForcedStop(SystemExit):
    """A second signal: leave now, without finishing the step or writing a checkpoint."""

    def __init__(self, signal_name: str):
        super().__init__(EXIT_CODES.get(signal_name, 1))
        self.signal_name = signal_name


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stop_guard() -> Iterator[StopFlag]:
    """Install the two-stage SIGINT/SIGTERM handlers for the duration of a training run."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield flag
        return

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if flag.requested:  # second signal: leave now
            raise ForcedStop(name)
        flag.signal_name = name

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class RankAgreedStop:
    """The stop flag of a distributed run, agreed by all ranks at each loss read-back.

    A signal reaches each rank at a slightly different step; if one rank acted on its own flag it would
    leave the others waiting in a collective it never joins. So each read-back also all-reduces (max) the
    signal number, and every rank stops at the same step: at most `train.log_every` steps after the signal.
    """

    def __init__(self, local: StopFlag, device: torch.device):
        self.local, self.device, self.signal_name = local, device, None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def sync(self) -> None:
        """Collective: every rank calls it at the same step."""
        local = signal.Signals[self.local.signal_name].value if self.local.requested else 0
        signum = torch.tensor([local], device=self.device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        if signum.item():
            self.signal_name = signal.Signals(int(signum.item())).name
