"""`simclr submit`: pretraining as a SLURM batch job that checkpoints and requeues itself before its time runs out.

The engines are SLURM's and torchrun's; this module only writes what joins them, a batch script:

    #SBATCH lines        the resources (`Resources`), the log RUN/slurm/%j.log (appended to after a requeue),
                         --requeue, and --signal=B:USR1@S: SLURM signals the script S seconds before the limit
    srun                 one task per node, each `python -m simclr_cli pretrain --config RUN/slurm/config.yaml
                         --auto-resume` (with --nproc and, on several nodes, --nnodes and a c10d rendezvous on
                         the first node: torchrun's launcher, `train.launch`)
    trap USR1            passes the signal to every process of that step (`scancel --signal=USR1`): each rank
                         takes it as a stop (`train.interrupt`), the ranks agree on the step, rank 0 writes the
                         checkpoint; once the step has ended the script runs `scontrol requeue`, and the job
                         starts again later, resuming from checkpoint.pt (--auto-resume)

Submitting writes RUN/slurm/config.yaml (the resolved config every start of the job reads), job.sbatch and,
once sbatch accepted it, job.json (the job id, the log, the command); a refused submission leaves the folder
as it was. The run's start panel shows the job id, the restart count and the log (`job_facts`).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from simclr_cli.config import Config, dump_config
from simclr_cli.errors import ConfigError, RuntimeSetupError
from simclr_cli.files import atomic_write_text

STOP_SIGNAL = "USR1"
# sbatch options this module writes itself: given again through --sbatch they would contradict the script
OWNED = {"output", "error", "open-mode", "requeue", "no-requeue", "signal", "chdir", "nodes", "ntasks",
         "ntasks-per-node", "gpus-per-node", "cpus-per-task", "mem", "time", "partition", "account", "qos",
         "job-name"}
# job states of a job that is over (squeue shows them for a few minutes after its end)
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
         "OUT_OF_MEMORY", "REVOKED", "SPECIAL_EXIT"}
TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")  # MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
MEMORY = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
NAME = re.compile(r"^[A-Za-z0-9_.,:+-]+$")


def time_limit_s(text: str) -> int:
    """Seconds in a SLURM time limit; ConfigError naming the forms it takes otherwise."""
    m = TIME.match(text.strip())
    if not m or text.strip() in ("0", ""):
        raise ConfigError(f"--time {text!r} is no SLURM time limit: give MINUTES, HH:MM:SS or DAYS-HH:MM:SS "
                          "(e.g. --time 04:00:00)")
    days, first, second, third = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
    if third is not None:  # HH:MM:SS
        return first * 3600 + second * 60 + third
    return first * 60 + (second or 0)  # MM or MM:SS


@dataclass
class Resources:
    """What the job asks SLURM for; None: the cluster's default."""

    nodes: int = 1  # machines
    gpus_per_node: int = 0  # GPUs on each machine; one process each
    nproc: int | None = None  # processes on each machine (None: one per GPU, or 1 without GPUs)
    cpus_per_node: int | None = None  # CPUs on each machine, shared by its processes and their data workers
    mem: str | None = None  # memory on each machine, SLURM's form: 64G, 500M
    time: str | None = None  # time limit: MINUTES, HH:MM:SS, DAYS-HH:MM:SS
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    job_name: str | None = None  # None: simclr-<run directory's name>
    signal_before_s: int = 120  # seconds before the time limit SLURM signals the job to checkpoint and requeue
    extra: list[str] = field(default_factory=list)  # further sbatch options, e.g. "--constraint=a100"

    @property
    def processes(self) -> int:
        return self.nproc or self.gpus_per_node or 1

    def check(self) -> None:
        """Each value as SLURM would take it, before anything is written: one line naming the fix."""
        if self.time is not None and time_limit_s(self.time) <= self.signal_before_s:
            raise ConfigError(f"--signal-before {self.signal_before_s} s must be shorter than --time {self.time}: "
                              "the job would be told to stop as it starts")
        if self.mem is not None and not MEMORY.match(self.mem):
            raise ConfigError(f"--mem {self.mem!r} is no SLURM memory size: give a number with K, M, G or T "
                              "(e.g. --mem 64G)")
        for flag, value in (("--partition", self.partition), ("--account", self.account), ("--qos", self.qos),
                            ("--job-name", self.job_name)):
            if value is not None and not NAME.match(value):
                raise ConfigError(f"{flag} {value!r}: a SLURM name has letters, digits and _.,:+- only")
        if self.gpus_per_node and self.nproc and self.nproc != self.gpus_per_node:
            raise ConfigError(f"--nproc {self.nproc} with --gpus-per-node {self.gpus_per_node}: one process per "
                              "GPU, leave --nproc out")
        for line in self.extra:
            self._check_extra(line)

    @staticmethod
    def _check_extra(line: str) -> None:
        option = line.removeprefix("#SBATCH").strip()
        name = option.lstrip("-").split("=", 1)[0].split(" ", 1)[0]
        if not option.startswith("-") or "\n" in option:
            raise ConfigError(f"--sbatch {line!r} is no sbatch option: give one per --sbatch, e.g. "
                              "--sbatch=--constraint=a100")
        if name in OWNED:
            raise ConfigError(f"--sbatch {line!r}: simclr submit writes --{name} itself; use its own option "
                              f"(simclr submit --help)")

    def directives(self, run: Path, name: str) -> list[str]:
        """The #SBATCH lines."""
        given = [("job-name", self.job_name or name), ("nodes", self.nodes), ("ntasks-per-node", 1),
                 ("gpus-per-node", self.gpus_per_node or None), ("cpus-per-task", self.cpus_per_node),
                 ("mem", self.mem), ("time", self.time), ("partition", self.partition),
                 ("account", self.account), ("qos", self.qos),
                 ("output", run / "slurm" / "%j.log"), ("open-mode", "append"), ("requeue", None),
                 ("signal", f"B:{STOP_SIGNAL}@{self.signal_before_s}")]
        lines = [f"#SBATCH --{k}" + ("" if v is None else f"={v}") for k, v in given
                 if v is not None or k == "requeue"]
        return lines + [f"#SBATCH {line.removeprefix('#SBATCH').strip()}" for line in self.extra]


