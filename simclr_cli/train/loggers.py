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
import secrets
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from simclr_cli.config import Config, config_to_dict, dump_config
from simclr_cli.errors import LoggerError, MissingExtraError
from simclr_cli.files import atomic_write_text
from simclr_cli.rundir import RunDir, scalars
from simclr_cli.runtime import DistInfo
from simclr_cli.train.agree import together
from simclr_cli.train.interrupt import StopRequested

# name -> (module it imports, extra that installs it)
PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow stores behind SQLAlchemy


def check_loggers(names: list[str]) -> None:
    """Each logger's package imports; MLflow's database store has its driver. One line naming the fix."""
    for name in names:
        module, extra = PACKAGES[name]
        try:
            __import__(module)
        except ImportError as err:
            raise MissingExtraError(f"train.loggers has {name}, which needs the {extra} package ({err}): pip install "
                                    f"'simclr-cli[{extra}]', or take {name} out of train.loggers") from None
    if "mlflow" in names:
        import mlflow

        uri = mlflow.get_tracking_uri()
        if uri.split(":", 1)[0].split("+", 1)[0] in DATABASE_SCHEMES:
            try:
                import alembic  # noqa: F401
                import sqlalchemy  # noqa: F401
            except ImportError:
                raise MissingExtraError(f"MLflow's tracking store {uri} is a database, which needs the full mlflow "
                                        "package, not mlflow-skinny alone: pip install 'simclr-cli[mlflow]', or "
                                        "set MLFLOW_TRACKING_URI to your tracking server") from None


def flat(cfg: Config) -> dict[str, str | int | float | bool]:
    """The resolved config as section.key -> value; lists, mappings and null as their JSON text."""
    out = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            simple = isinstance(value, (str, int, float, bool))
            out[f"{section}.{key}"] = value if simple else json.dumps(value)
    return out


