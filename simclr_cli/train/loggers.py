"""Live loggers: every record the loop writes to metrics.jsonl, as it is written, also in TensorBoard,
Weights & Biases or MLflow (`train.loggers`), so a run on a GPU box or a cluster is watched where people
already watch runs.

Rank 0 alone writes, once per record, from a thread of its own (`Loggers`): the step never waits on a
logger, and rank 0 never keeps the other ranks waiting in a collective while one sends; the loggers close
after the run's last collective. TensorBoard is flushed after each record: a run being watched is current
to its last log window. Each logger gets the resolved config as hyper-parameters and the start panel's
facts (device, precision, model, data). A resumed run continues the same record: the same TensorBoard
folder with what came after the checkpoint purged (as metrics.jsonl drops it), the same W&B run, the same
MLflow run (their ids are kept in RUN_DIR/loggers.json); those two cannot take points back, so the
steps they already hold are not sent again (an exact resume computes them the same; W&B offline cannot
tell which it holds).

A missing package is one line naming the extra (`check_loggers`, before any data is read); a logger that
cannot start is one line naming the fix, on every rank (they agree on it before any goes on); a logger
that fails mid-run is one warning and the run goes on without it: metrics.jsonl still has every record,
and `simclr report --tensorboard` rebuilds the curves.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from simclr_cli.config import Config
from simclr_cli.files import atomic_write_text
from simclr_cli.rundir import RunDir, scalars
from simclr_cli.runtime import DistInfo
from simclr_cli.train.agree import together
from simclr_cli.train.interrupt import StopRequested
from simclr_cli.train.trackers import open_tracker, why_failed

class Loggers:
    """The open loggers of one run (none on ranks other than 0). `write(record)` queues a record and returns:
    a thread of their own sends it to each logger, so a slow or retrying logger (MLflow's HTTP calls with
    their retries, a W&B upload) never holds up the step, nor the other ranks waiting in the next collective.

    The queue holds QUEUE_RECORDS records; when the loggers fall that far behind, new records are not queued
    (one warning says so; metrics.jsonl keeps them all). What the thread learns (a logger that failed) is said
    on the caller's thread, at its next write or at close, so the callback is never called from another
    thread. `close(status)` sends what is queued and closes each logger, waiting at most CLOSE_WAIT_S; past
    that it says how many records were left and returns: the thread drops them and closes the loggers once
    its current call returns (if the process is still alive then)."""

    QUEUE_RECORDS = 1000  # about 1 kB each: a bounded backlog, minutes of log windows at most
    CLOSE_WAIT_S = 60.0  # what a run's end waits for its loggers (a W&B upload; MLflow retries up to ~2 min)

    def __init__(self, loggers: list | None = None, emit: Callable[[str, dict], None] | None = None) -> None:
        self.loggers, self.emit = loggers or [], emit or (lambda event, data: None)
        self.queue: queue.Queue = queue.Queue(self.QUEUE_RECORDS)
        self.notices: queue.SimpleQueue = queue.SimpleQueue()  # from the thread, said by the caller's
        self.dropped, self.status, self.cut = 0, "failed", False
        self.thread = None
        if self.loggers:
            self.thread = threading.Thread(target=self._send_all, name="simclr-loggers", daemon=True)
            self.thread.start()

    def where(self) -> dict[str, str]:
        """Each logger's name and where to watch it, for the start panel."""
        return {logger.name: logger.where() for logger in self.loggers}

    def write(self, record: dict) -> None:
        """Queue `record` for every logger; never waits."""
        self._say()
        if self.thread is None:
            return
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                names = ", ".join(logger.name for logger in self.loggers)
                self.emit("notice", {"message": f"{names} fell {self.QUEUE_RECORDS} records behind at step "
                                                f"{record['step']}: records are left out of them until they "
                                                "catch up (training does not wait for them); metrics.jsonl keeps "
                                                "every record (simclr report --tensorboard draws them)"})

    def close(self, status: str) -> None:
        """status: done | stopped (a signal; the run can be resumed) | failed. Sends what is queued first."""
        self.status = status
        if self.thread is not None:
            deadline, closing = time.monotonic() + self.CLOSE_WAIT_S, 1
            try:
                self.queue.put(_CLOSE, timeout=self.CLOSE_WAIT_S)
            except queue.Full:
                closing = 0  # still full after the whole wait: the thread is stuck in a call
            self.thread.join(max(0.0, deadline - time.monotonic()))
            if self.thread.is_alive():
                self.cut = True  # the thread leaves out what is queued and closes the loggers when it can
                names = ", ".join(logger.name for logger in self.loggers)
                left = max(0, self.queue.qsize() - closing)
                self.notices.put(f"{names} did not finish within {self.CLOSE_WAIT_S:g} s of the run's end "
                                 f"({left} records queued were not sent): not waiting longer; metrics.jsonl "
                                 "keeps every record (simclr report --tensorboard draws them)")
        else:
            self._close_each()
        self._say()

    def _send_all(self) -> None:
        """The thread: each queued record to each logger, in order; then each logger closed."""
        while not self.cut:
            record = self.queue.get()
            if record is _CLOSE:
                break
            self._send(record)
        self._close_each()

    def _send(self, record: dict) -> None:
        numbers = scalars(record)
        for logger in list(self.loggers):
            if record["step"] <= logger.after:  # already there from before the stop
                continue
            try:
                logger.write(record, numbers)
            except Exception as err:  # a logger's fault (network, disk, its service) never stops training
                self.loggers.remove(logger)
                self.notices.put(f"{logger.name} logging stopped at step {record['step']} ({why_failed(err)}); the run "
                                 "goes on and metrics.jsonl keeps every record (simclr report --tensorboard "
                                 "draws them)")
                try:
                    logger.close("failed")
                except Exception:
                    pass  # already said: it stopped

    def _close_each(self) -> None:
        for logger in list(self.loggers):
            try:
                logger.close(self.status)
            except Exception as err:
                self.notices.put(f"{logger.name} did not close cleanly ({why_failed(err)})")
        self.loggers = []

    def _say(self) -> None:
        """The thread's notices, on the caller's thread."""
        while True:
            try:
                message = self.notices.get_nowait()
            except queue.Empty:
                return
            self.emit("notice", {"message": message})


