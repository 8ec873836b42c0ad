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
import typer.core
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from simclr_cli import __version__

console = Console(stderr=True)
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
            console.print(f"[red]error:[/red] {err.format_message().rstrip('.')}{where}", highlight=False,
                          soft_wrap=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            console.print("aborted", highlight=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="simclr",
    cls=OneLineErrors,
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
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps. Default: auto (pretrain: the config's train.device).", show_default=False)]
PrecisionOption = Annotated[Optional[str], typer.Option("--precision", help="auto (bf16 where the hardware runs it fast, else fp32) | fp32 | bf16 (pretrain also fp16). Default: fp32 for embed (the same vectors on any machine), auto for probe (speed), the config's train.precision for pretrain.", show_default=False)]


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
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see examples/).")] = None,
    overrides: SetOption = [],
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Run directory (default: the config's train.output_dir).")] = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the output directory from its checkpoint.pt.")] = False,
    nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="Processes on this machine, e.g. --nproc 4 for 4 GPUs: starts torchrun with the same options; train.batch_size stays the global batch.")] = None,
) -> None:
    """Self-supervised pretraining: writes config.yaml, metrics.jsonl, checkpoint.pt and encoder.pth."""
    import shlex

    from simclr_cli.config import load_config, read_yaml, config_from_dict, merge_overrides
    from simclr_cli.interrupt import EXIT_CODES, ForcedStop, StopRequested
    from simclr_cli.train import NonFiniteLoss, pretrain as run_pretrain

    flags = list(overrides)
    # Dedicated flags are taken as typed (never read as YAML): "runs/exp #3" keeps its "#3", "42" is a folder.
    values = {key: str(value) for key, value in (("train.output_dir", output_dir), ("train.device", device),
                                                 ("train.precision", precision)) if value is not None}
    display = PretrainDisplay(is_main_process())
    say = console.print if is_main_process() else (lambda *args, **kwargs: None)  # once, not once per rank
    with handle_errors():
        cfg = load_config(config, flags, values)
        saved_config = Path(cfg.train.output_dir) / "config.yaml"
        if config is None and resume and saved_config.is_file():  # resume the run as it was configured
            cfg = config_from_dict(merge_overrides(read_yaml(saved_config), flags, values))
        if nproc is not None and nproc > 1:
            from simclr_cli.launch import forwarded_args, launch_pretrain

            result = launch_pretrain(nproc, forwarded_args(ctx.command.params, ctx.params, {"nproc"}), cfg, resume)
            if result.message:
                console.print(f"[red]error:[/red] {result.message}", highlight=False, soft_wrap=True)
            raise typer.Exit(result.exit_code)
        resume_hint = f"simclr pretrain --resume --output-dir {shlex.quote(cfg.train.output_dir)}"
        try:
            summary = run_pretrain(cfg, resume=resume, callback=display)
        except StopRequested as stop:
            display.stop()
            if stop.saved:
                what = f"at step {stop.step}; checkpoint written to {stop.checkpoint}. Resume with: {resume_hint}"
            elif stop.checkpoint:
                what = f"at step {stop.step}; {stop.checkpoint} is unchanged. Resume with: {resume_hint}"
            else:
                what = "before the first checkpoint; nothing to resume (run the same command to start again)"
            say(f"[yellow]stopped by {stop.signal_name}[/yellow] {what}", highlight=False, soft_wrap=True)
            raise typer.Exit(stop.exit_code)
        except (ForcedStop, KeyboardInterrupt) as err:  # a second signal, or Ctrl-C before training was set up
            display.stop()
            name = getattr(err, "signal_name", "SIGINT")
            say(f"[yellow]stopped at once by {name}[/yellow]; the last checkpoint in "
                          f"{cfg.train.output_dir} (if any) is intact. Resume with: {resume_hint}",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_CODES[name])
        except NonFiniteLoss as err:
            display.stop()
            say(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(3)
        finally:
            display.stop()
    if is_main_process():
        final = f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-"
        knn = f", kNN top-1 {100 * summary['knn_top1']:.2f}%" if summary.get("knn_top1") is not None else ""
        console.print(f"done: {summary['epochs']} epochs, final loss {final}{knn}; "
                      f"encoder {summary['encoder']}, checkpoint {summary['checkpoint']}", highlight=False)


@app.command(epilog="Example: simclr embed photos/ --encoder runs/simclr/encoder.pth --paths paths.txt > vectors.npy")
def embed(
    images: Annotated[Path, typer.Argument(help="A folder of images (searched recursively, sorted by path), one image, or a text file listing image paths, one per line (relative to the list file).", show_default=False)],
    encoder: Annotated[Optional[Path], typer.Option("--encoder", "-e", help="Encoder file (from `simclr extract`), checkpoint or ResNet state dict. Default: encoder.pth in the working directory.", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the .npy to this file (atomically) instead of stdout.", show_default=False)] = None,
    paths: Annotated[Optional[Path], typer.Option("--paths", help="Also write each row's image path, one per line, in row order.", show_default=False)] = None,
    normalize: Annotated[bool, typer.Option("--normalize", help="L2-normalise each row (cosine similarity becomes a dot product).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 256,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave out files that do not decode (and out of --paths) instead of failing.")] = False,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Image-decoding worker processes (0: decode in this process).")] = 2,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
) -> None:
    """Embed images as a float32 .npy of shape (N, D): the encoder's representation h, row i for image i.

    The array goes to stdout when it is redirected, or to -o FILE; never to a terminal. A file that does
    not decode is reported by path and nothing is written (exit 2); --skip-bad leaves such files out.
    """
    from rich.progress import MofNCompleteColumn

    from simclr_cli.embed import embed_images

    progress = Progress(TextColumn("embed"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
                        disable=not console.is_terminal)  # in a log, a bar would only leave blank lines
    task = progress.add_task("embed", total=None)

    def show(event: str, d: dict) -> None:
        if event == "start":
            console.print(f"embedding {d['images']} images at {d['image_size']} px into h of {d['dim']} "
                          f"({d['kind']}; {d['device']}, {d['precision']})", highlight=False, soft_wrap=True)
            for note in d["notes"]:
                console.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
            progress.update(task, total=d["images"])
            progress.start()
        elif event == "bad":
            progress.console.print(f"[yellow]bad image:[/yellow] {d['path']} ({d['reason']})", highlight=False,
                                   soft_wrap=True)
        elif event == "progress":
            progress.update(task, completed=d["done"])

    sys.stdout.flush()
    with handle_errors():
        try:
            result = embed_images(images, encoder, output, sys.stdout.buffer, paths_out=paths, normalize=normalize,
                                  batch_size=batch_size, workers=workers, skip_bad=skip_bad, device=device or "auto",
                                  precision=precision or "fp32", callback=show)
        except BrokenPipeError:  # the reader left (`| head`): stop quietly, as cat does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            raise typer.Exit(1)
        finally:
            progress.stop()
    skipped = f"; left out {len(result.failures)} bad images" if result.failures else ""
    console.print(f"embedded {result.rows} images -> {result.output}: ({result.rows}, {result.dim}) float32, "
                  f"{result.images_per_s:.0f} images/s{skipped}", highlight=False, soft_wrap=True)  # one line, for logs


TORCHVISION_LOAD_HINT = ("m = torchvision.models.{arch}(){stem}; m.fc = torch.nn.Identity(); "
                         "m.load_state_dict(torch.load('{path}', weights_only=True), strict=True)")


@app.command(epilog="Example: simclr extract runs/simclr/checkpoint.pt -o encoder.pth  "
                    "(or --format torchvision -o resnet18.pth)")
def extract(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint.pt that `simclr pretrain` wrote (final or mid-run).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the encoder (atomically).")] = Path("encoder.pth"),
    fmt: Annotated[str, typer.Option("--format", help="native: self-describing encoder file with head and provenance | torchvision: plain state dict for torchvision's ResNet (width 64 only).")] = "native",
) -> None:
    """Write the encoder of a pretraining checkpoint alone, for probe, embed or torchvision."""
    from simclr_cli.checkpoint import extract_encoder

    with handle_errors():
        info = extract_encoder(checkpoint, output, fmt)
    p = info["provenance"]
    console.print(f"wrote {info['path']} ({info['format']}): {info['arch']}, {info['stem']} stem, width {info['width']}, "
                  f"h of {info['feature_dim']}, {info['image_size']}px; from epoch {p.get('epoch')} step "
                  f"{p.get('step')} on {p.get('dataset')} (config {p.get('config_digest')})", highlight=False,
                  soft_wrap=True)
    if info["format"] == "torchvision":
        stem = "; m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); m.maxpool = torch.nn.Identity()" \
            if info["stem"] == "cifar" else ""
        console.print("load it with: " + TORCHVISION_LOAD_HINT.format(arch=info["arch"], stem=stem, path=info["path"]),
                      highlight=False, soft_wrap=True, markup=False)


class ProbeDisplay:
    """Panel with the encoder recognised, a transient progress bar per extraction, a line per stage."""

    def __init__(self) -> None:
        from rich.progress import MofNCompleteColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, transient=True)
        self.tasks: dict = {}

    def __call__(self, event: str, data: dict) -> None:
        getattr(self, f"on_{event}", lambda d: None)(data)

    def on_start(self, d: dict) -> None:
        e, ds = d["encoder"], d["dataset"]
        grid = Table.grid(padding=(0, 2))
        rows = {"encoder": f"{e['path']}: recognised as {e['kind']}",
                "model": f"{e['arch']}, {e['stem']} stem, width {e['width']}, "
                         + (f"h of {e['feature_dim']}" if not d["layer"] else f"head layer {d['layer']}"),
                "input": f"{e['image_size']}px, mean {tuple(round(m, 4) for m in e['mean'])}, "
                         f"std {tuple(round(s, 4) for s in e['std'])}",
                "dataset": f"{ds['name']}: {ds['train_size']} train, {ds['test_size']} test, {ds['num_classes']} classes",
                "device": f"{d['device']}, {d['precision']}"}
        if e["provenance"]:
            p = e["provenance"]
            rows["from"] = f"epoch {p.get('epoch')}, step {p.get('step')} on {p.get('dataset')}, seed {p.get('seed')}"
        for key, value in rows.items():
            grid.add_row(f"[bold]{key}[/bold]", value)
        console.print(Panel(grid, title=f"simclr probe {__version__}", expand=False), highlight=False)
        for note in [*e["notes"], *d["notes"]]:
            console.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
        self.progress.start()

    def on_extract(self, d: dict) -> None:
        import time

        key = (d["model"], d["split"])
        if key not in self.tasks:
            self.tasks[key] = (self.progress.add_task(f"{d['model']} {d['split']}", total=d["total"], rate="-"),
                               time.perf_counter())
        task, t0 = self.tasks[key]
        self.progress.update(task, completed=d["done"], rate=f"{d['done'] / max(time.perf_counter() - t0, 1e-9):.0f}")

    def on_stage(self, d: dict) -> None:
        self.progress.console.print(f"{d['model']}: {d['message']}...", highlight=False)

    def stop(self) -> None:
        self.progress.stop()


def probe_table(report: dict) -> Table:
    table = Table(title=f"{report['dataset']['name']} test split ({report['dataset']['test_size']} images)")
    for col in ("encoder", "linear top-1", "linear top-5", "kNN top-1", "L2 (held-out)", "extract img/s"):
        table.add_column(col, justify="left" if col == "encoder" else "right")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    for name, r in report["results"].items():
        table.add_row(name.replace("_", " "), pct(r["linear_top1"]), pct(r["linear_top5"]), pct(r["knn_top1"]),
                      f"{r['weight_decay']:g}", f"{r['images_per_s']:.0f}")
    return table


@app.command(epilog="Example: simclr probe runs/simclr/encoder.pth --dataset cifar10 --baseline --json probe.json")
def probe(
    encoder: Annotated[Path, typer.Argument(help="Encoder file, checkpoint.pt, torchvision ResNet state dict, or the original design's nn.Sequential state dict.", show_default=False)],
    dataset: Annotated[str, typer.Option("--dataset", help="cifar10 | cifar100 | folder (DIR/train/<class>/*, DIR/test/<class>/*, or DIR/<class>/* split 80/20) | synthetic.")] = "cifar10",
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Folder holding cifar-10-batches-py/ or cifar-100-python/, or the image folder (default: $SIMCLR_DATA_DIR or ~/.cache/simclr-cli/data).", show_default=False)] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write every figure, the encoder's provenance and timings to this JSON file.", show_default=False)] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Probe an untrained encoder of the same architecture instead (seeded like the pretraining).")] = False,
    baseline: Annotated[bool, typer.Option("--baseline", help="Probe the encoder and its random-init twin, side by side.")] = False,
    layer: Annotated[int, typer.Option("--layer", min=0, help="0: the representation h; k: after the first k projection-head blocks.")] = 0,
    download: Annotated[bool, typer.Option("--download", help="Fetch CIFAR with torchvision when it is missing.")] = False,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, help="Seed of a flat folder's 80/20 split and of the held-out 10% that picks the L2 strength. Default: the encoder's pretraining train.seed, so the test images are the ones pretraining held out.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass during extraction.")] = 512,
    synthetic_size: Annotated[int, typer.Option("--synthetic-size", min=2, hidden=True, help="Images per split of the synthetic dataset (tests, demos).")] = 2000,
) -> None:
    """Linear probe and kNN on frozen features: fit on the train split, report on the test split."""
    import json

    from simclr_cli.checkpoint import atomic_write_text, check_output_path
    from simclr_cli.evaluate import run_probe

    display = ProbeDisplay()
    with handle_errors():
        if json_path is not None:  # before minutes of extraction, not after
            check_output_path(json_path, "probe.json")
        try:
            report = run_probe(encoder, dataset, data_dir, device=device or "auto", precision=precision or "auto",
                               batch_size=batch_size, layer=layer, seed=seed,
                               random_init=random_init, baseline=baseline, download=download,
                               synthetic_size=synthetic_size, callback=display)
        finally:
            display.stop()
        if json_path is not None:
            atomic_write_text(json.dumps(report, indent=2) + "\n", json_path)
    console.print(probe_table(report))
    t = report["timing"]
    console.print(f"done in {t['total_s']:.1f} s (loading {t['load_s']:.1f} s)"
                  + (f"; report {json_path}" if json_path is not None else ""), highlight=False)


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
