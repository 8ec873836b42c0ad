"""`simclr embed`: inputs, the streamed .npy, stdout and terminal handling, bad files, and flat memory."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.config import config_from_dict
from simclr_cli.data import NORMALIZATION
from simclr_cli.data.images import decode_image
from simclr_cli.serve.embed import embed_images
from simclr_cli.serve.vectors import HEADER_BYTES, NpyWriter, npy_header
from simclr_cli.files import atomic_save
from simclr_cli.models import ResNetEncoder
from simclr_cli.models.encoder_file import encoder_payload, load_encoder
from simclr_cli.models.features import extract_features

BAD = ("bad/corrupt.jpg", "bad/truncated.png", "bad/zero.jpg", "bad/text.jpg", "bad/dangling.png")
CLI = [sys.executable, "-m", "simclr_cli"]


def write_encoder(path: Path, *, width: int = 8, stem: str = "cifar", image_size: int = 32, seed: int = 0) -> Path:
    """A native encoder file built with `encoder_payload`, random weights (BN stats perturbed so h varies)."""
    torch.manual_seed(seed)
    encoder = ResNetEncoder("resnet18", stem, width)
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    cfg = config_from_dict({"data": {"image_size": image_size}, "model": {"stem": stem, "width": width}})
    mean, std = NORMALIZATION["cifar10"]
    return atomic_save(encoder_payload(encoder, cfg, mean=mean, std=std), path)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    return write_encoder(tmp_path_factory.mktemp("enc") / "encoder.pth")


def _save(path: Path, img: Image.Image, **kw) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path.name


def write_mixed_folder(root: Path, bad: bool = True) -> list[str]:
    """Every format and mode the issue names, odd sizes, in subfolders; plus each kind of bad file.
    Returns the good files' paths relative to root, sorted."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (27, 40, 3), np.uint8))  # landscape: resize + centre crop
    rgba = Image.fromarray(rng.integers(0, 256, (36, 20, 4), np.uint8), "RGBA")  # portrait, partly transparent
    i16 = Image.fromarray(rng.integers(0, 65536, (30, 30), np.uint16))
    assert i16.mode == "I;16"
    frames = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).convert("P") for _ in range(2)]
    images = {"jpeg/rgb.jpg": (rgb, {}), "jpeg/l.JPEG": (rgb.convert("L"), {}),
              "jpeg/cmyk.jpg": (rgb.convert("CMYK"), {}), "png/rgba.png": (rgba, {}),
              "png/la.png": (rgba.convert("LA"), {}), "png/p.png": (rgb.convert("P"), {"transparency": 3}),
              "png/i16.png": (i16, {}), "webp/rgb.webp": (rgb, {}), "webp/rgba.webp": (rgba, {"lossless": True}),
              "bmp/rgb.bmp": (rgb, {}), "bmp/p.bmp": (rgb.convert("P"), {}),
              "gif/anim.gif": (frames[0], {"save_all": True, "append_images": frames[1:]}),
              "tiff/rgb.tif": (rgb, {}), "tiff/cmyk.tiff": (rgb.convert("CMYK"), {}), "tiff/i16.tiff": (i16, {})}
    for rel, (img, kw) in images.items():
        _save(root / rel, img, **kw)
        with Image.open(root / rel) as back:
            assert back.mode == img.mode, rel  # the file really holds that mode
    if bad:
        (root / "bad").mkdir()
        good_png = (root / "png/rgba.png").read_bytes()
        (root / "bad/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 600, np.uint8).tobytes())
        (root / "bad/truncated.png").write_bytes(good_png[: len(good_png) // 2])
        (root / "bad/zero.jpg").write_bytes(b"")
        (root / "bad/text.jpg").write_text("not an image, renamed .jpg\n")
        os.symlink(root / "gone.png", root / "bad/dangling.png")  # unreadable: the target does not exist
    return sorted(images)


def invoke(*args: str):
    return CliRunner().invoke(app, ["embed", *map(str, args)], catch_exceptions=False)


def expected_rows(encoder_file: Path, paths: list[Path], normalize: bool = False) -> np.ndarray:
    """What `probe`'s feature extraction gives for the same files: decode, then `extract_features`."""
    loaded = load_encoder(encoder_file)
    images = torch.stack([decode_image(p, loaded.image_size) for p in paths])
    h = extract_features(loaded.encoder, images, loaded.mean, loaded.std, loaded.image_size,
                         torch.device("cpu"), "fp32", batch_size=7)
    return torch.nn.functional.normalize(h, dim=1).numpy() if normalize else h.numpy()


def test_mixed_folder_skip_bad_matches_extract_features(tmp_path, encoder_file):
    good = write_mixed_folder(tmp_path / "images")
    out, listing = tmp_path / "v.npy", tmp_path / "paths.txt"
    r = invoke(tmp_path / "images", "--encoder", encoder_file, "-o", out, "--paths", listing, "--skip-bad",
               "--batch-size", "4", "--workers", "2")
    assert r.exit_code == 0, r.output
    rows = listing.read_text().splitlines()
    assert rows == [str(tmp_path / "images" / g) for g in good]  # sorted, recursive, bad ones left out
    v = np.load(out)
    assert v.dtype == np.float32 and v.shape == (len(rows), 64)  # resnet18 width 8: D = 8 * 8
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as `>` would make it, not mkstemp's 0600
    np.testing.assert_allclose(v, expected_rows(encoder_file, [Path(p) for p in rows]), rtol=1e-4, atol=1e-5)
    for rel in BAD:
        assert f"bad image: {tmp_path / 'images' / rel}" in r.stderr
    summary = r.stderr.strip().splitlines()[-1]  # one line, however narrow the terminal
    assert summary.startswith(f"embedded {len(good)} images -> {out}: ({len(good)}, 64) float32, ")
    assert summary.endswith(f"images/s; left out {len(BAD)} bad images")
    assert r.stdout == ""


def test_bad_files_fail_the_run_and_leave_nothing(tmp_path, encoder_file):
    write_mixed_folder(tmp_path / "images")
    out, listing = tmp_path / "out" / "v.npy", tmp_path / "out" / "paths.txt"
    r = invoke(tmp_path / "images", "--encoder", encoder_file, "-o", out, "--paths", listing, "--workers", "0")
    assert r.exit_code == 2
    for rel in BAD:  # every bad file, by path, not just the first
        assert str(tmp_path / "images" / rel) in r.stderr
    assert f"{len(BAD)} of 20 images could not be decoded" in r.stderr and "--skip-bad" in r.stderr
    assert list((tmp_path / "out").iterdir()) == []  # no array, no paths file, no temporary file


def test_stdout_carries_only_the_array(tmp_path, encoder_file):
    good = write_mixed_folder(tmp_path / "images", bad=False)
    r = invoke(tmp_path / "images", "--encoder", encoder_file, "--normalize", "--batch-size", "5")
    assert r.exit_code == 0, r.stderr
    v = np.load(io.BytesIO(r.stdout_bytes))  # nothing but the .npy on stdout
    paths = [tmp_path / "images" / g for g in good]
    np.testing.assert_allclose(v, expected_rows(encoder_file, paths, normalize=True), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)


def test_skip_bad_to_a_pipe_gets_the_right_header(tmp_path, encoder_file):
    """A stream cannot be patched: with --skip-bad the rows are spooled, then written under the real count."""
    good = write_mixed_folder(tmp_path / "images")
    r = invoke(tmp_path / "images", "--encoder", encoder_file, "--skip-bad", "--workers", "0")
    assert r.exit_code == 0, r.stderr
    assert np.load(io.BytesIO(r.stdout_bytes)).shape == (len(good), 64)


def test_shell_redirection_to_a_real_file(tmp_path, encoder_file):
    """`> out.npy`: header patched in place under --skip-bad; a failed run truncates the file to nothing."""
    good = write_mixed_folder(tmp_path / "images")
    cmd = f"{' '.join(CLI)} embed images --encoder {encoder_file} --workers 0 --skip-bad > out.npy"
    done = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "out.npy", "rb") as f:
        assert f.read(HEADER_BYTES) == npy_header(len(good), 64)
    assert np.load(tmp_path / "out.npy").shape == (len(good), 64)
    failed = subprocess.run(cmd.replace(" --skip-bad", ""), shell=True, cwd=tmp_path, capture_output=True)
    assert failed.returncode == 2 and (tmp_path / "out.npy").stat().st_size == 0


def test_terminal_is_refused(tmp_path, encoder_file):
    write_mixed_folder(tmp_path / "images", bad=False)
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([*CLI, "embed", "images", "--encoder", str(encoder_file)], cwd=tmp_path,
                              stdout=follower, stderr=subprocess.PIPE, text=True, timeout=120)
        os.set_blocking(leader, False)
        try:
            written = os.read(leader, 1 << 16)
        except BlockingIOError:
            written = b""
    finally:
        os.close(leader)
        os.close(follower)
    assert done.returncode == 2 and written == b""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "terminal" in lines[0] and "> vectors.npy" in lines[0] and "-o" in lines[0]


def test_single_image_and_list_file_match_the_folder(tmp_path, encoder_file):
    good = write_mixed_folder(tmp_path / "images", bad=False)
    assert invoke(tmp_path / "images", "-e", encoder_file, "-o", tmp_path / "all.npy").exit_code == 0
    whole = np.load(tmp_path / "all.npy")
    r = invoke(tmp_path / "images" / good[3], "-e", encoder_file, "-o", tmp_path / "one.npy")
    assert r.exit_code == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "one.npy"), whole[3:4], rtol=1e-4, atol=1e-5)
    # A list in another folder: relative paths relative to the list, absolute ones as they are, blank lines
    # skipped, order kept (reversed here), a path listed twice gives two rows.
    (tmp_path / "lists").mkdir()
    lines = [f"../images/{g}" for g in reversed(good)] + ["", f"  {tmp_path / 'images' / good[0]}  "]
    (tmp_path / "lists" / "some.txt").write_text("\n".join(lines) + "\n")
    r = invoke(tmp_path / "lists" / "some.txt", "-e", encoder_file, "-o", tmp_path / "list.npy",
               "--paths", tmp_path / "rows.txt")
    assert r.exit_code == 0, r.stderr
    v, rows = np.load(tmp_path / "list.npy"), (tmp_path / "rows.txt").read_text().splitlines()
    assert v.shape[0] == len(rows) == len(good) + 1
    np.testing.assert_allclose(v, np.concatenate([whole[::-1], whole[:1]]), rtol=1e-4, atol=1e-5)
    assert Path(rows[0]).resolve() == (tmp_path / "images" / good[-1]).resolve()


