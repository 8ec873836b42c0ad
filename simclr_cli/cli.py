"""The `simclr` command: a thin Typer layer that parses options, calls one core function, shows the result.

stdout carries data only (`simclr embed images/ > vectors.npy`); panels, progress bars and errors go to
stderr. A user's mistake is one line naming the fix and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from simclr_cli import __version__

console = Console(stderr=True)
app = typer.Typer(
    name="simclr",
    help="SimCLR self-supervised learning of image representations: pretrain, extract, probe, embed.\n\n"
         "Example: simclr pretrain --config examples/quickstart.yaml",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

USER_ERROR_EXIT = 2

# Shared options, defined once.
SetOption = Annotated[list[str], typer.Option("--set", help="Override a config key, e.g. --set optim.lr=0.5 (repeatable).")]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps (default: the config's).")]


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean the user gave something wrong: shown as one line, exit code 2."""
    from simclr_cli.checkpoint import CheckpointError
    from simclr_cli.config import ConfigError
    from simclr_cli.data import DatasetError
    from simclr_cli.runtime import RuntimeSetupError

    return ConfigError, DatasetError, CheckpointError, RuntimeSetupError, FileNotFoundError


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Turn the core's user-facing errors into one red line and a non-zero exit."""
    try:
        yield
    except user_errors() as err:
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(USER_ERROR_EXIT)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


class PretrainDisplay:
    """Rich panel at start, one progress bar over all steps, and a line per epoch; rank 0 only."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress: Progress | None = None
        self.task = None

    def __call__(self, event: str, data: dict) -> None:
        if not self.enabled:
            return
        getattr(self, f"on_{event}", lambda d: None)(data)

    def on_start(self, d: dict) -> None:
        table = Table.grid(padding=(0, 2))
        for key, value in d["info"].items():
            table.add_row(f"[bold]{key}[/bold]", str(value))
        console.print(Panel(table, title=f"simclr pretrain {__version__}", expand=False))
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]} views/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)
        total = d["epochs"] * d["steps_per_epoch"]
        self.task = self.progress.add_task("pretrain", total=total, completed=d["step"], epoch=d["start_epoch"] + 1,
                                           epochs=d["epochs"], loss="-", lr="-", rate="-")
        self.progress.start()

    def on_log(self, d: dict) -> None:
        self.progress.update(self.task, completed=d["step"], epoch=d["epoch"], loss=f"{d['loss']:.4f}",
                             lr=f"{d['lr']:.3g}", rate=f"{d['views_per_s']:.0f}")

    def on_epoch(self, d: dict) -> None:
        self.progress.console.print(f"epoch {d['epoch']}: loss {d['loss']:.4f}  lr {d['lr']:.3g}", highlight=False)

    def on_eval(self, d: dict) -> None:
        self.progress.console.print(f"epoch {d['epoch']}: kNN top-1 {100 * d['knn_top1']:.2f}%", highlight=False)

    def on_notice(self, d: dict) -> None:
        console.print(f"[yellow]note:[/yellow] {d['message']}", highlight=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@app.command(epilog="Example: simclr pretrain --config examples/quickstart.yaml --set train.epochs=5")
def pretrain(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see examples/).")] = None,
    overrides: SetOption = [],
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Run directory (default: the config's train.output_dir).")] = None,
    device: DeviceOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the output directory from its checkpoint.pt.")] = False,
) -> None:
    """Self-supervised pretraining: writes config.yaml, metrics.jsonl, checkpoint.pt and encoder.pth."""
    from simclr_cli.config import load_config, read_yaml, config_from_dict, merge_overrides
    from simclr_cli.interrupt import StopRequested
    from simclr_cli.train import NonFiniteLoss, pretrain as run_pretrain

    flags = list(overrides)
    if output_dir is not None:
        flags.append(f"train.output_dir={output_dir}")
    if device is not None:
        flags.append(f"train.device={device}")
    display = PretrainDisplay(is_main_process())
    with handle_errors():
        if config is None and resume and output_dir is not None and (output_dir / "config.yaml").exists():
            cfg = config_from_dict(merge_overrides(read_yaml(output_dir / "config.yaml"), flags))
        else:
            cfg = load_config(config, flags)
        try:
            summary = run_pretrain(cfg, resume=resume, callback=display)
        except StopRequested as stop:
            display.stop()
            console.print(f"[yellow]stopped by {stop.signal_name}[/yellow]; checkpoint written. Resume with: "
                          f"simclr pretrain --resume --output-dir {cfg.train.output_dir}", highlight=False)
            raise typer.Exit(stop.exit_code)
        except NonFiniteLoss as err:
            display.stop()
            console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(3)
        finally:
            display.stop()
    if is_main_process():
        console.print(f"done: {summary['epochs']} epochs, final loss {summary['final_loss']:.4f}; "
                      f"encoder {summary['encoder']}, checkpoint {summary['checkpoint']}", highlight=False)


def _show_version(value: bool) -> None:
    if value:
        print(f"simclr-cli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """SimCLR self-supervised learning of image representations: pretrain, extract, probe, embed."""


def main() -> None:
    app()
