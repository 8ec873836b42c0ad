"""A real one-node SLURM for the tests: Debian's slurm-wlm (slurmctld + slurmd) and munge, configured in a
temporary folder, started on this machine and stopped afterwards.

`.ci/run` installs the packages (`apt-get install slurm-wlm munge`); `start` needs root (slurmd runs jobs as
their user) and the binaries, and returns why it cannot start otherwise, so a test can skip with the reason.
The settings are the ones seen to work on these machines without cgroups (../shared/notes/single-node-slurm.md):
proctrack/linuxproc, task/none, cons_tres over CPUs, no accounting. Client commands (sbatch, squeue,
scontrol) find this cluster through SLURM_CONF, which `Cluster.env` sets.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "munged", "munge", "unmunge")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def why_not() -> str | None:
    """Why a SLURM cannot start here (None: it can)."""
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs; these tests need root (CI runs as root)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge; .ci/run does)"
    return None


def munge_runs() -> bool:
    encode = subprocess.run(["munge", "-n"], capture_output=True)
    return encode.returncode == 0 and subprocess.run(["unmunge"], input=encode.stdout,
                                                     capture_output=True).returncode == 0


def start_munge() -> None:
    """munged as the munge user with Debian's key (the package makes one; a new one if it is missing)."""
    if munge_runs():
        return
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True, capture_output=True)
    for _ in range(50):
        if munge_runs():
            return
        time.sleep(0.1)
    raise RuntimeError("munged started but munge -n | unmunge does not succeed")


def slurm_conf(folder: Path, host: str, cpus: int) -> str:
    return "\n".join([
        "ClusterName=simclrtest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        # a requeued job may start this long after (default 120 s), at the next backfill pass (default every 30 s)
        "AuthType=auth/munge", "AuthInfo=cred_expire=5", "SchedulerParameters=bf_interval=1,sched_interval=1",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "JobAcctGatherType=jobacct_gather/none",
        "MpiDefault=none", "ReturnToService=2", "SchedulerType=sched/backfill",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        f"StateSaveLocation={folder}/state", f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid", f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log", f"SlurmdLogFile={folder}/slurmd.log",
        f"NodeName={host} CPUs={cpus} RealMemory=4000 State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])


@dataclass
class Cluster:
    folder: Path
    conf: Path
    processes: list = field(default_factory=list)

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, check: bool = True) -> str:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, check=check, timeout=60).stdout

    def state(self, job: str) -> str:
        """The job's state (PENDING, RUNNING, ...) as scontrol shows it; '' once it has left the queue."""
        out = self.run("scontrol", "show", "job", job, "--oneliner", check=False)
        return next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), "")

    def stop(self) -> None:
        for p in self.processes:
            p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        subprocess.run(["pkill", "-f", f"slurmstepd.*{self.folder}"], check=False)


def start(folder: Path) -> Cluster:
    """slurmctld and slurmd in the foreground (-D) with their config, state and logs in `folder`; returns once
    sinfo shows the node idle. Raises RuntimeError naming the log to read when it does not come up."""
    start_munge()
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, host, os.cpu_count() or 1))
    cluster = Cluster(folder, conf)
    for daemon in ("slurmctld", "slurmd"):
        log = open(folder / f"{daemon}.out", "w")
        cluster.processes.append(subprocess.Popen([daemon, "-D", "-f", str(conf)], env=cluster.env,
                                                  stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in cluster.processes):
            break
        states = cluster.run("sinfo", "--noheader", "--format=%T", check=False).split()
        if states and all(s == "idle" for s in states):
            return cluster
        time.sleep(0.5)
    cluster.stop()
    raise RuntimeError(f"SLURM did not come up within 60 s: see {folder}/slurmctld.log and slurmd.log")