def test_user_errors_are_one_line(tmp_path, encoder_file, monkeypatch):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    r = invoke(tmp_path / "empty", "-e", encoder_file, "-o", tmp_path / "v.npy")
    assert r.exit_code == 2 and "no images under" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "lists no image paths" in invoke(tmp_path / "empty.txt", "-e", encoder_file, "-o", "v.npy").stderr
    monkeypatch.chdir(tmp_path)  # no encoder.pth here
    write_mixed_folder(tmp_path / "images", bad=False)
    r = invoke("images", "-o", "v.npy")
    assert r.exit_code == 2 and "no encoder.pth" in r.stderr and "simclr extract" in r.stderr
    assert "--encoder" in r.stderr and not (tmp_path / "v.npy").exists()
    r = invoke("images", "-e", "missing.pth", "-o", "v.npy")
    assert r.exit_code == 2 and "missing.pth" in r.stderr
    r = invoke("images", "-e", encoder_file, "-o", "images")
    assert r.exit_code == 2 and "is a folder" in r.stderr
    help_text = CliRunner().invoke(app, ["embed", "--help"], env={"COLUMNS": "200"}).output
    assert "Default: encoder.pth in the working directory" in help_text and "Example: simclr embed" in help_text


def test_plain_state_dict_works_and_its_assumptions_are_shown(tmp_path, encoder_file):
    """The formats probe takes: a torchvision-style state dict has no image size or normalisation."""
    good = write_mixed_folder(tmp_path / "images", bad=False)
    payload = torch.load(encoder_file, weights_only=True)
    torch.save(payload["state_dict"], tmp_path / "resnet.pth")
    r = invoke(tmp_path / "images", "-e", tmp_path / "resnet.pth", "-o", tmp_path / "v.npy")
    assert r.exit_code == 0, r.stderr
    assert "torchvision state dict" in r.stderr and "note:" in r.stderr and "assumed 32 px" in r.stderr
    assert np.load(tmp_path / "v.npy").shape == (len(good), 64)


