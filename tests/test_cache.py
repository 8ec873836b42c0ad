"""The decoded image-folder cache: equal to direct decoding, invalidated by any change to the folder, never
reused after an interrupted build, built once by one of several processes, safe against short and refused
writes, bad files named or skipped, memory flat, training the same as in memory."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from simclr_cli.config import DataConfig, load_config
from simclr_cli.data import cache, load_dataset
from simclr_cli.data.images import decode_all, list_images
from simclr_cli.errors import DatasetError
from simclr_cli.train import Trainer, pretrain


def write_folder(root: Path, per_class: int = 5, classes=("a", "b")) -> list[Path]:
    """Class subfolders of JPEGs and PNGs with varied sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
            img.save(root / c / (f"{i}.jpg" if i % 2 else f"{i}.png"))
    return list_images(root)


def load(root: Path, tmp_path: Path, split: str = "train", size: int = 24, notes: list | None = None,
         progress=None, **data):
    """A split through the cache in tmp_path/cache; `data`: more DataConfig fields (skip_bad, cache)."""
    return load_dataset(DataConfig(dataset="folder", root=root, num_workers=0, cache_dir=tmp_path / "cache", **data),
                        split, image_size=size, progress=progress, notice=notes.append if notes is not None else None)


def direct(root: Path, split: str = "train", size: int = 24):
    """The same split decoded into memory, without the cache."""
    return load_dataset(DataConfig(dataset="folder", root=root, num_workers=0, cache=False), split, image_size=size)


def test_the_cache_equals_direct_decoding_and_is_mapped(tmp_path):
    write_folder(tmp_path / "images")
    for split in ("train", "test"):
        mapped = load(tmp_path / "images", tmp_path, split)
        decoded = direct(tmp_path / "images", split)
        assert mapped.mapped and not decoded.mapped
        assert torch.equal(mapped.images[torch.arange(len(mapped))], decoded.images)
        assert torch.equal(mapped.labels, decoded.labels) and mapped.classes == decoded.classes
        n = len(mapped)
        assert torch.equal(mapped.images[1:n], decoded.images[1:n]) and torch.equal(mapped.images[n - 1], decoded.images[n - 1])
        shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(3))
        assert torch.equal(mapped.images[shuffled], decoded.images[shuffled])  # read in file order, given back as asked
    (folder,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [".build.lock", "images.npy", "index.json"]
    assert np.load(folder / "images.npy", mmap_mode="r").shape == (10, 3, 24, 24)  # the whole folder, once


@pytest.mark.parametrize("change", ["modified", "added", "removed"])
def test_a_changed_folder_is_decoded_again(tmp_path, change):
    paths = write_folder(tmp_path / "images")
    before = load(tmp_path / "images", tmp_path)
    if change == "modified":
        Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(paths[0])  # same name, new content
        os.utime(paths[0], ns=(paths[0].stat().st_atime_ns, paths[0].stat().st_mtime_ns + 10**9))
    elif change == "added":
        Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "images" / "a" / "new.png")
    else:
        paths[-1].unlink()
    notes = []
    after = load(tmp_path / "images", tmp_path, notes=notes)
    assert len(notes) == 1 and "changed since it was cached" in notes[0] and f"1 {change}" in notes[0]
    decoded = direct(tmp_path / "images")
    assert torch.equal(after.images[torch.arange(len(after))], decoded.images)
    if change == "modified":
        assert not torch.equal(after.images[torch.arange(len(after))], before.images[torch.arange(len(before))])
    again = []
    load(tmp_path / "images", tmp_path, notes=again)
    assert again == []  # now up to date: mapped, not decoded


def test_an_interrupted_build_is_never_reused(tmp_path, monkeypatch):
    write_folder(tmp_path / "images")

    def interrupt(done, total, bad):
        raise KeyboardInterrupt  # Ctrl-C after the first batch

    with pytest.raises(KeyboardInterrupt):
        load(tmp_path / "images", tmp_path, progress=interrupt)
    (folder,) = (tmp_path / "cache").iterdir()
    assert [p.name for p in folder.iterdir()] == [".build.lock"]  # no index, no half-written array
    # What a kill -9 mid-build leaves: a temporary array, and an old images.npy whose index was removed first.
    np.save(folder / "images.npy", np.zeros((10, 3, 24, 24), np.uint8))
    (folder / f".images.{cache.HOST}.{dead_pid()}.tmp.npy").write_bytes(b"half")
    built = []
    data = load(tmp_path / "images", tmp_path, progress=lambda done, total, bad: built.append(done))
    assert built and built[-1] == 10  # decoded again, not taken from the zeros
    assert data.images[torch.arange(len(data))].float().std() > 10
    assert sorted(p.name for p in folder.iterdir()) == [".build.lock", "images.npy", "index.json"]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_a_dead_builds_temporaries_are_removed(tmp_path):
    write_folder(tmp_path / "images")
    folder = cache.cache_folder(tmp_path / "images", 24, tmp_path / "cache")
    folder.mkdir(parents=True)
    dead = folder / f".images.{cache.HOST}.{dead_pid()}.tmp.npy"
    live = folder / f".images.{cache.HOST}.{os.getppid()}.tmp.npy"  # a running process: this one's parent
    away_live = folder / ".images.other-machine.4242.tmp.npy"  # written just now: a build on another machine
    away_dead = folder / ".images.other-machine.4343.tmp.npy"
    old_layout = folder / ".images.999.tmp.npy"  # the name an older version gave its temporary
    for tmp in (dead, live, away_live, away_dead, old_layout):
        tmp.write_bytes(b"half")
    an_hour_ago = time.time() - 3600  # s; past cache.LEFTOVER_IDLE_S
    for tmp in (away_dead, old_layout):
        os.utime(tmp, (an_hour_ago, an_hour_ago))
    load(tmp_path / "images", tmp_path)
    assert sorted(p.name for p in folder.glob(".images.*")) == sorted([live.name, away_live.name])


