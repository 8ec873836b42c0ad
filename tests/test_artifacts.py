"""One place says what a file is (`artifacts.open_artifact`), export formats are registry entries that write
and read their own files (`registry.EXPORTS`), and a backbone family owns its state-dict policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import pretrained_tiny
import torch
import torchvision
from typer.testing import CliRunner

from simclr_cli.artifacts import (Checkpoint, ClassifierFile, EncoderFile, ExportFormat, Foreign, OnnxExport,
                                  SafetensorsExport, StateDict, TorchScriptExport, identify, open_artifact)
from simclr_cli.cli import app
from simclr_cli.errors import CheckpointError
from simclr_cli.exports.extract import extract_encoder, library_state
from simclr_cli.files import atomic_save, atomic_write_text
from simclr_cli.models import family_of
from simclr_cli.models.classifier import Classifier, classifier_payload
from simclr_cli.models.encoder_file import load_encoder
from simclr_cli.models.resnet import RESNETS
from simclr_cli.registry import ENCODERS, EXPORTS

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return pretrained_tiny(tmp_path_factory.mktemp("run"))


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_open_artifact_recognises_the_project_files(run, tmp_path):
    ckpt = open_artifact(run / "checkpoint.pt")
    assert isinstance(ckpt, Checkpoint) and ckpt.kind == "pretraining checkpoint"
    assert (ckpt.epoch, ckpt.world_size) == (1, 1) and ckpt.step == ckpt.data["step"] >= 1
    assert ckpt.encoder["arch"] == "resnet18" and ckpt.has_config and ckpt.config["model"]["width"] == 8
    encoder = open_artifact(run / "encoder.pth")
    assert type(encoder) is EncoderFile and encoder.describe() == {"kind": "native encoder file",
                                                                   "path": str(run / "encoder.pth")}
    assert encoder.weights["conv1.weight"].shape[0] == 8 and encoder.head is not None
    loaded = load_encoder(run / "encoder.pth")
    model = Classifier(loaded.encoder, loaded.head, 0, 3)
    atomic_save(classifier_payload(loaded, model, ["a", "b", "c"], {}), tmp_path / "classifier.pth")
    classifier = open_artifact(tmp_path / "classifier.pth")
    assert isinstance(classifier, ClassifierFile) and classifier.section["classes"] == ["a", "b", "c"]
    assert type(classifier.encoder_part()) is EncoderFile


def test_open_artifact_recognises_a_torchvision_state_dict(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "resnet18.pth")
    found = open_artifact(tmp_path / "resnet18.pth")
    assert type(found) is StateDict and not found.sequential and "fc.weight" in found.state
    assert EXPORTS["torchvision"].recognise(tmp_path / "resnet18.pth")  # what --format torchvision writes
    assert not EXPORTS["native"].recognise(tmp_path / "resnet18.pth")


@pytest.mark.parametrize("fmt, kind", [("native", EncoderFile), ("torchvision", StateDict),
                                       ("torchscript", TorchScriptExport), ("safetensors", SafetensorsExport),
                                       ("onnx", OnnxExport)])
def test_each_export_format_reads_back_as_its_kind(run, tmp_path, fmt, kind):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    if fmt == "torchvision":  # torchvision's ResNet is width 64: a width-8 encoder is refused in one line
        with pytest.raises(CheckpointError) as err:
            extract_encoder(run / "checkpoint.pt", tmp_path / "e.pth", fmt)
        assert "needs width 64" in one_line(err)
        return
    out = tmp_path / f"e.{EXPORTS[fmt].suffix}"
    extract_encoder(run / "checkpoint.pt", out, fmt)
    assert type(open_artifact(out)) is kind
    assert EXPORTS[fmt].recognise(out) and isinstance(EXPORTS[fmt].read(out), kind)
    others = [name for name in ("native", "torchscript", "safetensors") if name != fmt]
    assert not any(EXPORTS[name].recognise(out) for name in others)


@pytest.mark.parametrize("content, says", [
    ([1, 2, 3], "holds a list"),
    ({}, "holds an empty dict"),
    ({"format": "someone-else/model"}, "has format 'someone-else/model', which simclr-cli"),
    ({"weights": "not a tensor"}, "is neither a simclr-cli file nor a state dict of tensors"),
])
def test_a_file_of_no_known_kind_is_refused_in_one_line(tmp_path, content, says):
    torch.save(content, tmp_path / "x.pt")
    assert isinstance(identify(tmp_path / "x.pt"), Foreign)  # readers that word their own refusal see it
    with pytest.raises(CheckpointError) as err:
        open_artifact(tmp_path / "x.pt")
    assert says in one_line(err)


def test_an_unsafe_or_missing_file_is_refused_before_it_is_typed(tmp_path):
    with pytest.raises(CheckpointError) as err:
        open_artifact(tmp_path / "nothing.pt")
    assert one_line(err) == f"file not found: {tmp_path / 'nothing.pt'}"
    atomic_write_text("plain text", tmp_path / "notes.pt")
    with pytest.raises(CheckpointError) as err:
        open_artifact(tmp_path / "notes.pt")
    assert "is truncated or not a PyTorch file" in one_line(err)


def test_a_checkpoint_spells_its_keys_in_one_place():
    data = Checkpoint.payload(config={}, model={}, method={}, optimizer={}, scheduler={}, scaler=None, epoch=3,
                              step=30, history=[], epoch_losses=[], rng={}, world_size=2, train_images=100,
                              encoder={"arch": "resnet18"})
    assert set(data) == {"format", "simclr_cli", "config", "model", "method", "optimizer", "scheduler", "scaler",
                         "epoch", "step", "history", "epoch_losses", "rng", "world_size", "train_images", "encoder"}
    ckpt = Checkpoint(Path("c.pt"), data)
    assert (ckpt.epoch, ckpt.step, ckpt.world_size, ckpt.train_images(7)) == (3, 30, 2, 100)
    old = Checkpoint(Path("old.pt"), {"format": data["format"], "model": {}, "epoch": 1, "step": 5})  # simclr-cli 0.1
    assert (old.encoder, old.method, old.world_size, old.train_images(7), old.has_config) == (None, {}, 1, 7, False)


def write_json(loaded, path: Path, options: dict) -> dict:
    """A toy format: the encoder's description and input as JSON (no weights)."""
    atomic_write_text(json.dumps({"model": loaded.encoder.describe(), "image_size": loaded.image_size}), path)
    return {"toy": True}


