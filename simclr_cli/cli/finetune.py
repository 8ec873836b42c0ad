"""`simclr finetune`: options, the Rich panel, progress and table of a fine-tuning run (`score.finetune`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from simclr_cli import __version__
from simclr_cli.cli import display
from simclr_cli.cli.options import (DataRootOption, DatasetOption, DeviceOption, DownloadOption, NumWorkersOption,
                                    PrecisionOption, SyntheticSizeOption, handle_errors)
from simclr_cli.data import DataOptions

FINETUNE_EXAMPLE = ("Example: simclr finetune runs/cpu/encoder.pth --labels 1% --compare -o classifier.pth  "
                    "(then simclr predict classifier.pth photos/)")
ROWS = {"pretrained": "fine-tuned from the encoder", "random_init": "fine-tuned from random init",
        "linear_probe": "linear probe (encoder frozen)"}


class FinetuneDisplay:
    """A panel, a transient bar of epochs per model with its loss, a line per model's result."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                                 console=display.console, transient=True)
        self.tasks: dict = {}

    def __call__(self, event: str, data: dict) -> None:
        getattr(self, f"on_{event}", lambda d: None)(data)

    def on_start(self, d: dict) -> None:
        s, p, ds = d["subset"], d["protocol"], d["dataset"]
        grid = Table.grid(padding=(0, 2))
        rows = {"encoder": d["encoder"] + (f", from head layer {d['head_layer']}" if d["head_layer"] else ""),
                "labels": f"{s['labels']}: {s['images']} of {ds['train_size']} {ds['name']} training images, "
                          f"{s['classes']} classes, seed {s['seed']} (subset {s['digest']})",
                "protocol": f"{p['epochs']} epochs, batch {p['batch_size']}, SGD lr {p['lr']:g} (cosine), momentum "
                            f"{p['momentum']:g} Nesterov, weight decay {p['weight_decay']:g}, crops >= "
                            f"{p['crop_scale_min']:g} and flips",
                "scored on": f"the {ds['evaluated_on']} split, {ds['test_size']} images",
                "device": f"{d['device']}, {d['precision']}" + (" (resumed)" if d["resumed"] else "")}
        for key, value in rows.items():
            grid.add_row(f"[bold]{key}[/bold]", value)
        display.console.print(Panel(grid, title=f"simclr finetune {__version__}", expand=False), highlight=False)
        for message in d["notes"]:
            display.note(message)
        self.progress.start()

    def on_epoch(self, d: dict) -> None:
        if d["model"] not in self.tasks:
            self.tasks[d["model"]] = self.progress.add_task(ROWS[d["model"]], total=d["epochs"], loss="-")
        self.progress.update(self.tasks[d["model"]], completed=d["epoch"], loss=f"{d['loss']:.4f}")

    def on_model(self, d: dict) -> None:
        if d["model"] == "linear_probe":
            self.progress.console.print("linear probe on the same labels...", highlight=False)

    def on_result(self, d: dict) -> None:
        self.progress.console.print(f"{ROWS[d['model']]}: top-1 {100 * d['top1']:.2f}% ({d['seconds']:.0f} s)",
                                    highlight=False)

    def stop(self) -> None:
        self.progress.stop()


def table(report: dict) -> Table:
    ds, s = report["dataset"], report["subset"]
    out = Table(title=f"{ds['name']} {ds['evaluated_on']} split ({ds['test_size']} images), {s['labels']} of the "
                      f"labels ({s['images']} images)")
    for col in ("model", "top-1", "top-5", "seconds"):
        out.add_column(col, justify="left" if col == "model" else "right")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    for name, r in report["results"].items():
        out.add_row(ROWS[name], pct(r["top1"]), pct(r.get("top5")), f"{r['seconds']:.0f}")
    return out


def finetune(
    encoder: Annotated[Path, typer.Argument(help="The pretrained encoder: an encoder.pth or a run's checkpoint.pt.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the classifier file (atomically).")] = Path("classifier.pth"),
    labels: Annotated[str, typer.Option("--labels", help="The labelled training images used, class-balanced: 1%, 10%, a count per class, or all.")] = "10%",
    dataset: DatasetOption = DataOptions.dataset,
    data_root: DataRootOption = None,
    split: Annotated[str, typer.Option("--split", help="test: report on the test split (once, for the final number) | val: fit on the train split less its 5,000-image validation split and report on that (for choosing settings).")] = "test",
    compare: Annotated[bool, typer.Option("--compare", help="Also fine-tune a randomly initialised network and fit the linear probe, on the same labels: one table.")] = False,
    from_head_layer: Annotated[int, typer.Option("--from-head-layer", min=0, help="Fine-tune from this layer of the projection head (SimCLR v2: 1); 0: from h.")] = 0,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Default: 60 for 1% of the labels or fewer, 30 for more (the paper's).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 256,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate, decayed by a cosine. Default: 0.05 x batch / 256 (the paper's).", show_default=False)] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="L2 on the weights (the paper: none).")] = 0.0,
    crop_scale_min: Annotated[float, typer.Option("--crop-scale-min", help="Smallest random crop, as a share of the image.")] = 0.08,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the label subset (simclr probe --labels-seed picks the same), the new layer and the augmentations.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted fine-tune of --output from its last epoch.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write every figure to this JSON file.", show_default=False)] = None,
    download: DownloadOption = DataOptions.download,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    num_workers: NumWorkersOption = DataOptions.num_workers,
    synthetic_size: SyntheticSizeOption = DataOptions.synthetic_size,
) -> None:
    """Fine-tune the whole encoder and a linear classifier on a few labels; write a classifier for simclr predict."""
    from simclr_cli.score.finetune import FinetuneOptions, partial_path, run_finetune
    from simclr_cli.files import atomic_write_text, check_output_path

    shown = FinetuneDisplay()
    opts = FinetuneOptions(dataset=dataset, root=None if data_root is None else str(data_root), download=download,
                           synthetic_size=synthetic_size, num_workers=num_workers, labels=labels, split=split,
                           seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, momentum=0.9,
                           weight_decay=weight_decay, crop_scale_min=crop_scale_min, head_layer=from_head_layer,
                           compare=compare, device=device or "auto", precision=precision or "auto", resume=resume)
    with handle_errors():
        if json_path is not None:
            check_output_path(json_path, "finetune.json")
        try:
            report = run_finetune(encoder, output, opts, callback=shown)
        except KeyboardInterrupt:
            shown.stop()
            partial = partial_path(output.expanduser())
            display.line(f"interrupted: {'continue with --resume' if partial.exists() else 'nothing to resume yet'}")
            raise typer.Exit(130)
        finally:
            shown.stop()
        if json_path is not None:
            atomic_write_text(json.dumps(report, indent=2, default=str), json_path)
    display.console.print(table(report))
    display.line(f"wrote {report['output']}: the fine-tuned classifier (simclr predict {report['output']} IMAGES)")
