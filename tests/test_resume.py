"""Exact resume: a stopped-and-resumed run writes the same metrics and weights as one that never stopped.

Tiny runs (synthetic 48 images of 16 px, ResNet-18 at width 8, batch 16: 3 steps per epoch, fp32, one CPU
thread) so each test takes a second or two. Signals are sent to this process from inside the loop, at a
chosen step, through the same handlers the CLI uses.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_set_args
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.config import ConfigError
from simclr_cli.errors import CheckpointError
from simclr_cli.train import Trainer, pretrain
from simclr_cli.train.interrupt import StopRequested
from simclr_cli.train.state import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl without the timing field, which no two runs share, without kNN monitor lines and
    without the line that marks a resume (test_resume_is_marked_in_the_metrics checks that one)."""
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    # kNN monitor lines are left out: a run cut short evaluates at its own end, an unbroken one does not
    return [{k: v for k, v in rec.items() if k not in ("views_per_s", "data_wait")} for rec in lines
            if rec["kind"] not in ("eval", "resume")]


def weights(out: Path) -> dict:
    return load_checkpoint(out / "checkpoint.pt")["model"]


def assert_same_run(a: Path, b: Path) -> None:
    assert metrics(b) == metrics(a)  # every loss and lr bit for bit, step lines and epoch lines
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def signal_at_step(monkeypatch, step: int, signum: int = signal.SIGINT) -> None:
    """Send `signum` to this process right after optimiser step `step` (1-based) finishes."""
    original = Trainer.train_step

    def train_step(self, x):
        loss = original(self, x)
        if self.state.step + 1 == step:  # state.step counts this step once train_step returns
            os.kill(os.getpid(), signum)
        return loss
    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, Path]:
    """Reference runs that never stopped: 3 epochs, with the cosine and the constant schedule."""
    runs = {}
    torch.set_num_threads(1)
    for schedule in ("cosine", "constant"):
        out = tmp_path_factory.mktemp(f"straight-{schedule}")
        pretrain(tiny_config(out, f"optim.schedule={schedule}", "optim.warmup_epochs=1"))
        runs[schedule] = out
    return runs


def test_resume_with_more_epochs_matches_the_straight_run(tmp_path, straight):
    # The constant schedule does not depend on train.epochs, so a 1-epoch run extended to 3 is the 3-epoch run.
    notes = []
    pretrain(tiny_config(tmp_path, "optim.schedule=constant", "optim.warmup_epochs=1", "train.epochs=1"))
    pretrain(tiny_config(tmp_path, "optim.schedule=constant", "optim.warmup_epochs=1"), resume=True,
             callback=lambda event, d: notes.append(d["message"]) if event == "notice" else None)
    assert notes == ["resume changes train.epochs: 1 -> 3"]
    assert_same_run(straight["constant"], tmp_path)


def test_resume_after_epoch_stop_matches_the_straight_run_with_cosine(tmp_path, straight, monkeypatch):
    signal_at_step(monkeypatch, 3)  # the last step of epoch 1: the epoch ends and checkpoints, then it stops
    with pytest.raises(StopRequested) as stop:
        pretrain(tiny_config(tmp_path, "optim.schedule=cosine", "optim.warmup_epochs=1"))
    assert (stop.value.signal_name, stop.value.exit_code, stop.value.epoch, stop.value.step) == ("SIGINT", 130, 1, 3)
    assert not stop.value.saved  # the epoch-end checkpoint already holds step 3: nothing new to write
    monkeypatch.undo()
    pretrain(tiny_config(tmp_path, "optim.schedule=cosine", "optim.warmup_epochs=1"), resume=True)
    assert_same_run(straight["cosine"], tmp_path)


@pytest.mark.parametrize("stop_step", [4, 5])  # 4: a log window left open (1 of 2 steps); 5: window just closed
def test_resume_mid_epoch_matches_the_straight_run(tmp_path, straight, monkeypatch, stop_step):
    signal_at_step(monkeypatch, stop_step, signal.SIGTERM)
    with pytest.raises(StopRequested) as stop:
        pretrain(tiny_config(tmp_path, "optim.schedule=cosine", "optim.warmup_epochs=1"))
    assert (stop.value.exit_code, stop.value.step, stop.value.saved) == (143, stop_step, True)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, stop_step)  # epochs completed, steps completed
    assert len(ckpt["epoch_losses"]) == stop_step - 3  # the unfinished epoch's losses travel with it
    monkeypatch.undo()
    pretrain(tiny_config(tmp_path, "optim.schedule=cosine", "optim.warmup_epochs=1"), resume=True)
    assert_same_run(straight["cosine"], tmp_path)
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    marks = [i for i, rec in enumerate(lines) if rec["kind"] == "resume"]
    assert [lines[i] for i in marks] == [{"kind": "resume", "epoch": 1, "step": stop_step}]  # what the report draws
    assert all(rec["step"] <= stop_step for rec in lines[:marks[0]])
    assert all(rec["step"] > stop_step for rec in lines[marks[0] + 1:])


def test_extending_a_cosine_run_replans_the_schedule(tmp_path):
    notes = []
    pretrain(tiny_config(tmp_path, "train.epochs=1", "optim.warmup_epochs=0"))
    pretrain(tiny_config(tmp_path, "train.epochs=2", "optim.warmup_epochs=0"), resume=True,
             callback=lambda event, d: notes.append(d["message"]) if event == "notice" else None)
    assert notes == ["resume changes train.epochs: 1 -> 2", "the cosine schedule now ends at step 6 instead of 3"]
    lrs = [rec["lr"] for rec in metrics(tmp_path) if rec["kind"] == "step"]
    assert lrs[-2] > 0  # the extension trains (without re-planning, the lr would sit at min_lr = 0)