def test_a_new_export_format_is_one_registry_line_and_the_cli_offers_it(run, tmp_path):
    toy = ExportFormat("toy", "json", "the description as JSON", write_json, lambda encoder, path: f"json.load('{path}')")
    EXPORTS.add("toy", toy, "tests")
    try:
        result = CliRunner().invoke(app, ["extract", str(run / "checkpoint.pt"), "--format", "toy", "-o",
                                          str(tmp_path / "e.json")], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "e.json").read_text()) == {"model": load_encoder(run / "encoder.pth").encoder
                                                                 .describe(), "image_size": 32}
        assert f"load it with: json.load('{tmp_path / 'e.json'}')" in " ".join(result.stderr.split())
        refused = CliRunner().invoke(app, ["extract", str(run / "checkpoint.pt"), "--format", "toys", "-o",
                                           str(tmp_path / "f.json")])
        assert refused.exit_code == 2 and "toy" in refused.stderr and not (tmp_path / "f.json").exists()
    finally:
        EXPORTS.remove("toy")


def test_a_backbone_family_declares_its_state_dict_policy():
    assert family_of("resnet18") is RESNETS and family_of("torchvision:resnet18") is ENCODERS["torchvision"]
    assert family_of("nowhere:thing") is None and family_of(3) is None
    assert ENCODERS["torchvision"].formats == ("torchvision",) and ENCODERS["timm"].formats == ("timm",)
    encoder = ENCODERS["torchvision"].build("resnet18", {}, "cifar", 32)
    assert ENCODERS["torchvision"].classifier_keys(encoder)[0] == "fc."  # the layer it removed
    with pytest.raises(CheckpointError) as err:
        library_state(encoder, "timm")
    assert one_line(err) == "torchvision:resnet18 is not a timm model: use --format native or --format torchvision"
    state = library_state(encoder, "torchvision")
    reference = torchvision.models.resnet18()
    reference.conv1, reference.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(state, strict=True)  # the library's own layout
    assert ENCODERS["torchvision"].from_library_keys(state).keys() == encoder.state_dict().keys()
