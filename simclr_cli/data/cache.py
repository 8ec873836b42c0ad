"""A decoded image folder on disk: one uint8 array (N, 3, S, S) plus an index, decoded once, mapped after.

The first use of a folder at S pixels decodes it in DataLoader workers into CACHE/<name>-<S>px-<digest>/:
  images.npy   uint8 (N, 3, S, S), a plain .npy, so any tool can map it (numpy.load(mmap_mode="r"))
  index.json   what it holds: every file's path (relative to the folder), size and mtime, the files that did
               not decode and why; written last, atomically, so its presence means the array is whole
A later use lists the folder, compares names, sizes and mtimes with the index, and maps the array: no
decoding, start-up in seconds. Any file added, removed or modified means the cache is decoded again, never
reused. An interrupted build leaves no index.json (and its temporary array is removed, or ignored and
replaced next time), so nothing mistakes it for a complete cache. A write the disk refuses (full, I/O error)
is one DatasetError naming the folder; the temporary is removed and no index.json is written.

Several processes may want the same folder at once (torchrun: local rank 0 of every machine, with a shared
home directory). One builds, the others wait and then map its result:
  .build.lock  held with an exclusive `fcntl.flock` from "read the index" to "index.json written"; a process
               that finds it held says so once through `notice`, waits, reads the index again and maps the
               cache if it is complete and matches (else builds itself). The file is never removed: a
               process waiting on a removed lock file would hold a lock nobody else sees.
  .images.HOST.PID.tmp.npy
               a build's temporary array; a later build removes only a dead build's: this host's whose pid
               is not running, another host's not written for LEFTOVER_IDLE_S (a live build writes every
               batch), so even a lock that does not reach across machines never costs a live build its file.
The fast path (index complete and matching) takes no lock: index.json exists only while a whole images.npy
sits beside it (a build removes the index first and writes it last), and a mapped array keeps its file even
if a later build replaces it. What the lock relies on: flock keeps processes apart on a local file system,
and mostly on shared ones (Linux turns it into a POSIX lock on NFSv4 and on NFSv3 with lockd; Lustre needs
the `flock` mount option). On mounts with locks local to each machine (NFS local_lock=flock or all, Lustre
localflock) two machines may both decode the folder; they write the same files and neither loses its
temporary. Where the file system refuses flock (ENOSYS on Lustre noflock, ENOLCK on NFS without lockd) a
process says so through `notice` and builds without the lock.

The array is handed out as `data.mapped.MappedImages`: batches are read from the map as they are indexed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import socket
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from simclr_cli.errors import DatasetError
from simclr_cli.files import atomic_write_text
from simclr_cli.data.images import iter_decoded
from simclr_cli.data.mapped import MappedImages

VERSION = 1  # of the cache layout; another version is decoded again
INDEX, IMAGES, LOCK = "index.json", "images.npy", ".build.lock"
# This machine's name as it appears in temporaries: letters, digits and "-" only, so the name splits on ".".
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"
# Seconds without a write after which another machine's temporary counts as a dead build's. A live build
# writes every batch (seconds apart); the margin covers NFS write-back delay (~30 s) and clock skew.
LEFTOVER_IDLE_S = 600
Progress = Callable[[int, int, int], None]  # (done, total, bad) while a cache is built


def default_cache_dir() -> Path:
    """$SIMCLR_CACHE_DIR if set, else ~/.cache/simclr-cli/folders."""
    env = os.environ.get("SIMCLR_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "simclr-cli" / "folders"


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


def _complete(folder: Path, index: dict | None, size: int, entries: list[list]) -> bool:
    """Whether `index` describes a whole cache of exactly these files at `size` pixels."""
    return (index is not None and index.get("size") == size and index.get("files") == entries
            and (folder / IMAGES).is_file())


@contextlib.contextmanager
def _disk_errors(folder: Path) -> Iterator[None]:
    """A write the disk refuses (ENOSPC, EDQUOT, EIO, EACCES, ...) -> one DatasetError naming the fix."""
    try:
        yield
    except OSError as err:
        raise DatasetError(f"cannot write the image cache in {folder} ({err.strerror or err}): free space there, "
                           "or point data.cache_dir (or $SIMCLR_CACHE_DIR) at another disk") from None


@contextlib.contextmanager
def _build_lock(root: Path, folder: Path, notice: Callable[[str], None] | None) -> Iterator[None]:
    """Hold folder/.build.lock exclusively, saying once through `notice` when another process holds it."""
    say = notice or (lambda message: None)
    with _disk_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process decoding {root} into {folder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # a file system without flock (Lustre noflock, NFS without lockd)
            say(f"cannot lock {folder} ({err.strerror}): decoding {root} without the lock; processes that start "
                "at the same time each decode it")
        yield
    finally:
        # Unlock before closing: DataLoader workers forked during the build share this open file, and a
        # lock lives until every copy of it is closed.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and is another user's
        pass
    try:  # a killed process stays a zombie until its parent reaps it: it exists, but writes nothing more
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux)
        return True


def _is_leftover(tmp: Path) -> bool:
    """Whether a temporary array belongs to a build that died (see the module docstring)."""
    parts = tmp.name.split(".")  # ["", "images", HOST, PID, "tmp", "npy"]
    if len(parts) == 6 and parts[2] == HOST and parts[3].isdigit():
        return int(parts[3]) > 0 and not _running(int(parts[3]))
    try:  # another machine's, or an older version's ".images.PID.tmp.npy"
        return time.time() - tmp.stat().st_mtime > LEFTOVER_IDLE_S
    except FileNotFoundError:
        return False


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """os.pwrite until every byte is on disk: a write may store fewer bytes than asked (a nearly full disk, a
    signal), and the rest would stay zeros in a cache marked complete."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:  # no progress and no error: retrying would spin forever
            raise OSError(errno.EIO, "a write stored 0 bytes")
        view, offset = view[written:], offset + written