class TensorBoard:
    """Event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`)."""

    name = "tensorboard"

    def __init__(self, rundir: RunDir, cfg: Config, facts: dict, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        folder = rundir.path / "tensorboard"
        if start_step == 0:  # a new run: an earlier attempt's events go, as its metrics.jsonl does
            for old in folder.glob("events.out.tfevents.*"):
                old.unlink()
        # purge_step: TensorBoard hides what an earlier attempt logged past the checkpoint
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)
        self.folder, self.after = folder, start_step
        if start_step == 0:
            for summary in hparams(flat(cfg), {"eval/knn_top1": 0}):  # the HParams tab
                self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + dump_config(cfg) + "```", start_step)  # each (re)start's
        self.writer.add_text("start", "\n".join(f"- **{k}**: {v}" for k, v in facts.items()), start_step)
        self.writer.flush()

    def where(self) -> str:
        return f"tensorboard --logdir {self.folder}"

    def write(self, record: dict, numbers: dict[str, float]) -> None:
        for tag, value in numbers.items():
            self.writer.add_scalar(tag, value, record["step"])
        if record.get("kind") == "warning":
            self.writer.add_text("warnings", record["message"], record["step"])
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run (project train.log_project, named after the run directory); its local files in
    RUN_DIR/wandb. WANDB_MODE=offline writes them only, for `wandb sync` later."""

    name = "wandb"

    def __init__(self, rundir: RunDir, cfg: Config, facts: dict, start_step: int, saved: dict) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=cfg.train.log_project, name=rundir.path.resolve().name,
                              id=saved.get("id") or secrets.token_hex(4), resume="allow", dir=str(rundir.path),
                              config={**config_to_dict(cfg), "start": facts}, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off"))
        saved.update(id=self.run.id, project=cfg.train.log_project)
        # Our step is every chart's x axis, sent with each record, which W&B then writes at once (with log's
        # step=, it would hold a step's row back until a later step came). A resumed online run's summary
        # has the last step it holds; offline it is empty, and the resumed segment repeats the steps after
        # the checkpoint (with an exact resume, the same values).
        self.run.define_metric("step", hidden=True)
        self.run.define_metric("*", step_metric="step")
        self.after = max(start_step, int(self.run.summary.get("step", 0)))

    def where(self) -> str:
        if self.run.settings.mode == "offline":
            return f"offline; to upload: wandb sync {Path(self.run.dir).parent}"
        return str(self.run.url)

    def write(self, record: dict, numbers: dict[str, float]) -> None:
        if numbers:
            self.run.log({**numbers, "step": record["step"]})
        if record.get("kind") == "warning":
            self.run.summary["warning"] = record["message"]
            self.run.alert(title="simclr: representation collapse?", text=record["message"],
                           level=self.wandb.AlertLevel.WARN)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "done" else 1)  # W&B: finished, else failed until resumed


class MLflow:
    """An MLflow run in experiment train.log_project, at MLFLOW_TRACKING_URI (MLflow's default without it);
    the config as parameters, the start facts as tags."""

    name = "mlflow"
    STATUS = {"done": "FINISHED", "stopped": "KILLED"}  # anything else: FAILED

    def __init__(self, rundir: RunDir, cfg: Config, facts: dict, start_step: int, saved: dict) -> None:
        import mlflow
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric, self.experiment = Metric, saved.get("experiment") or cfg.train.log_project
        uri = saved.get("tracking_uri") or mlflow.get_tracking_uri()  # a resumed run stays where it began
        self.client = client = MlflowClient(uri)
        self.run_id = saved.get("run_id")
        self.after = start_step
        if self.run_id:
            client.update_run(self.run_id, status="RUNNING")
            for key in ("train/loss", "epoch/loss"):  # the steps it holds from before the stop
                self.after = max([self.after] + [m.step for m in client.get_metric_history(self.run_id, key)])
        else:
            experiment = client.get_experiment_by_name(self.experiment)
            ident = experiment.experiment_id if experiment else client.create_experiment(self.experiment)
            self.run_id = client.create_run(ident, run_name=rundir.path.resolve().name).info.run_id
        held = client.get_run(self.run_id).data.params  # parameters cannot change: a resume adds new keys only
        params = [Param(k, str(v)) for k, v in flat(cfg).items() if k not in held]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            client.log_batch(self.run_id, params=params[i:i + 100])
        for key, value in facts.items():
            client.set_tag(self.run_id, key, str(value))
        saved.update(tracking_uri=uri, run_id=self.run_id, experiment=self.experiment)

    def where(self) -> str:
        uri = self.client.tracking_uri
        if uri.split(":", 1)[0] in ("sqlite", "file"):  # a store on this disk: say how to open it
            return f"run {self.run_id} in experiment {self.experiment}; to see it: mlflow ui --backend-store-uri {uri}"
        return f"run {self.run_id} in experiment {self.experiment} at {uri}"

    def write(self, record: dict, numbers: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        if numbers:
            self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, record["step"])
                                                        for k, v in numbers.items()])
        if record.get("kind") == "warning":
            self.client.set_tag(self.run_id, "warning", record["message"])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, self.STATUS.get(status, "FAILED"))


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
                self.notices.put(f"{logger.name} logging stopped at step {record['step']} ({_why(err)}); the run "
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
                self.notices.put(f"{logger.name} did not close cleanly ({_why(err)})")
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


def _why(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


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
            opened.append(_open(name, rundir, cfg, facts, start_step, saved.setdefault(name, {})))
        atomic_write_text(json.dumps({k: v for k, v in saved.items() if v}, indent=1) + "\n", state_file)
    except BaseException:
        for logger in opened:  # those that did open, closed as failed: the error raised says why
            try:
                logger.close("failed")
            except Exception:
                pass
        raise
    return Loggers(opened, emit)


def _open(name: str, rundir: RunDir, cfg: Config, facts: dict, start_step: int, saved: dict):
    """One logger, or one line naming why it could not start and the fix."""
    try:
        if name == "tensorboard":
            return TensorBoard(rundir, cfg, facts, start_step)
        return (WandB if name == "wandb" else MLflow)(rundir, cfg, facts, start_step, saved)
    except Exception as err:
        fix = {"tensorboard": "check that the run directory can be written",
               "wandb": "run `wandb login` or set WANDB_API_KEY, or WANDB_MODE=offline to keep the run on disk "
                        "for `wandb sync`",
               "mlflow": "check MLFLOW_TRACKING_URI and that its server or store is reachable"}[name]
        raise LoggerError(f"{name} could not start ({_why(err)}): {fix}, or take {name} out of train.loggers"
                          ) from None


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no file (the loggers are new to this run), or torn: start new records
    return state if isinstance(state, dict) and all(isinstance(v, dict) for v in state.values()) else {}

