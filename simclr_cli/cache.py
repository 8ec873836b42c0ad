"""A decoded image folder on disk: one uint8 array (N, 3, S, S) plus an index, decoded once, mapped after.

The first use of a folder at S pixels decodes it in DataLoader workers into CACHE/<name>-<S>px-<digest>/:
  images.npy   uint8 (N, 3, S, S), a plain .npy, so any tool can map it (numpy.load(mmap_mode="r"))
  index.json   what it holds: every file's path (relative to the folder), size and mtime, the files that did
               not decode and why; written last, atomically, so its presence means the array is whole
A later use lists the folder, compares names, sizes and mtimes with the index, and maps the array: no
decoding, start-up in seconds. Any file added, removed or modified means the cache is decoded again, never
reused. An interrupted build leaves no index.json (and its temporary array is removed, or ignored and
replaced next time), so nothing mistakes it for a complete cache.

`MappedImages` stands in for the uint8 image tensor of an `ImageSet`: batches are read from the map as
they are indexed, so memory does not grow with the number of images (the page cache aside).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from simclr_cli.errors import DatasetError
from simclr_cli.files import atomic_write_text
from simclr_cli.images import iter_decoded

VERSION = 1  # of the cache layout; another version is decoded again
INDEX, IMAGES = "index.json", "images.npy"
Progress = Callable[[int, int, int], None]  # (done, total, bad) while a cache is built


def default_cache_dir() -> Path:
    """$SIMCLR_CACHE_DIR if set, else ~/.cache/simclr-cli/folders."""
    env = os.environ.get("SIMCLR_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "simclr-cli" / "folders"


class MappedImages:
    """uint8 (N, 3, S, S) images read from a memory-mapped file as they are indexed.

    Supports what the tool does with an image tensor: len, shape, dtype, `x[i]`, `x[a:b]`, `x[index_tensor]`
    (each returns an ordinary tensor holding those images only), `select(rows)` (a view of a subset) and
    `to(device)` (itself: batches are moved to the device one at a time, see `train.Trainer._batch`).
    """

    dtype, ndim, device = torch.uint8, 4, torch.device("cpu")

    def __init__(self, array: np.ndarray, rows: np.ndarray | None = None) -> None:
        self.array = array  # (N_all, 3, S, S) memmap
        self.rows = np.arange(len(array)) if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.array.shape[1:]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, tuple):  # x[rows, channel, ...]: the rows from the map, the rest on the tensor
            first, rest = key[0], key[1:]
            single = isinstance(first, (int, np.integer)) or (isinstance(first, torch.Tensor) and first.ndim == 0)
            return self[first][rest] if single else self[first][(slice(None), *rest)]
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        rows = self.rows[key]
        if np.ndim(rows) == 0:
            return torch.from_numpy(np.array(self.array[int(rows)]))
        # Read in file order (fewer, forward seeks: each image is one contiguous 3*S*S-byte record), then put
        # the images back in the order asked for.
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.array.shape[1:]), dtype=np.uint8)
        out[order] = self.array[rows[order]]
        return torch.from_numpy(out)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """torch.equal(x, y), torch.cat([x, y]), ...: on the images read whole (fine for a small set; the
        tool itself only ever indexes batches)."""
        def whole(a):
            return a[:] if isinstance(a, MappedImages) else a
        return func(*[whole(a) for a in args], **{k: whole(v) for k, v in (kwargs or {}).items()})

    def select(self, index) -> MappedImages:
        index = index.cpu().numpy() if isinstance(index, torch.Tensor) else index
        return MappedImages(self.array, self.rows[index])

    def to(self, device) -> MappedImages:
        return self

    def contiguous(self, *args, **kwargs) -> MappedImages:
        return self


def cache_folder(root: Path, size: int, cache_dir: Path) -> Path:
    root = root.resolve()
    digest = hashlib.sha1(str(root).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return cache_dir / f"{root.name or 'root'}-{size}px-{digest}"


def _entries(root: Path, paths: Sequence[Path]) -> list[list]:
    out = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:  # a dangling link: decoding names it
            out.append([str(p.relative_to(root)), -1, -1])
            continue
        out.append([str(p.relative_to(root)), st.st_size, st.st_mtime_ns])
    return out


def _read_index(folder: Path) -> dict | None:
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and index.get("version") == VERSION else None


def _changes(old: list[list], new: list[list]) -> str:
    before, after = {e[0]: e[1:] for e in old}, {e[0]: e[1:] for e in new}
    added, removed = len(after.keys() - before.keys()), len(before.keys() - after.keys())
    changed = sum(1 for k in after.keys() & before.keys() if after[k] != before[k])
    return f"{added} added, {removed} removed, {changed} modified"


def _build(folder: Path, paths: Sequence[Path], entries: list[list], size: int, num_workers: int,
           progress: Progress | None) -> dict:
    """Decode every path into folder/images.npy; write index.json last."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX).unlink(missing_ok=True)  # from here on the old cache is not complete
    for stale in folder.glob(".images.*.tmp.npy"):  # a build killed before it could clean up
        stale.unlink(missing_ok=True)
    tmp = folder / f".images.{os.getpid()}.tmp.npy"
    bad: list[list] = []
    try:
        header = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
        offset, record = header.offset, 3 * size * size  # bytes before row 0, bytes per image
        del header  # rows are written with pwrite, not through a map: the build's pages stay out of this
        # process's memory (a mapped write keeps every page resident here: 5 GB at 100,000 x 128 px)
        batch = max(1, min(64, math.ceil(len(paths) / max(1, num_workers))))
        done = 0
        with open(tmp, "r+b") as f:
            for b in iter_decoded(paths, size, batch_size=batch, num_workers=num_workers):
                for i, image in zip(b.indices.tolist(), b.images.numpy()):
                    os.pwrite(f.fileno(), image.tobytes(), offset + i * record)
                bad += [[entries[i][0], why] for i, why in b.failures]
                done += len(b.indices) + len(b.failures)
                if progress is not None:
                    progress(done, len(paths), len(bad))
            os.fsync(f.fileno())
        os.replace(tmp, folder / IMAGES)
    finally:
        tmp.unlink(missing_ok=True)
    index = {"version": VERSION, "size": size, "count": len(paths), "files": entries, "bad": bad,
             "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(json.dumps(index) + "\n", folder / INDEX)
    return index


def load_cached(root: Path, paths: Sequence[Path], size: int, *, cache_dir: Path | None = None,
                num_workers: int = 2, skip_bad: bool = False, progress: Progress | None = None,
                notice: Callable[[str], None] | None = None) -> tuple[MappedImages, list[int]]:
    """The images of `paths` (files under `root`) at `size` pixels from the cache, decoding it first when it
    is missing or out of date. Returns (images of the kept files, their positions in `paths`). A file that
    did not decode fails the call, naming the files, unless `skip_bad`: then it is left out."""
    folder = cache_folder(root, size, cache_dir or default_cache_dir())
    entries = _entries(root, paths)
    index = _read_index(folder)
    if index is None or index.get("size") != size or index.get("files") != entries or not (folder / IMAGES).is_file():
        if notice is not None and index is not None:
            notice(f"{root} changed since it was cached ({_changes(index.get('files', []), entries)}): decoding "
                   "it again")
        index = _build(folder, paths, entries, size, num_workers, progress)
    array = np.load(folder / IMAGES, mmap_mode="r")
    if array.shape != (len(paths), 3, size, size):
        raise DatasetError(f"the cache {folder} holds {array.shape}, not ({len(paths)}, 3, {size}, {size}): delete "
                           "the folder and run again")
    bad = {name for name, _ in index["bad"]}
    if bad and not skip_bad:
        shown = "; ".join(f"{root / name} ({why})" for name, why in index["bad"][:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DatasetError(f"{len(bad)} of {len(paths)} images could not be decoded: {shown}{more}: remove or "
                           "replace them, or set data.skip_bad=true to leave them out")
    kept = [i for i, e in enumerate(entries) if e[0] not in bad]
    return MappedImages(array, np.array(kept, dtype=np.int64)), kept