def test_npy_writer_patches_the_row_count_in_place():
    buf = io.BytesIO(b"prefix")
    buf.seek(0, io.SEEK_END)
    w = NpyWriter(buf, rows=10, dim=3, seekable=True)
    w.write(torch.arange(6, dtype=torch.float32).view(2, 3))
    w.write(torch.ones(1, 3))
    w.finish()
    data = buf.getvalue()[len(b"prefix"):]
    assert len(npy_header(10**15, 10**6)) == HEADER_BYTES and HEADER_BYTES % 64 == 0
    v = np.load(io.BytesIO(data))
    assert v.shape == (3, 3) and v.tolist() == [[0, 1, 2], [3, 4, 5], [1, 1, 1]]


def test_core_reports_through_the_callback(tmp_path, encoder_file):
    write_mixed_folder(tmp_path / "images")
    events = []
    result = embed_images(tmp_path / "images", encoder_file, tmp_path / "v.npy", skip_bad=True, num_workers=0,
                          batch_size=8, callback=lambda e, d: events.append((e, d)))
    assert result.rows == 15 and result.dim == 64 and len(result.failures) == len(BAD)
    assert events[0][0] == "start" and events[0][1]["images"] == 20
    assert [d["done"] for e, d in events if e == "progress"] == [8, 16, 20]
    assert sorted(str(d["path"]) for e, d in events if e == "bad") == sorted(str(tmp_path / "images" / b) for b in BAD)


