"""The `simclr shards` command: an image folder in, WebDataset tar shards and their index.json out
(`data.shards`); its progress display, on stderr. `cli.app` registers it on the app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from simclr_cli.cli import display
from simclr_cli.cli.options import handle_errors

SHARDS_EXAMPLE = "Example: simclr shards photos/ shards/ --max-size 1GB"
SKIPPED_SHOWN = 10  # skipped files named in the closing lines; all of them are in index.json


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


class ShardsDisplay:
    """A transient bar over the files (on a terminal only: in a log it would leave blank lines), a line per
    finished shard, and the closing lines, which name the files that did not decode. Nothing is printed before
    the first shard (but where a run goes on), so a folder where no image decodes is one error line."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("shards"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), console=display.console, transient=True,
                                 disable=not display.console.is_terminal)
        self.task = self.progress.add_task("shards", total=None)

    def __call__(self, event: str, d: dict) -> None:
        if event == "start":
            if d["shards"] and d["done"] == d["files"]:
                display.line(f"all {d['files']} files are in the {d['shards']} shards already written")
            elif d["shards"]:
                display.line(f"going on after the {d['shards']} shards already written ({d['done']} of "
                             f"{d['files']} files done)")
            self.progress.update(self.task, total=d["files"], completed=d["done"])
            self.progress.start()
        elif event == "progress":
            self.progress.update(self.task, completed=d["done"])
        elif event == "shard":
            self.progress.console.print(f"{escape(d['name'])}: {d['samples']} samples, {_size(d['bytes'])}",
                                        highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if not self.progress.disable:  # rich before 14.3 printed an empty line stopping a disabled bar
            self.progress.stop()

    @staticmethod
    def done(result) -> None:
        kept = f" ({result.resumed} from the earlier run)" if result.resumed else ""
        display.line(f"wrote {result.shards} shards{kept}: {result.samples} samples, {_size(result.bytes)}, "
                     f"{len(result.skipped)} skipped; index {result.index}")
        for path, reason in result.skipped[:SKIPPED_SHOWN]:
            display.line(f"  skipped {path} ({reason})")
        if len(result.skipped) > SKIPPED_SHOWN:
            display.line(f"  and {len(result.skipped) - SKIPPED_SHOWN} more, listed in {result.index}")


def shards(
    folder: Annotated[Path, typer.Argument(help="The image folder: FOLDER/<class>/*, FOLDER/train/ and FOLDER/test/ (two series), or unlabelled FOLDER/*.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="The folder for the shards and index.json: new, empty, or where the same command was interrupted.", show_default=False)],
    max_size: Annotated[str, typer.Option("--max-size", help="Largest shard: bytes, or with KB, MB, GB (1000s) or KiB, MiB, GiB (1024s).")] = "1GB",
    max_count: Annotated[Optional[int], typer.Option("--max-count", min=1, help="Most samples per shard. Default: no limit but --max-size.", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the sample order, which mixes the classes in each shard.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Remove the shards and index.json already in OUT (nothing else) and write anew.")] = False,
) -> None:
    """Pack an image folder into WebDataset tar shards plus OUT/index.json, for streaming data past one disk.

    Each sample is KEY.jpg|png|webp, KEY.cls (class subfolders only) and KEY.json (its path and class).

    Samples go in a seeded order that mixes the classes, into train-000000.tar, ... (and test-...).

    JPEG, PNG and WebP are copied as they are; BMP, GIF and TIFF are stored as PNG.

    A file that does not decode is skipped and named. Interrupted, the same command goes on.
    """
    from simclr_cli.data.shards import parse_size, write_shards

    shown = ShardsDisplay()
    with handle_errors():
        try:
            result = write_shards(folder, out, max_size=parse_size(max_size), max_count=max_count, seed=seed,
                                  overwrite=overwrite, progress=shown)
        except KeyboardInterrupt:
            display.line("stopped; the finished shards are kept: run the same command to go on")
            raise typer.Exit(130) from None
        finally:
            shown.stop()
    shown.done(result)
