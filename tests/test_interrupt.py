"""Runs that stop: SIGINT / SIGTERM / a second SIGINT / kill -9 on a real `python -m simclr_cli pretrain`
process, and non-finite losses. Every stop leaves a checkpoint that loads (weights_only) and resumes.

The subprocess tests are marked slow (run with -m slow); the in-process tests send real signals to this
process through the same handlers. The subprocesses run one intra-op thread (OMP_NUM_THREADS=1), as the in-process runs here do, so a
resumed run can be compared bit for bit with a straight one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_overrides, tiny_set_args
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.config import load_config
from simclr_cli.methods import simclr as simclr_method
from simclr_cli.train import Trainer, pretrain
from simclr_cli.train import loop as train
from simclr_cli.train.interrupt import StopRequested
from simclr_cli.train.readback import NonFiniteLoss
from simclr_cli.train.state import load_checkpoint

# 160 images / batch 16 = 10 steps per epoch, a line per step: long enough to interrupt mid-epoch.
SUB = tiny_overrides(synthetic_size=160, log_every=1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


pytestmark = pytest.mark.usefixtures("one_thread")


def sets(options: list[str]) -> list[str]:
    return [arg for kv in options for arg in ("--set", kv)]


def start(out: Path, options: list[str] = SUB, code: str | None = None, env: dict | None = None) -> subprocess.Popen:
    """`python -m simclr_cli pretrain ...`, or the same app behind a few lines of `code` (test hooks)."""
    prefix = ["-m", "simclr_cli"] if code is None else ["-c", f"{code}\nfrom simclr_cli.cli import main; main()"]
    return subprocess.Popen([sys.executable, *prefix, "pretrain", *sets(options), "--output-dir", str(out)],
                            env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def step_lines(out: Path) -> list[dict]:
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # the last line may be half-written
            pass
    return records


def wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"pretrain ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("pretrain made no progress")
        time.sleep(0.02)


def metrics(out: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    # kNN monitor lines are left out: a run cut short evaluates at its own end, an unbroken one does not
    return [{k: v for k, v in rec.items() if k not in ("views_per_s", "data_wait")} for rec in lines
            if rec["kind"] not in ("eval", "resume")]  # a resume's own mark is the one line that differs


def resume_cli(out: Path, *extra: str):
    result = CliRunner().invoke(app, ["pretrain", "--resume", "--output-dir", str(out), *extra])
    assert "Traceback" not in result.output + result.stderr
    return result


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("straight")
    pretrain(load_config(None, [*SUB, f"train.output_dir={out}"]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_signal_stops_saves_and_resumes_exactly(tmp_path, straight, signum, code):
    proc = start(tmp_path)
    wait_for(proc, lambda: len(step_lines(tmp_path)) >= 2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")  # weights_only; a stop mid-epoch saves mid-epoch
    assert last == (f"stopped by {name} at step {ckpt['step']}; checkpoint written to {tmp_path / 'checkpoint.pt'}. "
                    f"Resume with: simclr pretrain --resume --output-dir {tmp_path}")
    assert ckpt["step"] >= 2
    resumed = resume_cli(tmp_path)
    assert resumed.exit_code == 0, resumed.stderr
    assert metrics(tmp_path) == metrics(straight)  # the stop left no trace in the numbers
    final, reference = load_checkpoint(tmp_path / "checkpoint.pt"), load_checkpoint(straight / "checkpoint.pt")
    assert all(torch.equal(final["model"][k], reference["model"][k]) for k in reference["model"])


SLOW_STEPS = """
import time
from simclr_cli.train import loop as train
_step = train.Trainer.train_step
def slow_step(self, x):
    loss = _step(self, x)
    time.sleep(0.5)  # a long step: both signals arrive while it runs
    return loss
