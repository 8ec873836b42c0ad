"""`simclr pretrain --nproc N` (`--nnodes M`): the same run on N processes of this machine (of each of M
machines), through torchrun's own launcher.

It is a shortcut for `torchrun --standalone --nproc_per_node N -m simclr_cli pretrain --config <the config this
command resolved>`: the launcher resolves the config once (file, --set, flags, --resume's saved config,
--auto-resume's choice) and hands every rank that config, written to a temporary file, and whether to resume.
The launcher runs in this process (`torch.distributed.run.main`) rather than as `python -m
torch.distributed.run`: one interpreter fewer to start, and a failed rank arrives as a `ChildFailedError`
object, so the user reads one line naming the rank and how it died instead of torchrun's failure table.
`--standalone` rendezvouses on a free local port, so two runs on one machine never fight over port 29500.
With `--nnodes N --rdzv-endpoint HOST:PORT` (`Nodes`) the same command on each machine joins torchrun's c10d
rendezvous instead, under an id derived from the output directory; `--max-restarts` is torchrun's.

When one rank dies, torchrun's agent stops the others at once (SIGTERM, SIGKILL after 30 s), so no rank
waits out the collective timeout (`train.dist_timeout_min`). Rank 0 alone writes checkpoints, by atomic rename, so the last
one stays whole whatever dies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from simclr_cli.config import Config, dump_config
from simclr_cli.errors import USER_ERROR_EXIT, ConfigError, RuntimeSetupError
from simclr_cli.rundir import RunDir
from simclr_cli.runtime import check_device_for_ranks, pick_device
from simclr_cli.train.interrupt import EXIT_CODES
from simclr_cli.train.preflight import check_names, check_world, preflight


@dataclass
class Nodes:
    """Several machines, each running the same `simclr pretrain --nnodes N --rdzv-endpoint HOST:PORT` command:
    torchrun's c10d rendezvous at `endpoint` joins them (the node whose address it names serves it)."""

    count: int = 1  # machines taking part
    endpoint: str | None = None  # HOST:PORT of the rendezvous, the same on every node
    timeout_s: float = 600.0  # seconds to wait for every node to join before giving up
    max_restarts: int = 0  # torchrun restarts every process of the run after a failure, this many times

    def argv(self, run_id: str) -> list[str]:
        """torchrun's arguments for these nodes (`--standalone` for one machine without restarts)."""
        if self.count == 1 and not self.endpoint:
            return ["--standalone", "--max-restarts", str(self.max_restarts)]
        return ["--nnodes", str(self.count), "--rdzv-backend", "c10d", "--rdzv-endpoint", str(self.endpoint),
                "--rdzv-id", run_id, "--rdzv-conf", f"join_timeout={self.timeout_s:g}",
                "--max-restarts", str(self.max_restarts)]

    def check(self) -> None:
        if self.count > 1 and not self.endpoint:
            raise ConfigError(f"--nnodes {self.count} needs --rdzv-endpoint HOST:PORT, the address of one of the "
                              "nodes, the same on every node (e.g. --rdzv-endpoint node0:29400)")
        if self.endpoint is not None:
            host, _, port = self.endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"--rdzv-endpoint {self.endpoint!r} is not HOST:PORT (e.g. node0:29400)")
        if self.timeout_s <= 0 or self.max_restarts < 0:
            raise ConfigError("--rdzv-timeout must be > 0 and --max-restarts >= 0")


@dataclass
class LaunchResult:
    exit_code: int
    message: str | None = None  # one line for the user when the run failed


