"""The trackers a run's records go to (`train.loggers`, registry.LOGGERS): TensorBoard, Weights & Biases and
MLflow, each one `Tracker` class that opens (or continues) its record, writes one record, says where to
watch it and closes, and declares its package, extra and fix; their packages checked before any data is
read (`check_loggers`), and one line naming the fix for one that cannot start (`open_tracker`).
`loggers.Loggers` feeds them from a thread of its own.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from simclr_cli.config import Config, config_to_dict, dump_config
from simclr_cli.errors import LoggerError, MissingExtraError
from simclr_cli.registry import LOGGERS
from simclr_cli.rundir import RunDir

DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow stores behind SQLAlchemy


class Tracker:
    """What a live logger declares (an entry of registry.LOGGERS): the module it imports and the extra that
    installs it, checked before any data is read, and the fix to name when it cannot start. A tracker is
    built as cls(rundir, cfg, facts, start_step, saved: its own dict, kept in the checkpoint for a resume) and
    has `where()` (what the start panel shows), `write(record, numbers)` and `close(status)`."""

    name: str
    package: str  # the module it imports
    extra: str  # pip install 'simclr-cli[EXTRA]'
    fix: str  # what to do when it cannot start

    @classmethod
    def check(cls) -> None:
        try:
            __import__(cls.package)
        except ImportError as err:
            raise MissingExtraError(f"train.loggers has {cls.name}, which needs the {cls.extra} package ({err}): pip "
                                    f"install 'simclr-cli[{cls.extra}]', or take {cls.name} out of train.loggers") from None


def check_loggers(names: list[str]) -> None:
    """Each logger's package imports (and what else it needs, MLflow's database driver). One line naming the fix."""
    for name in names:
        LOGGERS[name].check()


def flat(cfg: Config) -> dict[str, str | int | float | bool]:
    """The resolved config as section.key -> value; lists, mappings and null as their JSON text."""
    out = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            simple = isinstance(value, (str, int, float, bool))
            out[f"{section}.{key}"] = value if simple else json.dumps(value)
    return out


class TensorBoard(Tracker):
    """Event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`)."""

    name, package, extra = "tensorboard", "torch.utils.tensorboard", "tensorboard"
    fix = "check that the run directory can be written"

    def __init__(self, rundir: RunDir, cfg: Config, facts: dict, start_step: int, saved: dict) -> None:
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


class WandB(Tracker):
    """A Weights & Biases run (project train.log_project, named after the run directory); its local files in
    RUN_DIR/wandb. WANDB_MODE=offline writes them only, for `wandb sync` later."""

    name, package, extra = "wandb", "wandb", "wandb"
    fix = "run `wandb login` or set WANDB_API_KEY, or WANDB_MODE=offline to keep the run on disk for `wandb sync`"

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


class MLflow(Tracker):
    """An MLflow run in experiment train.log_project, at MLFLOW_TRACKING_URI (MLflow's default without it);
    the config as parameters, the start facts as tags."""

    name, package, extra = "mlflow", "mlflow", "mlflow"
    fix = "check MLFLOW_TRACKING_URI and that its server or store is reachable"
    STATUS = {"done": "FINISHED", "stopped": "KILLED"}  # anything else: FAILED

    @classmethod
    def check(cls) -> None:
        """The package, and a database store's driver: the full mlflow package, not mlflow-skinny alone."""
        super().check()
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


def why_failed(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def open_tracker(name: str, rundir: RunDir, cfg: Config, facts: dict, start_step: int, saved: dict):
    """One logger, or one line naming why it could not start and the fix."""
    tracker = LOGGERS[name]
    try:
        return tracker(rundir, cfg, facts, start_step, saved)
    except Exception as err:
        raise LoggerError(f"{name} could not start ({why_failed(err)}): {tracker.fix}, or take {name} out of "
                          "train.loggers") from None
