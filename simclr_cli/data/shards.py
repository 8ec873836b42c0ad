"""An image folder packed into WebDataset tar shards plus an index: what `simclr shards FOLDER OUT` writes.

Which files: the folder's images as `images.list_images` finds them. A folder with its own train/ and test/
(`folder.has_split_folders`) gives two series, `train-000000.tar...` and `test-000000.tar...`; any other folder
gives one series, `train-...` (a streamed reader holds a fixed subset out itself). Classes are the first-level
subfolders (of train/ and test/ together when presplit), by `folder`'s rule.

A sample is three tar members, in this order: `KEY.jpg|png|webp` (the image), `KEY.cls` (the class index as
ASCII digits; only when the folder has classes) and `KEY.json` ({"path": the file's path relative to FOLDER,
"class": its class name or null, "format": PIL's name of the file's format}). KEY is a running number per
series, zero-padded to at least 6 digits (no dots: WebDataset splits a member's name at the first dot).
JPEG (MPO too), PNG and WebP bytes are copied as they are, keyed by the format PIL finds in them, not by the
file's extension (a .jpeg is `jpg`, a PNG named .jpg is `png`); BMP, GIF and TIFF are decoded and stored as
PNG of what the folder decoder sees (first frame, EXIF orientation applied, RGB with transparency on white).
Every file first passes the folder decoder (`images.decode_image`: its limits, truncation and special-file
checks); one that fails is skipped, counted and named in the index, never fatal.

Samples follow a seeded order (sha256 of seed and path), so each shard mixes classes: a streamed reader only
shuffles shard order and within a buffer. A shard is cut before the sample that would take it past
`max_size` bytes (a lone sample larger than that gets a shard of its own) or past `max_count` samples. The
bytes are deterministic: ustar members with a fixed mtime, mode 0644, uid/gid 0, no user names, so the same
folder and settings give the same files, and `tar tf` and the plain `webdataset` library read them.

The index beside the shards, `OUT/index.json`, is `shardindex`'s: what it holds, and how a rerun after an
interruption keeps the finished shards and goes on after the last of them. Each shard is written under a
temporary name and renamed when whole, then the index is rewritten (atomically), so nothing half-written is
ever under a final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from PIL import Image, ImageOps

from simclr_cli.data.folder import _folder_labels, has_split_folders
from simclr_cli.data.images import IMAGE_EXTENSIONS, PIL_FORMATS, _to_rgb, decode_image, list_images, open_regular
from simclr_cli.data.shardindex import INDEX_NAME, new_index, prepare_out, save_index
from simclr_cli.errors import DatasetError, ImageDecodeError, OptionError
from simclr_cli.files import atomic_file

COPIED = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> key, bytes kept as they are
CHECK_SIZE = 224  # px the decode check decodes to; under JPEG draft scaling, the limits hold alike up to 1/8 of a side
MTIME = 946684800  # 2000-01-01 UTC for every member: fixed bytes (0 makes GNU tar warn "implausibly old")
MIN_SIZE = tarfile.RECORDSIZE  # 10240 bytes: the smallest tar file tarfile writes
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
Emit = Callable[[str, dict], None]


def parse_size(text: str) -> int:
    """Bytes from "1GB", "500MB", "1GiB", "64KiB", "1.5GB" or "123456" (KB = 1000 bytes, KiB = 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    if not m or unit not in UNITS:
        raise OptionError(f"--max-size {text!r} is not a size: give bytes or a number with KB, MB, GB, KiB, MiB "
                          "or GiB, e.g. 1GB")
    size = int(float(m.group(1)) * UNITS[unit])
    if size < MIN_SIZE:
        raise OptionError(f"--max-size {text!r} is under {MIN_SIZE} bytes, the smallest tar file: give more, "
                          "e.g. 1GB")
    return size


class Item(NamedTuple):
    path: Path
    rel: str  # relative to FOLDER, with "/"
    label: int | None


@dataclass
class ShardPlan:
    """Which files go into which series, in the seeded order they are written in."""

    series: dict[str, list[Item]]  # "train" (and "test") -> items
    classes: list[str] | None
    fingerprint: str  # sha256 of the listing (series, path, size, mtime): a changed folder is another plan


def _fingerprint(series: dict[str, list[Item]]) -> str:
    """sha256 of the listing: series, path, size and mtime of each file (a file gone since listed: no size)."""
    digest = hashlib.sha256()
    for s, items in series.items():
        for it in items:
            try:
                st = os.stat(it.path)
                line = f"{s}\0{it.rel}\0{st.st_size}\0{st.st_mtime_ns}\n"
            except OSError:
                line = f"{s}\0{it.rel}\0-\n"
            digest.update(line.encode(errors="surrogateescape"))  # a file name need not be UTF-8
    return digest.hexdigest()


def plan_shards(folder: Path, seed: int) -> ShardPlan:
    """The series of `folder` (train/ and test/, else all of it as "train"), each in the seeded order."""
    if not folder.is_dir():
        what = "does not exist: check the path" if not folder.exists() else "is not a folder: give a folder of images"
        raise DatasetError(f"image folder {folder} {what} (DIR/<class>/*, or DIR/train/ and DIR/test/)")
    bases = {s: folder / s for s in ("train", "test")} if has_split_folders(folder) else {"train": folder}
    found = {s: list_images(base) for s, base in bases.items()}
    paths = [p for ps in found.values() for p in ps]
    if not paths:
        raise DatasetError(f"no images under {folder} ({', '.join(IMAGE_EXTENSIONS)}): point at a folder of images")
    classes, labels = _folder_labels(paths, [bases[s] for s, ps in found.items() for _ in ps])  # shared by the series
    labels = labels or [None] * len(paths)
    items = [Item(p, p.relative_to(folder).as_posix(), label) for p, label in zip(paths, labels)]
    series, start = {}, 0
    for s, ps in found.items():
        # sha256 of (seed, path): the same order on any machine and Python, and classes mixed in every shard
        series[s] = sorted(items[start:start + len(ps)],
                           key=lambda it: hashlib.sha256(f"{seed}\0{it.rel}".encode(errors="surrogateescape")).digest())
        start += len(ps)
    return ShardPlan(series, classes, _fingerprint(series))


def encode_sample(item: Item, classes: list[str] | None) -> list[tuple[str, bytes]]:
    """The members of one sample without their key: [(ext, bytes), ...]; ImageDecodeError if it is no image."""
    decode_image(item.path, CHECK_SIZE)  # the folder decoder's verdict: limits, truncation, special files
    try:
        with open_regular(item.path) as f:
            data = f.read()
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as img:
            fmt = img.format
            if fmt not in COPIED:
                img.seek(0)
                buf = io.BytesIO()
                _to_rgb(ImageOps.exif_transpose(img)).save(buf, "PNG")
                data = buf.getvalue()
    except (OSError, ValueError) as e:  # changed since the check
        raise ImageDecodeError(item.path, f"{type(e).__name__}: {e}") from None
    meta = {"path": item.rel, "class": None if item.label is None else classes[item.label], "format": fmt}
    members = [(COPIED.get(fmt, "png"), data)]
    if item.label is not None:
        members.append(("cls", str(item.label).encode()))
    return members + [("json", json.dumps(meta, sort_keys=True).encode())]


def _tar_size(offset: int) -> int:
    """Bytes of a tar file whose members end at `offset`: two zero blocks, padded to a whole record."""
    return -(-(offset + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _member_bytes(members: list[tuple[str, bytes]]) -> int:
    return sum(tarfile.BLOCKSIZE + -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for _, data in members)


class _Hashing:
    """A write-only file that hashes what passes through it (the shard's sha256 without reading it again)."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.sha.update(data)
        self.n += len(data)
        return len(data)

    def tell(self) -> int:
        return self.n


def _add(tar: tarfile.TarFile, key: str, members: list[tuple[str, bytes]]) -> None:
    for ext, data in members:
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode, info.uid, info.gid = len(data), MTIME, 0o644, 0, 0
        tar.addfile(info, io.BytesIO(data))


@dataclass
class ShardsResult:
    out: Path
    index: Path  # OUT/index.json
    shards: int
    resumed: int  # shards kept from an earlier, interrupted run
    samples: int
    bytes: int
    skipped: list[tuple[str, str]]  # (path relative to FOLDER, reason) of each file that did not decode
    series: dict[str, dict]  # the index's series entries


def _samples(items: list[Item], start: int, classes: list[str] | None, skip: Callable[[int, Item, str], None],
             emit: Emit, base: int) -> Iterator[tuple[int, list[tuple[str, bytes]]]]:
    """(position, members) of each item from `start` on that decodes; `skip` hears of the others."""
    for pos in range(start, len(items)):
        try:
            members = encode_sample(items[pos], classes)
        except ImageDecodeError as err:
            skip(pos, items[pos], err.reason)
            members = None
        emit("progress", {"done": base + pos + 1})
        if members is not None:
            yield pos, members


def _write_series(out: Path, name: str, items: list[Item], classes: list[str] | None, index: dict, emit: Emit,
                  base: int) -> None:
    """The shards of one series from its first unwritten item on; the index is saved after each shard."""
    st, settings = index["series"][name], index["settings"]
    if st["complete"]:
        return

    def skip(pos: int, item: Item, reason: str) -> None:
        index["skipped"].append({"series": name, "position": pos, "path": item.rel, "reason": reason})
        emit("skip", {"path": item.rel, "reason": reason})

    def fits(offset: int, members: list[tuple[str, bytes]], count: int) -> bool:
        full = settings["max_count"] is not None and count >= settings["max_count"]
        return not full and _tar_size(offset + _member_bytes(members)) <= settings["max_size"]

    width = max(6, len(str(len(items) - 1)))
    samples = _samples(items, st["done"], classes, skip, emit, base)
    pending = next(samples, None)
    while pending is not None:
        shard, count = f"{name}-{len(st['shards']):06d}.tar", 0
        with atomic_file(out / shard) as f:
            stream = _Hashing(f)
            with tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                while pending is not None and (count == 0 or fits(tar.offset, pending[1], count)):
                    _add(tar, f"{st['samples'] + count:0{width}d}", pending[1])  # a lone big sample still goes in
                    count += 1
                    pending = next(samples, None)
        end = pending[0] if pending is not None else len(items)
        entry = {"name": shard, "samples": count, "bytes": stream.n, "sha256": stream.sha.hexdigest(),
                 "plan": [st["done"], end]}
        st["shards"].append(entry)
        st.update(done=end, samples=st["samples"] + count, bytes=st["bytes"] + stream.n)
        save_index(out, index)
        emit("shard", {"series": name, **entry})
    n = len(st["shards"])
    st.update(done=len(items), complete=True, pattern=None if n == 0 else f"{name}-000000.tar" if n == 1
              else f"{name}-{{000000..{n - 1:06d}}}.tar")
    save_index(out, index)


def write_shards(folder: str | Path, out: str | Path, *, max_size: int = 10**9, max_count: int | None = None,
                 seed: int = 0, overwrite: bool = False, progress: Emit | None = None) -> ShardsResult:
    """Pack the images of `folder` into tar shards in `out`, with `out/index.json`; go on from where an
    interrupted run of the same command stopped. progress(event, data): "start" {files, done, series,
    shards}, "progress" {done}, "skip" {path, reason}, "shard" {series, name, samples, bytes, ...}."""
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    if max_size < MIN_SIZE or (max_count is not None and max_count < 1) or seed < 0:
        raise OptionError(f"need max_size >= {MIN_SIZE} bytes, max_count >= 1, seed >= 0; got {max_size}, "
                          f"{max_count}, {seed}")
    emit = progress or (lambda event, data: None)
    plan = plan_shards(folder, seed)
    created = [p for p in (out, *out.parents) if not p.exists()]  # removed again when nothing decodes
    settings = {"max_size": max_size, "max_count": max_count, "seed": seed}
    fresh = new_index(folder, {s: len(v) for s, v in plan.series.items()}, plan.classes, plan.fingerprint, settings)
    index = prepare_out(out, fresh, overwrite)
    resumed = sum(len(st["shards"]) for st in index["series"].values())
    save_index(out, index)
    emit("start", {"files": sum(map(len, plan.series.values())), "series": {s: len(v) for s, v in plan.series.items()},
                   "done": sum(st["done"] for st in index["series"].values()), "shards": resumed})
    base = 0
    for name, items in plan.series.items():
        _write_series(out, name, items, plan.classes, index, emit, base)
        base += len(items)
    skipped = [(s["path"], s["reason"]) for s in index["skipped"]]
    if not index["totals"]["samples"]:
        (out / INDEX_NAME).unlink()
        for p in created:
            p.rmdir()
        shown = "; ".join(f"{p} ({why})" for p, why in skipped[:2])
        raise DatasetError(f"none of the {len(skipped)} images under {folder} decodes ({shown}): check the files")
    index["complete"] = True
    save_index(out, index)
    t = index["totals"]
    return ShardsResult(out, out / INDEX_NAME, t["shards"], resumed, t["samples"], t["bytes"], skipped,
                        index["series"])
