"""`simclr pretrain --nnodes N --rdzv-endpoint HOST:PORT`: the same command on each machine, joined by torchrun's
c10d rendezvous (here two commands on 127.0.0.1 stand for two machines). Bad node settings are one line before
any rank starts, and a rendezvous that never completes is one line naming --rdzv-timeout, not a traceback."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides
from ranks import free_port  # tests/ranks.py
from test_nodes import ENV, run_marked  # tests/test_nodes.py
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.train import launch
from simclr_cli.train.launch import Nodes
from simclr_cli.train.state import load_checkpoint

SETTINGS = tiny_overrides(synthetic_size=128, batch_size=32, image_size=None, precision=None, device=None, epochs=1)
TINY = ["--device", "cpu"] + [arg for kv in SETTINGS for arg in ("--set", kv)]


def test_nodes_become_torchruns_rendezvous_arguments():
    assert Nodes().argv("x") == ["--standalone", "--max-restarts", "0"]
    assert Nodes(2, "node0:29400", 30, 1).argv("run-1") == [
        "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "run-1",
        "--rdzv-conf", "join_timeout=30", "--max-restarts", "1"]


def test_restarts_across_nodes_keep_the_ranks_off_the_agents_store(monkeypatch):
    """With --max-restarts on several nodes the ranks get a store of their own: torch's shared one hangs a
    restarted node (tests/test_nodes.py's restart runs with the same setting)."""
    from torch.distributed import run as torchrun

    seen = {}
    monkeypatch.setattr(torchrun, "main", lambda argv: seen.update(
        argv=argv, share=os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")))
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)  # restored after, as OMP_NUM_THREADS
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    assert launch.run_torchrun(1, ["simclr_cli"], Nodes(2, "node0:29400", 60, 0), "r").exit_code == 0
    assert seen["share"] is None and seen["argv"][-4:] == ["--nproc_per_node", "1", "-m", "simclr_cli"]
    assert launch.run_torchrun(1, ["simclr_cli"], Nodes(2, "node0:29400", 60, 1), "r").exit_code == 0
    assert seen["share"] == "1" and "--max-restarts" in seen["argv"]


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "node0"], "--rdzv-endpoint 'node0' is not HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "node0:99999"], "is not HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "node0:29400", "--rdzv-timeout", "0"], "--rdzv-timeout must be > 0"),
    (["--nnodes", "2", "--nproc", "2", "--rdzv-endpoint", "node0:29400", "--set", "train.batch_size=18"],
     "train.batch_size 18 must divide evenly over 4 processes (2 nodes x 2): pick a multiple of 4"),
])
def test_bad_node_settings_are_one_line_before_any_rank(tmp_path: Path, monkeypatch, args, message) -> None:
    monkeypatch.setattr(launch, "run_torchrun", lambda *a: pytest.fail("no rank may start"))
    result = CliRunner().invoke(app, ["pretrain", "-o", str(tmp_path / "run"), *TINY, *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def _simclr(tmp_path: Path, *commands: list[str]) -> list[tuple[int | None, str]]:
    """Each `python -m simclr_cli ARGS` at once, (exit code, output) of each; whatever is left of them past the
    deadline, torchrun's ranks included (each in a session of its own), is killed (tests/test_nodes.py)."""
    logs = [tmp_path / f"simclr{i}.log" for i in range(len(commands))]
    codes = run_marked([[sys.executable, "-m", "simclr_cli", *args] for args in commands], logs, ENV)
    return [(code, log.read_text()) for code, log in zip(codes, logs)]


@pytest.mark.slow
def test_a_rendezvous_that_never_completes_is_one_line_naming_the_timeout(tmp_path: Path) -> None:
    """One of two nodes started: after --rdzv-timeout seconds the command ends with one line, not a hang."""
    endpoint = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    [(code, out)] = _simclr(tmp_path, ["pretrain", "-o", str(tmp_path / "run"), *TINY, "--nnodes", "2",
                                       "--rdzv-endpoint", endpoint, "--rdzv-timeout", "4"])
    assert code == 2, out
    assert f"the rendezvous at {endpoint} did not complete within 4 s (--rdzv-timeout)" in " ".join(out.split())
    assert "Traceback" not in out and time.monotonic() - t0 < 60


@pytest.mark.slow
def test_two_commands_on_one_endpoint_train_as_one_run(tmp_path: Path) -> None:
    """`simclr pretrain --nnodes 2 --rdzv-endpoint` twice (two "machines" on one run directory): one run of 2 ranks,
    one start panel, every step's metrics once."""
    endpoint, out = f"127.0.0.1:{free_port()}", tmp_path / "run"
    args = ["pretrain", "-o", str(out), *TINY, "--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-timeout", "60"]
    results = _simclr(tmp_path, args, args)
    assert [code for code, _ in results] == [0, 0], "\n".join(o[-3000:] for _, o in results)
    text = "".join(o for _, o in results)
    assert text.count("simclr pretrain 0.") == 1 and "32 global = 2 ranks x 16" in text
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert (ckpt["world_size"], ckpt["epoch"]) == (2, 1)
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in line]
    assert len(steps) == len(set(steps)) > 0
