"""The `simclr` app: the Typer group, its commands registered in the order a user meets them, `--version`.
Each command (`cli/train.py`, `cli/evaluate.py`) parses its options, calls one core function and hands the
result to `display`.

stdout carries data only (`simclr embed images/ > vectors.npy`); panels, progress bars and errors go to
stderr. A user's mistake is one line naming the fix and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
import typer.core

from simclr_cli import __version__
from simclr_cli.cli import plugins

plugins.warn_in_one_line()  # before the commands' modules ask the registries (the --dataset help does)

from simclr_cli.cli import display, evaluate, finetune, predict, shards, submit, train  # noqa: E402

# The click that typer runs on: vendored as typer._click since typer 0.23, the click package before.
_click = getattr(typer.core, "_click", None) or __import__("click")


class OneLineErrors(typer.core.TyperGroup):
    """A usage mistake (`--seed -1`, a missing argument, an unknown option) is one line on stderr and exit
    code 2, like every other user error, instead of a usage box; `simclr` alone still shows the help."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)  # an Exit's code, or the command's None
        except _click.exceptions.NoArgsIsHelpError as err:
            err.show()
            sys.exit(err.exit_code)
        except _click.exceptions.ClickException as err:
            where = f"; see {err.ctx.command_path} --help" if getattr(err, "ctx", None) is not None else ""
            display.error(f"{err.format_message().rstrip('.')}{where}")
            sys.exit(err.exit_code)
        except typer.Abort:
            display.line("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="simclr",
    cls=OneLineErrors,
    help="SimCLR self-supervised learning of image representations: pretrain (submit: as a SLURM job), extract, "
         "probe, finetune, predict, embed, report, neighbors; shards packs an image folder into tar shards; list "
         "shows the methods, sources, backbones, formats and evaluations.\n\n"
         "Example: simclr pretrain --config examples/quickstart.yaml",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


# In the order a user meets them, which --help keeps: preparing the data (shards) comes before pretraining on it.
app.command("shards", epilog=shards.SHARDS_EXAMPLE)(shards.shards)
app.command("pretrain", epilog=train.PRETRAIN_EXAMPLE)(train.pretrain)
app.command("submit", epilog=submit.SUBMIT_EXAMPLE)(submit.submit)
app.command("embed", epilog=evaluate.EMBED_EXAMPLE)(evaluate.embed)
app.command("extract", epilog=evaluate.EXTRACT_EXAMPLE)(evaluate.extract)
app.command("probe", epilog=evaluate.PROBE_EXAMPLE)(evaluate.probe)
app.command("finetune", epilog=finetune.FINETUNE_EXAMPLE)(finetune.finetune)
app.command("predict", epilog=predict.PREDICT_EXAMPLE)(predict.predict)
app.command("report", epilog=evaluate.REPORT_EXAMPLE)(evaluate.report)
app.command("neighbors", epilog=evaluate.NEIGHBORS_EXAMPLE)(evaluate.neighbors)
app.command("list", epilog=plugins.LIST_EXAMPLE)(plugins.list_entries)


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
