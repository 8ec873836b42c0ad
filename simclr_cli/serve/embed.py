"""Embedding: image files -> representations h, one row per image, streamed to a .npy or a .csv.

Owns what `simclr embed` does beneath the CLI: turning IMAGES (a folder, one image, or a text file listing
paths) into an ordered path list, or tar shards into their samples in shard order (`embed_shards`); writing
rows batch by batch (the formats are `vectors.py`'s), so memory stays flat however many images there are;
outputs that never hold a partial array after a failure; and bad files (report every one and write nothing,
or leave them out). Each batch goes through `models.features.extract_features`, so the rows equal what
`simclr probe` extracts from the same images.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from simclr_cli.data.images import IMAGE_EXTENSIONS, iter_decoded, list_images
from simclr_cli.errors import BadImagesError, CheckpointError, DatasetError, OutputError
from simclr_cli.serve.embed_shards import is_shards, shard_samples, shards_of
from simclr_cli.serve.inference import Inference
from simclr_cli.serve.vectors import WRITERS, format_for
from simclr_cli.files import atomic_file, check_output_path
from simclr_cli.models.encoder_file import LoadedEncoder
from simclr_cli.runtime import Callback

DEFAULT_ENCODER = Path("encoder.pth")  # looked up in the working directory when no --encoder is given


@dataclass
class Shards:
    """IMAGES as tar shards (`embed_shards`): their URLs and the samples each holds."""

    urls: list[str]
    counts: list[int]

    def __len__(self) -> int:
        return sum(self.counts)  # the rows to come


@dataclass
class EmbedResult:
    rows: int  # images embedded, rows of the array
    dim: int  # D, the representation's size
    seconds: float  # decode + forward + write, after the encoder was loaded
    output: str  # where the array went
    paths: list = field(repr=False)  # path of each row (shards: its URL#KEY name), in order
    failures: list[tuple[Path, str]] = field(default_factory=list)  # skipped (path, reason)

    @property
    def images_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


# --- inputs ----------------------------------------------------------------------------------------------

def read_path_list(list_file: Path) -> list[Path]:
    """One path per line; blank lines skipped, surrounding spaces stripped, relative paths taken relative to
    the list file's folder (so a list travels with its images)."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DatasetError(f"{list_file} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a UTF-8 text "
                         "file listing image paths: point at a folder, an image or a list") from None
    paths = [Path(s).expanduser() for s in (line.strip() for line in lines) if s]
    return [p if p.is_absolute() else list_file.parent / p for p in paths]


def resolve_paths(images: str | Path) -> list[Path]:
    """IMAGES -> the paths to embed, in row order: a folder (recursive, sorted), one image, or a list file."""
    images = Path(images).expanduser()
    if images.is_file() and images.suffix.lower() not in IMAGE_EXTENSIONS:
        paths = read_path_list(images)
        if not paths:
            raise DatasetError(f"{images} lists no image paths: put one path per line")
        return paths
    paths = list_images(images)  # a folder or one image; raises DatasetError when IMAGES does not exist
    if not paths:
        raise DatasetError(f"no images under {images} ({', '.join(IMAGE_EXTENSIONS)}): point at a folder of "
                         "images, one image, or a text file listing paths")
    return paths


def resolve_encoder(encoder: str | Path | None) -> Path:
    if encoder is not None:
        return Path(encoder).expanduser()
    if not DEFAULT_ENCODER.is_file():
        raise CheckpointError(f"no {DEFAULT_ENCODER} in the working directory ({Path.cwd()}): write one with "
                         "`simclr extract`, or pass --encoder PATH (an encoder file, checkpoint or state dict)")
    return DEFAULT_ENCODER


# --- the output stream -------------------------------------------------------------------------------------

def _is_regular_file(fp: BinaryIO) -> bool:
    """True when `fp` is a plain file we may seek in and truncate: `> out.npy`, not a pipe, tty or `>>`."""
    try:
        fd = fp.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False
    try:
        import fcntl
        appending = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)
    except ImportError:  # Windows: no fcntl; treat as a stream
        appending = True
    return stat.S_ISREG(os.fstat(fd).st_mode) and not appending


@contextlib.contextmanager
def stdout_target(stdout: BinaryIO, rows_may_shrink: bool) -> Iterator[tuple[BinaryIO, bool]]:
    """(file, seekable) for an array going to stdout.

    A regular file (`> out.npy`) is written in place, its row count patched at the end, and truncated back
    to where it started if the run fails. A pipe cannot be patched: with --skip-bad the row count is only
    known at the end, so rows are spooled to a temporary file on disk (not memory) and copied out after;
    otherwise they stream straight through and a failed run leaves a short stream that numpy.load refuses.
    """
    stdout.flush()
    if _is_regular_file(stdout):
        start = stdout.tell()
        try:
            yield stdout, True
        except BaseException:
            stdout.seek(start)
            stdout.truncate()
            raise
    elif rows_may_shrink:
        with tempfile.TemporaryFile(prefix="simclr-embed-") as spool:
            yield spool, True
            spool.seek(0)
            shutil.copyfileobj(spool, stdout, 1 << 20)
    else:
        yield stdout, False
    stdout.flush()


# --- the loop --------------------------------------------------------------------------------------------

