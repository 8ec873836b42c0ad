"""Image files -> uint8 tensors: listing a folder, decoding one file, decoding many in DataLoader workers.

Owns the rules every image path in the project follows (pretrain/probe on a folder, `simclr embed`): which
files count as images, how odd modes become RGB, how a picture becomes a fixed-size square, and how a bad
file is reported by path instead of crashing a worker. Only regular files (or links to them) are opened: a
FIFO named x.jpg would block its reader until some writer came, forever in a decode worker, and a device
may act when opened, so sockets, FIFOs and devices are bad files, named by what they are. A folder as a
dataset (classes, splits) is `data.folder`'s.
"""

from __future__ import annotations

import io
import math
import os
import signal
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from simclr_cli.errors import DatasetError, ImageDecodeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The decoders PIL may pick, whatever the extension says (JPEG also yields MPO, PIL's label for many camera
# JPEGs). Without this list a renamed EPS file would make PIL run Ghostscript on it.
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Files past these bounds are bad files (named, skipped with --skip-bad), not images to decode: a few hundred
# compressed bytes can declare a 1 x 200,000 PNG, or 30,000 x 30,000 pixels (2.7 GB decoded, per worker).
# 64 megapixels covers 48 MP phone photos; a centre crop keeps under 1/32 of a stripe past 32:1.
MAX_PIXELS = 64_000_000  # width x height after JPEG draft scaling
MAX_ASPECT = 32  # longer side / shorter side


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words, from its `st_mode`."""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


class SpecialFileError(OSError):
    """A path that is not a regular file (a FIFO, socket or device): never opened, since opening a FIFO waits
    for a writer that may never come."""


def open_regular(path: str | Path) -> BinaryIO:
    """`path` opened for reading in binary if it is a regular file (or a link to one), else SpecialFileError.

    os.stat first, so a FIFO or device is never opened; the file is then opened non-blocking and checked
    again with fstat, so one swapped in between (a race) still cannot block the read. O_NONBLOCK changes
    nothing for a regular file.
    """
    mode = os.stat(path).st_mode  # follows links: a link to a FIFO is a FIFO
    if not stat.S_ISREG(mode):
        raise SpecialFileError(f"{file_kind(mode)}, not a regular file")
    f = open(path, "rb", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NONBLOCK", 0)))  # Windows: no FIFOs
    mode = os.fstat(f.fileno()).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        raise SpecialFileError(f"{file_kind(mode)}, not a regular file")
    return f


def list_images(root: str | Path) -> list[Path]:
    """Every image file under `root`, recursively, sorted by path; extension match is case-insensitive.

    Hidden files and folders (".*") are skipped: macOS leaves "._photo.jpg" resource forks beside real photos,
    and those are not images. Symlinked folders are followed once each (a link cycle cannot loop).
    A single image file is accepted as a one-element list. Inside a folder, a FIFO, socket or device with an
    image's name is listed, and decoding names it as a bad file (`decode_image`); given as `root` itself it
    is one DatasetError, before anything else runs.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        try:
            mode = root.stat().st_mode  # never opens it
        except OSError:
            raise DatasetError(f"image folder {root} does not exist: check the path") from None
        if not stat.S_ISREG(mode):
            raise DatasetError(f"{root} is {file_kind(mode)}, not an image file or a folder: point at an image or "
                               "a folder")
        if root.suffix.lower() in IMAGE_EXTENSIONS:
            return [root]
        raise DatasetError(f"{root} is not an image file ({', '.join(IMAGE_EXTENSIONS)}): point at an image "
                           "or a folder")
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _array_to_uint8(img: Image.Image) -> Image.Image:
    """Single-channel 16/32-bit int or float image -> mode L, scaled by the value range the mode implies.

    I;16*: full 16-bit range, v / 257 (65535 -> 255). I and F hold either 8-bit values (e.g. after
    `convert("I")`) or wider ones: I above 255 is read as 16-bit; F with max <= 1 is read as [0, 1].
    """
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        a = a / 257.0
    elif img.mode == "I" and a.max(initial=0) > 255:
        a = np.clip(a, 0, 65535) / 257.0
    elif img.mode == "F" and a.max(initial=0) <= 1.0:
        a = a * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # 2-D uint8 -> mode L


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels are composited onto white (not black, PIL's default)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _array_to_uint8(img)
    has_alpha = "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _check_size(img: Image.Image) -> None:
    """Refuse sizes no photo has, before any pixel is decoded (PIL knows the size from the header)."""
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"{w}x{h} pixels")
    if w * h > MAX_PIXELS:
        raise ValueError(f"{w}x{h} pixels is more than the {MAX_PIXELS // 1_000_000} megapixels decoded per image")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ValueError(f"{w}x{h} pixels is a stripe (aspect ratio over {MAX_ASPECT}:1), not a picture to "
                         "centre-crop")


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """The central square of the image (side = its shorter side, in source coordinates), resized to
    size x size (bilinear; PIL widens the filter when shrinking, so it is antialiased). Cropping first means
    the resize never makes pixels that the crop throws away."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    if side == size and left == int(left) and top == int(top):
        return img.crop((int(left), int(top), int(left) + size, int(top) + size))
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


def decode_image(path: str | Path, size: int) -> torch.Tensor:
    """Decode one file to a uint8 (3, size, size) tensor, or raise ImageDecodeError naming the path.

    EXIF orientation is applied; GIF/WebP animations give their first frame. Truncated files fail
    (`img.load()` runs inside the try, with PIL's LOAD_TRUNCATED_IMAGES forced off for the call, since other
    libraries sometimes switch it on and a half-grey image would then pass silently). Sizes past MAX_PIXELS
    or MAX_ASPECT fail before decoding. A FIFO, socket or device fails without being opened (`open_regular`).
    """
    return _decode(lambda: open_regular(path), path, size)


def decode_bytes(data: bytes, size: int, name: str) -> torch.Tensor:
    """`decode_image` for an image held in memory (a member of a tar shard): the same formats, limits, modes
    and resize, so a streamed image and the same file in a folder give the same pixels. ImageDecodeError
    names `name` (the shard and member, say)."""
    return _decode(lambda: io.BytesIO(data), name, size)


def _decode(opener: Callable[[], BinaryIO], path: str | Path, size: int) -> torch.Tensor:
    """The decoding both entry points share: `opener()` gives the file, `path` is what errors name."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with opener() as f, Image.open(f, formats=PIL_FORMATS) as img:
            img.seek(0)
            if img.format in ("JPEG", "MPO"):
                # Let libjpeg downscale by 1/2..1/8 while decoding, never below (size, size): 1024x768 -> 224
                # takes 6 ms instead of 16 ms here. Pixels differ slightly from a full decode + resize.
                img.draft("RGB", (size, size))
            _check_size(img)
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _resize_center_crop(_to_rgb(img), size)
            out = np.asarray(img, dtype=np.uint8)
    except SpecialFileError as e:
        raise ImageDecodeError(path, str(e)) from None
    except UnidentifiedImageError:  # PIL names the file object it was given; name the path, as it does for one
        raise ImageDecodeError(path, f"UnidentifiedImageError: cannot identify image file {str(path)!r}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ... for bad files
        raise ImageDecodeError(path, f"{type(e).__name__}: {e}".strip()) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))  # HWC -> CHW, a writable copy


