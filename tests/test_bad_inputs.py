"""The bad-input table: every command (pretrain, extract, probe, embed) given something wrong fails the same
way. Rows cover missing files, a folder where a file is expected, empty (0-byte) files, garbage (random
bytes, a text file named .pth, a config.yaml that is not a mapping), truncated checkpoint.pt / encoder.pth
files, wrong types and out-of-range values in --set, unknown keys, datasets, devices, precisions and export
formats, and YAML oddities (a date, !!binary, !!set, Python tags).

For each row: exit code 2, stderr is exactly one line starting with "error: ", no traceback (printed or
raised), and nothing under the working folder is written: inputs stay byte-identical, no file or folder
appears (no run directory, no encoder.pth, no .npy, no temporary file left behind)."""

from __future__ import annotations

import hashlib
import os
import shutil
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_set_args
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import app

SETS = tiny_set_args(epochs=1, log_every=None)  # the shared tiny run (tests/conftest.py), one epoch

CONFIGS = {  # written as NAME.yaml in each test's working folder
    "random": None,  # random bytes, not UTF-8
    "config": "hello\n",  # YAML, but a string, not a mapping of sections
    "date": "train:\n  output_dir: 2024-06-01\n",  # YAML 1.1 reads an unquoted date as datetime.date
    "binary": "train:\n  output_dir: !!binary aGVsbG8=\n",  # bytes
    "set": "train:\n  output_dir: !!set {a, b}\n",  # a Python set
    "pyobject": "train:\n  output_dir: !!python/object:argparse.Namespace {}\n",
    "pyapply": "train:\n  epochs: !!python/object/apply:os.system ['touch pwned']\n",  # would create ./pwned
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A real checkpoint.pt and encoder.pth from a one-epoch run on 48 synthetic 16-pixel images."""
    run = tmp_path_factory.mktemp("made") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, ["pretrain", "--output-dir", str(run), *SETS])
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    assert (run / "checkpoint.pt").is_file() and (run / "encoder.pth").is_file()
    return run


def write_inputs(root: Path, made: Path) -> None:
    """Everything a row may point at, relative to root (the working folder during the invoke)."""
    rng = np.random.default_rng(0)
    garbage = b"\xff\xfe" + rng.bytes(4094)
    for name in ("checkpoint.pt", "encoder.pth"):
        shutil.copyfile(made / name, root / name)
    ckpt, enc = (made / "checkpoint.pt").read_bytes(), (made / "encoder.pth").read_bytes()
    (root / "half.pt").write_bytes(ckpt[: len(ckpt) // 2])
    (root / "half.pth").write_bytes(enc[: len(enc) // 2])
    (root / "empty.pth").write_bytes(b"")
    (root / "random.pth").write_bytes(garbage)
    (root / "x.pth").write_text("hello")
    (root / "empty.txt").write_bytes(b"")
    (root / "adir").mkdir()
    for name, text in CONFIGS.items():
        (root / f"{name}.yaml").write_bytes(garbage if text is None else text.encode())
    runs = {"none": None, "empty": b"", "random": garbage, "hello": b"hello", "half": ckpt[: len(ckpt) // 2]}
    for name, data in runs.items():
        (root / "runs" / name).mkdir(parents=True)
        if data is not None:
            (root / "runs" / name / "checkpoint.pt").write_bytes(data)
    (root / "runs" / "dir" / "checkpoint.pt").mkdir(parents=True)  # a folder where the checkpoint should be
    (root / "images").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), np.uint8)).save(root / "images" / f"{i}.png")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every folder and file under root: folders by name, files by size, mtime and content hash."""
    seen: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            seen[os.path.relpath(os.path.join(folder, name), root) + "/"] = ("dir",)
        for name in files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if os.path.isfile(path) else ""
            seen[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, digest)
    return seen


def pretrain(*extra: str, out: str | None = "run") -> list[str]:
    """out=None: no --output-dir, so a YAML row's odd train.output_dir is what the config ends up with."""
    return ["pretrain", *SETS, *extra, *(["--output-dir", out] if out else [])]


def extract(ckpt: str = "checkpoint.pt", *extra: str) -> list[str]:
    return ["extract", ckpt, *extra] if "-o" in extra else ["extract", ckpt, "-o", "out.pth", *extra]


def probe(enc: str = "encoder.pth", *extra: str) -> list[str]:
    argv = ["probe", enc, "--synthetic-size", "40", *extra]
    for flag, value in (("--dataset", "synthetic"), ("--device", "cpu")):
        argv += [] if flag in extra else [flag, value]
    return argv


def embed(images: str = "images", *extra: str) -> list[str]:
    argv = ["embed", images, "--num-workers", "0", *extra]
    for flag, value in (("--encoder", "encoder.pth"), ("-o", "out.npy"), ("--device", "cpu")):
        argv += [] if flag in extra else [flag, value]
    return argv


DEVICES = {"xpu": "xpu", "meta": "meta", "cuda7": "cuda:7"}
ROWS = [
    # pretrain: config files
    ("pretrain-config-missing", pretrain("--config", "missing.yaml")),
    ("pretrain-config-is-dir", pretrain("--config", "adir")),
    ("pretrain-config-random-bytes", pretrain("--config", "random.yaml")),
    ("pretrain-config-not-a-mapping", pretrain("--config", "config.yaml")),
    ("pretrain-yaml-date", pretrain("--config", "date.yaml", out=None)),
    ("pretrain-yaml-binary", pretrain("--config", "binary.yaml", out=None)),
    ("pretrain-yaml-set", pretrain("--config", "set.yaml", out=None)),
    ("pretrain-yaml-python-object", pretrain("--config", "pyobject.yaml", out=None)),
    ("pretrain-yaml-python-apply", pretrain("--config", "pyapply.yaml", out=None)),
    # pretrain --resume: the run directory's checkpoint.pt
    ("pretrain-resume-checkpoint-missing", pretrain("--resume", out="runs/none")),
    ("pretrain-resume-checkpoint-is-dir", pretrain("--resume", out="runs/dir")),
    ("pretrain-resume-checkpoint-empty", pretrain("--resume", out="runs/empty")),
    ("pretrain-resume-checkpoint-random-bytes", pretrain("--resume", out="runs/random")),
    ("pretrain-resume-checkpoint-hello", pretrain("--resume", out="runs/hello")),
    ("pretrain-resume-checkpoint-truncated", pretrain("--resume", out="runs/half")),
    # pretrain: --set values
    ("pretrain-epochs-abc", pretrain("--set", "train.epochs=abc")),
    ("pretrain-lr-list", pretrain("--set", "optim.lr=[1]")),
    ("pretrain-temperature-0", pretrain("--set", "loss.temperature=0")),
    ("pretrain-batch-size-1", pretrain("--set", "train.batch_size=1")),
    ("pretrain-seed-negative", pretrain("--set", "train.seed=-1")),
    ("pretrain-seed-huge", pretrain("--set", "train.seed=20000000000000")),
    ("pretrain-nesterov-momentum-0", pretrain("--set", "optim.nesterov=true", "--set", "optim.momentum=0")),
    ("pretrain-unknown-key-lrr", pretrain("--set", "optim.lrr=0.1")),
    ("pretrain-dataset-imagenet1k", pretrain("--set", "data.dataset=imagenet1k")),
    *[(f"pretrain-device-{k}", pretrain("--device", v)) for k, v in DEVICES.items()],
    ("pretrain-precision-fp64", pretrain("--precision", "fp64")),
    ("pretrain-folder-missing", pretrain("--set", "data.dataset=folder", "--set", "data.root=nope")),
    ("pretrain-folder-empty", pretrain("--set", "data.dataset=folder", "--set", "data.root=adir")),
    # extract
    ("extract-checkpoint-missing", extract("missing.pt")),
    ("extract-checkpoint-is-dir", extract("adir")),
    ("extract-checkpoint-empty", extract("empty.pth")),
    ("extract-checkpoint-random-bytes", extract("random.pth")),
    ("extract-checkpoint-hello", extract("x.pth")),
    ("extract-checkpoint-truncated", extract("half.pt")),
    ("extract-format-unknown", extract("checkpoint.pt", "--format", "coreml")),
    ("extract-output-is-dir", extract("checkpoint.pt", "-o", "adir")),
    # probe
    ("probe-encoder-missing", probe("missing.pth")),
    ("probe-encoder-is-dir", probe("adir")),
    ("probe-encoder-empty", probe("empty.pth")),
    ("probe-encoder-random-bytes", probe("random.pth")),
    ("probe-encoder-hello", probe("x.pth")),
    ("probe-encoder-truncated", probe("half.pth")),
    ("probe-checkpoint-truncated", probe("half.pt")),
    ("probe-dataset-foo", probe("encoder.pth", "--dataset", "foo")),
    ("probe-cifar10-data-dir-missing", probe("encoder.pth", "--dataset", "cifar10", "--data-root", "nope")),
    ("probe-flat-folder-without-labels", probe("encoder.pth", "--dataset", "folder", "--data-root", "images")),
    ("probe-seed-negative", probe("encoder.pth", "--seed", "-1")),
    *[(f"probe-device-{k}", probe("encoder.pth", "--device", v)) for k, v in DEVICES.items()],
    ("probe-precision-fp64", probe("encoder.pth", "--precision", "fp64")),
    ("probe-json-is-dir", probe("encoder.pth", "--json", "adir")),
    # embed
    ("embed-images-missing", embed("missing")),
    ("embed-images-list-empty", embed("empty.txt")),
    ("embed-encoder-missing", embed("images", "--encoder", "missing.pth")),
    ("embed-encoder-is-dir", embed("images", "--encoder", "adir")),
    ("embed-encoder-empty", embed("images", "--encoder", "empty.pth")),
    ("embed-encoder-random-bytes", embed("images", "--encoder", "random.pth")),
    ("embed-encoder-hello", embed("images", "--encoder", "x.pth")),
    ("embed-encoder-truncated", embed("images", "--encoder", "half.pth")),
    ("embed-checkpoint-truncated", embed("images", "--encoder", "half.pt")),
    *[(f"embed-device-{k}", embed("images", "--device", v)) for k, v in DEVICES.items()],
    ("embed-precision-fp64", embed("images", "--precision", "fp64")),
    ("embed-output-is-dir", embed("images", "-o", "adir")),
    ("embed-paths-is-dir", embed("images", "--paths", "adir")),
]


@pytest.mark.parametrize("argv", [argv for _, argv in ROWS], ids=[name for name, _ in ROWS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, made, argv):
    monkeypatch.chdir(tmp_path)  # every relative path in the row, and anything written by mistake, is here
    monkeypatch.setenv("SIMCLR_DATA_DIR", str(tmp_path / "data"))
    write_inputs(tmp_path, made)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, argv)
    after = snapshot(tmp_path)

    problems = []
    exc = None if isinstance(result.exception, SystemExit) else result.exception
    if exc is not None:
        problems.append("raised " + "".join(traceback.format_exception_only(type(exc), exc)).strip())
    if result.exit_code != 2:
        problems.append(f"exit code {result.exit_code}, not 2")
    err = result.stderr.strip()
    if len(err.splitlines()) != 1 or not err.startswith("error: "):
        problems.append(f"stderr is not one 'error: ' line: {err!r}")
    if "Traceback" in result.stdout + result.stderr:
        problems.append("a traceback was printed")
    if after != before:
        added = sorted(set(after) - set(before))
        changed = sorted(k for k in before if k in after and before[k] != after[k])
        removed = sorted(set(before) - set(after))
        problems.append(f"files written: added {added}, changed {changed}, removed {removed}")
    assert not problems, f"simclr {' '.join(argv)}\n" + "\n".join(problems)
