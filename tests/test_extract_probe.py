"""Encoder files: every accepted format loads to the same function, every rejected input is one clear line,
and the CLI chain pretrain -> extract -> probe writes the report it promises."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from torch import nn
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.config import config_digest, load_config
from simclr_cli.data import NORMALIZATION, normalization_for
from simclr_cli.errors import CheckpointError
from simclr_cli.exports.extract import extract_encoder
from simclr_cli.files import atomic_save
from simclr_cli.methods import build_method
from simclr_cli.models.encoder_file import encoder_meta, encoder_payload, load_encoder
from simclr_cli.train.optim import build_optimizer, build_scheduler
from simclr_cli.train.state import Parts, RunState, checkpoint

ENV = {"COLUMNS": "120", "NO_COLOR": "1"}


def write_checkpoint(path: Path, width: int = 8, seed: int = 3, layout: str = "today"):
    """A checkpoint as `simclr pretrain` writes it (epoch 2, step 10), without the training; layout "0.1": as
    simclr-cli 0.1 wrote it, without the encoder's description (read from its config instead)."""
    cfg = load_config(None, ["data.dataset=synthetic", f"model.width={width}", "data.image_size=16",
                             f"train.seed={seed}"])
    torch.manual_seed(seed)
    method = build_method(cfg)
    model = method.model
    opt = build_optimizer(model, "sgd", 0.1)
    sched = build_scheduler(opt, "cosine", 100)
    mean, std = normalization_for(cfg.data.dataset)
    payload = checkpoint(cfg, RunState(epoch=2, step=10), Parts(model, method, opt, sched, None, torch.Generator()),
                         world_size=1, train_images=100, encoder=encoder_meta(model.encoder, cfg, model.head, mean, std))
    if layout == "0.1":
        del payload["encoder"]
    atomic_save(payload, path)
    return model.eval(), cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    model, cfg = write_checkpoint(folder / "checkpoint.pt")
    return folder, model, cfg


def outputs(encoder: nn.Module, size: int = 16) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return encoder.eval()(torch.randn(2, 3, size, size))


def cifar_torchvision_resnet18() -> nn.Module:
    m = torchvision.models.resnet18()
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


# --- accepted formats ------------------------------------------------------------------------------------

def test_native_file_from_checkpoint_keeps_weights_head_and_provenance(run, tmp_path):
    folder, model, cfg = run
    info = extract_encoder(folder / "checkpoint.pt", tmp_path / "encoder.pth")
    assert info["format"] == "native" and info["has_head"] and info["width"] == 8
    loaded = load_encoder(tmp_path / "encoder.pth")
    assert loaded.kind == "native encoder file" and loaded.notes == []
    assert not loaded.encoder.training and loaded.image_size == 16
    assert (loaded.mean, loaded.std) == tuple(map(tuple, normalization_for("synthetic")))
    p = loaded.provenance
    assert (p["epoch"], p["step"], p["dataset"], p["seed"], p["config_digest"]) == (2, 10, "synthetic", 3,
                                                                                    config_digest(cfg))
    torch.testing.assert_close(outputs(loaded.encoder), outputs(model.encoder))
    h = torch.randn(4, loaded.encoder.feature_dim)
    torch.testing.assert_close(loaded.head(h), model.head(h))


def test_checkpoint_loads_directly_as_the_same_encoder(run):
    folder, model, _ = run
    loaded = load_encoder(folder / "checkpoint.pt")
    assert loaded.kind == "pretraining checkpoint" and loaded.head is not None
    assert loaded.provenance["epoch"] == 2
    torch.testing.assert_close(outputs(loaded.encoder), outputs(model.encoder))


def test_a_checkpoint_of_simclr_cli_0_1_loads_the_same_encoder_without_todays_rules(tmp_path, run):
    """0.1 wrote no description of the encoder: it is read from the checkpoint's config as it is, so a rule
    tightened since (here a config value today's validation refuses) never stops an old checkpoint loading."""
    folder, _, cfg = run
    model, _ = write_checkpoint(tmp_path / "checkpoint.pt", layout="0.1")
    old = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    old["config"]["train"]["knn_k"] = 0  # refused by today's rules
    atomic_save(old, tmp_path / "checkpoint.pt")
    loaded = load_encoder(tmp_path / "checkpoint.pt")
    today = load_encoder(folder / "checkpoint.pt")
    assert loaded.encoder.describe() == today.encoder.describe() and loaded.image_size == today.image_size
    assert (loaded.mean, loaded.std) == (today.mean, today.std) and loaded.provenance["config_digest"] is None
    torch.testing.assert_close(outputs(loaded.encoder), outputs(model.encoder))
    h = torch.randn(4, loaded.encoder.feature_dim)
    torch.testing.assert_close(loaded.head(h), model.head(h))


