"""The `simclr` command: a thin Typer layer; each command parses its options, calls one core function and
hands the result to `display`.

stdout carries data only (`simclr embed images/ > vectors.npy`); panels, progress bars and errors go to
stderr. A user's mistake is one line naming the fix and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from simclr_cli import __version__, cli_pictures, display
from simclr_cli.cli_options import (DeviceOption, NumWorkersOption, PrecisionOption, SetOption, handle_errors,
                                    quiet_on_broken_pipe)

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
    help="SimCLR self-supervised learning of image representations: pretrain, extract, probe, embed, report, "
         "neighbors.\n\n"
         "Example: simclr pretrain --config examples/quickstart.yaml",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0

@app.command(epilog="Example: simclr pretrain --config examples/quickstart.yaml --set train.epochs=5")
def pretrain(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see examples/).")] = None,
    overrides: SetOption = [],
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Run directory (default: the config's train.output_dir).")] = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the output directory from its checkpoint.pt.")] = False,
    auto_resume: Annotated[bool, typer.Option("--auto-resume", help="Continue from the output directory's checkpoint.pt when there is one, else start: for jobs that restart themselves (torchrun --max-restarts, a requeued cluster job).")] = False,
    nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="Processes on this machine, e.g. --nproc 4 for 4 GPUs: starts torchrun with the same options; train.batch_size stays the global batch.")] = None,
) -> None:
    """Self-supervised pretraining: writes config.yaml, metrics.jsonl, checkpoint.pt and encoder.pth."""
    from simclr_cli.rundir import resolve_config

    # Dedicated flags are taken as typed (never read as YAML): "runs/exp #3" keeps its "#3", "42" is a folder.
    values = {key: str(value) for key, value in (("train.output_dir", output_dir), ("train.device", device),
                                                 ("train.precision", precision)) if value is not None}
    with handle_errors():
        cfg, resume = resolve_config(config, list(overrides), values, resume, auto_resume)
        if nproc is not None and nproc > 1:
            from simclr_cli.launch import forwarded_args, launch_pretrain

            result = launch_pretrain(nproc, forwarded_args(ctx.command.params, ctx.params, {"nproc"}), cfg, resume)
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

    from simclr_cli.interrupt import EXIT_CODES, ForcedStop, StopRequested
    from simclr_cli.train import NonFiniteLoss, pretrain as run_pretrain

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


@app.command(epilog="Example: simclr embed photos/ --encoder runs/simclr/encoder.pth --paths paths.txt > vectors.npy  "
                    "(or --format csv > embeddings.csv)")
def embed(
    images: Annotated[Path, typer.Argument(help="A folder of images (searched recursively, sorted by path), one image, or a text file listing image paths, one per line (relative to the list file).", show_default=False)],
    encoder: Annotated[Optional[Path], typer.Option("--encoder", "-e", help="Encoder file (from `simclr extract`), checkpoint or ResNet state dict. Default: encoder.pth in the working directory.", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the .npy to this file (atomically) instead of stdout.", show_default=False)] = None,
    paths: Annotated[Optional[Path], typer.Option("--paths", help="Also write each row's image path, one per line, in row order.", show_default=False)] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="npy: float32 (N, D) array | csv: one row per image, the path then the D values, under a header. Default: csv when -o ends in .csv, else npy.", show_default=False)] = None,
    normalize: Annotated[bool, typer.Option("--normalize", help="L2-normalise each row (cosine similarity becomes a dot product).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 256,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave out files that do not decode (and out of --paths) instead of failing.")] = False,
    num_workers: NumWorkersOption = 2,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
) -> None:
    """Embed images as a float32 .npy of shape (N, D): the encoder's representation h, row i for image i
    (or, with --format csv, a csv of path and values per image).

    The array goes to stdout when it is redirected, or to -o FILE; never a .npy to a terminal. A file that does
    not decode is reported by path and nothing is written (exit 2); --skip-bad leaves such files out.
    """
    from simclr_cli.embed import embed_images

    shown = display.EmbedDisplay()
    sys.stdout.flush()
    with handle_errors():
        try:
            with quiet_on_broken_pipe():
                result = embed_images(images, encoder, output, sys.stdout.buffer, paths_out=paths,
                                      normalize=normalize, batch_size=batch_size, num_workers=num_workers,
                                      skip_bad=skip_bad, device=device or "auto", precision=precision or "fp32",
                                      fmt=fmt, callback=shown)
        finally:
            shown.stop()
    shown.done(result)  # one line, for logs


@app.command(epilog="Example: simclr extract runs/simclr/checkpoint.pt -o encoder.pth  "
                    "(or --format torchvision -o resnet18.pth)")
def extract(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint.pt that `simclr pretrain` wrote (final or mid-run).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the encoder (atomically).")] = Path("encoder.pth"),
    fmt: Annotated[str, typer.Option("--format", help="native: self-describing encoder file with head and provenance | torchvision: plain state dict for torchvision's ResNet (width 64 only).")] = "native",
) -> None:
    """Write the encoder of a pretraining checkpoint alone, for probe, embed or torchvision."""
    from simclr_cli.encoder_file import extract_encoder

    with handle_errors():
        info = extract_encoder(checkpoint, output, fmt)
    display.extracted(info)


@app.command(epilog="Example: simclr probe runs/simclr/encoder.pth --dataset cifar10 --baseline --json probe.json")
def probe(
    encoder: Annotated[Path, typer.Argument(help="Encoder file, checkpoint.pt, torchvision ResNet state dict, or the original design's nn.Sequential state dict.", show_default=False)],
    dataset: Annotated[str, typer.Option("--dataset", help="cifar10 | cifar100 | folder (DIR/train/<class>/*, DIR/test/<class>/*, or DIR/<class>/* split 80/20) | synthetic.")] = "cifar10",
    data_root: Annotated[Optional[Path], typer.Option("--data-root", "--data-dir", help="Folder holding cifar-10-batches-py/ or cifar-100-python/, or the image folder, as data.root (default: $SIMCLR_DATA_DIR or ~/.cache/simclr-cli/data).", show_default=False)] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write every figure, the encoder's provenance and timings to this JSON file.", show_default=False)] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Probe an untrained encoder of the same architecture instead (seeded like the pretraining).")] = False,
    baseline: Annotated[bool, typer.Option("--baseline", help="Probe the encoder and its random-init twin, side by side.")] = False,
    layer: Annotated[int, typer.Option("--layer", min=0, help="0: the representation h; k: after the first k projection-head blocks.")] = 0,
    download: Annotated[bool, typer.Option("--download", help="Fetch CIFAR with torchvision when it is missing.")] = False,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, help="Seed of a flat folder's 80/20 split and of the held-out 10% that picks the L2 strength. Default: the encoder's pretraining train.seed, so the test images are the ones pretraining held out.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass during extraction.")] = 512,
    split: Annotated[str, typer.Option("--split", help="test: fit on the train split, report on the test split | val: fit on the train split less a fixed 5,000-image validation split and report on that (for choosing recipes; keep test for the final number).")] = "test",
    synthetic_size: Annotated[int, typer.Option("--synthetic-size", min=2, hidden=True, help="Images per split of the synthetic dataset (tests, demos).")] = 2000,
) -> None:
    """Linear probe and kNN on frozen features: fit on the train split, report on the test split."""
    import json

    from simclr_cli.files import atomic_write_text, check_output_path
    from simclr_cli.probe import run_probe

    shown = display.ProbeDisplay()
    with handle_errors():
        if json_path is not None:  # before minutes of extraction, not after
            check_output_path(json_path, "probe.json")
        try:
            report = run_probe(encoder, dataset, data_root, device=device or "auto", precision=precision or "auto",
                               batch_size=batch_size, layer=layer, seed=seed, random_init=random_init,
                               baseline=baseline, download=download, synthetic_size=synthetic_size, split=split,
                               callback=shown)
        finally:
            shown.stop()
        if json_path is not None:
            atomic_write_text(json.dumps(report, indent=2) + "\n", json_path)
    display.probe_done(report, json_path)


# After the four core commands, so --help lists them in the order a user meets them.
app.command("report", epilog=cli_pictures.REPORT_EXAMPLE)(cli_pictures.report)
app.command("neighbors", epilog=cli_pictures.NEIGHBORS_EXAMPLE)(cli_pictures.neighbors)


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
