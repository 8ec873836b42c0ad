"""Few labels after pretraining: class-balanced label subsets, `simclr finetune` (with its comparison, head
layers and resume), `simclr probe --labels`, and the classifier file refused where an encoder is expected."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_config
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.data.mapped import MappedImages
from simclr_cli.errors import CheckpointError, DatasetError, OptionError
from simclr_cli.score import finetune_loop
from simclr_cli.score.finetune import FinetuneOptions, FinetuneRun, partial_path, run_finetune
from simclr_cli.score.finetune_loop import Protocol, train_classifier
from simclr_cli.score.labels import LabelSpec, label_subset, parse_labels
from simclr_cli.score.probe import run_probe
from simclr_cli.models.classifier import Classifier, load_classifier
from simclr_cli.models.encoder_file import load_encoder
from simclr_cli.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def options(**kw) -> FinetuneOptions:
    base = {"labels": "20%", "dataset": "synthetic", "synthetic_size": 200, "epochs": 2, "batch_size": 16,
            "device": "cpu", "precision": "fp32", "num_workers": 0}
    return FinetuneOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    pretrain(tiny_config(out, "train.eval_every=0", "data.val_size=8", synthetic_size=32, image_size=32, epochs=1,
                         precision=None, log_every=None))
    return out / "encoder.pth"


# --- label subsets ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, spec", [("1%", LabelSpec("1%", fraction=0.01)), ("10%", LabelSpec("10%", fraction=0.1)),
                                        ("25", LabelSpec("25", per_class=25)), ("all", LabelSpec("all")),
                                        ("100%", LabelSpec("all"))])
def test_label_specs(text, spec):
    assert parse_labels(text) == spec


@pytest.mark.parametrize("text", ["0%", "100.5%", "-3", "0", "abc", "1.5"])
def test_a_label_spec_that_names_no_subset_is_one_line(text):
    with pytest.raises(OptionError, match="is not a label subset"):
        parse_labels(text)


def test_subsets_are_class_balanced_and_fixed_by_their_seed():
    labels = torch.arange(1000) % 10  # 100 images per class
    a = label_subset(labels, parse_labels("10%"), seed=0)
    assert torch.bincount(labels[a.indices]).tolist() == [10] * 10 and a.indices.equal(a.indices.sort().values)
    assert label_subset(labels, parse_labels("10%"), seed=0).digest == a.digest  # the same on any machine
    b = label_subset(labels, parse_labels("10%"), seed=1)
    assert b.digest != a.digest and not b.indices.equal(a.indices)
    assert torch.bincount(labels[label_subset(labels, parse_labels("3"), 0).indices]).tolist() == [3] * 10
    uneven = torch.cat([torch.zeros(300, dtype=torch.long), torch.ones(50, dtype=torch.long)])
    assert torch.bincount(uneven[label_subset(uneven, parse_labels("10%"), 0).indices]).tolist() == [30, 5]


def test_a_subset_that_leaves_a_class_empty_or_asks_too_much_is_one_line():
    labels = torch.cat([torch.zeros(500, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    with pytest.raises(OptionError, match="leaves class 'dog' \\(20 images\\) with none"):
        label_subset(labels, parse_labels("1%"), 0, ["cat", "dog"])
    with pytest.raises(OptionError, match="asks for 25 images of class 'dog', which has 20"):
        label_subset(labels, parse_labels("25"), 0, ["cat", "dog"])


# --- finetune ---------------------------------------------------------------------------------------------------

def test_finetune_compares_and_writes_a_classifier(encoder, tmp_path):
    events = []
    report = run_finetune(encoder, tmp_path / "c.pth", options(compare=True), lambda e, d: events.append(e))
    assert list(report["results"]) == ["pretrained", "random_init", "linear_probe"]
    assert all(0 <= r["top1"] <= 1 for r in report["results"].values())
    assert report["subset"]["images"] == 40 and report["protocol"]["lr"] == pytest.approx(0.05 * 16 / 256)
    assert events.count("epoch") == 4 and not partial_path(tmp_path / "c.pth").exists()
    loaded = load_classifier(tmp_path / "c.pth")
    assert loaded.classes == [f"class{k}" for k in range(10)] and loaded.info["subset"]["digest"] == \
        report["subset"]["digest"] and len(loaded.info["indices"]) == 40
    assert loaded.info["result"]["top1"] == report["results"]["pretrained"]["top1"]
    with pytest.raises(CheckpointError, match="is a classifier file \\(simclr finetune\\): use it with simclr predict"):
        load_encoder(tmp_path / "c.pth")  # where an encoder is expected
    with pytest.raises(CheckpointError, match="is an encoder file: simclr predict takes the classifier file"):
        load_classifier(encoder)  # and the reverse


def test_the_linear_probe_row_sees_the_pretrained_encoder_not_the_fine_tuned_one(encoder, tmp_path):
    report = run_finetune(encoder, tmp_path / "c.pth", options(compare=True, epochs=1))
    probe = run_probe(encoder, "synthetic", device="cpu", precision="fp32", synthetic_size=200, labels="20%")
    assert report["results"]["linear_probe"]["top1"] == probe["results"]["trained"]["linear_top1"]
    assert probe["dataset"]["train_size"] == 40 and probe["dataset"]["labels"]["images"] == 40


def test_finetuning_from_a_head_layer(encoder, tmp_path):
    report = run_finetune(encoder, tmp_path / "c.pth", options(head_layer=1, epochs=1))
    model = load_classifier(tmp_path / "c.pth").model
    assert report["head_layer"] == 1 and model.fc.in_features == load_encoder(encoder).head.blocks[0][0].out_features
    with pytest.raises(OptionError, match="--from-head-layer 5 asked for, but the encoder file has a 2-layer"):
        run_finetune(encoder, tmp_path / "d.pth", options(head_layer=5))
    assert not (tmp_path / "d.pth").exists()


def test_an_interrupted_finetune_resumes_to_the_weights_of_an_unbroken_one(encoder, tmp_path, monkeypatch):
    run_finetune(encoder, tmp_path / "whole.pth", options(epochs=3))
    real = finetune_loop.train_classifier

    def stop_after_one(*args):
        *rest, progress = args

        def interrupt(epoch, epochs, loss):
            progress(epoch, epochs, loss)
            if epoch == 1:
                raise KeyboardInterrupt
        return real(*rest, interrupt)
    monkeypatch.setattr("simclr_cli.score.finetune.train_classifier", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(encoder, tmp_path / "cut.pth", options(epochs=3))
    monkeypatch.undo()
    assert partial_path(tmp_path / "cut.pth").exists() and not (tmp_path / "cut.pth").exists()
    with pytest.raises(OptionError, match="holds an interrupted fine-tune .* continue it with --resume"):
        run_finetune(encoder, tmp_path / "cut.pth", options(epochs=3))
    with pytest.raises(OptionError, match="was started with another encoder, labels or settings"):
        run_finetune(encoder, tmp_path / "cut.pth", options(epochs=3, labels="30%", resume=True))
    report = run_finetune(encoder, tmp_path / "cut.pth", options(epochs=3, resume=True))
    assert report["resumed"] and not partial_path(tmp_path / "cut.pth").exists()
    whole, cut = load_classifier(tmp_path / "whole.pth").model, load_classifier(tmp_path / "cut.pth").model
    for (k, a), b in zip(whole.state_dict().items(), cut.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(OptionError, match="nothing to resume"):
        run_finetune(encoder, tmp_path / "other.pth", options(resume=True))


@pytest.mark.parametrize("labels, split, epochs, images", [
    ("1%", "test", 60, 20),  # 150 a class: 1% rounds to 2 each, 1.33% of the images, still the 1% protocol
    ("1%", "val", 60, 10),  # the validation run trains the epochs of the test run it chooses settings for
    ("10%", "test", 30, 150),
    ("1", "test", 60, 10),  # a count per class: its share of the training split, 0.67%
    ("15", "test", 30, 150),  # 10%
    ("15", "val", 30, 150),  # 150 of the 1500 labelled images, validation ones included: 10% as for test
    ("all", "test", 30, 1500),
])
def test_the_default_epochs_follow_the_share_asked_for_not_its_rounding(encoder, tmp_path, labels, split, epochs,
                                                                       images):
    run = FinetuneRun(encoder, tmp_path / "c.pth", options(labels=labels, split=split, epochs=None, synthetic_size=1500),
                      lambda event, data: None)
    assert run.protocol.epochs == epochs and len(run.subset.indices) == images


def write_class_folder(root: Path, per_class: int = 12) -> Path:
    g = torch.Generator().manual_seed(0)
    for c in ("ant", "bee", "cow"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (40, 36, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def test_a_cached_folder_is_fine_tuned_from_the_map_with_the_weights_of_the_images_in_memory(encoder, tmp_path):
    """The label subset of a folder stays a view of the decoded cache (memory flat however large the folder);
    reading its batches from the map, ahead on a thread, trains the very weights the same images in memory do."""
    root = write_class_folder(tmp_path / "images")
    run = FinetuneRun(encoder, tmp_path / "c.pth", options(dataset="folder", root=str(root), labels="50%"),
                      lambda event, data: None)
    assert isinstance(run.images, MappedImages) and isinstance(run.test.images, MappedImages)
    in_memory = run.images[:]
    assert in_memory.shape == (15, 3, 32, 32)  # 50% of the 80% of 12 images a class, for 3 classes
    protocol = Protocol(epochs=2, batch_size=4, lr=0.05, seed=3)  # 4 steps an epoch, the last of 3 images
    weights = []
    for images in (run.images, in_memory):
        torch.manual_seed(0)
        model = Classifier(copy.deepcopy(run.loaded.encoder), copy.deepcopy(run.loaded.head), 0, 3)
        train_classifier(model, images, run.labels, run.loaded.mean, run.loaded.std, 32, protocol, torch.device("cpu"),
                         "fp32")
        weights.append(model.state_dict())
    for (k, a), b in zip(weights[0].items(), weights[1].values()):
        assert torch.equal(a, b), k
    report = run_finetune(encoder, tmp_path / "c.pth", options(dataset="folder", root=str(root), labels="50%"))
    assert report["subset"]["images"] == 15 and 0 <= report["results"]["pretrained"]["top1"] <= 1


def test_the_benchmark_chooses_each_rows_setting_on_validation_then_scores_the_test_split_once(encoder, tmp_path):
    """benchmarks/finetune.py in its smoke mode: every row (fine-tuned, random init, linear probe) has a
    validation figure for each value of its grid, the two fine-tuned rows the same grid, and its test run
    uses the value with the best validation top-1 (ties: the smaller rate, the stronger L2)."""
    import importlib.util

    from simclr_cli.score.linear import WEIGHT_DECAYS

    spec = importlib.util.spec_from_file_location("finetune_benchmark", REPO / "benchmarks" / "finetune.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main([str(encoder), "--dataset", "synthetic", "--synthetic-size", "200", "--labels", "20%",
                         "--epochs", "1", "--batch-size", "16", "--lr", "0.2", "--lr", "0.01", "--device", "cpu",
                         "--precision", "fp32", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "report.json").read_text()).keys() == {"20%"}
    rows = report["20%"]
    assert list(rows) == ["pretrained", "random_init", "linear_probe"]
    assert list(rows["pretrained"]["validation"]) == list(rows["random_init"]["validation"]) == ["0.01", "0.2"]
    assert list(rows["linear_probe"]["validation"]) == [f"{wd:g}" for wd in sorted(WEIGHT_DECAYS, reverse=True)]
    for name, r in rows.items():
        best = max(v["top1"] for v in r["validation"].values())
        assert r["validation"][f"{r['chosen']:g}"]["top1"] == best
        assert f"{r['chosen']:g}" == next(k for k, v in r["validation"].items() if v["top1"] == best)  # first of ties
        assert 0 <= r["test"]["top1"] <= 1 and r["test"]["subset"]["images"] == 40  # 20% of the test run's 200
    for name in ("pretrained", "random_init"):
        assert rows[name]["test"]["protocol"]["lr"] == rows[name]["chosen"]
        assert all(v["protocol"]["epochs"] == 1 and v["subset"]["images"] == 36 for v in rows[name]["validation"].values())
    assert rows["linear_probe"]["test"]["weight_decay"] == rows["linear_probe"]["chosen"]
    assert not list(tmp_path.glob(".*.partial"))


@pytest.mark.parametrize("args, message", [
    (["--labels", "0%"], "is not a label subset"),
    (["--labels", "101"], "asks for 101 images of class 'class0'"),
    (["--epochs", "0"], "need --epochs >= 1"),
    (["-o", "FOLDER"], "is a folder: give a file name"),
    (["--from-head-layer", "4"], "--from-head-layer 4 asked for"),
])
def test_cli_bad_finetune_requests_are_one_line(encoder, tmp_path, args, message):
    args = [str(tmp_path) if a == "FOLDER" else a for a in args]
    before = sorted(tmp_path.iterdir())
    result = CliRunner().invoke(app, ["finetune", str(encoder), "--dataset", "synthetic", "--synthetic-size", "200",
                                      "--device", "cpu", *(["-o", str(tmp_path / "c.pth")] if "-o" not in args else []),
                                      *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert sorted(tmp_path.iterdir()) == before


def test_an_unlabelled_folder_is_one_line(encoder, tmp_path):
    (tmp_path / "flat").mkdir()
    for i in range(12):
        Image.new("RGB", (32, 32), (20 * i, 0, 0)).save(tmp_path / "flat" / f"{i}.png")
    with pytest.raises(DatasetError, match="has neither class subfolders nor train/ and test/.*DIR/<class>/"):
        run_finetune(encoder, tmp_path / "c.pth", options(dataset="folder", root=str(tmp_path / "flat")))
    assert not (tmp_path / "c.pth").exists()


def test_cli_finetune_prints_the_table_and_writes_json(encoder, tmp_path):
    result = CliRunner().invoke(app, ["finetune", str(encoder), "--dataset", "synthetic", "--synthetic-size", "200",
                                      "--device", "cpu", "--labels", "4", "--epochs", "1", "--batch-size", "16",
                                      "-o", str(tmp_path / "c.pth"), "--json", str(tmp_path / "f.json")])
    assert result.exit_code == 0, result.output
    assert "fine-tuned from the encoder" in result.output and (tmp_path / "c.pth").is_file()
    assert json.loads((tmp_path / "f.json").read_text())["subset"]["images"] == 40
    (tmp_path / "imgs").mkdir()  # the chain's last link: predict with what finetune wrote
    for name, colour in (("a.png", (250, 0, 0)), ("b.jpg", (0, 250, 0))):
        Image.new("RGB", (48, 40), colour).save(tmp_path / "imgs" / name)
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "c.pth"), str(tmp_path / "imgs"), "-k", "2",
                                      "--device", "cpu", "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    rows = [line.split(",") for line in result.stdout.strip().splitlines()]
    assert rows[0] == ["path", "class_1", "probability_1", "class_2", "probability_2"] and len(rows) == 3
    assert all(r[1].startswith("class") and 1 >= float(r[2]) >= float(r[4]) >= 0 for r in rows[1:])


def test_the_classifier_exports_to_onnx_and_torchscript_with_its_classes(encoder, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from simclr_cli.serve.embed import embed_images
    from simclr_cli.exports.extract import extract_encoder

    run_finetune(encoder, tmp_path / "c.pth", options(epochs=1, head_layer=1))
    model = load_classifier(tmp_path / "c.pth").model
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
    info = extract_encoder(tmp_path / "c.pth", tmp_path / "c.onnx", "onnx")
    assert info["parity"] < 1e-4 and info["classes"] == [f"class{k}" for k in range(10)]
    session = onnxruntime.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["simclr-cli"])
    assert meta["output"] == "logits" and meta["output_dim"] == 10 and meta["model"]["classes"][3] == "class3"
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), logits,
                               atol=1e-4, rtol=1e-4)
    assert extract_encoder(tmp_path / "c.pth", tmp_path / "c.pt", "torchscript")["parity"] < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "c.pt"))(x), logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="is a classifier file \\(simclr finetune\\): it exports with"):
        extract_encoder(tmp_path / "c.pth", tmp_path / "c.safetensors", "safetensors")
    with pytest.raises(CheckpointError, match="is an exported classifier \\(it gives logits, not h\\)"):
        (tmp_path / "imgs").mkdir()
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "imgs" / "red.png")
        embed_images(tmp_path / "imgs", tmp_path / "c.onnx", tmp_path / "v.npy", device="cpu")
