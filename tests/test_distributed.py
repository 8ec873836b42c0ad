"""Distributed pretraining: two gloo ranks on CPU against one process, and `simclr pretrain --nproc 2`."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from ranks import assert_one_process, global_batch, run_ranks, shard_step  # tests/ranks.py
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.config import ModelConfig, load_config
from simclr_cli.errors import ConfigError
from simclr_cli.files import ENCODER_FORMAT, safe_load
from simclr_cli.models import build_model
from simclr_cli.train import launch
from simclr_cli.train.state import load_checkpoint

WORLD = 2
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors, two cores shared with the spawned ranks
    yield
    torch.set_num_threads(threads)


# --- one step on two gloo ranks equals one step on the whole batch ---------------------------------------


def _rank_worker(rank: int, state: dict, x1: torch.Tensor, x2: torch.Tensor, out_dir: str) -> None:
    torch.save(shard_step(rank, WORLD, state, x1, x2), os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_ranks_give_the_loss_and_gradients_of_one_process(tmp_path: Path) -> None:
    """Every parameter's gradient after one DDP step on two gloo ranks equals one process on the whole batch.

    BatchNorm: in training mode each rank normalises over its own half of the views, so its gradients
    differ from the whole batch's by construction; SyncBatchNorm would fix that, but torch's runs on
    GPUs only (on CPU `simclr pretrain` refuses model.sync_bn). So the equality is checked with BN in
    eval mode on running statistics taken from the global batch: every layer is then a per-image function,
    and the only coupling across images, the one that must cross ranks, is NT-Xent's negatives. The
    test also shows that training-mode BN does differ, and that the loss without the gather differs.
    The same step across two torchrun agents ("nodes") is tests/test_nodes.py's.
    """
    state, x1, x2 = global_batch()
    run_ranks(_rank_worker, (state, x1, x2, str(tmp_path)), WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert_one_process(ranks, state, x1, x2)


# --- simclr pretrain --nproc ---------------------------------------------------------------------------------

# the shared tiny run (tests/conftest.py) with 128 images, batch 32; None: the config's default
SETTINGS = tiny_overrides(synthetic_size=128, batch_size=32, image_size=None, precision=None, device=None, epochs=None)
TINY = ["--device", "cpu"] + [arg for kv in SETTINGS for arg in ("--set", kv)]


def _simclr(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "simclr_cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_nproc_hands_the_ranks_the_config_it_resolved(tmp_path: Path, monkeypatch) -> None:
    """The launcher resolves the config once (file, --set, flags, the resume) and every rank reads that."""
    seen = {}

    def fake_torchrun(nproc: int, module_args: list[str], nodes: launch.Nodes, run_id: str) -> launch.LaunchResult:
        seen["nproc"], seen["args"], seen["nodes"] = nproc, module_args, nodes
        seen["config"] = load_config(module_args[module_args.index("--config") + 1])  # what a rank loads
        return launch.LaunchResult(0)

    monkeypatch.setattr(launch, "run_torchrun", fake_torchrun)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out, config = tmp_path / "run", tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 3  # passes\n")
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")  # --resume needs one to exist; the ranks would read it
    result = CliRunner().invoke(app, ["pretrain", "--resume", "--nproc", "2", "-c", str(config), "-o", str(out),
                                      *TINY, "--set", "train.seed=5"])
    assert result.exit_code == 0, result.output
    assert seen["nproc"] == 2 and seen["nodes"] == launch.Nodes()  # one machine: torchrun --standalone
    assert seen["args"][:3] == ["simclr_cli", "pretrain", "--config"] and seen["args"][4:] == ["--resume"]
    resolved = load_config(config, SETTINGS + ["train.seed=5"], {"train.output_dir": str(out), "train.device": "cpu"})
    assert seen["config"] == resolved
    assert not Path(seen["args"][3]).exists()  # the launcher's temporary config is gone


@pytest.mark.parametrize("override, message", [
    ("model.sync_bn=true", "model.sync_bn needs CUDA GPUs"),
    ("train.batch_size=33", "must divide evenly over 2 processes"),
])
def test_nproc_refuses_before_starting_any_rank(tmp_path: Path, monkeypatch, override: str, message: str) -> None:
    monkeypatch.setattr(launch, "run_torchrun", lambda *a: pytest.fail("no rank may start"))
    result = CliRunner().invoke(app, ["pretrain", "--nproc", "2", "-o", str(tmp_path), *TINY, "--set", override])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_a_batch_that_the_nodes_do_not_divide_names_the_nodes(monkeypatch) -> None:
    """Under torchrun on 2 nodes of 2 ranks (LOCAL_WORLD_SIZE 2 of WORLD_SIZE 4) the refusal counts the nodes."""
    from simclr_cli.train.preflight import check_world

    cfg = load_config(None, ["train.batch_size=18"])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^train.batch_size 18 must divide evenly over 4 processes \(2 nodes x 2\): "
                                          r"pick a multiple of 4$"):
        check_world(cfg, 4, torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"over 4 processes: pick"):
        check_world(cfg, 4, torch.device("cpu"))


def test_nproc_above_the_gpu_count_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(launch, "pick_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(launch, "run_torchrun", lambda *a: pytest.fail("no rank may start"))
    result = CliRunner().invoke(app, ["pretrain", "--nproc", "2", "-o", str(tmp_path), *TINY])
    assert result.exit_code == 2 and "--nproc 2 needs 2 GPUs, 1 visible" in result.output


def test_nproc_under_torchrun_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["pretrain", "--nproc", "2", "-o", str(tmp_path), *TINY])
    assert result.exit_code == 2 and "under torchrun, leave them out" in " ".join(result.output.split())


def test_failure_line_names_the_rank_and_the_signal() -> None:
    assert launch.describe_failure(1, -9) == "rank 1 was killed by SIGKILL; torchrun stopped the other ranks"
    assert launch.describe_failure(0, 3).startswith("rank 0 exited with code 3")


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One `simclr pretrain --nproc 2` run (1 epoch, 4 steps) shared by the tests below."""
    out = tmp_path_factory.mktemp("nproc") / "run"
    board = ["--set", "train.loggers=[tensorboard]"] if importlib.util.find_spec("tensorboard") else []
    return out, _simclr("pretrain", "--nproc", "2", "-o", str(out), *TINY, "--set", "train.epochs=1", *board)


