"""The `simclr` commands that use a trained encoder: `extract` (the encoder alone, in a format of
`exports.extract`), `probe` (kNN and linear on frozen features), `embed` (images -> vectors), `report`
(figures of a run) and `neighbors` (most similar images). Plain functions with their options; `cli.app`
registers them on the app."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from simclr_cli.cli import display
from simclr_cli.cli.options import (DataRootOption, DatasetOption, DeviceOption, DownloadOption, NumWorkersOption,
                                    PrecisionOption, SyntheticSizeOption, handle_errors, quiet_on_broken_pipe)
from simclr_cli.data import DataOptions


def export_help() -> str:
    """`--format`'s help: each format of registry.EXPORTS (plugins included) with its one line."""
    from simclr_cli.exports.extract import formats

    return " | ".join(f"{f.name}: {f.help}" for f in formats()) + "."


EXTRACT_EXAMPLE = 'Example: simclr extract runs/simclr/checkpoint.pt -o encoder.pth  (or --format onnx -o encoder.onnx)'
PROBE_EXAMPLE = 'Example: simclr probe runs/simclr/encoder.pth --dataset cifar10 --baseline --json probe.json'
EMBED_EXAMPLE = 'Example: simclr embed photos/ --encoder runs/simclr/encoder.pth --paths paths.txt > vectors.npy  (or --format csv > embeddings.csv)'
REPORT_EXAMPLE = "Example: simclr report runs/quickstart  (then open runs/quickstart/report/index.html)"
NEIGHBORS_EXAMPLE = "Example: simclr neighbors query.jpg --index vectors.npy --paths paths.txt -k 5 --grid nn.png"


def extract(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint.pt that `simclr pretrain` wrote (final or mid-run); for onnx, torchscript and safetensors also an encoder.pth, and for onnx and torchscript a classifier.pth from `simclr finetune`.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the encoder (atomically).")] = Path("encoder.pth"),
    fmt: Annotated[str, typer.Option("--format", help=export_help())] = "native",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset version to write (--format onnx).")] = 18,
) -> None:
    """Write the encoder of a pretraining checkpoint alone, for probe, embed, torchvision, timm or other runtimes."""
    from simclr_cli.exports.extract import extract_encoder

    with handle_errors():
        info = extract_encoder(checkpoint, output, fmt, opset=opset)
    display.extracted(info)


def probe(
    encoder: Annotated[Path, typer.Argument(help="Encoder file, checkpoint.pt, torchvision ResNet state dict, or the original design's nn.Sequential state dict.", show_default=False)],
    dataset: DatasetOption = DataOptions.dataset,
    data_root: DataRootOption = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write every figure, the encoder's provenance and timings to this JSON file.", show_default=False)] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Probe an untrained encoder of the same architecture instead (seeded like the pretraining).")] = False,
    baseline: Annotated[bool, typer.Option("--baseline", help="Probe the encoder and its random-init twin, side by side.")] = False,
    layer: Annotated[int, typer.Option("--layer", min=0, help="0: the representation h; k: after the first k projection-head blocks.")] = 0,
    download: DownloadOption = DataOptions.download,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, help="Seed of a flat folder's 80/20 split and of the held-out 10% that picks the L2 strength. Default: the encoder's pretraining train.seed, so the test images are the ones pretraining held out.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass during extraction.")] = 512,
    split: Annotated[str, typer.Option("--split", help="test: fit on the train split, report on the test split | val: fit on the train split less a fixed 5,000-image validation split and report on that (for choosing recipes; keep test for the final number).")] = "test",
    labels: Annotated[str, typer.Option("--labels", help="Fit on a class-balanced share of the training labels: 1%, 10%, a count per class, or all (the subsets simclr finetune takes).")] = "all",
    labels_seed: Annotated[int, typer.Option("--labels-seed", min=0, help="Seed of the --labels subset (simclr finetune's --seed picks the same one).")] = 0,
    synthetic_size: SyntheticSizeOption = DataOptions.synthetic_size,
) -> None:
    """Linear probe and kNN on frozen features: fit on the train split, report on the test split."""
    import json

    from simclr_cli.score.probe import run_probe
    from simclr_cli.files import atomic_write_text, check_output_path

    shown = display.ProbeDisplay()
    with handle_errors():
        if json_path is not None:  # before minutes of extraction, not after
            check_output_path(json_path, "probe.json")
        try:
            report = run_probe(encoder, dataset, data_root, device=device or "auto", precision=precision or "auto",
                               batch_size=batch_size, layer=layer, seed=seed, random_init=random_init,
                               baseline=baseline, download=download, synthetic_size=synthetic_size, split=split,
                               labels=labels, labels_seed=labels_seed, callback=shown)
        finally:
            shown.stop()
        if json_path is not None:
            atomic_write_text(json.dumps(report, indent=2) + "\n", json_path)
    display.probe_done(report, json_path)


