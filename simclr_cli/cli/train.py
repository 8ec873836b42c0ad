"""`simclr pretrain`: options in, `train.pretrain` (or, with --nproc, --nnodes or --max-restarts,
`train.launch`) out, and the one line that a stop by signal or a non-finite loss ends with."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from simclr_cli.cli import display
from simclr_cli.cli.options import ConfigOption, DeviceOption, PrecisionOption, SetOption, handle_errors, run_flags
from simclr_cli.runtime import is_main_process

PRETRAIN_EXAMPLE = 'Example: simclr pretrain --config examples/quickstart.yaml --set train.epochs=5'


def pretrain(
    config: ConfigOption = None,
    overrides: SetOption = [],
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Run directory (default: the config's train.output_dir).")] = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the output directory from its checkpoint.pt.")] = False,
    auto_resume: Annotated[bool, typer.Option("--auto-resume", help="Continue from the output directory's checkpoint.pt when there is one, else start: for jobs that restart themselves (torchrun --max-restarts, a requeued cluster job). On several ranks, rank 0 decides for all.")] = False,
    nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="Processes on this machine, e.g. --nproc 4 for 4 GPUs: starts torchrun with the same options; train.batch_size stays the global batch.")] = None,
    nnodes: Annotated[int, typer.Option("--nnodes", min=1, help="Machines taking part, each running this same command (--nproc processes each), joined by torchrun's c10d rendezvous at --rdzv-endpoint.")] = 1,
    rdzv_endpoint: Annotated[Optional[str], typer.Option("--rdzv-endpoint", help="HOST:PORT of the rendezvous: one of the nodes, the same on every node (e.g. node0:29400).", show_default=False)] = None,
    rdzv_timeout: Annotated[float, typer.Option("--rdzv-timeout", help="Seconds to wait for every node to join before giving up with one line.")] = 600.0,
    max_restarts: Annotated[int, typer.Option("--max-restarts", min=0, help="After a failure torchrun restarts every process, this many times; with --auto-resume each restart continues from checkpoint.pt.")] = 0,
) -> None:
    """Self-supervised pretraining: writes config.yaml, metrics.jsonl, checkpoint.pt and encoder.pth."""
    from simclr_cli.train.preflight import resolve_config

    values = run_flags(output_dir, device, precision)
    with handle_errors():
        cfg, resume = resolve_config(config, list(overrides), values, resume, auto_resume)
        if (nproc or 1) > 1 or nnodes > 1 or rdzv_endpoint or max_restarts:
            from simclr_cli.train.launch import Nodes, launch_pretrain

            nodes = Nodes(nnodes, rdzv_endpoint, rdzv_timeout, max_restarts)
            result = launch_pretrain(nproc or 1, cfg, resume, nodes)
            if result.message:
                display.error(result.message)
            raise typer.Exit(result.exit_code)
        summary = _pretrain_until_done_or_stopped(cfg, resume)
    if is_main_process():
        display.pretrain_summary(summary)


def _pretrain_until_done_or_stopped(cfg, resume: bool) -> dict:
    """Run pretraining; a stop by signal or a non-finite loss becomes its own line and exit code (rank 0
    alone speaks: once, not once per rank)."""
    import shlex

    from simclr_cli.train import pretrain as run_pretrain
    from simclr_cli.train.interrupt import EXIT_CODES, ForcedStop, StopRequested
    from simclr_cli.train.readback import NonFiniteLoss

    main = is_main_process()
    shown = display.PretrainDisplay(main)
    resume_hint = f"simclr pretrain --resume --output-dir {shlex.quote(cfg.train.output_dir)}"
    try:
        return run_pretrain(cfg, resume=resume, callback=shown)
    except StopRequested as stop:
        shown.stop()
        if main:
            display.pretrain_stopped(stop, resume_hint)
        raise typer.Exit(stop.exit_code)
    except (ForcedStop, KeyboardInterrupt) as err:  # a second signal, or Ctrl-C before training was set up
        shown.stop()
        name = getattr(err, "signal_name", "SIGINT")
        if main:
            display.pretrain_stopped_at_once(name, cfg.train.output_dir, resume_hint)
        raise typer.Exit(EXIT_CODES[name])
    except NonFiniteLoss as err:
        shown.stop()
        if main:
            display.error(str(err))
        raise typer.Exit(3)
    finally:
        shown.stop()