BUILDER = """
import json, sys, time
from pathlib import Path
from simclr_cli.data import cache
from simclr_cli.data.images import list_images
import numpy as np

decode = cache.iter_decoded
def slow(*args, **kwargs):  # 2 s per batch (one batch here): the other process arrives mid-build
    for batch in decode(*args, **kwargs):
        time.sleep(2)
        yield batch
cache.iter_decoded = slow

root, out, go = map(Path, sys.argv[1:4])
out.with_suffix(".ready").touch()
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.005)
built, notes = [], []
images, kept = cache.load_cached(root, list_images(root), 24, num_workers=0, notice=notes.append,
                                 progress=lambda done, total, bad: built.append(done))
np.save(out, images[:].numpy())
print(json.dumps({"built": bool(built), "notes": notes}))
"""


def test_two_processes_on_one_folder_share_one_build(tmp_path):
    """Started together, one decodes the folder while the other waits (its temporary untouched), then both
    map the same finished cache."""
    paths = write_folder(tmp_path / "images")
    env = {**os.environ, "SIMCLR_CACHE_DIR": str(tmp_path / "cache")}
    outs, go = [tmp_path / f"out{k}.npy" for k in range(2)], tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(tmp_path / "images"), str(out), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for out in outs]
    try:
        deadline = time.monotonic() + 60  # s; importing torch takes a few on two busy cores
        while not all(out.with_suffix(".ready").exists() for out in outs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a builder did not start"
            time.sleep(0.01)
        go.touch()  # both start the build within a few ms of each other
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr
    reports = [json.loads(stdout.splitlines()[-1]) for stdout, _ in results]
    assert sorted(r["built"] for r in reports) == [False, True]  # exactly one decoded the folder
    builder, waiter = sorted(reports, key=lambda r: not r["built"])
    assert builder["notes"] == []
    assert len(waiter["notes"]) == 1 and waiter["notes"][0].startswith("waiting for another process decoding")
    direct = decode_all(paths, 24, 0).numpy()
    for out in outs:
        assert np.array_equal(np.load(out), direct)


def test_a_builder_killed_mid_build_leaves_the_waiting_process_to_build(tmp_path):
    """A node that dies while decoding (SIGKILL: no clean-up runs) releases the build lock with its process: the
    process waiting on the lock finds no index.json and decodes the folder itself, to the same array."""
    paths = write_folder(tmp_path / "images")
    env = {**os.environ, "SIMCLR_CACHE_DIR": str(tmp_path / "cache")}
    outs, gos = [tmp_path / f"out{k}.npy" for k in range(2)], [tmp_path / f"go{k}" for k in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(tmp_path / "images"), str(out), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for out, go in zip(outs, gos)]
    try:
        deadline = time.monotonic() + 60
        while not all(out.with_suffix(".ready").exists() for out in outs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a builder did not start"
            time.sleep(0.01)
        gos[0].touch()  # the first one builds: 2 s on its one batch
        while not list((tmp_path / "cache").glob("*/.images.*.tmp.npy")):
            assert time.monotonic() < deadline and procs[0].poll() is None, "the first build did not start"
            time.sleep(0.005)
        gos[1].touch()  # the second finds the lock held and waits
        time.sleep(0.5)
        procs[0].kill()  # left unreaped for now: a zombie's temporary counts as dead too
        stdout, stderr = procs[1].communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode == -9 and procs[1].returncode == 0, stderr
    report = json.loads(stdout.splitlines()[-1])
    assert report["built"] and len(report["notes"]) == 1 and report["notes"][0].startswith("waiting for another")
    assert np.array_equal(np.load(outs[1]), decode_all(paths, 24, 0).numpy())
    # The dead build's temporary is gone, or, where the waiting process took the lock while the killed one was
    # still exiting (not yet a zombie), left for the next build; nothing else is there.
    folder = next((tmp_path / "cache").iterdir())
    left = sorted(p.name for p in folder.iterdir())
    dead = f".images.{cache.HOST}.{procs[0].pid}.tmp.npy"
    assert left in ([".build.lock", "images.npy", "index.json"],
                    sorted([".build.lock", dead, "images.npy", "index.json"]))


def test_a_file_system_without_flock_builds_without_the_lock(tmp_path, monkeypatch):
    paths = write_folder(tmp_path / "images")

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))  # NFS without lockd; Lustre noflock: ENOSYS

    monkeypatch.setattr(cache.fcntl, "flock", no_flock)
    notes = []
    data = load(tmp_path / "images", tmp_path, notes=notes)
    assert len(notes) == 1 and notes[0].startswith("cannot lock") and os.strerror(errno.ENOLCK) in notes[0]
    assert data.mapped and np.array_equal(np.load(cache.cache_folder(tmp_path / "images", 24, tmp_path / "cache")
                                                  / "images.npy"), decode_all(paths, 24, 0).numpy())


