"""The project's files on disk: written whole or not at all, read without running anything they hold.

A write goes to a temporary file beside the target (`.NAME.<random>.tmp`), is fsync'ed, then renamed over
the target, and the folder is fsync'ed so the rename itself survives a crash. A `kill -9` mid-write can
only leave such a temporary file behind; `remove_stale_temps` clears them, and nothing ever reads one.

Every torch file is read through `safe_load`, `torch.load(weights_only=True)`: a file carrying a pickled
object that would run code is refused before anything in it runs. The two files the tool writes say what
they are in their "format" key: CHECKPOINT_FORMAT (a run's checkpoint.pt, `train.state`) and ENCODER_FORMAT
(the encoder file, `models.encoder_file`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import torch

from simclr_cli.errors import CheckpointError, OutputError

CHECKPOINT_FORMAT = "simclr-cli/checkpoint"
ENCODER_FORMAT = "simclr-cli/encoder"
CLASSIFIER_FORMAT = "simclr-cli/classifier"


def temp_glob(name: str) -> str:
    """The glob of the temporary files `atomic_file` and `replace_with_link` make for the file `name`."""
    return f".{name}.*.tmp"


def check_output_path(path: str | Path, example: str | None = None) -> None:
    """Refuse an output path that is a folder before any work is done for it."""
    path = Path(path).expanduser()
    if path.is_dir():
        hint = f", e.g. {path / example}" if example else " inside it"
        raise OutputError(f"{path} is a folder: give a file name{hint}")


def _temporary(path: Path) -> tuple[int, Path]:
    """(fd, path) of a new temporary file beside `path`, as readable as `>` would make the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OutputError(f"cannot write {path} ({err.strerror}): choose another output path") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
    return fd, Path(tmp)


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A temporary file beside `path`, fsync'ed and renamed over it on success, removed on any failure."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """The path of a temporary file beside `path`, for a writer that wants a path (an exporter): fsync'ed and
    renamed over `path` if the block ends normally (a caller checks what was written inside it), removed
    otherwise."""
    path = Path(path)
    check_output_path(path)
    fd, tmp = _temporary(path)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _atomic_write(path: str | Path, write) -> Path:
    """Call write(binary file) on a temporary file beside `path`, fsync, then rename over `path`."""
    with atomic_file(path) as f:
        write(f)
    return Path(path)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file beside `path`, fsync, then rename over `path`."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write UTF-8 text the same crash-safe way (JSON reports)."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def replace_with_link(src: Path, dest: Path) -> None:
    """`dest` becomes the same file as `src` (a hard link: no copy, no extra space; a copy where the file
    system has no hard links), through a temporary name so `dest` is never half there."""
    if dest.exists() and dest.samefile(src):  # linked already (a kill came after the link); renaming a
        return  # file onto its own hard link would do nothing and leave the temporary name behind
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def remove_stale_temps(folder: Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files a killed writer left for each of `names` (globs allowed) in `folder`."""
    stale = [p for name in names for p in folder.glob(temp_glob(name))]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def safe_load(path: str | Path) -> Any:
    """torch.load with weights_only=True, turning every failure into a one-line CheckpointError."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a file: give the encoder.pth or checkpoint.pt inside it")
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): was it written completely?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).lower()  # torch >= 2.4: "... global ...", before: "Unsupported class ..."
        if "global" in reason or "unsupported class" in reason:  # the file names a Python callable: it could run code
            raise CheckpointError(
                f"{path} holds pickled Python objects that could run code; refused (only tensors and plain "
                "data are loaded). Re-save it as a plain state dict from a source you trust"
            ) from None
        with path.open("rb") as f:
            raw_pickle = f.read(1) == b"\x80"  # pickle's PROTO opcode; torch.save writes a zip archive
        if raw_pickle:
            raise CheckpointError(f"{path} is a raw pickle stream, not a torch.save file; refused (a pickle can run "
                                  "code). Re-save it with torch.save from a source you trust") from None
        raise CheckpointError(f"{path} is truncated or not a PyTorch file (no checkpoint could be read)") from None
    except Exception as err:  # torch's readers raise RuntimeError, EOFError, BadZipFile, KeyError, ... on junk
        reason = str(err).strip().splitlines()[0].split(". ")[0][:160] if str(err).strip() else "no message"
        raise CheckpointError(f"{path} is truncated or not a PyTorch file ({type(err).__name__}: {reason}): "
                              "give a file that torch.save wrote (an encoder.pth or checkpoint.pt)") from None


def is_safetensors(path: Path) -> bool:
    """A safetensors file, whatever its name: an 8-byte little-endian header length, then the JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = f.seek(0, 2)
    except OSError:
        return False
    return len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip holding compiled code (torch.save's zips hold data.pkl and data/ only)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
