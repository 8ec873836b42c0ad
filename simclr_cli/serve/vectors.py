"""The files that hold embeddings: how `simclr embed` writes them and how `simclr neighbors` reads them back.

- .npy: float32 (N, D), written as a stream (header first, rows batch by batch) so memory stays flat, and
  read back memory-mapped, so an index of a million rows is never loaded whole. Row i's image is line i of
  the paths file written beside it (`--paths paths.txt`).
- .csv: one row per image, the path and then the D values (lightly's embeddings.csv layout), under a
  header `path,h_0,...,h_{D-1}`; each value printed with 9 significant digits, which a float32 survives
  exactly, so a csv reads back to the very rows of the .npy.
"""

from __future__ import annotations

import csv
import io
import struct
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import torch

from simclr_cli.errors import DatasetError, OptionError

FORMATS = ("npy", "csv")
# A .npy v1.0 header is magic + version + 2-byte length + a Python dict literal padded with spaces. Padding it
# to a fixed 128 bytes leaves room for any (rows, dim), so the row count can be rewritten in place once a
# --skip-bad run knows it, and keeps the data 64-byte aligned as numpy's own writer does.
HEADER_BYTES = 128


def format_for(fmt: str | None, output: str | Path | None) -> str:
    """The output format: `fmt` when given, else from the output's suffix (.csv -> csv), else npy."""
    if fmt is None:
        return "csv" if output is not None and Path(output).suffix.lower() == ".csv" else "npy"
    if fmt not in FORMATS:
        raise OptionError(f"unknown format {fmt!r}: use --format npy or --format csv")
    return fmt


def npy_header(rows: int, dim: int) -> bytes:
    """A .npy v1.0 header for a little-endian float32 C-order (rows, dim) array, exactly HEADER_BYTES long."""
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (rows, dim)
    text = text.ljust(HEADER_BYTES - 11) + "\n"  # 11 = magic (6) + version (2) + length (2) + this newline
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


class NpyWriter:
    """Header first, then rows as they come; `finish` rewrites the row count in place when it changed.

    `seekable` False (a pipe): the header must already be right, so the row count may not change.
    """

    def __init__(self, fp: BinaryIO, rows: int, dim: int, seekable: bool) -> None:
        self.fp, self.dim, self.seekable, self.planned, self.rows = fp, dim, seekable, rows, 0
        self.start = fp.tell() if seekable else 0
        fp.write(npy_header(rows, dim))

    def write(self, h: torch.Tensor, paths: Sequence[Path] = ()) -> None:
        self.fp.write(np.ascontiguousarray(h.numpy(), dtype="<f4").tobytes())  # (B, D) rows
        self.rows += h.shape[0]

    def finish(self) -> None:
        if self.rows != self.planned:
            if not self.seekable:
                raise RuntimeError(f"wrote {self.rows} rows after a header for {self.planned} to a stream")
            self.fp.seek(self.start)
            self.fp.write(npy_header(self.rows, self.dim))
            self.fp.seek(0, io.SEEK_END)
        self.fp.flush()


class CsvWriter:
    """A header line, then `path,v_0,...,v_{D-1}` per image; rows may be fewer than planned (--skip-bad)."""

    def __init__(self, fp: BinaryIO, rows: int, dim: int, seekable: bool) -> None:
        self.fp, self.rows = fp, 0
        self._write_rows([["path", *(f"h_{j}" for j in range(dim))]])

    def _write_rows(self, rows: list[list[str]]) -> None:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)  # quotes a path holding a comma or a quote
        self.fp.write(text.getvalue().encode("utf-8", "surrogateescape"))

    def write(self, h: torch.Tensor, paths: Sequence[Path]) -> None:
        values = h.numpy().astype(np.float32)
        self._write_rows([[str(p), *(f"{v:.9g}" for v in row)] for p, row in zip(paths, values.tolist())])
        self.rows += h.shape[0]

    def finish(self) -> None:
        self.fp.flush()


WRITERS = {"npy": NpyWriter, "csv": CsvWriter}


def read_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(paths, float32 (N, D)) from a csv `simclr embed --format csv` wrote; loaded whole, so for large
    indexes prefer the .npy, which is memory-mapped."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:1] != ["path"]:
        raise DatasetError(f"{path} is not a csv written by `simclr embed --format csv` (no path,h_0,... header)")
    try:
        values = np.array([[float(v) for v in r[1:]] for r in rows[1:]], dtype=np.float32).reshape(len(rows) - 1, -1)
    except ValueError:
        raise DatasetError(f"{path}: a row has a value that is not a number, or too few values") from None
    return [r[0] for r in rows[1:]], values


def open_npy(path: str | Path) -> np.ndarray:
    """A (N, D) float array, memory-mapped: rows are read from disk as they are used."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path} is not a .npy array ({str(err).splitlines()[0]}): give the vectors.npy "
                           "`simclr embed` wrote") from None
    if array.ndim != 2 or array.dtype.kind != "f" or array.shape[0] == 0:
        raise DatasetError(f"{path} holds a {array.dtype} array of shape {array.shape}: need float rows (N, D), "
                           "as `simclr embed` writes")
    return array


def read_paths(path: str | Path, rows: int, vectors: str | Path) -> list[str]:
    """The paths file of an index: one line per row of `vectors`, the count must match."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"no paths file {path} for {vectors}: pass --paths with the file `simclr embed "
                           "--paths` wrote beside it")
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    if len(lines) != rows:
        raise DatasetError(f"{path} lists {len(lines)} paths but {vectors} has {rows} rows: give the paths file "
                           "written with these vectors")
    return lines
