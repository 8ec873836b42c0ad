"""Atomic writes and their leftovers: every file the tool writes appears whole or not at all.

A write goes to a temporary file beside the target (`.NAME.<random>.tmp`), is fsync'ed, then renamed over
the target, and the folder is fsync'ed so the rename itself survives a crash. A `kill -9` mid-write can
only leave such a temporary file behind; `remove_stale_temps` clears them, and nothing ever reads one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import torch

from simclr_cli.errors import OutputError


def temp_glob(name: str) -> str:
    """The glob of the temporary files `atomic_file` and `replace_with_link` make for the file `name`."""
    return f".{name}.*.tmp"


def check_output_path(path: str | Path, example: str | None = None) -> None:
    """Refuse an output path that is a folder before any work is done for it."""
    path = Path(path).expanduser()
    if path.is_dir():
        hint = f", e.g. {path / example}" if example else " inside it"
        raise OutputError(f"{path} is a folder: give a file name{hint}")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A temporary file beside `path`, fsync'ed and renamed over it on success, removed on any failure."""
    path = Path(path)
    check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OutputError(f"cannot write {path} ({err.strerror}): choose another output path") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should be as readable as `>` makes it
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
