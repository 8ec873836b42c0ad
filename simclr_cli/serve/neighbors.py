"""`simclr neighbors`: the most similar images to each query by cosine similarity on h.

The search is `search.top_k_cosine`: it walks the index in chunks and keeps a running top-k per query, so a
million-row index (a memory-mapped vectors.npy) costs one (queries x chunk) block at a time, never a
(queries x N) matrix.
The index is either a vectors.npy (+ paths.txt) or a .csv that `simclr embed` wrote, or a folder of images
embedded here with the encoder (to a temporary .npy on disk, then mapped like any other).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from simclr_cli.data.images import decode_image
from simclr_cli.errors import DatasetError, OptionError
from simclr_cli import figures
from simclr_cli.serve.embed import embed_paths, resolve_encoder, resolve_paths
from simclr_cli.serve.inference import Inference
from simclr_cli.serve.search import top_k_cosine
from simclr_cli.serve.vectors import open_npy, read_csv, read_paths
from simclr_cli.files import check_output_path
from simclr_cli.models.encoder_file import LoadedEncoder
from simclr_cli.runtime import Callback

GRID_QUERIES, GRID_PIXELS = 20, 96  # --grid draws the first 20 queries, each image at 96 x 96


@dataclass
class Index:
    vectors: np.ndarray  # (N, D) float rows, often memory-mapped
    paths: list[str]  # the image of each row


def load_index(vectors: str | Path, paths: str | Path | None = None) -> Index:
    """A .npy (memory-mapped; its paths file: `paths`, default paths.txt beside it) or a .csv (loaded)."""
    vectors = Path(vectors)
    if vectors.suffix.lower() == ".csv":
        names, values = read_csv(vectors)
        if not names:
            raise DatasetError(f"{vectors} has no rows: embed some images into it first")
        return Index(values, names)
    array = open_npy(vectors)
    paths = Path(paths) if paths is not None else vectors.parent / "paths.txt"
    return Index(array, read_paths(paths, array.shape[0], vectors))


@contextlib.contextmanager
def embedded(loaded: LoadedEncoder, paths: Sequence[Path], opts: dict, stage: str,
             callback: Callback) -> Iterator[Index]:
    """`paths` embedded with the encoder into a temporary .npy on disk (removed after), mapped as an Index."""
    def staged(event: str, data: dict) -> None:
        callback(event, {"stage": stage, **data})

    with tempfile.TemporaryDirectory(prefix="simclr-neighbors-") as tmp:
        file = Path(tmp) / "vectors.npy"
        with open(file, "wb") as fp:
            kept, _ = embed_paths(loaded, paths, fp, True, callback=staged, **opts)
        yield Index(np.load(file, mmap_mode="r"), [str(p) for p in kept])


def find_neighbors(queries: str | Path, index: str | Path, *, encoder: str | Path | None = None,
                   paths: str | Path | None = None, k: int = 5, batch_size: int = 256, num_workers: int = 2,
                   skip_bad: bool = False, device: str = "auto", precision: str = "fp32",
                   grid: str | Path | None = None, callback: Callback | None = None) -> list[dict]:
    """For each query image, its k most similar images of `index` (a folder of images, or a vectors.npy /
    .csv that `simclr embed` wrote): [{"query", "neighbors": [{"path", "similarity"}]}], in query order.
    The queries are embedded with the encoder (the one that made the index); fp32 by default, as embed.
    `grid`: also draw the first queries and their neighbours to this PNG."""
    if k < 1:
        raise OptionError(f"-k must be >= 1, got {k}")
    if grid is not None:
        check_output_path(grid, "neighbors.png")
        figures.require()
    callback = callback or (lambda event, data: None)
    index = Path(index).expanduser()
    if not index.exists():
        raise DatasetError(f"index {index} does not exist: give a folder of images or the vectors.npy of "
                           "`simclr embed`")
    stored = None if index.is_dir() else load_index(index, paths)  # checked before any image is decoded
    query_paths = resolve_paths(queries)
    run = Inference(device, precision)
    loaded = run.load(resolve_encoder(encoder))
    if stored is not None and stored.vectors.shape[1] != loaded.feature_dim:
        raise DatasetError(f"{index} has {stored.vectors.shape[1]} values per row but the encoder gives "
                           f"{loaded.feature_dim}: pass the encoder that made the index, or embed with the same encoder")
    opts = {"run": run, "batch_size": batch_size, "num_workers": num_workers, "skip_bad": skip_bad}
    callback("start", {"queries": len(query_paths), "index": str(index), "dim": loaded.feature_dim,
                       "device": str(run.device), "precision": run.precision, "notes": loaded.notes})
    with contextlib.ExitStack() as stack:
        if stored is None:
            stored = stack.enter_context(embedded(loaded, resolve_paths(index), opts, "index", callback))
        asked = stack.enter_context(embedded(loaded, query_paths, opts, "queries", callback))
        callback("stage", {"stage": "search", "rows": len(stored.paths)})
        sims, rows = top_k_cosine(asked.vectors, stored.vectors, k)
    results = [{"query": q, "neighbors": [{"path": stored.paths[r], "similarity": round(float(s), 6)}
                                          for s, r in zip(srow.tolist(), rrow.tolist())]}
               for q, srow, rrow in zip(asked.paths, sims, rows)]
    if grid is not None:
        callback("stage", {"stage": "grid", "path": str(grid)})
        draw_grid(results, grid)
    return results


def _thumbnail(path: str) -> np.ndarray:
    try:
        return decode_image(path, GRID_PIXELS).numpy()
    except DatasetError:  # gone or damaged since it was embedded: a grey square keeps the grid's shape
        return np.full((3, GRID_PIXELS, GRID_PIXELS), 128, dtype=np.uint8)


def _short(path: str, chars: int = 22) -> str:
    """The file's folder and name (class folders make names like 0001.jpg repeat), cut from the left."""
    text = "/".join(Path(path).parts[-2:])
    return text if len(text) <= chars else "…" + text[-chars + 1:]


def draw_grid(results: Sequence[dict], path: str | Path) -> Path:
    """The first GRID_QUERIES queries, each followed by its neighbours with their similarity and name."""
    rows = [{"image": _thumbnail(r["query"]), "caption": _short(r["query"]),
             "neighbors": [{"image": _thumbnail(n["path"]), "caption": f"{n['similarity']:.3f}\n{_short(n['path'])}"}
                           for n in r["neighbors"]]} for r in results[:GRID_QUERIES]]
    shown = f"the first {GRID_QUERIES} of {len(results)} queries" if len(results) > GRID_QUERIES else "each query"
    return figures.neighbors_grid(rows, path, f"{shown} and its nearest images by cosine on h")