def _build(folder: Path, paths: Sequence[Path], entries: list[list], size: int, num_workers: int,
           progress: Progress | None) -> dict:
    """Decode every path into folder/images.npy; write index.json last. Runs under `_build_lock`."""
    (folder / INDEX).unlink(missing_ok=True)  # from here on the old cache is not complete
    for stale in folder.glob(".images.*.tmp.npy"):
        if _is_leftover(stale):
            stale.unlink(missing_ok=True)
    tmp = folder / f".images.{HOST}.{os.getpid()}.tmp.npy"
    bad: list[list] = []
    try:
        with _disk_errors(folder):
            header = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
        offset, record = header.offset, 3 * size * size  # bytes before row 0, bytes per image
        del header  # rows are written with pwrite, not through a map: the build's pages stay out of this
        # process's memory (a mapped write keeps every page resident here: 5 GB at 100,000 x 128 px)
        batch = max(1, min(64, math.ceil(len(paths) / max(1, num_workers))))
        done = 0
        with open(tmp, "r+b") as f:
            for b in iter_decoded(paths, size, batch_size=batch, num_workers=num_workers):
                with _disk_errors(folder):
                    for i, image in zip(b.indices.tolist(), b.images.numpy()):
                        _pwrite_all(f.fileno(), image.tobytes(), offset + i * record)
                bad += [[entries[i][0], why] for i, why in b.failures]
                done += len(b.indices) + len(b.failures)
                if progress is not None:
                    progress(done, len(paths), len(bad))
            with _disk_errors(folder):  # NFS reports a failed write-back here, not at the write
                os.fsync(f.fileno())
        with _disk_errors(folder):
            os.replace(tmp, folder / IMAGES)
    finally:
        tmp.unlink(missing_ok=True)
    index = {"version": VERSION, "size": size, "count": len(paths), "files": entries, "bad": bad,
             "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with _disk_errors(folder):
        atomic_write_text(json.dumps(index) + "\n", folder / INDEX)
    return index


def _build_once(root: Path, folder: Path, paths: Sequence[Path], entries: list[list], size: int,
                num_workers: int, progress: Progress | None, notice: Callable[[str], None] | None) -> dict:
    """Under the build lock: the index of a cache another process finished meanwhile, else a new build's."""
    with _build_lock(root, folder, notice):
        index = _read_index(folder)
        if _complete(folder, index, size, entries):
            return index
        if notice is not None and index is not None:
            notice(f"{root} changed since it was cached ({_changes(index.get('files', []), entries)}): decoding "
                   "it again")
        return _build(folder, paths, entries, size, num_workers, progress)


def load_cached(root: Path, paths: Sequence[Path], size: int, *, cache_dir: Path | None = None,
                num_workers: int = 2, skip_bad: bool = False, progress: Progress | None = None,
                notice: Callable[[str], None] | None = None) -> tuple[MappedImages, list[int]]:
    """The images of `paths` (files under `root`) at `size` pixels from the cache, decoding it first when it
    is missing or out of date (or waiting for another process that is decoding it). Returns (images of the
    kept files, their positions in `paths`). A file that did not decode fails the call, naming the files,
    unless `skip_bad`: then it is left out."""
    folder = cache_folder(root, size, cache_dir or default_cache_dir())
    entries = _entries(root, paths)
    index = _read_index(folder)
    if not _complete(folder, index, size, entries):
        index = _build_once(root, folder, paths, entries, size, num_workers, progress, notice)
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
