"""Graceful interruption: the first Ctrl-C or SIGTERM asks the loop to stop after the current step.

The loop then writes its checkpoint and raises `StopRequested`; the CLI prints how to resume and exits
130 (SIGINT) or 143 (SIGTERM), the shell's convention of 128 + signal number. A second signal exits at
once: the previous checkpoint is still intact because checkpoints are only ever replaced by rename.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class StopRequested(Exception):
    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = EXIT_CODES.get(signal_name, 1)


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stop_guard() -> Iterator[StopFlag]:
    """Install the two-stage SIGINT/SIGTERM handlers for the duration of a training loop."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield flag
        return

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if flag.requested:  # second signal: leave now
            raise SystemExit(EXIT_CODES.get(name, 1))
        flag.signal_name = name

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