def pretrain_argv(config: Path, res: Resources) -> str:
    """The command every node runs (its rendezvous on the first node of the job, a port from the job id)."""
    argv = [sys.executable, "-m", "simclr_cli", "pretrain", "--config", str(config), "--auto-resume"]
    if res.processes > 1:
        argv += ["--nproc", str(res.processes)]
    text = shlex.join(argv)
    if res.nodes > 1:
        text += f' --nnodes {res.nodes} --rdzv-endpoint "$head:$port"'
    return text


def job_script(cfg: Config, res: Resources, workdir: Path) -> str:
    """The batch script for the run `cfg` describes."""
    run = Path(cfg.train.output_dir).resolve()
    config = run / "slurm" / "config.yaml"
    nodes = ['head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # the rendezvous: first node',
             "port=$((20000 + SLURM_JOB_ID % 20000))"] if res.nodes > 1 else []
    return "\n".join([
        "#!/bin/bash",
        f"# simclr submit: pretraining of {run} as a SLURM job that checkpoints and requeues itself",
        *res.directives(run, "simclr-" + re.sub(r"[^A-Za-z0-9_.-]", "_", run.name)),
        f"#SBATCH --chdir={workdir}",
        "",
        "set -u",
        f'export SIMCLR_SLURM_LOG={shlex.quote(str(run / "slurm"))}/"$SLURM_JOB_ID.log"',
        "requeue=0",
        f"on_signal() {{  # SLURM's SIG{STOP_SIGNAL}, {res.signal_before_s} s before the time limit",
        "    requeue=1",
        f'    echo "simclr: job $SLURM_JOB_ID got SIG{STOP_SIGNAL}: every rank stops after its step, rank 0 '
        'writes the checkpoint, then the job requeues itself"',
        f'    scancel --signal={STOP_SIGNAL} "$SLURM_JOB_ID"  # every process of the training step',
        "}",
        f"trap on_signal {STOP_SIGNAL}",
        *nodes,
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 "
        '${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \\',
        f"    {pretrain_argv(config, res)} &",
        "step=$!",
        'wait "$step"; code=$?',
        'while kill -0 "$step" 2>/dev/null; do wait "$step"; code=$?; done  # a trapped signal ends wait early',
        'if [ "$requeue" = 1 ]; then',
        f'    echo "simclr: requeueing job $SLURM_JOB_ID: it resumes from "{shlex.quote(str(run / "checkpoint.pt"))}',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$code"',
        ""])


