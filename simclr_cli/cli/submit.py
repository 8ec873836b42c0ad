"""`simclr submit`: `simclr pretrain` as a SLURM batch job (`train.slurm`): the same config options, the job's
resources, and `--dry-run` to read the script first. The job id goes to stdout (`job=$(simclr submit ...)`),
what was submitted and where its log is to stderr."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from simclr_cli.cli import display
from simclr_cli.cli.options import ConfigOption, DeviceOption, PrecisionOption, SetOption, handle_errors, run_flags

SUBMIT_EXAMPLE = ("Example: simclr submit --config examples/cifar10.yaml --nnodes 2 --gpus-per-node 4 "
                  "--cpus-per-node 32 --mem 128G --time 12:00:00 --partition gpu --dry-run")


def submit(
    config: ConfigOption = None,
    overrides: SetOption = [],
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Run directory (default: the config's train.output_dir); the job's files go to its slurm/ folder.")] = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="The job continues the run in the output directory from its checkpoint.pt.")] = False,
    nnodes: Annotated[int, typer.Option("--nnodes", "--nodes", min=1, help="Machines (SLURM nodes); on several, torchrun's c10d rendezvous runs on the first.")] = 1,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", min=0, help="GPUs on each node, one process each (0: CPU processes, --nproc of them).")] = 0,
    nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="Processes on each node without GPUs (default 1).", show_default=False)] = None,
    cpus_per_node: Annotated[Optional[int], typer.Option("--cpus-per-node", min=1, help="CPUs on each node, for its processes and their data workers (sbatch --cpus-per-task).", show_default=False)] = None,
    mem: Annotated[Optional[str], typer.Option("--mem", help="Memory on each node, e.g. 64G.", show_default=False)] = None,
    time_limit: Annotated[Optional[str], typer.Option("--time", help="Time limit: MINUTES, HH:MM:SS or DAYS-HH:MM:SS; the job checkpoints and requeues itself --signal-before seconds before it.", show_default=False)] = None,
    partition: Annotated[Optional[str], typer.Option("--partition", "-p", show_default=False)] = None,
    account: Annotated[Optional[str], typer.Option("--account", "-A", show_default=False)] = None,
    qos: Annotated[Optional[str], typer.Option("--qos", show_default=False)] = None,
    job_name: Annotated[Optional[str], typer.Option("--job-name", help="Default: simclr-<run directory's name>.", show_default=False)] = None,
    signal_before: Annotated[int, typer.Option("--signal-before", min=1, help="Seconds before the time limit SLURM signals the job (SIGUSR1): every rank stops after its step, the checkpoint is written, the job requeues itself.")] = 120,
    sbatch: Annotated[list[str], typer.Option("--sbatch", help="A further sbatch option, e.g. --sbatch=--constraint=a100 (repeatable).")] = [],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the job script to stdout; write and submit nothing.")] = False,
) -> None:
    """Pretraining as a SLURM job that checkpoints and requeues itself before its time limit; writes its script,
    config, job id and log into the run directory's slurm/ folder."""
    from simclr_cli.train.preflight import resolve_config
    from simclr_cli.train.slurm import Resources, check_job, job_script, submit as submit_job

    values, workdir = run_flags(output_dir, device, precision), Path.cwd()
    with handle_errors():
        cfg, resume = resolve_config(config, list(overrides), values, resume)
        res = Resources(nnodes, gpus_per_node, nproc, cpus_per_node, mem, time_limit, partition, account, qos,
                        job_name, signal_before, list(sbatch))
        check_job(cfg, res, resume, workdir)
        if dry_run:
            print(job_script(cfg, res, workdir), end="")
            display.line("dry run: nothing written, nothing submitted")
            return
        done = submit_job(cfg, res, workdir, shlex.join(["simclr", *sys.argv[1:]]))
    display.line(f"submitted SLURM job {done.job_id}: {res.nodes} node{'s' * (res.nodes > 1)} x {res.processes} "
                 f"process{'es' * (res.processes > 1)}; log {done.log}, script {done.script}")
    display.line(f"it checkpoints and requeues itself {res.signal_before_s} s before its time limit; "
                 f"follow: tail -f {shlex.quote(str(done.log))}; stop: scancel {done.job_id}")
    print(done.job_id)
