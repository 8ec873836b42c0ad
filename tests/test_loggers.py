"""Live loggers (train.loggers): each one's own reader sees a run's records while it runs, a run that fails
and is resumed continues the same record without repeating a step, a missing package or a logger that cannot
start is one line before any training, and a logger that fails mid-run is one warning while the run goes on.
W&B runs offline and MLflow against a file store in the test's folder: nothing leaves the machine."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.config import load_config
from simclr_cli.errors import ConfigError
from simclr_cli.rundir import scalars
from simclr_cli.train import loggers, pretrain, trackers

from conftest import tiny_config, tiny_set_args
from test_watch import RUN, records

pytestmark = pytest.mark.usefixtures("one_thread")


class Crash(Exception):
    """A run dying mid-epoch (a killed job): after its epoch-1 checkpoint and one more log window."""


def config(out: Path, *names: str, epochs: int = 2, extra: tuple[str, ...] = ()):
    return tiny_config(out, f"train.loggers=[{','.join(names)}]", *extra, epochs=epochs, **RUN)


def crash_in_epoch(epoch: int, watch=None):
    """A callback that calls `watch(event, data)`, then raises Crash at the first log window of `epoch`."""
    def callback(event, data):
        if watch is not None:
            watch(event, data)
        if event == "log" and data["epoch"] == epoch:
            raise Crash
    return callback


def run_crash_then_resume(out: Path, *names: str, watch=None) -> None:
    with pytest.raises(Crash):
        pretrain(config(out, *names), callback=crash_in_epoch(2, watch))
    pretrain(config(out, *names), resume=True)


def eventually(read, done, timeout: float = 30.0):
    """read() until done(value) or `timeout` seconds: the loggers write from a thread of their own, so a
    record is in a logger's files a moment after the loop logged it, not at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def steps_and_losses(out: Path) -> tuple[list[int], list[float]]:
    rows = records(out, "step")
    return [r["step"] for r in rows], [r["loss"] for r in rows]


# --- TensorBoard ---------------------------------------------------------------------------------------