def embed(
    images: Annotated[str, typer.Argument(help="A folder of images (searched recursively, sorted by path), one image, a text file listing image paths, one per line (relative to the list file), or tar shards: a folder `simclr shards` wrote, a .tar path or URL with brace ranges (s3://bucket/train-{0000..0099}.tar); rows in shard order, named URL#KEY.", show_default=False)],
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
    from simclr_cli.serve.embed import embed_images

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


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory `simclr pretrain` wrote (its train.output_dir), finished, stopped or still going.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for the figures and index.html. Default: RUN_DIR/report.", show_default=False)] = None,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", "--data-dir", help="Where the run's dataset is now, when not at its data.root.", show_default=False)] = None,
    map_method: Annotated[str, typer.Option("--map", help="auto (t-SNE where scikit-learn is installed, else PCA) | tsne | pca.")] = "auto",
    map_points: Annotated[int, typer.Option("--map-points", min=1, help="Test images on the map (a fixed random subset).")] = 5000,
    queries: Annotated[int, typer.Option("--queries", min=1, help="Rows of the neighbour grid: the first test image of each of this many classes.")] = 10,
    k: Annotated[int, typer.Option("-k", min=1, help="Neighbours per query in the grid.")] = 8,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Use a fixed random subset of this many images per split (faster; the kNN figure then differs from the monitor's).", show_default=False)] = None,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also write the scalars as TensorBoard event files into the report's tensorboard/ (needs the tensorboard extra).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 512,
    num_workers: NumWorkersOption = 2,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
) -> None:
    """Figures of a run as PNGs and one offline index.html: curves, a 2-D map of the test split, neighbours."""
    from simclr_cli.report import make_report

    shown = display.StagedDisplay("report")
    with handle_errors():
        try:
            result = make_report(run_dir, output=output, data_root=data_root, device=device or "auto",
                                 precision=precision or "auto", map_method=map_method, map_points=map_points,
                                 queries=queries, k=k, limit=limit, batch_size=batch_size, num_workers=num_workers,
                                 tensorboard=tensorboard, callback=shown)
        finally:
            shown.stop()
    display.report_done(result)


def neighbors(
    queries: Annotated[Path, typer.Argument(help="Query images: a folder, one image, or a text file listing paths.", show_default=False)],
    index: Annotated[Path, typer.Option("--index", "-i", help="Where to search: a folder of images (embedded now with the encoder), or the vectors.npy / .csv `simclr embed` wrote.", show_default=False)],
    paths: Annotated[Optional[Path], typer.Option("--paths", help="The paths file of a .npy index, as `simclr embed --paths` wrote it. Default: paths.txt beside the .npy.", show_default=False)] = None,
    encoder: Annotated[Optional[Path], typer.Option("--encoder", "-e", help="The encoder that made the index (it embeds the queries). Default: encoder.pth in the working directory.", show_default=False)] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Neighbours per query.")] = 5,
    grid: Annotated[Optional[Path], typer.Option("--grid", help="Also draw the first 20 queries and their neighbours to this PNG (needs the report extra).", show_default=False)] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave out files that do not decode instead of failing.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 256,
    num_workers: NumWorkersOption = 2,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
) -> None:
    """The k most similar images to each query, by cosine on h, as JSON lines on stdout.

    One line per query: {"query": PATH, "neighbors": [{"path": PATH, "similarity": S}, ...]}, best first.
    """
    import json

    from simclr_cli.serve.neighbors import find_neighbors

    shown = display.StagedDisplay("neighbors")
    with handle_errors():
        try:
            results = find_neighbors(queries, index, encoder=encoder, paths=paths, k=k, batch_size=batch_size,
                                     num_workers=num_workers, skip_bad=skip_bad, device=device or "auto",
                                     precision=precision or "fp32", grid=grid, callback=shown)
        finally:
            shown.stop()
    with quiet_on_broken_pipe():
        for result in results:
            sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    if grid is not None:
        display.line(f"grid: {grid}")