_CLOSE = object()  # the queue's last item: close the loggers


@contextmanager
def open_loggers(cfg: Config, rundir: RunDir, facts: dict, start_step: int, emit, ranks: DistInfo
                 ) -> Iterator[Loggers]:
    """The run's loggers (rank 0's; none elsewhere), open for the block and closed after it with its outcome:
    done, stopped (by a signal, to be resumed) or failed. `start_step`: the step the run starts at, 0 when new,
    else the checkpoint's. They open before the start panel, so that a logger asking something (W&B's login
    prompt on a terminal) is not drawn over by the progress bar. Whether they could open is agreed by every
    rank before any goes on (`agree.together`): a logger that cannot start stops every rank with its line,
    under any launcher. Collective when there are several ranks and train.loggers is not empty."""
    if not cfg.train.loggers:
        yield Loggers()
        return
    opened = together(ranks, lambda: _open_all(cfg, rundir, facts, start_step, emit) if ranks.is_main else Loggers())
    try:
        yield opened
    except BaseException as err:
        opened.close("stopped" if isinstance(err, StopRequested) else "failed")
        raise
    opened.close("done")


def _open_all(cfg: Config, rundir: RunDir, facts: dict, start_step: int, emit) -> Loggers:
    """Each logger of train.loggers, opened; their ids kept in loggers.json for a resume."""
    state_file = rundir.path / "loggers.json"
    saved = _read_state(state_file) if start_step else {}
    opened = []
    try:
        for name in cfg.train.loggers:
            opened.append(open_tracker(name, rundir, cfg, facts, start_step, saved.setdefault(name, {})))
        atomic_write_text(json.dumps({k: v for k, v in saved.items() if v}, indent=1) + "\n", state_file)
    except BaseException:
        for logger in opened:  # those that did open, closed as failed: the error raised says why
            try:
                logger.close("failed")
            except Exception:
                pass
        raise
    return Loggers(opened, emit)


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no file (the loggers are new to this run), or torn: start new records
    return state if isinstance(state, dict) and all(isinstance(v, dict) for v in state.values()) else {}