@dataclass
class Submitted:
    job_id: str
    log: Path
    script: Path


def _sbatch() -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise RuntimeSetupError("sbatch was not found on PATH: run simclr submit on a SLURM cluster's login node "
                                "(or add --dry-run to print the job script without submitting it)")
    return sbatch


def check_not_queued(run: Path) -> None:
    """Refuse a second job on a run directory whose last job is still queued or running."""
    record = run / "slurm" / "job.json"
    if not record.is_file() or shutil.which("squeue") is None:
        return
    try:
        job = str(json.loads(record.read_text()).get("job_id", ""))
    except (ValueError, AttributeError):  # damaged or hand-edited: nothing to ask squeue about
        return
    if not job.isdigit():
        return
    state = subprocess.run(["squeue", "--noheader", "--jobs", job, "--format=%T"], capture_output=True,
                           text=True).stdout.strip()
    if state and state not in ENDED:
        raise ConfigError(f"job {job} of {run} is {state}: wait for it, or scancel {job} first, or choose another "
                          "--output-dir")


def check_job(cfg: Config, res: Resources, resume: bool, workdir: Path) -> None:
    """What the job would find wrong once it starts, asked before it is queued: the resources, the config's
    names, the batch over every process of every node, the device, a new run over another's checkpoint."""
    import torch

    from simclr_cli.train.preflight import check_names, check_world, preflight

    res.check()
    for what, path in (("the run directory", Path(cfg.train.output_dir).resolve()), ("the working directory", workdir)):
        if any(c.isspace() or c in "\"'" for c in str(path)):
            raise ConfigError(f"{what} {str(path)!r} has a space or quote, which #SBATCH lines cannot hold: choose "
                              "a path without them")
    check_names(cfg)
    if cfg.train.device.startswith("cuda") and not res.gpus_per_node:
        raise ConfigError(f"train.device {cfg.train.device} needs GPUs: add --gpus-per-node N, or --device cpu")
    device = torch.device("cuda" if res.gpus_per_node else "cpu")
    check_world(cfg, res.nodes * res.processes, device, local_size=res.processes)
    preflight(cfg, resume, load=False)


def submit(cfg: Config, res: Resources, workdir: Path, command: str) -> Submitted:
    """Write the job's config and script into RUN/slurm/, hand the script to sbatch and record the job; a refused
    submission leaves the folder as it was."""
    sbatch, run = _sbatch(), Path(cfg.train.output_dir).resolve()
    check_not_queued(run)
    folder = run / "slurm"
    made = [p for p in (run, folder) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    script, config = folder / "job.sbatch", folder / "config.yaml"
    before = {p: p.read_text() if p.is_file() else None for p in (script, config)}
    atomic_write_text(dump_config(cfg), config)
    atomic_write_text(job_script(cfg, res, workdir), script)
    done = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    job_id = done.stdout.strip().split(";")[0]
    if done.returncode != 0 or not job_id.isdigit():
        for path, text in before.items():  # the last job's files back, or none
            atomic_write_text(text, path) if text is not None else path.unlink(missing_ok=True)
        for path in reversed(made):
            path.rmdir()
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RuntimeSetupError(f"sbatch refused the job: {why.removeprefix('sbatch: error: ')}")
    log = folder / f"{job_id}.log"
    atomic_write_text(json.dumps({"job_id": job_id, "log": str(log), "script": str(script), "config": str(config),
                                  "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command},
                                 indent=1) + "\n", folder / "job.json")
    return Submitted(job_id, log, script)


def job_facts(environ: dict) -> dict:
    """The start panel's line about the SLURM job this process runs in ({} outside SLURM)."""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    restarts = int(environ.get("SLURM_RESTART_COUNT") or 0)
    log = environ.get("SIMCLR_SLURM_LOG")
    text = f"{job}" + (f" (requeued {restarts}x)" if restarts else "") + (f", log {log}" if log else "")
    return {"slurm job": text}