# --- memory ----------------------------------------------------------------------------------------------

# Held still so that what the code keeps is what gets measured. glibc's dynamic mmap threshold lets freed
# activation buffers pile up in the heap and come back in a sawtooth (+21 MiB between two runs of this same
# code); a fixed 256 KiB threshold unmaps them at once (+1.4 MiB). One compute thread: two OpenMP threads on
# a busy 2-core machine stall in spin-waits (20x slower here).
QUIET_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "262144", "OMP_NUM_THREADS": "1"}


def _peak_rss_mb(folder: Path, encoder: Path, out: Path) -> float:
    """Peak RSS of an `embed` run, from a fresh parent so earlier children of pytest do not count: the
    largest of the embed process and its decoding workers (ru_maxrss of waited-for descendants)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", probe, *CLI, "embed", str(folder), "-e", str(encoder), "-o",
                           str(out), "--batch-size", "64", "--workers", "2"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **QUIET_MEMORY})
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1]) / 1024  # Linux reports KiB


def test_memory_stays_flat_on_a_large_folder(tmp_path):
    """3,000 vs 300 tiny PNGs decoded to 128 px: streaming keeps the growth to the path list (+1.4 MiB here).
    An embed that kept the decoded batches (3,000 x 48 KiB) measured +55 MiB: above the start-up peak of
    importing torch, which hides anything much smaller, so the images are this large on purpose."""
    encoder = write_encoder(tmp_path / "enc.pth", stem="imagenet", image_size=128)
    rng = np.random.default_rng(0)
    tiles = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)) for _ in range(16)]
    for n, name in ((300, "small"), (3000, "large")):
        for i in range(n):
            _save(tmp_path / name / f"{i // 500:02d}" / f"{i:05d}.png", tiles[i % 16])
    small = _peak_rss_mb(tmp_path / "small", encoder, tmp_path / "small.npy")
    large = _peak_rss_mb(tmp_path / "large", encoder, tmp_path / "large.npy")
    assert np.load(tmp_path / "large.npy", mmap_mode="r").shape == (3000, 64)
    assert large - small < 20, f"peak RSS {small:.0f} MiB for 300 images, {large:.0f} MiB for 3,000"


# --- --format csv ----------------------------------------------------------------------------------------

def test_csv_round_trips_to_the_npy_rows(tmp_path, encoder_file):
    """csv: a header, then the path and D values per image, in the .npy's row order, to the float32 bit."""
    import csv

    good = write_mixed_folder(tmp_path / "images")
    odd = tmp_path / "images" / 'odd, "quoted" name.png'  # a path the csv must quote
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(odd)
    npy, listing = tmp_path / "v.npy", tmp_path / "paths.txt"
    assert invoke(tmp_path / "images", "-e", encoder_file, "-o", npy, "--paths", listing, "--skip-bad").exit_code == 0
    r = invoke(tmp_path / "images", "-e", encoder_file, "-o", tmp_path / "v.csv", "--skip-bad")  # csv from the suffix
    assert r.exit_code == 0, r.output
    with open(tmp_path / "v.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", *(f"h_{j}" for j in range(64))]
    assert [row[0] for row in rows[1:]] == listing.read_text().splitlines() and len(rows) == len(good) + 2
    assert str(odd) in [row[0] for row in rows[1:]]
    values = np.array([[float(v) for v in row[1:]] for row in rows[1:]], dtype=np.float32)
    assert np.array_equal(values, np.load(npy))  # exactly the .npy's float32 values
    piped = invoke(tmp_path / "images", "-e", encoder_file, "--format", "csv", "--skip-bad")  # stdout, shrunk by bad files
    assert piped.exit_code == 0 and piped.stdout_bytes == (tmp_path / "v.csv").read_bytes()


def test_csv_to_a_terminal_is_allowed_and_an_unknown_format_is_one_line(tmp_path, encoder_file):
    write_mixed_folder(tmp_path / "images", bad=False)
    r = invoke(tmp_path / "images", "-e", encoder_file, "--format", "parquet", "-o", tmp_path / "v.parquet")
    assert r.exit_code == 2 and "use --format npy or --format csv" in r.stderr and not (tmp_path / "v.parquet").exists()
    assert len(r.stderr.strip().splitlines()) == 1
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tmp_path / "one.png")  # ~1 kB: fits the pty's buffer
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([*CLI, "embed", "one.png", "-e", str(encoder_file), "--format", "csv", "--workers", "0"],
                              cwd=tmp_path, stdout=follower, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(leader)
        os.close(follower)
    assert done.returncode == 0, done.stderr
