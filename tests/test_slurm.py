"""`simclr submit` on a real SLURM (tests/slurm_cluster.py: slurmctld, slurmd and munge on this machine, 2 CPUs):
a job trains, is signalled as SLURM signals it before its time limit (`scancel --batch --signal=USR1`, what
--signal=B:USR1@S delivers) or is requeued by SLURM itself (`scontrol requeue`: SIGTERM to every process, as a
preemption), checkpoints, requeues, resumes and ends with the weights, optimiser state and metrics of an unbroken
run; sbatch's refusal leaves the run directory as it was; a second job on a queued run is refused.

Where SLURM cannot start (not root, not installed) the tests skip with the reason; under CI (CI=true), where
.ci/run installs it, they fail instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster  # tests/slurm_cluster.py
from conftest import tiny_set_args
from test_nodes import _records, _unequal

from simclr_cli.rundir import read_metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# the tiny synthetic run for long enough to be signalled mid-run: 3 steps an epoch, 60 epochs, no kNN monitor
RUN = tiny_set_args("train.eval_every=0", epochs=60)
DEADLINE_S = 180


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_cluster.why_not()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"SLURM cannot start in CI: {why}")
        pytest.skip(f"SLURM cannot start here: {why}")
    started = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    yield started
    started.stop()


def simclr(cluster, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m simclr_cli args` as a user of `cluster` runs it (None: on a machine without SLURM)."""
    env = {**(cluster.env if cluster else os.environ), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "simclr_cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=DEADLINE_S)


def wait_until(what, why: str, cluster=None, job: str = "") -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not what():
        if time.monotonic() > deadline:
            shown = cluster.run("scontrol", "show", "job", job, check=False) if cluster else ""
            pytest.fail(f"timed out waiting for {why}\n{shown}")
        time.sleep(0.2)


def job_field(cluster, job: str, name: str) -> str:
    out = cluster.run("scontrol", "show", "job", job, "--oneliner", check=False)
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith(f"{name}=")), "")


@pytest.mark.parametrize("how, nproc", [("signal", 1), ("signal", 2), ("requeue", 2)])
def test_a_requeued_job_ends_with_the_weights_of_an_unbroken_run(cluster, tmp_path: Path, how: str, nproc: int):
    run = tmp_path / "run"
    submitted = simclr(cluster, tmp_path, "submit", *RUN, "-o", str(run), "--nproc", str(nproc),
                       "--cpus-per-node", "2", "--time", "10")
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    assert job.isdigit() and f"submitted SLURM job {job}: 1 node x {nproc} process" in submitted.stderr
    recorded = json.loads((run / "slurm" / "job.json").read_text())
    assert recorded["job_id"] == job and recorded["log"] == str(run / "slurm" / f"{job}.log")

    wait_until(lambda: any(r["step"] >= 4 for r in read_metrics(run / "metrics.jsonl")), "step 4", cluster, job)
    if how == "signal":  # what SLURM sends the batch shell --signal-before seconds before the time limit
        cluster.run("scancel", "--batch", "--signal=USR1", job)
    else:  # SLURM's own requeue (as a preemption's): SIGTERM to every process of the job, then requeued
        cluster.run("scontrol", "requeue", job)
    wait_until(lambda: job_field(cluster, job, "Restarts") == "1" and cluster.state(job) == "PENDING",
               "the job back in the queue", cluster, job)
    wait_until(lambda: cluster.state(job) not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"), "the job's end",
               cluster, job)
    log = (run / "slurm" / f"{job}.log").read_text()
    assert cluster.state(job) == "COMPLETED" and job_field(cluster, job, "ExitCode") == "0:0", log[-4000:]

    name = "SIGUSR1" if how == "signal" else "SIGTERM"
    stopped = [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "resume"]
    assert len(stopped) == 1 and 4 <= stopped[0]["step"] < 180, log[-4000:]  # resumed once, mid-run
    assert f"stopped by {name} at step {stopped[0]['step']}; " in log, log[-4000:]  # saved then, or at that epoch's end
    assert f"slurm job      {job}, log {run}/slurm/{job}.log" in log
    assert f"slurm job      {job} (requeued 1x), log {run}/slurm/{job}.log" in log
    assert "Traceback" not in log and "stopped at once" not in log
    if how == "signal":
        assert f"simclr: job {job} got SIGUSR1" in log and f"simclr: requeueing job {job}" in log

    straight = simclr(None, tmp_path, "pretrain", *RUN, "-o", str(tmp_path / "straight"),
                      *(["--nproc", str(nproc)] if nproc > 1 else []))  # outside SLURM
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert [r for r in _records(run) if r["kind"] != "resume"] == _records(tmp_path / "straight")
    assert _unequal(run, tmp_path / "straight") == []


def test_a_refused_submission_leaves_the_run_directory_as_it_was(cluster, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = simclr(cluster, tmp_path, "submit", *RUN, "-o", str(run), "--partition", "nosuch")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "error: sbatch refused the job: Batch job submission failed: Invalid partition " \
                                    "name specified"
    assert not run.exists()


def test_a_second_job_on_a_queued_run_is_refused(cluster, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = simclr(cluster, tmp_path, "submit", *RUN, "-o", str(run), "--sbatch=--hold")  # queued, held
    job = first.stdout.strip()
    try:
        assert first.returncode == 0 and cluster.state(job) == "PENDING", first.stderr
        before = {p.name: p.read_bytes() for p in (run / "slurm").iterdir()}
        second = simclr(cluster, tmp_path, "submit", *RUN, "-o", str(run))
        assert second.returncode == 2
        assert second.stderr.strip() == (f"error: job {job} of {run} is PENDING: wait for it, or scancel {job} "
                                         "first, or choose another --output-dir")
        assert {p.name: p.read_bytes() for p in (run / "slurm").iterdir()} == before
        cluster.run("scancel", job)
        wait_until(lambda: cluster.state(job) == "CANCELLED", "the cancel", cluster, job)
        third = simclr(cluster, tmp_path, "submit", *RUN, "-o", str(run), "--sbatch=--hold")  # its job is over
        assert third.returncode == 0, third.stderr
        cluster.run("scancel", third.stdout.strip())
    finally:
        cluster.run("scancel", job, check=False)
