"""The `simclr` commands that show what an encoder learned: `report` (figures of a run) and `neighbors`
(most similar images). Plain functions with their options; `cli.py` registers them on the app."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from simclr_cli import display
from simclr_cli.cli_options import DeviceOption, NumWorkersOption, PrecisionOption, handle_errors, quiet_on_broken_pipe

REPORT_EXAMPLE = "Example: simclr report runs/quickstart  (then open runs/quickstart/report/index.html)"
NEIGHBORS_EXAMPLE = "Example: simclr neighbors query.jpg --index vectors.npy --paths paths.txt -k 5 --grid nn.png"


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

    from simclr_cli.neighbors import find_neighbors

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