class DecodedBatch(NamedTuple):
    """One batch of decoded files, by index into the dataset's path list."""

    indices: torch.Tensor  # int64 (B,): which paths `images` holds, in order
    images: torch.Tensor  # uint8 (B, 3, size, size)
    failures: list[tuple[int, str]]  # (index, reason) for each file in the batch that did not decode


class ImageFolderDataset(Dataset):
    """Decodes `paths[i]` to uint8 (3, size, size). Items are (index, image, error): on a bad file the image
    is empty (0,) and `error` says why, so a worker never dies and the caller can report every bad path.
    Batch with `collate_fn=dataset.collate` (see `iter_decoded`)."""

    def __init__(self, paths: Sequence[str | Path], size: int) -> None:
        self.paths = [Path(p) for p in paths]
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        try:
            return index, decode_image(self.paths[index], self.size), ""
        except ImageDecodeError as e:
            return index, torch.empty(0, dtype=torch.uint8), e.reason

    def collate(self, items: list[tuple[int, torch.Tensor, str]]) -> DecodedBatch:
        """DataLoader `collate_fn`: stacks the good images of a batch and lists the bad ones."""
        good = [(i, x) for i, x, err in items if not err]
        return DecodedBatch(
            indices=torch.tensor([i for i, _ in good], dtype=torch.int64),
            images=torch.stack([x for _, x in good]) if good
            else torch.empty((0, 3, self.size, self.size), dtype=torch.uint8),
            failures=[(i, err) for i, _, err in items if err])


def leave_signals_to_main(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: SIGTERM and SIGUSR1 ask the training to stop (`train.interrupt`); a data worker
    leaves them to its main process, which ends it when done. SLURM signals every process of a job step, data
    workers included, and the default action would kill them before the main process saved its checkpoint."""
    for stop in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop, signal.SIG_IGN)


def iter_decoded(paths: Sequence[str | Path], size: int, *, batch_size: int = 256,
                 num_workers: int = 2) -> Iterator[DecodedBatch]:
    """Decode `paths` in `num_workers` DataLoader workers (0: in this process), yielding batches in order."""
    dataset = ImageFolderDataset(paths, size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=dataset.collate, shuffle=False, worker_init_fn=leave_signals_to_main)
    yield from loader


def decode_all(paths: Sequence[Path], size: int, num_workers: int) -> torch.Tensor:
    """Decode every path to one uint8 (N, 3, size, size) tensor; any bad file -> one DatasetError naming
    how many failed and the first few paths."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    # Batches small enough that every worker gets one on a small folder; 256 caps worker memory.
    batch = max(1, min(256, math.ceil(len(paths) / max(1, num_workers))))
    failures: list[tuple[int, str]] = []
    for b in iter_decoded(paths, size, batch_size=batch, num_workers=num_workers):
        out[b.indices] = b.images
        failures += b.failures
    if failures:
        shown = "; ".join(f"{paths[i]} ({why})" for i, why in failures[:3])
        more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
        raise DatasetError(f"{len(failures)} of {len(paths)} images could not be decoded: {shown}{more}: "
                           "remove or replace them")
    return out