def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def test_tensorboard_is_current_while_running_and_a_resume_continues_the_same_folder(tmp_path):
    pytest.importorskip("tensorboard")
    folder, seen = tmp_path / "tensorboard", {}

    def watch(event, data):
        if event == "start":
            seen["panel"] = data["info"]
        if event == "epoch" and data["epoch"] == 1:  # the run is still going
            seen["loss"] = eventually(lambda: tensorboard_scalars(folder, "train/loss"), lambda v: len(v) >= 4)
            # Written by the logger's thread just after each loss: wait for it too, not just the losses.
            seen["wait"] = eventually(lambda: tensorboard_scalars(folder, "train/data_wait"), lambda v: len(v) >= 4)
    run_crash_then_resume(tmp_path, "tensorboard", watch=watch)

    assert [step for step, _ in seen["loss"]] == [2, 4, 6, 8] and len(seen["wait"]) == 4
    assert seen["panel"]["tensorboard"] == f"tensorboard --logdir {folder}"  # the start panel says where
    steps, losses = steps_and_losses(tmp_path)
    assert steps == list(range(2, 17, 2))  # metrics.jsonl: each step once
    board = tensorboard_scalars(folder, "train/loss")  # the crashed attempt's step 10 purged, then logged again
    assert [step for step, _ in board] == steps
    assert [value for _, value in board] == pytest.approx(losses, rel=1e-6)
    evals = records(tmp_path, "eval")
    assert [v for _, v in tensorboard_scalars(folder, "eval/knn_top1")] == pytest.approx([r["knn_top1"] for r in evals])
    assert [v for _, v in tensorboard_scalars(folder, "eval/rank_z")] == pytest.approx([r["rank_z"] for r in evals])
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one folder: one file per attempt

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    assert {"config/text_summary", "start/text_summary"} <= set(events.Tags()["tensors"])
    start = events.Tensors("start/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "**precision**: fp32" in start and "**model**: resnet18" in start
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "loggers:\n  - tensorboard" in config_text
    assert events.PluginTagToContent("hparams")  # the config in TensorBoard's HParams tab


def test_a_new_run_after_one_that_died_before_its_checkpoint_starts_a_new_tensorboard_record(tmp_path):
    pytest.importorskip("tensorboard")
    with pytest.raises(Crash):  # no checkpoint: the next start is a new run in the same folder
        pretrain(config(tmp_path, "tensorboard", extra=("train.seed=1",)), callback=crash_in_epoch(1))
    pretrain(config(tmp_path, "tensorboard", epochs=1))
    steps, losses = steps_and_losses(tmp_path)
    board = tensorboard_scalars(tmp_path / "tensorboard", "train/loss")
    assert [s for s, _ in board] == steps == [2, 4, 6, 8]
    assert [v for _, v in board] == pytest.approx(losses, rel=1e-6)


# --- Weights & Biases, offline ---------------------------------------------------------------------------

@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode, every file it keeps (settings, caches) in the test's folder."""
    pytest.importorskip("wandb", minversion="0.31")  # the first with a reader of offline files: leet inspect --json
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / key.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    return tmp_path / "run"


def wandb_records(run_file: Path) -> list[dict]:
    """The records of one offline .wandb file, as W&B's own reader prints them."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def wandb_history(run_file: Path, tag: str) -> list[tuple[int, float]]:
    rows = [r["history"] for r in wandb_records(run_file) if r.get("type") == "history"]
    return [(int(row["item"]["step"]), row["item"][tag]) for row in rows if tag in row["item"]]


def wandb_files(out: Path) -> list[Path]:
    return sorted(out.glob("wandb/offline-run-*/run-*.wandb"))


def test_wandb_offline_files_are_current_while_running_and_a_resume_continues_the_run(wandb_offline):
    out, seen = wandb_offline, {}

    def watch(event, data):
        if event == "epoch" and data["epoch"] == 1:  # the run is still going: W&B's service writes on its own
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                files = wandb_files(out)
                seen["loss"] = wandb_history(files[0], "train/loss") if files else []
                if len(seen["loss"]) >= 4:
                    break
                time.sleep(0.5)
    run_crash_then_resume(out, "wandb", watch=watch)

    assert [step for step, _ in seen["loss"]][:4] == [2, 4, 6, 8]
    first, second = wandb_files(out)  # the crashed attempt and the resume: one W&B run, two offline segments
    runs = [next(r["run"] for r in wandb_records(f) if r.get("type") == "run") for f in (first, second)]
    assert runs[0]["run_id"] == runs[1]["run_id"] == json.loads((out / "loggers.json").read_text())["wandb"]["id"]
    assert runs[0]["project"] == "simclr" and runs[0]["display_name"] == "run"
    assert runs[0]["config"]["update"]["optim"]["lr"] == 0.06 and "device" in runs[0]["config"]["update"]["start"]
    steps, losses = steps_and_losses(out)
    before = wandb_history(first, "train/loss")
    after = wandb_history(second, "train/loss")
    assert [s for s, _ in before] == [2, 4, 6, 8, 10]  # the crash came after step 10's window was logged
    assert [s for s, _ in after] == [10, 12, 14, 16]  # offline it cannot know; `wandb sync` keeps step 10 once
    assert [v for _, v in before[:4] + after] == pytest.approx(losses, rel=1e-6)
    assert before[4][1] == pytest.approx(after[0][1], rel=1e-6)  # an exact resume: the same step 10
    evals = records(out, "eval")
    assert [v for _, v in wandb_history(second, "eval/knn_top1")] == pytest.approx([evals[-1]["knn_top1"]])


# --- MLflow, file store ----------------------------------------------------------------------------------

@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """MLflow's tracking client against a file store in the test's folder (allowed again where MLflow 3
    refuses new file stores by default)."""
    pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_mlflow_has_each_record_while_running_and_a_resume_continues_the_run(tmp_path, mlflow_store):
    out, client, seen = tmp_path / "run", mlflow_store, {}

    def watch(event, data):
        if event == "epoch" and data["epoch"] == 1:  # the run is still going
            run_id = json.loads((out / "loggers.json").read_text())["mlflow"]["run_id"]
            seen["loss"] = eventually(lambda: [m.step for m in client.get_metric_history(run_id, "train/loss")],
                                      lambda v: len(v) >= 4)
            seen["status"] = client.get_run(run_id).info.status
    with pytest.raises(Crash):
        pretrain(config(out, "mlflow"), callback=crash_in_epoch(2, watch))
    run_id = json.loads((out / "loggers.json").read_text())["mlflow"]["run_id"]
    assert seen == {"loss": [2, 4, 6, 8], "status": "RUNNING"}
    assert client.get_run(run_id).info.status == "FAILED"
    pretrain(config(out, "mlflow", extra=("train.epochs=3",)), resume=True)  # a resume may add epochs

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "simclr"
    assert run.data.params["optim.lr"] == "0.06" and run.data.params["train.epochs"] == "2"  # the start's
    assert run.data.tags["precision"] == "fp32" and run.data.tags["model"].startswith("resnet18")
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    steps, losses = steps_and_losses(out)
    assert [s for s, _ in history] == steps == list(range(2, 25, 2))  # step 10 once: held from before the crash
    assert [v for _, v in history] == pytest.approx(losses, rel=1e-6)
    evals = records(out, "eval")
    ranks = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/rank_z"))
    assert ranks == [(r["step"], pytest.approx(r["rank_z"])) for r in evals]
    assert len(client.search_runs([run.info.experiment_id])) == 1  # one run, not one per attempt


# --- failures ------------------------------------------------------------------------------------------

def test_a_missing_logger_package_is_one_line_naming_the_extra_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    r = CliRunner().invoke(app, ["pretrain", "-o", str(tmp_path / "run"), *tiny_set_args(epochs=None, **RUN),
                                 "--set", "train.loggers=[wandb]"])
    assert r.exit_code == 2 and "pip install 'simclr-cli[wandb]'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_logger_that_cannot_start_is_one_line_before_training(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (blocker / "mlruns").as_uri())  # a store under a file
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    r = CliRunner().invoke(app, ["pretrain", "-o", str(tmp_path / "run"), *tiny_set_args(epochs=None, **RUN),
                                 "--set", "train.loggers=[mlflow]"])
    assert r.exit_code == 2, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: mlflow could not start (") and "MLFLOW_TRACKING_URI" in line
    assert "Traceback" not in r.output and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_logger_failing_mid_run_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    calls = []

    def disk_full(self, record, numbers):
        calls.append(record["step"])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(trackers.TensorBoard, "write", disk_full)
    events = []
    summary = pretrain(config(tmp_path, "tensorboard"), callback=lambda event, data: events.append((event, data)))
    notices = [d["message"] for e, d in events if e == "notice" and "logging stopped" in d["message"]]
    assert calls == [2] and len(notices) == 1  # dropped at its first failure, said once
    assert notices[0].startswith("tensorboard logging stopped at step 2 (OSError: [Errno 28] No space left")
    assert summary["epochs"] == 2 and len(records(tmp_path, "step")) == 8  # metrics.jsonl has everything


def test_open_loggers_without_loggers_opens_nothing(tmp_path):
    """(Ranks other than 0 open none either: test_distributed's two-rank run finds one events file.)"""
    cfg = config(tmp_path)
    from simclr_cli.rundir import RunDir
    from simclr_cli.runtime import DistInfo

    with loggers.open_loggers(cfg, RunDir(tmp_path), {}, 0, lambda e, d: None, DistInfo()) as opened:
        assert opened.loggers == [] and opened.thread is None
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "loggers.json").exists()


def test_loggers_config_is_checked():
    with pytest.raises(ConfigError, match="train.loggers"):
        load_config(None, ["train.loggers=[tensorbord]"])
    with pytest.raises(ConfigError, match="distinct"):
        load_config(None, ["train.loggers=[wandb, wandb]"])
    assert load_config(None, ["train.loggers=[mlflow, wandb]"]).train.loggers == ["mlflow", "wandb"]


def test_every_record_kind_has_its_tags():
    assert scalars({"kind": "step", "epoch": 1, "step": 4, "loss": 3.5, "lr": 0.1, "data_wait": 0.02}) == {
        "train/loss": 3.5, "train/lr": 0.1, "train/data_wait": 0.02}
    assert scalars({"kind": "epoch", "epoch": 1, "step": 8, "loss": 3.4, "lr": 0.1}) == {"epoch/loss": 3.4,
                                                                                       "epoch/lr": 0.1}
    assert scalars({"kind": "eval", "epoch": 1, "step": 8, "knn_top1": 50.0, "alignment": None,
                    "split": "val"}) == {"eval/knn_top1": 50.0}
    assert scalars({"kind": "warning", "step": 8, "message": "collapse?"}) == {}
    assert scalars({"kind": "resume", "epoch": 1, "step": 8}) == {}


def test_an_mlflow_database_store_without_its_driver_is_one_line_before_any_work(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # mlflow-skinny alone
    r = CliRunner().invoke(app, ["pretrain", "-o", str(tmp_path / "run"), *tiny_set_args(epochs=None, **RUN),
                                 "--set", "train.loggers=[mlflow]"])
    assert r.exit_code == 2 and "pip install 'simclr-cli[mlflow]'" in r.stderr and "MLFLOW_TRACKING_URI" in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_stopped_by_a_signal_leaves_its_mlflow_run_killed_and_a_resume_finishes_it(tmp_path, mlflow_store):
    from simclr_cli.train.interrupt import StopRequested

    def stop(event, data):
        if event == "log" and data["epoch"] == 2:
            raise StopRequested("SIGTERM")  # as the loop raises it between steps after a SIGTERM
    with pytest.raises(StopRequested):
        pretrain(config(tmp_path, "mlflow"), callback=stop)
    run_id = json.loads((tmp_path / "loggers.json").read_text())["mlflow"]["run_id"]
    assert mlflow_store.get_run(run_id).info.status == "KILLED"
    pretrain(config(tmp_path, "mlflow"), resume=True)
    assert mlflow_store.get_run(run_id).info.status == "FINISHED"
    history = [m.step for m in mlflow_store.get_metric_history(run_id, "train/loss")]
    assert sorted(history) == [r["step"] for r in records(tmp_path, "step")] == list(range(2, 17, 2))


# --- a slow logger, MLflow without a server ------------------------------------------------------------

def test_a_logger_taking_5_s_a_record_never_holds_up_the_step(tmp_path, monkeypatch):
    """A logger that takes 5 s for each record (an MLflow server retrying, a slow link), a log window of one
    step: the loop queues its records and goes on at its own pace. The queue (4 records here) fills, and the
    records it cannot take are left out with one warning; at the end the run waits CLOSE_WAIT_S (1 s here)
    for the logger, says what it did not send, and returns, while metrics.jsonl has every record."""
    pytest.importorskip("tensorboard")
    release, sent = threading.Event(), []

    def slow(self, record, numbers):
        sent.append(record["step"])
        release.wait(5)  # 5 s a record, unless the test is over
    monkeypatch.setattr(trackers.TensorBoard, "write", slow)
    monkeypatch.setattr(loggers.Loggers, "QUEUE_RECORDS", 4)
    monkeypatch.setattr(loggers.Loggers, "CLOSE_WAIT_S", 1.0)
    events = []
    t0 = time.monotonic()
    try:
        pretrain(config(tmp_path, "tensorboard", extra=("train.log_every=1",)),
                 callback=lambda event, data: events.append((event, data, time.monotonic())))
    finally:
        took = time.monotonic() - t0
        release.set()
    logged = [t for event, _, t in events if event == "log"]
    assert len(logged) == len(records(tmp_path, "step")) == 16  # metrics.jsonl: every step's record
    gaps = [b - a for a, b in zip(logged, logged[1:])]
    assert max(gaps) < 2.5, gaps  # no step waited for a 5 s record (a step here takes about 0.05 s)
    ended = next(t for event, _, t in events if event == "end")
    assert ended - logged[-1] < 1.0 + 2.5  # the bounded close, not the 5 s of each record queued
    assert took < 30 < 5 * len(logged)
    notices = [d["message"] for event, d, _ in events if event == "notice"]
    behind = [m for m in notices if "records behind" in m]
    assert len(behind) == 1 and behind[0].startswith("tensorboard fell 4 records behind at step ")
    assert any(m.startswith("tensorboard did not finish within 1 s of the run's end (") for m in notices)
    assert sent[0] == 1 and len(sent) < 5  # the first record was sent; the run did not wait for the others


def test_mlflow_without_a_server_keeps_a_run_that_mlflow_ui_opens(tmp_path, monkeypatch):
    """`pip install 'simclr-cli[mlflow]'`, then train.loggers=[mlflow] with no MLFLOW_TRACKING_URI: the run
    goes to MLflow's default store (MLflow 3: ./mlflow.db), which `mlflow ui` started in the same folder opens;
    it is read back here through MLflow's client on the same default, as `mlflow ui` resolves it."""
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["pretrain", "-o", "run", *tiny_set_args(epochs=None, **RUN),
                                 "--set", "train.epochs=1", "--set", "train.loggers=[mlflow]"])
    assert r.exit_code == 0, r.output
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import _get_default_tracking_uri

    client = MlflowClient(_get_default_tracking_uri())  # the store `mlflow ui` (mlflow server) opens given none
    (run,) = client.search_runs([client.get_experiment_by_name("simclr").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.info.run_id == json.loads((tmp_path / "run" / "loggers.json").read_text())["mlflow"]["run_id"]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    steps, losses = steps_and_losses(tmp_path / "run")
    assert [s for s, _ in history] == steps and [v for _, v in history] == pytest.approx(losses, rel=1e-6)


def test_the_mlflow_extra_installs_the_package_that_opens_mlflows_default_store():
    """mlflow-skinny cannot open MLflow 3's default store (a local database): the extra, and the test extra
    that runs the test above, name the full package."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    names = {extra: {re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0] for req in reqs} for extra, reqs in extras.items()}
    assert "mlflow" in names["mlflow"] and "mlflow" in names["test"]
    assert "mlflow-skinny" not in names["mlflow"] | names["test"]
