"""The index of a folder of shards (`simclr shards`), `OUT/index.json`: what it holds, and how a rerun goes on.

It holds format ("simclr-cli/shards"), version, complete (every series written), folder (absolute path),
settings (max_size in bytes, max_count or null, seed), fingerprint (sha256 of the listing: series, relative
path, size and mtime of each file), classes (names, index = `.cls`; null without class subfolders), series,
skipped and totals (shards, samples, bytes, skipped). Per series ("train", and "test" for a folder with its own
train/ and test/): files (listed), done (files handled, in the seeded order), complete, samples, bytes, pattern
(the shards' names as a brace pattern, `train-{000000..000011}.tar`, what `webdataset.WebDataset` takes) and
shards, each {name, samples, bytes, sha256, plan: [first, end) positions of its files in the seeded order}. A
reader takes an epoch's length from the samples. skipped: {series, position, path, reason} of each file that
did not decode.

The index is rewritten (atomically) after each finished shard. A rerun with the same listing and settings
keeps, per series, the recorded shards that are on disk with their recorded size, up to the first that is not,
and goes on from there; another listing or other settings into the same OUT is one line asking for an empty
folder or --overwrite, which removes the shards and index found there, and nothing else.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from simclr_cli.errors import OutputError
from simclr_cli.files import atomic_write_text, remove_stale_temps

INDEX_NAME = "index.json"
INDEX_FORMAT = "simclr-cli/shards"
INDEX_VERSION = 1
SHARD_NAME = re.compile(r"[a-z]+-\d{6,}\.tar")  # what --overwrite removes besides the index


def new_index(folder: Path, files: dict[str, int], classes: list[str] | None, fingerprint: str,
              settings: dict) -> dict:
    """The index of a run that has written nothing yet: `files` per series, in the order they are written."""
    series = {s: {"files": n, "done": 0, "complete": False, "samples": 0, "bytes": 0, "pattern": None,
                  "shards": []} for s, n in files.items()}
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "complete": False, "folder": str(folder.resolve()),
            "settings": settings, "fingerprint": fingerprint, "classes": classes, "series": series,
            "skipped": [], "totals": {}}


def save_index(out: Path, index: dict) -> None:
    """Write `index` to OUT/index.json (atomically), its totals brought up to date."""
    shards = [sh for st in index["series"].values() for sh in st["shards"]]
    index["totals"] = {"shards": len(shards), "samples": sum(sh["samples"] for sh in shards),
                       "bytes": sum(sh["bytes"] for sh in shards), "skipped": len(index["skipped"])}
    atomic_write_text(json.dumps(index, indent=1) + "\n", out / INDEX_NAME)


def read_index(path: Path) -> dict | None:
    """The index in `path`; None when there is no file, {} when the file is not a shard index."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) and index.get("format") == INDEX_FORMAT else {}


def _keep_intact(out: Path, index: dict) -> dict:
    """`index` rolled back, per series, to its shards that are on disk with their recorded size."""
    for name, st in index["series"].items():
        kept = []
        for sh in st["shards"]:
            path = out / sh["name"]
            if not (path.is_file() and path.stat().st_size == sh["bytes"]):
                break
            kept.append(sh)
        if len(kept) < len(st["shards"]):
            st.update(shards=kept, done=kept[-1]["plan"][1] if kept else 0, complete=False, pattern=None,
                      samples=sum(sh["samples"] for sh in kept), bytes=sum(sh["bytes"] for sh in kept))
            index["complete"] = False
            index["skipped"] = [s for s in index["skipped"] if s["series"] != name or s["position"] < st["done"]]
    return index


def prepare_out(out: Path, fresh: dict, overwrite: bool) -> dict:
    """The index to go on from: `fresh` for an empty (or --overwrite) OUT, else the one in OUT if it is this
    plan's, else one OutputError."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file: give a folder for the shards (new or empty)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot make {out} ({err.strerror}): choose another folder for the shards") from None
    remove_stale_temps(out, ["*.tar", INDEX_NAME])  # a killed writer's half-written shard or index
    if overwrite:
        for p in out.iterdir():
            if p.name == INDEX_NAME or SHARD_NAME.fullmatch(p.name):
                p.unlink()
        return fresh
    old = read_index(out / INDEX_NAME)
    if old is None:
        if any(out.iterdir()):
            raise OutputError(f"{out} is not empty and holds no shard index: choose an empty folder or pass "
                              "--overwrite")
        return fresh
    if not old or old.get("version") != INDEX_VERSION:
        raise OutputError(f"{out / INDEX_NAME} is not a shard index of this version: choose an empty folder or "
                          "pass --overwrite")
    settings = old.get("settings") if isinstance(old.get("settings"), dict) else {}
    changed = [f"{k} {settings.get(k)}, not {v}" for k, v in fresh["settings"].items() if settings.get(k) != v]
    if changed:
        raise OutputError(f"{out} holds shards written with other settings ({'; '.join(changed)}): choose an "
                          "empty folder or pass --overwrite")
    if old.get("fingerprint") != fresh["fingerprint"]:
        raise OutputError(f"{out} holds shards of another listing of the folder (files added, removed or changed "
                          "since): choose an empty folder or pass --overwrite")
    try:
        return _keep_intact(out, old)
    except (KeyError, TypeError, IndexError, AttributeError):  # edited by hand
        raise OutputError(f"{out / INDEX_NAME} is damaged: choose an empty folder or pass --overwrite") from None
