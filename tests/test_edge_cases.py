"""Defects found by trying edge cases as a new user would; each test failed before its fix.

Precision on both kinds of CPU (auto forced through SIMCLR_PRECISION), a flat folder's split seed, hostile
image sizes, evaluation that must leave the live model as it found it, flag values taken as typed, values
that passed validation and crashed later, a device change on resume, and flat folders without labels.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_set_args
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.config import DataConfig, config_from_dict
from simclr_cli.data import NORMALIZATION, load_dataset
from simclr_cli.data.images import decode_image
from simclr_cli.errors import CheckpointError, ImageDecodeError
from simclr_cli.serve.embed import embed_images
from simclr_cli.score.probe import run_probe
from simclr_cli.files import atomic_save, safe_load
from simclr_cli.models import ResNetEncoder
from simclr_cli.models.encoder_file import encoder_payload, load_encoder
from simclr_cli.models.features import extract_features
from simclr_cli.runtime import PRECISION_ENV, RuntimeSetupError, pick_device, resolve_precision, restore_rng
from simclr_cli.train import Trainer, pretrain
from simclr_cli.train.state import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def encoder_file(path: Path, seed: int | None = 0, image_size: int = 16) -> Path:
    torch.manual_seed(0)
    encoder = ResNetEncoder("resnet18", "cifar", 8)
    cfg = config_from_dict({"data": {"image_size": image_size}, "model": {"width": 8}, "train": {"seed": seed or 0}})
    payload = encoder_payload(encoder, cfg, mean=NORMALIZATION["cifar10"][0], std=NORMALIZATION["cifar10"][1])
    if seed is None:
        del payload["provenance"]["seed"]
    return atomic_save(payload, path)


def grey_folder(root: Path, n: int = 20, classes: tuple[str, ...] = ("a", "b")) -> None:
    """n images, each a different grey level (so an image identifies itself), in class folders."""
    for i in range(n):
        p = root / classes[i % len(classes)] / f"{i:02d}.png" if classes else root / f"{i:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (i * 12,) * 3).save(p)


# --- precision: the suite on both kinds of CPU ------------------------------------------------------------

def test_forced_precision_decides_what_auto_means(monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    assert resolve_precision("auto", CPU) == "bf16" and resolve_precision("fp32", CPU) == "fp32"
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    assert resolve_precision("auto", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    monkeypatch.setenv(PRECISION_ENV, "fp64")
    with pytest.raises(RuntimeSetupError, match=PRECISION_ENV):
        resolve_precision("auto", CPU)
    monkeypatch.delenv(PRECISION_ENV)
    with pytest.raises(RuntimeSetupError, match="unknown precision"):
        resolve_precision("fp16", CPU, ("auto", "fp32", "bf16"))


def test_embed_gives_fp32_rows_where_auto_would_be_bf16(tmp_path, monkeypatch):
    """What failed on AMX machines: embed took `auto`, so its rows were bf16-rounded there."""
    monkeypatch.setenv(PRECISION_ENV, "bf16")  # what auto means on an AMX CPU
    enc = encoder_file(tmp_path / "enc.pth")
    grey_folder(tmp_path / "img", 6)
    result = embed_images(tmp_path / "img", enc, tmp_path / "v.npy", num_workers=0, device="cpu")
    images = torch.stack([decode_image(p, 16) for p in result.paths])
    loaded = load_encoder(enc)
    expected = extract_features(loaded.encoder, images, loaded.mean, loaded.std, 16, CPU, "fp32")
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_probe_and_embed_take_precision_and_report_it(tmp_path):
    enc = encoder_file(tmp_path / "enc.pth")
    r = CliRunner().invoke(app, ["probe", str(enc), "--dataset", "synthetic", "--synthetic-size", "40",
                                 "--device", "cpu", "--precision", "bf16", "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert "cpu, bf16" in r.stderr and json.loads((tmp_path / "p.json").read_text())["precision"] == "bf16"
    grey_folder(tmp_path / "img", 4)
    r = CliRunner().invoke(app, ["embed", str(tmp_path / "img"), "-e", str(enc), "-o", str(tmp_path / "v.npy"),
                                 "--workers", "0", "--device", "cpu", "--precision", "bf16"])
    assert r.exit_code == 0 and "cpu, bf16" in r.stderr, r.output


# --- a: the probe splits a flat folder with the pretraining seed ----------------------------------------

def test_probe_splits_a_flat_folder_with_the_pretraining_seed(tmp_path):
    grey_folder(tmp_path / "img")
    held_out = {seed: sorted(load_dataset(DataConfig(dataset="folder", root=tmp_path / "img", num_workers=0), "test", seed=seed, image_size=16).images[:, 0, 0, 0].tolist()) for seed in (0, 1)}
    assert held_out[0] != held_out[1]  # else the test below could not tell the seeds apart
    report = run_probe(encoder_file(tmp_path / "enc.pth", seed=1), "folder", tmp_path / "img", device="cpu",
                       num_workers=0)
    assert report["dataset"]["split_seed"] == 1 and not report["notes"]
    report = run_probe(tmp_path / "enc.pth", "folder", tmp_path / "img", device="cpu", num_workers=0, seed=0)
    assert report["dataset"]["split_seed"] == 0 and "differently from pretraining" in report["notes"][0]
    report = run_probe(encoder_file(tmp_path / "anon.pth", seed=None), "folder", tmp_path / "img", device="cpu",
                       num_workers=0)
    assert report["dataset"]["split_seed"] == 0 and "records no pretraining seed" in report["notes"][0]


# --- b: hostile image sizes ----------------------------------------------------------------------------

def png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose header is rewritten to declare width x height (its data stays small)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("width, height, why", [(1, 200_000, "stripe"), (9_000, 9_000, "megapixels")])
def test_images_of_hostile_sizes_are_bad_files(tmp_path, width, height, why):
    path = png_declaring(tmp_path / "x.png", width, height)
    assert path.stat().st_size < 1000
    with pytest.raises(ImageDecodeError, match=why):
        decode_image(path, 224)


def test_hostile_sizes_are_named_and_skipped_by_embed(tmp_path):
    grey_folder(tmp_path / "img", 3, classes=())
    png_declaring(tmp_path / "img" / "stripe.png", 1, 200_000)
    enc = encoder_file(tmp_path / "enc.pth")
    r = CliRunner().invoke(app, ["embed", str(tmp_path / "img"), "-e", str(enc), "-o", str(tmp_path / "v.npy"),
                                 "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 2 and "stripe.png" in r.stderr and not (tmp_path / "v.npy").exists()
    r = CliRunner().invoke(app, ["embed", str(tmp_path / "img"), "-e", str(enc), "-o", str(tmp_path / "v.npy"),
                                 "--workers", "0", "--device", "cpu", "--skip-bad"])
    assert r.exit_code == 0 and np.load(tmp_path / "v.npy").shape[0] == 3


def test_centre_crop_keeps_the_centre_and_is_exact_at_the_target_size(tmp_path):
    img = np.zeros((16, 48, 3), np.uint8)
    img[:, 16:32] = 200  # a wide image: only its middle third survives the square crop
    Image.fromarray(img).save(tmp_path / "wide.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "wide.png", 16).numpy(), np.full((3, 16, 16), 200))
    small = decode_image(tmp_path / "wide.png", 8)  # antialiasing reads a pixel past the box at each edge
    assert (small[:, :, 1:-1] == 200).all() and (small > 150).all()


# --- c: evaluation leaves the live model as it found it -------------------------------------------------

def test_monitor_leaves_the_model_in_its_memory_format_and_mode(tmp_path):
    cfg = tiny_config(tmp_path, "train.channels_last=false", epochs=2)
    trainer = Trainer(cfg)
    conv = next(m.weight for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    trainer.model.train()
    assert trainer.evaluate() is not None
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    assert trainer.model.training


def test_resume_is_exact_without_channels_last(tmp_path):
    extra = ["train.channels_last=false", "train.eval_every=1"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    pretrain(tiny_config(straight, *extra, epochs=2))
    pretrain(tiny_config(stopped, *extra, epochs=1))
    pretrain(tiny_config(stopped, *extra, epochs=2), resume=True)
    a, b = load_checkpoint(straight / "checkpoint.pt")["model"], load_checkpoint(stopped / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- d: files that are not PyTorch files ----------------------------------------------------------------

@pytest.mark.parametrize("content", [b"hello", b"hello\n" * 100, b"PK\x03\x04" + bytes(60), bytes(range(256))])
def test_non_pytorch_files_are_one_clear_error(tmp_path, content):
    (tmp_path / "x.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match="not a PyTorch file"):
        safe_load(tmp_path / "x.pth")


# --- e: flags that name a path or a word are strings ----------------------------------------------------

@pytest.mark.parametrize("name", ["runs/exp #3", "42", "no"])
def test_output_dir_flag_is_taken_as_typed(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["pretrain", "--output-dir", name, *tiny_set_args(epochs=2),
                                 "--set", "train.epochs=1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / name / "encoder.pth").is_file()


# --- g: values that passed validation and crashed later -------------------------------------------------

@pytest.mark.parametrize("name", ["xpu", "hpu", "meta", "cpu:1", "tpu"])
def test_devices_this_tool_cannot_run_on_are_refused(name):
    with pytest.raises(RuntimeSetupError, match="unknown device"):
        pick_device(name)


def test_cuda_index_beyond_the_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(RuntimeSetupError, match="2 CUDA GPUs are visible"):
        pick_device("cuda:2")


# --- h: a device change on resume -----------------------------------------------------------------------

@pytest.mark.parametrize("recorded", [True, False])
def test_resume_from_another_device_reseeds_the_augmentation(tmp_path, recorded):
    out = tmp_path / "run"
    pretrain(tiny_config(out, epochs=1))
    ckpt = load_checkpoint(out / "checkpoint.pt")
    ckpt["rng"]["augment"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA (Philox) generator's state
    if recorded:
        ckpt["rng"]["augment_device"] = "cuda"
    else:  # a checkpoint written before the device was recorded
        ckpt["rng"].pop("augment_device", None)
    atomic_save(ckpt, out / "checkpoint.pt")
    notices = []
    summary = pretrain(tiny_config(out, epochs=2), resume=True,
                       callback=lambda event, d: notices.append(d["message"]) if event == "notice" else None)
    assert summary["epochs"] == 2 and any("augmentation stream is reseeded" in n for n in notices)


def test_cuda_rng_states_of_more_gpus_restore_on_fewer(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.append(index))
    state = {"torch": torch.get_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}
    assert restore_rng(state) and restored == [0]


# --- i: a flat folder without labels --------------------------------------------------------------------

def test_pretraining_on_an_unlabelled_flat_folder_uses_every_image(tmp_path):
    grey_folder(tmp_path / "img", 20, classes=())
    cfg = tiny_config(tmp_path / "run", "data.dataset=folder", f"data.root={tmp_path / 'img'}", "data.num_workers=0",
                      epochs=2)
    assert len(Trainer(cfg).data) == 20