def threads_per_process(nproc: int) -> int:
    """CPU threads each rank may use: the cores this process may run on, shared out (torchrun's default is 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // nproc)


def describe_failure(rank: int, exit_code: int) -> str:
    if exit_code < 0:
        try:
            how = f"was killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            how = f"was killed by signal {-exit_code}"
    else:
        how = f"exited with code {exit_code} (its error is printed above)"
    return f"rank {rank} {how}; torchrun stopped the other ranks"


def run_torchrun(nproc: int, module_args: list[str], nodes: Nodes | None = None,
                 run_id: str = "simclr") -> LaunchResult:
    """`torchrun --standalone --nproc_per_node nproc -m <module_args>` in this process (with `nodes`: their
    rendezvous and restarts instead); never raises for a rank's failure or a rendezvous that fails."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError

    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc)))
    # The agent warns about each failure and signal; the line the caller prints (or rank 0's) says the same.
    # Its loggers each set their own level, so the parent's level alone would not quiet them.
    for name, log in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("torch.distributed") and isinstance(log, logging.Logger):
            log.setLevel(logging.CRITICAL)
    # The agent looks at its ranks every 0.1 s (torch 2.3's default was 5 s: a rank that saw its killed peer
    # in the meantime and exited was then reported as the first failure, and the stop came seconds later).
    nodes = nodes or Nodes()
    if nodes.endpoint and nodes.max_restarts:
        # Sharing the agents' rendezvous store with the ranks (torch's default since 2.5) hangs a restarted node
        # in the next round: a node kept from the last round never publishes the new MASTER_ADDR
        # (pytorch/pytorch#135712, #147064); tests/test_nodes.py restarts a killed node with this set.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # SIGUSR1 stops a run as SIGTERM does (train.interrupt): the agent passes it on to the ranks too. It is what a
    # `simclr submit` job gets from SLURM before its time limit (train.slurm).
    argv = [*nodes.argv(run_id), "--monitor-interval", "0.1", "--signals-to-handle",
            "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--nproc_per_node", str(nproc), "-m", *module_args]
    try:
        torchrun.main(argv)
    except RendezvousTimeoutError:
        return LaunchResult(USER_ERROR_EXIT, f"the rendezvous at {nodes.endpoint} did not complete within "
                            f"{nodes.timeout_s:g} s (--rdzv-timeout): start the same command on each of the "
                            f"{nodes.count} nodes, and check that {nodes.endpoint} is reachable from every one")
    except RendezvousError as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        return LaunchResult(USER_ERROR_EXIT, f"the rendezvous at {nodes.endpoint} failed ({why}): check that "
                            "--rdzv-endpoint names a node every node can reach and a free port")
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()  # the earliest failure is the cause; the rest were stopped
        if failure.exitcode in (USER_ERROR_EXIT, *EXIT_CODES.values()):  # the rank printed its line already:
            return LaunchResult(failure.exitcode)  # the fix, or a stop by a signal that reached the ranks first
        code = failure.exitcode if failure.exitcode > 0 else 1
        return LaunchResult(code, describe_failure(rank, failure.exitcode))
    except SignalException as err:  # Ctrl-C or SIGTERM reached the launcher; it passed it on to every rank
        return LaunchResult(128 + int(err.sigval))
    return LaunchResult(0)


def launch_pretrain(nproc: int, cfg: Config, resume: bool = False, nodes: Nodes | None = None) -> LaunchResult:
    """Check what can be checked once here, then run `simclr pretrain` with this config on nproc local
    processes (on each of `nodes`). A mistake every rank would find is caught here, so it reads as one line
    rather than one per rank.
    """
    nodes = nodes or Nodes()
    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--nproc, --nnodes and --max-restarts start torchrun themselves: under torchrun, leave "
                          "them out")
    nodes.check()
    check_names(cfg)
    check_device_for_ranks(cfg.train.device, nproc * nodes.count)
    device = pick_device(cfg.train.device)
    check_world(cfg, nproc * nodes.count, device, local_size=nproc)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and nproc > gpus:  # NCCL refuses two ranks on one GPU, with a cryptic error
        raise RuntimeSetupError(f"--nproc {nproc} needs {nproc} GPUs, {gpus} visible: use --nproc {gpus} "
                                "(one process per GPU), or --device cpu")
    preflight(cfg, resume, load=False)  # the new-or-resume policy the ranks apply, once, before any starts
    with tempfile.TemporaryDirectory(prefix="simclr-launch-") as folder:
        resolved = Path(folder) / "config.yaml"
        resolved.write_text(dump_config(cfg))
        run_id = "simclr-" + hashlib.sha256(cfg.train.output_dir.encode()).hexdigest()[:16]  # alike on every node
        result = run_torchrun(nproc, ["simclr_cli", "pretrain", "--config", str(resolved),
                                      *(["--resume"] if resume else [])], nodes, run_id)
    checkpoint = RunDir(cfg.train.output_dir).checkpoint
    if result.message and checkpoint.exists():
        result.message += f"; the last checkpoint {checkpoint} is intact: add --resume to continue (any --nproc)"
    return result

