"""The `simclr predict` command: a classifier file (`simclr finetune`) and images in, a CSV of classes and
probabilities out on stdout or -o; its progress display, on stderr. `cli.app` registers it on the app."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from simclr_cli.cli import display
from simclr_cli.cli.options import DeviceOption, NumWorkersOption, PrecisionOption, handle_errors, quiet_on_broken_pipe

PREDICT_EXAMPLE = "Example: simclr predict runs/finetune/classifier.pth photos/ -k 3 > predictions.csv"


class PredictDisplay(display.EmbedDisplay):
    """embed's display (a transient bar on a terminal, a line per bad image) with predict's first and last
    lines; all on stderr."""

    def __init__(self) -> None:
        super().__init__("predict")

    def on_start(self, d: dict) -> None:
        neck = f", from head layer {d['head_layer']}" if d["head_layer"] else ""
        display.line(f"classifying {d['images']} images at {d['image_size']} px into {d['classes']} classes, "
                     f"top {d['top_k']}{neck} ({d['device']}, {d['precision']})")

    @staticmethod
    def done(result) -> None:
        skipped = f"; left out {len(result.failures)} bad images" if result.failures else ""
        display.line(f"predicted {result.rows} images -> {result.output}: top {result.top_k} of "
                     f"{result.classes} classes, {result.images_per_s:.0f} images/s{skipped}")


def predict(
    classifier: Annotated[Path, typer.Argument(help="The classifier file `simclr finetune` wrote (not an encoder file).", show_default=False)],
    images: Annotated[Path, typer.Argument(help="A folder of images (searched recursively, sorted by path), one image, or a text file listing image paths, one per line (relative to the list file).", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the CSV to this file (atomically) instead of stdout.", show_default=False)] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes per image, most probable first: path,class,probability for 1, else path,class_1,probability_1,...")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 256,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave out files that do not decode instead of failing.")] = False,
    num_workers: NumWorkersOption = 2,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
) -> None:
    """Classify images with a fine-tuned classifier: one CSV row per image, its path, class and probability
    (softmax, 6 decimals), or the top k with -k.

    The CSV goes to stdout or to -o FILE; progress and the summary to stderr. A file that does not decode is
    reported by path and nothing is written to -o (exit 2); --skip-bad leaves such files out. Precision
    defaults to fp32, so the same classifier gives the same answer on any machine.
    """
    from simclr_cli.serve.predict import predict_images

    shown = PredictDisplay()
    sys.stdout.flush()
    with handle_errors():
        try:
            with quiet_on_broken_pipe():
                result = predict_images(classifier, images, output, sys.stdout.buffer, top_k=top_k,
                                        batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad,
                                        device=device or "auto", precision=precision or "fp32", callback=shown)
        finally:
            shown.stop()
    shown.done(result)  # one line, for logs