def test_torchvision_export_loads_strictly_into_torchvision(tmp_path):
    model, _ = write_checkpoint(tmp_path / "checkpoint.pt", width=64)
    info = extract_encoder(tmp_path / "checkpoint.pt", tmp_path / "resnet18.pth", fmt="torchvision")
    assert info["format"] == "torchvision" and not info["has_head"]
    tv = cifar_torchvision_resnet18()
    tv.fc = nn.Identity()
    tv.load_state_dict(torch.load(tmp_path / "resnet18.pth", weights_only=True), strict=True)
    torch.testing.assert_close(outputs(tv), outputs(model.encoder))
    assert load_encoder(tmp_path / "resnet18.pth").kind == "torchvision state dict"


@pytest.mark.parametrize("arch,stem", [("resnet18", "cifar"), ("resnet50", "imagenet")])
def test_torchvision_state_dict_is_recognised_with_fc_ignored(tmp_path, arch, stem):
    tv = cifar_torchvision_resnet18() if stem == "cifar" else getattr(torchvision.models, arch)()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")  # fc.weight and fc.bias included
    loaded = load_encoder(tmp_path / "tv.pth")
    assert loaded.kind == "torchvision state dict" and loaded.head is None
    assert loaded.encoder.describe()["arch"] == arch and loaded.encoder.stem == stem and loaded.encoder.width == 64
    assert (loaded.image_size, loaded.mean, loaded.std) == (32, *NORMALIZATION["cifar10"])
    assert any("assumed 32 px" in note for note in loaded.notes)
    tv.fc = nn.Identity()
    torch.testing.assert_close(outputs(loaded.encoder, 32), outputs(tv, 32))


def test_original_design_sequential_state_dict_infers_imagenet_stem(tmp_path):
    seq = nn.Sequential(*list(torchvision.models.resnet18().children())[:-1])
    torch.save(seq.state_dict(), tmp_path / "model.pth")  # keys 0.weight, 1.weight, 4.0.conv1.weight, ...
    loaded = load_encoder(tmp_path / "model.pth")
    assert loaded.kind == "original design state dict (nn.Sequential of resnet18 children)"
    assert (loaded.encoder.arch, loaded.encoder.stem, loaded.encoder.width) == ("resnet18", "imagenet", 64)
    assert loaded.image_size == 32 and loaded.mean == NORMALIZATION["cifar10"][0]
    torch.testing.assert_close(outputs(loaded.encoder, 32), outputs(seq, 32).flatten(1))


# --- rejected inputs -------------------------------------------------------------------------------------

