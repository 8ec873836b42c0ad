"""`simclr submit` without a cluster: the job script --dry-run prints, the resources and config refused in one
line before anything is written, sbatch missing, SLURM's time-limit forms, the start panel's job line, and
SIGUSR1 to `simclr pretrain --nproc 2`'s launcher (what a job's signal becomes outside SLURM's own delivery).
The job itself runs on a real SLURM in tests/test_slurm.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_set_args
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.errors import ConfigError
from simclr_cli.train.slurm import job_facts, time_limit_s
from simclr_cli.train.state import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def submit(*args: str):
    result = CliRunner().invoke(app, ["submit", *tiny_set_args(), *args])
    assert "Traceback" not in result.output + result.stderr
    return result


def test_dry_run_prints_the_two_node_gpu_script_and_writes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = submit("-o", str(run), "--nnodes", "2", "--gpus-per-node", "4", "--cpus-per-node", "32", "--mem", "128G",
                    "--time", "1-00:00:00", "--partition", "gpu", "--account", "lab", "--qos", "high",
                    "--sbatch=--constraint=a100", "--signal-before", "300", "--dry-run")
    assert result.exit_code == 0, result.stderr
    script = result.stdout
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=simclr-run", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=32", "#SBATCH --mem=128G", "#SBATCH --time=1-00:00:00",
        "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=high",
        f"#SBATCH --output={run}/slurm/%j.log", "#SBATCH --open-mode=append", "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300", "#SBATCH --constraint=a100", f"#SBATCH --chdir={Path.cwd()}"]
    command = (f"{sys.executable} -m simclr_cli pretrain --config {run}/slurm/config.yaml --auto-resume --nproc 4 "
               '--nnodes 2 --rdzv-endpoint "$head:$port" &')
    assert command in script
    assert 'scancel --signal=USR1 "$SLURM_JOB_ID"' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # it parses
    assert result.stderr.strip() == "dry run: nothing written, nothing submitted"
    assert not run.exists()


def test_one_cpu_node_has_no_rendezvous(tmp_path: Path) -> None:
    result = submit("-o", str(tmp_path / "run"), "--nproc", "2", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "--auto-resume --nproc 2 &" in result.stdout and "rdzv" not in result.stdout and "head=" not in result.stdout
    assert "--gpus-per-node" not in result.stdout and "--time" not in result.stdout  # the cluster's defaults


@pytest.mark.parametrize("args, message", [
    (["--time", "1:2:3:4"], "--time '1:2:3:4' is no SLURM time limit: give MINUTES, HH:MM:SS or DAYS-HH:MM:SS"),
    (["--time", "2"], "--signal-before 120 s must be shorter than --time 2"),
    (["--mem", "64GB"], "--mem '64GB' is no SLURM memory size"),
    (["--partition", "gpu a100"], "--partition 'gpu a100': a SLURM name has letters, digits and _.,:+- only"),
    (["--sbatch=--output=x.log"], "simclr submit writes --output itself"),
    (["--sbatch=constraint=a100"], "is no sbatch option"),
    (["--gpus-per-node", "4", "--nproc", "2"], "--nproc 2 with --gpus-per-node 4: one process per GPU"),
    (["--nnodes", "3"], "train.batch_size 16 must divide evenly over 3 processes (3 nodes x 1): pick a multiple of 3"),
    (["--device", "cuda"], "train.device cuda needs GPUs: add --gpus-per-node N, or --device cpu"),
    (["--nodes", "0"], "Invalid value for '--nnodes' / '--nodes'"),
    (["--set", "method.name=simclrr"], "simclrr"),
])
def test_bad_input_is_one_line_before_anything_is_written(tmp_path: Path, args: list[str], message: str) -> None:
    run = tmp_path / "run"
    result = submit("-o", str(run), *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not run.exists() and result.stdout == ""


def test_a_run_directory_with_a_space_is_refused(tmp_path: Path) -> None:
    result = submit("-o", str(tmp_path / "my run"), "--dry-run")
    assert result.exit_code == 2 and result.stdout == ""
    assert "has a space or quote, which #SBATCH lines cannot hold: choose a path without them" in result.stderr


def test_a_run_with_a_checkpoint_needs_resume(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"not read: only its presence counts here")
    result = submit("-o", str(tmp_path), "--dry-run")
    assert result.exit_code == 2
    assert "checkpoint.pt already exists: add --resume to continue that run" in result.stderr


def test_without_sbatch_it_says_where_to_run(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path / "empty")}  # no sbatch on it; the interpreter is named in full
    done = subprocess.run([sys.executable, "-m", "simclr_cli", "submit", *tiny_set_args(), "-o", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: sbatch was not found on PATH: run simclr submit on a SLURM cluster's login node "
                                   "(or add --dry-run to print the job script without submitting it)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("30:15", 1815), ("04:00:00", 14400), ("2-12", 216000),
                                           ("1-02:03", 93780), ("1-02:03:04", 93784)])
def test_time_limits_in_slurm_forms(text: str, seconds: int) -> None:
    assert time_limit_s(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "1h", "1:2:3:4", "-5", "1-"])
def test_time_limits_that_are_not(text: str) -> None:
    with pytest.raises(ConfigError):
        time_limit_s(text)


def test_the_start_panel_line_names_the_job_restarts_and_log() -> None:
    assert job_facts({}) == {}
    assert job_facts({"SLURM_JOB_ID": "17", "SIMCLR_SLURM_LOG": "runs/x/slurm/17.log"}) == {
        "slurm job": "17, log runs/x/slurm/17.log"}
    assert job_facts({"SLURM_JOB_ID": "17", "SLURM_RESTART_COUNT": "2"}) == {"slurm job": "17 (requeued 2x)"}


@pytest.mark.slow
def test_sigusr1_to_the_launcher_stops_every_rank_with_a_checkpoint(tmp_path: Path) -> None:
    """Outside SLURM the launcher alone is signalled (kill -USR1): torchrun's agent passes it to the ranks, they
    stop at one step, rank 0 saves it, and the launcher exits 138 with rank 0's stop line."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    command = [sys.executable, "-m", "simclr_cli", "pretrain", "--nproc", "2", "-o", str(run),
               *tiny_set_args("train.eval_every=0", epochs=200)]
    proc = subprocess.Popen(command, env={**env, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 138, err[-3000:]
    step = load_checkpoint(run / "checkpoint.pt")["step"]
    assert 0 < step < 600  # stopped mid-run, at the step saved
    assert f"stopped by SIGUSR1 at step {step}; " in err and "Traceback" not in err