def test_pretrain_nproc_2_end_to_end(two_rank_run, tmp_path: Path) -> None:
    """Two gloo ranks through torchrun; rank 0 alone prints and writes; the checkpoint resumes in one process."""
    out, run = two_rank_run
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("simclr pretrain 0.") == 1  # one panel: rank 1 shows nothing
    assert "32 global = 2 ranks x 16" in run.stderr
    assert run.stderr.count("done: 1 epochs") == 1

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["kind"], r["step"]) for r in records if r["kind"] != "eval"]
    assert steps == [("step", 2), ("step", 4), ("epoch", 4)]  # one line per event: a second writer doubles them
    assert len(records) <= 4
    if importlib.util.find_spec("tensorboard"):  # the live logger: rank 0's alone, each step once
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
        board = EventAccumulator(str(out / "tensorboard"))
        board.Reload()
        assert [e.step for e in board.Scalars("train/loss")] == [2, 4]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert (ckpt["world_size"], ckpt["epoch"], ckpt["step"]) == (2, 1, 4)
    encoder = safe_load(out / "encoder.pth")
    assert encoder["format"] == ENCODER_FORMAT and encoder["width"] == 8
    assert encoder["state_dict"].keys() == build_model(ModelConfig(width=8)).encoder.state_dict().keys()

    # One process continues the two-rank run: same global batch, so the same 4 steps per epoch.
    from simclr_cli.train import pretrain

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    cfg = load_config(None, SETTINGS + [f"train.output_dir={resumed}", "train.device=cpu", "train.epochs=2"])
    summary = pretrain(cfg, resume=True)
    assert (summary["epochs"], summary["steps"]) == (2, 8)
    assert load_checkpoint(resumed / "checkpoint.pt")["world_size"] == 1


@pytest.mark.slow  # about 25 s: a fourth interpreter importing torch
def test_probe_reads_the_two_rank_encoder(two_rank_run) -> None:
    out, run = two_rank_run
    assert run.returncode == 0, run.stderr
    probe = _simclr("probe", str(out / "encoder.pth"), "--dataset", "synthetic", "--device", "cpu")
    assert probe.returncode == 0, probe.stderr


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker torchrun started with RANK=rank under `launcher`, found through /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow  # about 35 s
def test_a_dead_rank_stops_the_run_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "simclr_cli", "pretrain", "--nproc", "2", "-o", str(out), *TINY,
                             "--set", "train.epochs=200"], stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        stopped_in = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert "rank 1 was killed by SIGKILL; torchrun stopped the other ranks" in stderr
    assert "is intact: add --resume" in stderr
    assert stopped_in < 40  # not the 30-minute collective timeout
    ckpt = load_checkpoint(out / "checkpoint.pt")  # whole, loadable
    assert ckpt["step"] % 4 == 0 and ckpt["world_size"] == 2