class WritesAFile:
    """Unpickling this calls open(target, "w"): a payload that acts on load."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


def bad_inputs(tmp_path: Path, run) -> dict[str, Path]:
    folder = run[0]
    good = (folder / "checkpoint.pt").read_bytes()
    files = {"empty": b"", "truncated": good[: len(good) // 2], "random bytes": torch.randint(0, 256, (4096,),
             generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes(),
             "yaml": yaml.safe_dump({"model": {"width": 8}}).encode()}
    paths = {"missing": tmp_path / "nope.pth"}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.pth"
        paths[name].write_bytes(data)
    for name, obj in {"a list": [torch.zeros(1)], "foreign state dict": {"encoder.w": torch.zeros(1)},
                      "other format": {"format": "someone-else/model"},
                      "damaged native": {**encoder_payload(run[1].encoder, run[2]), "state_dict": {}}}.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.pth"
        torch.save(obj, paths[name])
    return paths


def test_every_rejected_input_is_one_line(tmp_path, run):
    for name, path in bad_inputs(tmp_path, run).items():
        for call in (lambda: load_encoder(path), lambda: extract_encoder(path, tmp_path / "out.pth")):
            with pytest.raises(CheckpointError) as err:
                call()
            assert "\n" not in str(err.value) and str(path) in str(err.value), (name, str(err.value))
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_never_runs(tmp_path, writer):
    target, path = tmp_path / "pwned", tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save({"state_dict": WritesAFile(target)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(WritesAFile(target), f, protocol=2)
    for call in (load_encoder, lambda p: extract_encoder(p, tmp_path / "out.pth")):
        with pytest.raises(CheckpointError, match="refused"):
            call(path)
    assert not target.exists()


def test_extract_refuses_encoder_files_state_dicts_and_overwriting(run, tmp_path):
    folder = run[0]
    extract_encoder(folder / "checkpoint.pt", tmp_path / "encoder.pth")
    with pytest.raises(CheckpointError, match="already an encoder file; use it directly"):
        extract_encoder(tmp_path / "encoder.pth", tmp_path / "again.pth")
    torch.save(cifar_torchvision_resnet18().state_dict(), tmp_path / "tv.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        extract_encoder(tmp_path / "tv.pth", tmp_path / "again.pth")
    with pytest.raises(CheckpointError, match="overwrite the checkpoint"):
        extract_encoder(folder / "checkpoint.pt", folder / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="needs width 64"):
        extract_encoder(folder / "checkpoint.pt", tmp_path / "tv8.pth", fmt="torchvision")
    with pytest.raises(CheckpointError, match="unknown encoder format"):
        extract_encoder(folder / "checkpoint.pt", tmp_path / "x.pth", fmt="coreml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.pth", "tv.pth"]  # no temporary files left


# --- the CLI chain ---------------------------------------------------------------------------------------

def test_cli_pretrain_extract_probe_json(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, ["pretrain", "-o", str(out), "--device", "cpu", "--set", "data.dataset=synthetic",
                            "--set", "model.width=8", "--set", "data.image_size=16", "--set", "train.epochs=1",
                            "--set", "data.synthetic_size=64", "--set", "train.batch_size=32"], env=ENV)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["extract", str(out / "checkpoint.pt"), "-o", str(tmp_path / "enc.pth")], env=ENV)
    assert r.exit_code == 0 and "wrote" in r.output and "width 8" in r.output, r.output
    report_path = tmp_path / "report.json"
    r = runner.invoke(app, ["probe", str(tmp_path / "enc.pth"), "--dataset", "synthetic", "--synthetic-size", "100",
                            "--baseline", "--json", str(report_path), "--device", "cpu"], env=ENV)
    assert r.exit_code == 0, r.output
    assert "recognised as native encoder file" in r.output and "linear top-1" in r.output
    report = json.loads(report_path.read_text())
    assert report["encoder"]["provenance"]["epoch"] == 1 and report["encoder"]["kind"] == "native encoder file"
    assert report["dataset"] == {"name": "synthetic", "root": None, "train_size": 100, "test_size": 100,
                                 "num_classes": 10, "split_seed": 0, "evaluated_on": "test",
                                 "labels": {"labels": "all", "seed": 0, "images": 100,
                                            "digest": report["dataset"]["labels"]["digest"]}}
    assert set(report["results"]) == {"trained", "random_init"}
    for res in report["results"].values():
        assert 0 <= res["linear_top1"] <= 1 and 0 <= res["knn_top1"] <= 1 and res["images_per_s"] > 0
        assert res["weight_decay"] in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    assert report["timing"]["total_s"] > 0 and report["knn"] == {"k": 200, "temperature": 0.1}


def test_cli_errors_are_one_line_exit_2(run, tmp_path):
    runner = CliRunner()
    for args in (["probe", str(tmp_path / "missing.pth")], ["extract", str(tmp_path / "missing.pt")],
                 ["probe", str(run[0] / "checkpoint.pt"), "--dataset", "cifar10", "--data-dir", str(tmp_path)],
                 ["probe", str(run[0] / "checkpoint.pt"), "--dataset", "imagenet"],
                 ["probe", str(run[0] / "checkpoint.pt"), "--dataset", "synthetic", "--layer", "3"]):
        r = runner.invoke(app, args, env=ENV)
        assert r.exit_code == 2, (args, r.output)
        assert "error:" in r.output and "Traceback" not in r.output, r.output
        assert len([ln for ln in r.output.splitlines() if "error:" in ln]) == 1


def test_cli_extract_torchvision_prints_the_loading_lines(tmp_path):
    write_checkpoint(tmp_path / "checkpoint.pt", width=64)
    r = CliRunner().invoke(app, ["extract", str(tmp_path / "checkpoint.pt"), "-o", str(tmp_path / "tv.pth"),
                                 "--format", "torchvision"], env=ENV)
    assert r.exit_code == 0, r.output
    assert "torchvision.models.resnet18()" in r.output and "strict=True" in r.output
