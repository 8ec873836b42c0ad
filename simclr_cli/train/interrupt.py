"""Graceful interruption: the first Ctrl-C, SIGTERM or SIGUSR1 asks the loop to stop after the current step.

The loop then writes its checkpoint and raises `StopRequested`; the CLI prints how to resume and exits
130 (SIGINT), 143 (SIGTERM) or 138 (SIGUSR1), the shell's convention of 128 + signal number. SIGUSR1 is what
a `simclr submit` job passes on from SLURM before its time limit (`train.slurm`), then requeues itself. A
second signal raises `ForcedStop` (a SystemExit with the same code) at once, wherever the main thread is: the previous checkpoint
is still intact because checkpoints are only ever replaced by rename, and a half-written temporary file is
removed on the way out. In a SLURM job a second signal does not force the stop: SLURM delivers one signal
along several paths (to every process of the job step, and again through srun and torchrun's agent), and
kills the job itself once its KillWait has passed.

torchrun sends SIGKILL 30 s after SIGTERM, so a stop must be taken within seconds wherever the run is: the
loop asks between steps, the kNN monitor between batches, and while the run is being set up (data loaded,
a folder decoded into its cache, the model built), when there is nothing to save yet, the first signal
ends it at once (`StopFlag.at_once`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

import torch
import torch.distributed as dist

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGUSR1": 138}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


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
        self.immediate = False  # a signal raises StopRequested at once (set-up: nothing to save yet)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def check(self) -> bool:
        """Whether to stop now: the loop asks between steps (see RankAgreedStop for several processes)."""
        return self.requested

    @contextlib.contextmanager
    def at_once(self) -> Iterator[None]:
        """Within the block a signal stops the process where it is: for set-up, which has nothing to save and
        can take minutes (a large folder decoded into its cache)."""
        if self.requested:
            raise StopRequested(self.signal_name)
        self.immediate = True
        try:
            yield
        finally:
            self.immediate = False


@contextlib.contextmanager
def stop_guard() -> Iterator[StopFlag]:
    """Install the two-stage SIGINT/SIGTERM/SIGUSR1 handlers for the duration of a training run (one stage in
    a SLURM job, where a repeated signal is the same one arriving again)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield flag
        return
    repeat_forces = not os.environ.get("SLURM_JOB_ID")

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if flag.requested:  # second signal: leave now (in a SLURM job: the first one again)
            if repeat_forces:
                raise ForcedStop(name)
            return
        flag.signal_name = name
        if flag.immediate:
            raise StopRequested(name)

    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class RankAgreedStop:
    """The stop flag of a distributed run, agreed by all ranks every time the loop asks.

    A signal reaches each rank at a slightly different moment; if one rank acted on its own flag it would
    leave the others waiting in a collective it never joins. So `check()` all-reduces (max) the signal number
    and every rank stops at the same step, the one after the signal. The message is one CPU integer over a
    gloo group (`DistInfo.control` beside nccl), so asking every step never makes a GPU wait: about 0.1 ms
    on one machine, a network round trip across machines.
    """

    def __init__(self, local: StopFlag, group=None):
        self.local, self.group, self.signal_name = local, group, None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def check(self) -> bool:
        """Collective: every rank calls it at the same point of the loop."""
        local = signal.Signals[self.local.signal_name].value if self.local.requested else 0
        signum = torch.tensor([local])
        dist.all_reduce(signum, op=dist.ReduceOp.MAX, group=self.group)
        if signum.item():
            self.signal_name = signal.Signals(int(signum.item())).name
        return self.requested
