"""Nearest neighbours by cosine similarity on h: what `simclr neighbors` and the report's grid answer.

`top_k_cosine` walks the index in chunks and keeps a running top-k per query, so a million-row index (a
memory-mapped vectors.npy) costs one (queries x chunk) block at a time, never a (queries x N) matrix.
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
import torch
import torch.nn.functional as F

from simclr_cli.embed import embed_paths, resolve_encoder, resolve_paths
from simclr_cli.encoder_file import LoadedEncoder, load_encoder
from simclr_cli.errors import DatasetError, OptionError
from simclr_cli.features import for_inference
from simclr_cli.files import check_output_path
from simclr_cli.images import decode_image
from simclr_cli import plots
from simclr_cli.runtime import INFERENCE_PRECISIONS, Callback, pick_device, resolve_precision
from simclr_cli.vectors import open_npy, read_csv, read_paths

BLOCK_ELEMENTS = 1 << 24  # similarities held at once: 16 M floats (64 MB), whatever the index's size
QUERY_BLOCK = 4096  # queries compared per pass over the index
GRID_QUERIES, GRID_PIXELS = 20, 96  # --grid draws the first 20 queries, each image at 96 x 96


def _normalized(rows: np.ndarray | torch.Tensor) -> torch.Tensor:
    # a copy of the chunk: rows of a read-only memory map must not become a tensor that aliases them
    x = torch.from_numpy(np.array(rows, dtype=np.float32)) if not isinstance(rows, torch.Tensor) else rows.float()
    return F.normalize(x, dim=1)  # a zero row stays zero: similarity 0 to everything


def top_k_cosine(queries: torch.Tensor | np.ndarray, index: np.ndarray | torch.Tensor, k: int,
                 block_elements: int = BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """The k rows of `index` (N, D) most similar to each query (Q, D) by cosine: (similarities (Q, k),
    row numbers (Q, k)), best first. k is capped at N. `index` may be a memory-mapped array: it is read
    in chunks of rows, each compared with a block of queries, and only the running top-k is kept."""
    n, k = index.shape[0], min(k, index.shape[0])
    if queries.shape[1] != index.shape[1]:
        raise DatasetError(f"the queries have {queries.shape[1]} values per row but the index {index.shape[1]}: "
                           "embed both with the same encoder")
    q_all = _normalized(queries)  # (Q, D)
    sims, rows = [], []
    for q0 in range(0, q_all.shape[0], QUERY_BLOCK):
        q = q_all[q0:q0 + QUERY_BLOCK]  # (Qb, D)
        chunk = max(k, block_elements // max(len(q), 1))
        best_s = torch.empty((len(q), 0))
        best_i = torch.empty((len(q), 0), dtype=torch.int64)
        for start in range(0, n, chunk):
            s = q @ _normalized(index[start:start + chunk]).T  # (Qb, C)
            top = s.topk(min(k, s.shape[1]), dim=1)
            cand_s = torch.cat([best_s, top.values], dim=1)  # (Qb, <= 2k)
            cand_i = torch.cat([best_i, top.indices + start], dim=1)
            keep = cand_s.topk(k, dim=1) if cand_s.shape[1] > k else cand_s.sort(dim=1, descending=True)
            best_s, best_i = keep.values, cand_i.gather(1, keep.indices)
        sims.append(best_s)
        rows.append(best_i)
    return torch.cat(sims), torch.cat(rows)


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
        plots.require()
    callback = callback or (lambda event, data: None)
    index = Path(index).expanduser()
    if not index.exists():
        raise DatasetError(f"index {index} does not exist: give a folder of images or the vectors.npy of "
                           "`simclr embed`")
    stored = None if index.is_dir() else load_index(index, paths)  # checked before any image is decoded
    query_paths = resolve_paths(queries)
    dev = pick_device(device)
    loaded = load_encoder(resolve_encoder(encoder))
    if stored is not None and stored.vectors.shape[1] != loaded.encoder.feature_dim:
        raise DatasetError(f"{index} has {stored.vectors.shape[1]} values per row but the encoder gives "
                           f"{loaded.encoder.feature_dim}: pass the encoder that made the index, or embed with the same encoder")
    loaded.encoder, _ = for_inference(loaded.encoder, None, dev)
    opts = {"device": dev, "precision": resolve_precision(precision, dev, INFERENCE_PRECISIONS),
            "batch_size": batch_size, "num_workers": num_workers, "skip_bad": skip_bad}
    callback("start", {"queries": len(query_paths), "index": str(index), "dim": loaded.encoder.feature_dim,
                       "device": str(dev), "precision": opts["precision"], "notes": loaded.notes})
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
    return plots.neighbour_grid(rows, path, f"{shown} and its nearest images by cosine on h")