train.Trainer.train_step = slow_step
"""


@pytest.mark.slow
def test_second_sigint_exits_at_once_and_keeps_the_previous_checkpoint(tmp_path):
    options = [*SUB, "data.synthetic_size=32", "train.epochs=50"]  # 2 steps per epoch
    proc = start(tmp_path, options, code=SLOW_STEPS)
    wait_for(proc, lambda: any(rec["step"] == 3 for rec in step_lines(tmp_path)))
    before = (tmp_path / "checkpoint.pt").read_bytes()  # epoch 1's; epoch 2 ends after step 4
    proc.send_signal(signal.SIGINT)
    time.sleep(0.15)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 5  # at once: the 0.5 s step is not finished, nothing is saved
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"stopped at once by SIGINT; the last checkpoint in {tmp_path} (if any) is "
                                            f"intact. Resume with: simclr pretrain --resume --output-dir {tmp_path}")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_in_a_slurm_job_a_repeated_signal_is_the_same_stop(tmp_path):
    """SLURM passes one signal along several paths (every process of the step, srun, torchrun's agent): in a job
    the second arrival finishes the step and saves, as the first asked, instead of leaving at once."""
    options = [*SUB, "data.synthetic_size=32", "train.epochs=50"]
    proc = start(tmp_path, options, code=SLOW_STEPS, env={**ENV, "SLURM_JOB_ID": "4242"})  # srun sets it in a job
    wait_for(proc, lambda: any(rec["step"] == 3 for rec in step_lines(tmp_path)))
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.15)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 138, err
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] >= 4  # the step after the signal, saved: not the epoch-1 checkpoint (step 2)
    assert err.strip().splitlines()[-1].startswith(f"stopped by SIGUSR1 at step {ckpt['step']}; ")  # not "at once"


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_a_loadable_checkpoint(tmp_path):
    # A checkpoint every step (1 step per epoch) with keep_last copies: kills land inside writes often.
    options = [*SUB, "data.synthetic_size=16", "train.epochs=100000", "train.keep_last=1"]
    rng = random.Random()
    delays = [rng.uniform(0.0, 1.5) for _ in range(3)]
    runs = [tmp_path / f"run{i}" for i in range(len(delays) + 1)]
    procs = [start(out, options) for out in runs]
    time.sleep(rng.uniform(0.5, 3.0))
    procs[-1].kill()  # while starting up (importing, building), most likely before any checkpoint
    for proc, out, delay in zip(procs, runs, delays):
        wait_for(proc, lambda: len(step_lines(out)) >= 1)
        time.sleep(delay)
        proc.kill()
    for proc, out in zip(procs, runs):
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        if not (out / "checkpoint.pt").exists():
            continue
        ckpt = load_checkpoint(out / "checkpoint.pt")  # never torn, never a temporary file
        for copy in out.glob("checkpoint-epoch*.pt"):
            assert load_checkpoint(copy)["epoch"] <= ckpt["epoch"]  # equal: killed between keeping and replacing
        # Resuming clears the temporaries the kill left, and trains on (a later epoch cap is a safe change).
        result = resume_cli(out, "--set", f"train.epochs={ckpt['epoch'] + 1}")
        assert result.exit_code == 0, (delays, result.stderr)
        assert not list(out.glob(".*.tmp"))
        assert load_checkpoint(out / "checkpoint.pt")["epoch"] == ckpt["epoch"] + 1


def test_stale_temporaries_and_a_torn_metrics_line_are_ignored_on_resume(tmp_path):
    pretrain(tiny_config(tmp_path, "train.epochs=1"))
    stale = [tmp_path / ".checkpoint.pt.k9x2.tmp", tmp_path / ".checkpoint-epoch0001.pt.77.tmp"]
    for path in stale:
        path.write_bytes(b"PK\x03\x04 half a zip")  # what a kill -9 inside torch.save leaves
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "epoch": 2, "step": 5, "lo')  # a line a kill cut short
    pretrain(tiny_config(tmp_path, "train.epochs=2"), resume=True)
    assert not any(path.exists() for path in stale)
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] not in ("eval", "resume")]
    assert steps == [2, 3, 3, 5, 6, 6]  # the torn line dropped, no step logged twice
    assert [r for r in records if r["kind"] == "resume"] == [{"kind": "resume", "epoch": 1, "step": 3}]


def test_kill_between_keeping_and_replacing_leaves_nothing_behind_on_resume(tmp_path):
    pretrain(tiny_config(tmp_path, "train.epochs=2", "train.keep_last=1"))
    # The state a kill -9 leaves right after checkpoint.pt was kept as epoch 2's copy, before it was replaced.
    os.link(tmp_path / "checkpoint.pt", tmp_path / "checkpoint-epoch0002.pt")
    pretrain(tiny_config(tmp_path, "train.keep_last=1"), resume=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "checkpoint"))) == [
        "checkpoint-epoch0002.pt", "checkpoint.pt"]
    assert load_checkpoint(tmp_path / "checkpoint-epoch0002.pt")["epoch"] == 2


def test_signal_during_setup_stops_before_training(tmp_path, monkeypatch):
    load = train.load_train_set

    def interrupted_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the data is loading
        return load(*args, **kwargs)
    monkeypatch.setattr(train, "load_train_set", interrupted_load)
    with pytest.raises(StopRequested) as stop:
        pretrain(tiny_config(tmp_path))
    assert (stop.value.checkpoint, stop.value.saved, stop.value.step) == (None, False, 0)
    assert not (tmp_path / "checkpoint.pt").exists()


def nan_from_call(monkeypatch, first_bad: int) -> None:
    calls = {"n": 0}
    loss_fn = simclr_method.nt_xent

    def nt_xent(*args, **kwargs):
        calls["n"] += 1
        loss = loss_fn(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= first_bad else loss
    monkeypatch.setattr(simclr_method, "nt_xent", nt_xent)


def checkpoint_watch(tmp_path: Path) -> tuple[list, callable]:
    seen = []

    def callback(event, d):
        if event == "checkpoint":
            path = tmp_path / "checkpoint.pt"
            seen.append((path.read_bytes(), path.stat().st_mtime_ns))
    return seen, callback


def test_nan_loss_stops_with_step_lr_and_hint_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    nan_from_call(monkeypatch, 5)  # step 5, in epoch 2 (3 steps per epoch)
    seen, callback = checkpoint_watch(tmp_path)
    with pytest.raises(NonFiniteLoss) as err:
        pretrain(tiny_config(tmp_path), callback=callback)
    path = tmp_path / "checkpoint.pt"
    assert str(err.value).startswith("loss became nan at step 5 (lr 0.01); ")
    assert str(err.value).endswith(f"{path} (step 3) is kept. Hint: lower optim.lr (now 0.06) and start a new run "
                                   "with another --output-dir (a changed config cannot --resume)")
    assert len(seen) == 1 and (path.read_bytes(), path.stat().st_mtime_ns) == seen[0]
    assert not (tmp_path / "encoder.pth").exists()


def test_non_finite_weights_are_never_saved_even_if_the_loss_was_finite(tmp_path, monkeypatch):
    step = Trainer.train_step

    def poisoned_step(self, x):
        loss = step(self, x)
        if self.state.step + 1 == 6:  # the last step of epoch 2: its loss (computed before the update) is finite
            next(self.model.parameters()).data.fill_(float("inf"))
        return loss
    monkeypatch.setattr(Trainer, "train_step", poisoned_step)
    seen, callback = checkpoint_watch(tmp_path)
    with pytest.raises(NonFiniteLoss, match=r"weights became non-finite \(.+\) by step 6 .*\(step 3\) is kept"):
        pretrain(tiny_config(tmp_path), callback=callback)
    path = tmp_path / "checkpoint.pt"
    assert len(seen) == 1 and (path.read_bytes(), path.stat().st_mtime_ns) == seen[0]


def test_cli_huge_lr_is_one_line_and_exit_3(tmp_path):
    result = CliRunner().invoke(app, ["pretrain", *tiny_set_args(), "--set", "optim.lr=1.0e+30", "-o", str(tmp_path)])
    assert result.exit_code == 3
    assert "Traceback" not in result.output + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss became nan at step 2 (lr 6.667e+28); no checkpoint was written. "
                           "Hint: lower optim.lr (now 1e+30) and run again")
    assert not (tmp_path / "checkpoint.pt").exists()


def signal_after_step(monkeypatch, step: int, signum: int) -> None:
    original = Trainer.train_step

    def train_step(self, x):
        loss = original(self, x)
        if self.state.step + 1 == step:
            os.kill(os.getpid(), signum)
        return loss
    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_cli_stop_message_and_exit_code(tmp_path, monkeypatch, signum, code):
    signal_after_step(monkeypatch, 4, signum)
    result = CliRunner().invoke(app, ["pretrain", *tiny_set_args(), "-o", str(tmp_path)])
    assert result.exit_code == code
    assert "Traceback" not in result.output + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"stopped by {signal.Signals(signum).name} at step 4; checkpoint written to {tmp_path / 'checkpoint.pt'}. "
        f"Resume with: simclr pretrain --resume --output-dir {tmp_path}")
    monkeypatch.undo()
    resumed = resume_cli(tmp_path)
    assert resumed.exit_code == 0, resumed.stderr
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 9


def test_cli_stop_during_setup_says_there_is_nothing_to_resume(tmp_path, monkeypatch):
    load = train.load_train_set

    def interrupted_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return load(*args, **kwargs)
    monkeypatch.setattr(train, "load_train_set", interrupted_load)
    result = CliRunner().invoke(app, ["pretrain", *tiny_set_args(), "-o", str(tmp_path)])
    assert result.exit_code == 130
    assert result.stderr.strip() == ("stopped by SIGINT before the first checkpoint; nothing to resume (run the same "
                                     "command to start again)")
