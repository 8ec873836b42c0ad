"""Sockets, FIFOs and devices with an image's name: bad files, named by what they are, never opened.

Opening a FIFO for reading waits for a writer; a regression would hang a decode worker, and the suite with
it. So every test runs under `watched`: a thread that lets any reader of the FIFOs go at once (it opens
each for writing, non-blocking, and closes it) and records that it had to. With the fix nobody opens them,
and each test asserts so; without it a test fails on that assertion instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_embed import write_encoder
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.config import DataConfig
from simclr_cli.data import load_dataset
from simclr_cli.data.images import decode_image, list_images
from simclr_cli.errors import DatasetError, ImageDecodeError
from simclr_cli.score.probe import run_probe
from simclr_cli.files import atomic_save
from simclr_cli.models.classifier import Classifier, classifier_payload
from simclr_cli.models.encoder_file import load_encoder

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")]

FIFO_REASON = "a FIFO (named pipe), not a regular file"


@contextlib.contextmanager
def watched(*fifos: Path):
    """Yields the list of FIFOs some reader opened while the block ran (each let go at once: it reads EOF)."""
    stop, opened = threading.Event(), []

    def release() -> None:
        while not stop.is_set():
            for fifo in fifos:
                try:  # ENXIO unless a reader is waiting in open(): then this open lets it through
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    continue
                opened.append(fifo)
                os.close(fd)
            stop.wait(0.02)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield opened
    finally:
        stop.set()
        thread.join()


def write_images(folder: Path, n: int = 4, classes: tuple[str, ...] = ()) -> list[Path]:
    """n small PNGs (per class subfolder when `classes`), distinct colours."""
    out = []
    for c, sub in enumerate(classes or ("",)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            path = folder / sub / f"{i}.png"
            Image.new("RGB", (36, 30), (40 * i + 20, 60 * c + 10, 200 - 30 * i)).save(path)
            out.append(path)
    return out


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    return write_encoder(tmp_path_factory.mktemp("enc") / "encoder.pth")


@pytest.fixture(scope="module")
def classifier_file(encoder_file, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    loaded = load_encoder(encoder_file)
    model = Classifier(loaded.encoder, loaded.head, 0, 3)
    payload = classifier_payload(loaded, model, ["a", "b", "c"], {"labels": {"labels": "all", "seed": 0}})
    return atomic_save(payload, tmp_path_factory.mktemp("clf") / "classifier.pth")


def cli(*args) -> object:
    result = CliRunner().invoke(app, [*map(str, args)], catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


# --- decoding and listing ---------------------------------------------------------------------------------------

def test_a_fifo_a_socket_and_a_device_are_bad_files_named_by_kind(tmp_path):
    specials = {fifo(tmp_path / "pipe.jpg"): FIFO_REASON, tmp_path / "null.png": "a character device, not a regular file",
                tmp_path / "sock.jpg": "a socket, not a regular file"}
    os.symlink("/dev/null", tmp_path / "null.png")  # a link is followed: what it points at counts
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock.jpg"))
    try:
        with watched(tmp_path / "pipe.jpg") as opened:
            for path, reason in specials.items():
                with pytest.raises(ImageDecodeError) as err:
                    decode_image(path, 32)
                assert err.value.reason == reason and err.value.path == path
    finally:
        server.close()
    assert opened == []
    assert list_images(tmp_path) == sorted(specials)  # listed, so that decoding names them


def test_the_path_is_named_as_before_for_a_file_pil_cannot_identify(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image\n")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(tmp_path / "text.jpg", 32)
    assert err.value.reason == f"UnidentifiedImageError: cannot identify image file {str(tmp_path / 'text.jpg')!r}"


def test_a_fifo_given_as_the_image_path_is_one_line_before_anything_runs(tmp_path, encoder_file, classifier_file):
    pipe = fifo(tmp_path / "x.jpg")
    (tmp_path / "out").mkdir()
    with watched(pipe) as opened:
        with pytest.raises(DatasetError, match=r"x\.jpg is a FIFO \(named pipe\), not an image file or a folder"):
            list_images(pipe)
        for args in (["embed", pipe, "-e", encoder_file, "-o", tmp_path / "out" / "v.npy"],
                     ["predict", classifier_file, pipe, "-o", tmp_path / "out" / "p.csv"],
                     ["neighbors", pipe, "--index", tmp_path, "-e", encoder_file]):
            result = cli(*args, "--workers", "0", "--device", "cpu")
            assert result.exit_code == 2 and "is a FIFO (named pipe), not an image file or a folder" in result.stderr
            assert list((tmp_path / "out").iterdir()) == []
    assert opened == []


# --- embed, predict, neighbors ----------------------------------------------------------------------------------

def test_embed_names_a_fifo_in_a_folder_and_in_a_list_and_leaves_it_out_with_skip_bad(tmp_path, encoder_file):
    good = write_images(tmp_path / "images")
    pipe = fifo(tmp_path / "images" / "pipe.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in [good[0], pipe, good[1]]))
    out = tmp_path / "out"
    out.mkdir()
    with watched(pipe) as opened:
        for source, workers in ((tmp_path / "images", "1"), (listing, "0")):  # one DataLoader worker: where it hung
            failed = cli("embed", source, "-e", encoder_file, "-o", out / "v.npy", "--workers", workers,
                         "--device", "cpu")
            assert failed.exit_code == 2 and f"{pipe}" in failed.stderr and "FIFO" in failed.stderr
            assert "1 of" in failed.stderr and "--skip-bad" in failed.stderr and list(out.iterdir()) == []
        kept = cli("embed", tmp_path / "images", "-e", encoder_file, "-o", out / "v.npy", "--paths", out / "p.txt",
                   "--skip-bad", "--workers", "1", "--device", "cpu")
        assert kept.exit_code == 0, kept.output
    assert opened == []
    assert (out / "p.txt").read_text().splitlines() == [str(p) for p in good]
    assert np.load(out / "v.npy").shape == (len(good), 64)


def test_predict_names_a_fifo_and_leaves_it_out_with_skip_bad(tmp_path, classifier_file):
    good = write_images(tmp_path / "images")
    pipe = fifo(tmp_path / "images" / "pipe.png")
    with watched(pipe) as opened:
        failed = cli("predict", classifier_file, tmp_path / "images", "-o", tmp_path / "p.csv", "--workers", "1",
                     "--device", "cpu")
        assert failed.exit_code == 2 and f"{pipe}" in failed.stderr and "FIFO" in failed.stderr
        assert not (tmp_path / "p.csv").exists()
        kept = cli("predict", classifier_file, tmp_path / "images", "-o", tmp_path / "p.csv", "--skip-bad",
                   "--workers", "0", "--device", "cpu")
        assert kept.exit_code == 0, kept.output
    assert opened == []
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(p) for p in good]


def test_neighbors_names_a_fifo_in_the_index_and_leaves_it_out_with_skip_bad(tmp_path, encoder_file):
    good = write_images(tmp_path / "images")
    pipe = fifo(tmp_path / "images" / "pipe.jpg")
    with watched(pipe) as opened:
        failed = cli("neighbors", good[0], "--index", tmp_path / "images", "-e", encoder_file, "--workers", "1",
                     "--device", "cpu")
        assert failed.exit_code == 2 and f"{pipe}" in failed.stderr and "FIFO" in failed.stderr
        kept = cli("neighbors", good[0], "--index", tmp_path / "images", "-e", encoder_file, "-k", "10",
                   "--skip-bad", "--workers", "0", "--device", "cpu")
        assert kept.exit_code == 0, kept.output
    assert opened == []
    answer = [json.loads(line) for line in kept.stdout.splitlines()]
    assert sorted(n["path"] for n in answer[0]["neighbors"]) == sorted(str(p) for p in good)


# --- the folder dataset (pretrain, probe) -----------------------------------------------------------------------

def test_a_folder_dataset_names_a_fifo_and_leaves_it_out_with_skip_bad(tmp_path, encoder_file):
    write_images(tmp_path / "images", n=5, classes=("cat", "dog"))
    pipe = fifo(tmp_path / "images" / "dog" / "pipe.jpg")
    data = {"dataset": "folder", "root": str(tmp_path / "images"), "cache_dir": str(tmp_path / "cache")}
    with watched(pipe) as opened:
        with pytest.raises(DatasetError, match=r"1 of 11 images could not be decoded: .*pipe\.jpg \(a FIFO"):
            load_dataset(DataConfig(**data, num_workers=1), "train", image_size=32)  # the cache decodes all 11
        failed = []  # straight into memory (no cache): the split that holds the FIFO names it
        for split in ("train", "test"):
            try:
                load_dataset(DataConfig(**data, cache=False, num_workers=0), split, image_size=32)
            except DatasetError as err:
                failed.append(str(err))
        kept = [load_dataset(DataConfig(**data, skip_bad=True, num_workers=0), split, image_size=32)
                for split in ("train", "test")]
        with pytest.raises(DatasetError, match=r"pipe\.jpg \(a FIFO \(named pipe\), not a regular file\)"):
            run_probe(encoder_file, "folder", tmp_path / "images", device="cpu", precision="fp32", num_workers=0)
    assert opened == [] and len(failed) == 1 and "pipe.jpg (a FIFO (named pipe), not a regular file)" in failed[0]
    assert sum(len(k) for k in kept) == 10 and kept[0].classes == ["cat", "dog"]  # every good image, no FIFO