def test_unsafe_config_change_is_refused_before_anything_runs(tmp_path):
    pretrain(tiny_config(tmp_path, "train.epochs=1"))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError) as err:
        pretrain(tiny_config(tmp_path, "train.epochs=2", "optim.lr=0.1"), resume=True)
    message = str(err.value)
    assert "optim.lr: 0.06 -> 0.1" in message and "\n" not in message
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_refuses_a_changed_training_set(tmp_path):
    pretrain(tiny_config(tmp_path, "train.epochs=1"))
    with pytest.raises(ConfigError, match="data.synthetic_size"):
        pretrain(tiny_config(tmp_path, "data.synthetic_size=64"), resume=True)


def test_a_new_run_never_replaces_another_runs_checkpoint(tmp_path):
    pretrain(tiny_config(tmp_path, "train.epochs=1"))
    with pytest.raises(ConfigError, match="already exists: add --resume"):
        pretrain(tiny_config(tmp_path))


def test_resume_without_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        pretrain(tiny_config(tmp_path), resume=True)


@pytest.mark.parametrize("epochs, every, keep, saved_at, copies", [
    (4, 1, 0, [1, 2, 3, 4], []),  # keep_last 0: only checkpoint.pt
    (4, 1, 2, [1, 2, 3, 4], [2, 3]),  # the 2 epoch checkpoints before the current one
    (5, 2, 1, [2, 4, 5], [4]),  # every 2 epochs and at the end; one older copy kept
])
def test_checkpoint_every_and_keep_last(tmp_path, epochs, every, keep, saved_at, copies):
    saved = []
    pretrain(tiny_config(tmp_path, "data.synthetic_size=16", f"train.epochs={epochs}",
                         f"train.checkpoint_every={every}", f"train.keep_last={keep}"),
             callback=lambda event, d: saved.append(d["epoch"]) if event == "checkpoint" else None)
    assert saved == saved_at
    assert sorted(p.name for p in tmp_path.glob("checkpoint-epoch*.pt")) == [f"checkpoint-epoch{e:04d}.pt" for e in copies]
    for e in copies:  # each copy is the whole checkpoint of its epoch
        assert load_checkpoint(tmp_path / f"checkpoint-epoch{e:04d}.pt")["epoch"] == e
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == epochs
    assert not list(tmp_path.glob(".*.tmp"))


def run_cli(*args: str):
    result = CliRunner().invoke(app, ["pretrain", *args])
    assert "Traceback" not in result.output + result.stderr
    return result


def test_cli_resume_with_only_output_dir_uses_the_runs_config(tmp_path):
    out = tmp_path / "run"
    first = run_cli(*tiny_set_args(), "--set", "train.epochs=1", "--output-dir", str(out))
    assert first.exit_code == 0, first.stderr
    resumed = run_cli("--resume", "--output-dir", str(out), "--set", "train.epochs=2")  # no --config, no data flags
    assert resumed.exit_code == 0, resumed.stderr
    assert "note: resume changes train.epochs: 1 -> 2" in resumed.stderr
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2


def test_cli_refuses_unsafe_change_and_missing_checkpoint_in_one_line(tmp_path):
    out = tmp_path / "run"
    assert run_cli(*tiny_set_args(), "--set", "train.epochs=1", "--output-dir", str(out)).exit_code == 0
    refused = run_cli("--resume", "--output-dir", str(out), "--set", "optim.lr=0.1")
    assert refused.exit_code == 2
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
    assert refused.stderr.startswith("error: resume refused, the config changed (optim.lr: 0.06 -> 0.1)")
    missing = run_cli(*tiny_set_args(), "--resume", "--output-dir", str(tmp_path / "nothing-here"))
    assert missing.exit_code == 2
    assert missing.stderr.strip() == (f"error: nothing to resume: {tmp_path / 'nothing-here' / 'checkpoint.pt'} "
                                      "does not exist (drop --resume to start a new run)")


def test_views_per_s_after_a_resume_counts_only_the_steps_it_timed(monkeypatch):
    """A window a stop left open goes on after the resume holding the steps run before the stop; they were
    not timed from the window's start, so the rate leaves them out (they once gave 25,000 views/s)."""
    from types import SimpleNamespace

    from simclr_cli.train import loop as train_module
    from simclr_cli.train.readback import LossWindow

    window = LossWindow(10, torch.device("cpu"), restored=[2.0, 2.0, 2.0])  # 3 steps from before the stop
    for _ in range(2):
        window.add(torch.tensor(1.0), 0.1)  # 2 steps after the resume
    logged = []
    fake = SimpleNamespace(ranks=SimpleNamespace(world_size=1), _why=lambda: "", lr=lambda: 0.1,
                           state=SimpleNamespace(epoch_losses=[], step=15),
                           cfg=SimpleNamespace(train=SimpleNamespace(batch_size=16)),
                           method=SimpleNamespace(views_per_image=2),
                           _log=lambda record: logged.append(record))
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: window.t0 + 1.0)  # the window took 1 s
    Trainer._log_window(fake, 1, window)
    assert logged[0]["views_per_s"] == 2 * 16 * 2  # two timed steps of 16 images, two views each, in 1 s
    assert logged[0]["loss"] == pytest.approx((3 * 2.0 + 2 * 1.0) / 5)  # the loss still averages all five