def handle_batches(batches: Iterable[tuple[list, torch.Tensor | None, list]], total: int,
                   handle: Callable[[list, torch.Tensor], None], *, skip_bad: bool, callback: Callback | None,
                   nothing: str) -> tuple[list, list]:
    """What embed and predict do with decoded batches of (names, uint8 images or None, [(name, reason) of bad
    ones]): each batch's good images to `handle(names, images)`, in order. Returns (kept names, failures).
    Without `skip_bad` the first bad image stops the handling, but decoding goes on so every bad one is
    reported; then BadImagesError is raised and the caller commits nothing. `nothing`: the line when no
    image decodes."""
    callback = callback or (lambda event, data: None)
    kept: list = []
    failures: list = []
    done = 0
    for names, images, bad in batches:
        for name, why in bad:
            failures.append((name, why))
            callback("bad", {"path": name, "reason": why})
        if names and (skip_bad or not failures):
            handle(names, images)
            kept += names
        done += len(names) + len(bad)
        callback("progress", {"done": done, "total": total, "bad": len(failures)})
    if failures and not skip_bad:
        raise BadImagesError(failures, total)
    if not kept:
        raise DatasetError(nothing)
    return kept, failures


def each_decoded(paths: Sequence[Path], size: int, handle: Callable[[list[Path], torch.Tensor], None], *,
                 batch_size: int = 256, num_workers: int = 2, skip_bad: bool = False,
                 callback: Callback | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Decode `paths` in workers and hand each batch's good images to `handle(paths, images_u8)`, in order
    (`handle_batches`). Returns (kept paths, failures)."""
    batches = (([paths[i] for i in b.indices.tolist()], b.images, [(paths[i], why) for i, why in b.failures])
               for b in iter_decoded(paths, size, batch_size=batch_size, num_workers=num_workers))
    return handle_batches(batches, len(paths), handle, skip_bad=skip_bad, callback=callback,
                          nothing=f"none of the {len(paths)} images could be decoded: check the files")


def embed_paths(loaded: LoadedEncoder, paths: Sequence[Path] | Shards, fp: BinaryIO, seekable: bool, *,
                run: Inference, normalize: bool = False, batch_size: int = 256, num_workers: int = 2,
                skip_bad: bool = False, fmt: str = "npy", callback: Callback | None = None) -> tuple[list, list]:
    """Decode `paths` in workers (or the samples of `Shards`, in shard order), encode each batch, stream rows
    to `fp` as a .npy or .csv (`fmt`). Returns (kept paths or row names, failures); bad files as
    `each_decoded` says."""
    writer = WRITERS[fmt](fp, len(paths), loaded.feature_dim, seekable)

    def encode(batch_paths: list[Path], images: torch.Tensor) -> None:
        # probe's own extraction on this one batch, so the rows equal what `probe` computes
        h = run.features(loaded, images, batch_size=len(images))  # (B, D) float32
        writer.write(F.normalize(h, dim=1) if normalize else h, batch_paths)

    if isinstance(paths, Shards):
        kept, failures = handle_batches(shard_samples(paths.urls, paths.counts, loaded.image_size, batch_size),
                                        len(paths), encode, skip_bad=skip_bad, callback=callback,
                                        nothing=f"none of the {len(paths)} samples of the {len(paths.urls)} shards "
                                                "could be decoded: check them")
    else:
        kept, failures = each_decoded(paths, loaded.image_size, encode, batch_size=batch_size,
                                      num_workers=num_workers, skip_bad=skip_bad, callback=callback)
    writer.finish()
    return kept, failures


def embed_images(images: str | Path, encoder: str | Path | None = None, output: str | Path | None = None,
                 stdout: BinaryIO | None = None, *, paths_out: str | Path | None = None, normalize: bool = False,
                 batch_size: int = 256, num_workers: int = 2, skip_bad: bool = False, device: str = "auto",
                 precision: str = "fp32", fmt: str | None = None, callback: Callback | None = None) -> EmbedResult:
    """Embed IMAGES with an encoder file into a float32 (N, D) .npy (or a .csv: `fmt`, default from the
    output's suffix) at `output`, or on `stdout` when None.

    precision defaults to fp32, not auto: the same encoder and images then give the same rows on any
    machine (within ~1e-5), where auto would round them to bf16 on CPUs with AMX and on GPUs."""
    fmt = format_for(fmt, output)
    if output is None and (stdout is None or (stdout.isatty() and fmt == "npy")):  # csv is text: a terminal may show it
        raise OutputError("refusing to write a binary .npy to the terminal: redirect it "
                         "(simclr embed IMAGES > vectors.npy) or pass -o vectors.npy")
    output = None if output is None else Path(output).expanduser()
    if output is not None:
        check_output_path(output, f"vectors.{fmt}")
    run = Inference(device, precision)
    if paths_out is not None:
        check_output_path(paths_out, "paths.txt")
    paths = Shards(*shards_of(images)) if is_shards(images) else resolve_paths(images)
    loaded = run.load(resolve_encoder(encoder))
    callback = callback or (lambda event, data: None)
    callback("start", {"images": len(paths), "dim": loaded.feature_dim, "image_size": loaded.image_size,
                       "kind": loaded.kind, "notes": loaded.notes, "device": str(run.device),
                       "precision": run.precision})
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if output is not None:
            fp, seekable = stack.enter_context(atomic_file(output)), True
        else:
            fp, seekable = stack.enter_context(stdout_target(stdout, rows_may_shrink=skip_bad and fmt == "npy"))
        kept, failures = embed_paths(loaded, paths, fp, seekable, run=run, normalize=normalize, batch_size=batch_size, num_workers=num_workers,
                                     skip_bad=skip_bad, fmt=fmt, callback=callback)
        if paths_out is not None:  # inside the stack: a failed --paths write leaves no array either
            with atomic_file(Path(paths_out).expanduser()) as f:
                f.write("".join(f"{p}\n" for p in kept).encode("utf-8", "surrogateescape"))
    return EmbedResult(len(kept), loaded.feature_dim, time.perf_counter() - t0,
                       str(output) if output is not None else "stdout", kept, failures)