def test_short_writes_are_completed(tmp_path, monkeypatch):
    paths = write_folder(tmp_path / "images")
    write = os.pwrite

    def short(fd, data, offset):  # at most 100 bytes a call, as a nearly full disk or a signal may leave it
        return write(fd, bytes(data[:100]), offset)

    monkeypatch.setattr(os, "pwrite", short)
    load(tmp_path / "images", tmp_path)
    monkeypatch.undo()
    (folder,) = (tmp_path / "cache").iterdir()
    assert (folder / "index.json").is_file()
    assert np.array_equal(np.load(folder / "images.npy"), decode_all(paths, 24, 0).numpy())


@pytest.mark.parametrize("failure", ["no progress", "disk full"])
def test_a_refused_write_is_one_error_and_leaves_nothing(tmp_path, monkeypatch, failure):
    write_folder(tmp_path / "images")

    def refuse(fd, data, offset):
        if failure == "disk full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return 0  # no error, no byte written

    monkeypatch.setattr(os, "pwrite", refuse)
    with pytest.raises(DatasetError) as err:
        load(tmp_path / "images", tmp_path)
    (folder,) = (tmp_path / "cache").iterdir()
    message = str(err.value)
    assert str(folder) in message and "data.cache_dir" in message and "\n" not in message
    assert failure != "disk full" or os.strerror(errno.ENOSPC) in message
    assert [p.name for p in folder.iterdir()] == [".build.lock"]  # no index, no temporary, no array


def test_bad_files_are_named_or_skipped(tmp_path):
    write_folder(tmp_path / "images")
    (tmp_path / "images" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    for attempt in range(2):  # the second time from the index, without decoding
        with pytest.raises(DatasetError, match="broken.jpg") as err:
            load(tmp_path / "images", tmp_path)
        assert "data.skip_bad=true" in str(err.value)
    kept = load(tmp_path / "images", tmp_path, skip_bad=True)
    test = load(tmp_path / "images", tmp_path, "test", skip_bad=True)
    assert len(kept) + len(test) == 10  # the broken file left out of whichever split it fell in


def test_memory_stays_flat_while_batches_are_read(tmp_path):
    """20,000 images of 64 px (245 MB) read batch by batch in a random order: the process's anonymous memory
    (what it allocates, page cache aside) grows by a batch, not by the array. Would fail on a load-all."""
    script = f"""
import numpy as np, torch
from simclr_cli.data.mapped import MappedImages
def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
path = {str(tmp_path / 'images.npy')!r}
a = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(20000, 3, 64, 64))
for i in range(0, 20000, 2000):
    a[i:i + 2000] = i % 251
a.flush(); del a
images = MappedImages(np.load(path, mmap_mode="r"))
order = torch.randperm(len(images))
images[order[:256]]
before = anon_mb()
total = 0
for i in range(0, len(images), 256):
    total += int(images[order[i:i + 256]][:, 0, 0, 0].sum())
print(before, anon_mb(), total)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before, after, total = map(int, done.stdout.split())
    assert total == sum((i // 2000 * 2000) % 251 * 2000 for i in range(0, 20000, 2000))  # every image read once
    assert after - before < 60, (before, after)


# the shared tiny run (tests/conftest.py) on an image folder
RUN = {"dataset": "folder", "synthetic_size": None, "image_size": 24, "batch_size": 4, "epochs": 2, "log_every": 1,
       "data.num_workers": 0, "train.eval_every": 1}


def test_training_from_the_map_equals_training_in_memory(tmp_path):
    write_folder(tmp_path / "images", per_class=6)
    runs = {}
    torch.set_num_threads(1)
    for cached in (True, False):
        out = tmp_path / f"run-{cached}"
        cfg = tiny_config(out, f"data.root={tmp_path / 'images'}", f"data.cache={str(cached).lower()}",
                          f"data.cache_dir={tmp_path / 'cache'}", **RUN)
        assert Trainer(cfg).data.mapped is cached
        pretrain(cfg)
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[cached] = [{k: v for k, v in r.items() if k not in ("views_per_s", "data_wait", "eval_s")} for r in lines]
    assert runs[True] == runs[False]  # the same images in the same order: every loss and kNN bit for bit


def test_the_stem_follows_the_image_size_unless_set():
    assert load_config(None, ["data.image_size=32"]).model.stem == "cifar"
    assert load_config(None, ["data.image_size=64"]).model.stem == "imagenet"
    assert load_config(None, ["data.image_size=128", "model.stem=cifar"]).model.stem == "cifar"
    assert cache.default_cache_dir().name == "folder-cache"  # the tests' own, from conftest
