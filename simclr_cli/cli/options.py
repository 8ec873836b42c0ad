"""What every `simclr` command shares: the option aliases (defined once), the user-error handler and the
quiet exit when stdout's reader goes away."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from simclr_cli.cli import display
from simclr_cli.data import sources
from simclr_cli.errors import USER_ERROR_EXIT, UserError

# Shared options, defined once. A flag for a config key has that key's name (data.root: --data-root).
ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see examples/).")]
SetOption = Annotated[list[str], typer.Option("--set", help="Override a config key, e.g. --set optim.lr=0.5 (repeatable).")]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps. Default: auto (pretrain: the config's train.device).", show_default=False)]
PrecisionOption = Annotated[Optional[str], typer.Option("--precision", help="auto (bf16 where the hardware runs it fast, else fp32) | fp32 | bf16 (pretrain also fp16). Default: fp32 for embed and predict (the same answer on any machine), auto for probe and finetune (speed), the config's train.precision for pretrain.", show_default=False)]
# The data an evaluation reads (data.DataOptions), described by the sources themselves: a source added to
# registry.SOURCES (or by a plugin) shows up here.
_SOURCES = sources()
DatasetOption = Annotated[str, typer.Option("--dataset", help="The data source, as data.dataset: " + " | ".join(f"{name} ({s.help})" for name, s in _SOURCES.items()) + ".")]
# a str, not a Path: a URL prefix (webdataset: s3://bucket/shards) must keep its "//"
DataRootOption = Annotated[Optional[str], typer.Option("--data-root", "--data-dir", help="The data root, as data.root: the folder the source reads (cifar10: the one holding cifar-10-batches-py/; folder: the image folder; webdataset: the folder or URL prefix of a simclr shards index). Default: $SIMCLR_DATA_DIR or ~/.cache/simclr-cli/data.", show_default=False)]
DownloadOption = Annotated[bool, typer.Option("--download", help=f"Let a source that downloads ({', '.join(n for n, s in _SOURCES.items() if s.downloads)}) fetch its data when it is missing.")]
SyntheticSizeOption = Annotated[int, typer.Option("--synthetic-size", min=2, hidden=True, help="Images per split of the synthetic dataset (tests, demos).")]
NumWorkersOption = Annotated[int, typer.Option("--num-workers", "--workers", min=0, help="Image-decoding worker processes (0: decode in this process), as data.num_workers.")]


def run_flags(output_dir: Path | None, device: str | None, precision: str | None) -> dict[str, str]:
    """pretrain's and submit's dedicated flags as config values, taken as typed (never read as YAML): "runs/exp
    #3" keeps its "#3", "42" is a folder."""
    return {key: str(value) for key, value in (("train.output_dir", output_dir), ("train.device", device),
                                                 ("train.precision", precision)) if value is not None}


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Turn the core's user errors into one red line and exit code 2."""
    try:
        yield
    except (UserError, FileNotFoundError) as err:
        display.error(str(err))
        raise typer.Exit(USER_ERROR_EXIT)


@contextlib.contextmanager
def quiet_on_broken_pipe() -> Iterator[None]:
    """The reader of stdout left (`| head`): stop quietly with exit code 1, as cat does."""
    try:
        yield
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        raise typer.Exit(1)
