"""`simclr predict`: the CSV (header, rows, top k), probabilities equal to the softmax of the classifier's own
logits, bad files named and skipped as `embed` does, and a classifier and an encoder file each refused where
the other is expected."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import pretrained_tiny
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import predict as predict_cli
from simclr_cli.data.images import decode_image
from simclr_cli.errors import CheckpointError, OptionError
from simclr_cli.serve.embed import embed_images
from simclr_cli.serve.predict import csv_header, predict_images
from simclr_cli.files import atomic_save
from simclr_cli.models.classifier import Classifier, classifier_payload, load_classifier
from simclr_cli.models.encoder_file import load_encoder
from simclr_cli.models.features import preprocess

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["cat", "dog", "ship"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return pretrained_tiny(tmp_path_factory.mktemp("run"))


def write_classifier(run: Path, path: Path, head_layer: int = 0) -> Path:
    """A classifier file from the run's encoder: random linear layer, scaled so the probabilities spread."""
    torch.manual_seed(head_layer)
    loaded = load_encoder(run / "encoder.pth")
    model = Classifier(loaded.encoder, loaded.head, head_layer, len(CLASSES))
    with torch.no_grad():
        model.fc.weight.mul_(20.0)
    payload = classifier_payload(loaded, model, CLASSES, {"labels": {"labels": "all", "seed": 0}})
    return atomic_save(payload, path)


@pytest.fixture(scope="module")
def classifier(run, tmp_path_factory) -> Path:
    return write_classifier(run, tmp_path_factory.mktemp("clf") / "classifier.pth")


def images(folder: Path, n: int = 5) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):  # odd sizes and both formats: the resize, the crop and JPEG's draft decoding
        pixels = rng.integers(0, 256, (30 + 9 * i, 50 - 4 * i, 3), np.uint8)
        Image.fromarray(pixels).save(folder / (f"{i}.jpg" if i % 2 else f"{i}.png"), quality=90)
    return folder


def add_corrupt(folder: Path) -> Path:
    bad = folder / "2b-corrupt.jpg"  # sorts between good files
    bad.write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(1).integers(0, 256, 600, np.uint8).tobytes())
    return bad


def invoke(*args):
    app = typer.Typer()
    app.command()(predict_cli.predict)  # alone on the app: invoked without the command's name
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def read_rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def expected_probabilities(classifier: Path, paths: list[Path]) -> torch.Tensor:
    """Softmax of the classifier's logits, computed directly: decode, preprocess, forward, in fp32."""
    loaded = load_classifier(classifier)
    x = preprocess(torch.stack([decode_image(p, loaded.image_size) for p in paths]), loaded.mean, loaded.std,
                   loaded.image_size)
    with torch.no_grad():
        return torch.softmax(loaded.model(x).float(), dim=1)


@pytest.mark.parametrize("head_layer", [0, 1])
def test_rows_are_the_softmax_of_the_logits(run, tmp_path, head_layer):
    clf = write_classifier(run, tmp_path / "classifier.pth", head_layer)
    folder = images(tmp_path / "images")
    out = tmp_path / "predictions.csv"
    r = invoke(clf, folder, "-o", out, "--batch-size", "2", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert r.stdout == ""  # the CSV went to -o; stderr has the rest
    rows = read_rows(out.read_text(encoding="utf-8"))
    assert rows[0] == ["path", "class", "probability"]
    paths = sorted(folder.iterdir())
    assert [row[0] for row in rows[1:]] == [str(p) for p in paths]  # as embed writes paths
    want = expected_probabilities(clf, paths)
    got_class = [row[1] for row in rows[1:]]
    assert got_class == [CLASSES[i] for i in want.argmax(dim=1).tolist()]
    got = torch.tensor([float(row[2]) for row in rows[1:]])
    torch.testing.assert_close(got, want.max(dim=1).values, atol=1e-5, rtol=0)
    assert all(len(row[2].split(".")[1]) == 6 for row in rows[1:])  # 6 decimals
    summary = r.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"predicted 5 images -> {out}: top 1 of 3 classes, ")


def test_top_k_to_stdout_most_probable_first(classifier, tmp_path):
    folder = images(tmp_path / "images", 4)
    r = invoke(classifier, folder, "-k", "3", "--workers", "2", "--precision", "fp32", "--device", "cpu")
    assert r.exit_code == 0, r.output
    rows = read_rows(r.stdout)  # stdout carries the CSV alone
    assert rows[0] == csv_header(3) == ["path", "class_1", "probability_1", "class_2", "probability_2",
                                        "class_3", "probability_3"]
    want = expected_probabilities(classifier, sorted(folder.iterdir()))
    for row, p in zip(rows[1:], want):
        probs = [float(v) for v in row[2::2]]
        assert probs == sorted(probs, reverse=True) and sorted(row[1::2]) == sorted(CLASSES)
        torch.testing.assert_close(torch.tensor(probs), p[[CLASSES.index(c) for c in row[1::2]]], atol=1e-5, rtol=0)
        assert abs(sum(probs) - 1) < 1e-5
    assert len(rows) == 5


def test_k_beyond_the_classes_is_refused_before_any_work(classifier, tmp_path):
    folder = images(tmp_path / "images", 2)
    (tmp_path / "out").mkdir()
    r = invoke(classifier, folder, "-k", "4", "-o", tmp_path / "out" / "p.csv")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "-k 4" in r.stderr and "3 classes" in r.stderr
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(OptionError):
        predict_images(classifier, folder, stdout=io.BytesIO(), top_k=4)


def test_bad_file_named_and_skipped_with_skip_bad(classifier, tmp_path):
    folder = images(tmp_path / "images", 4)
    bad = add_corrupt(folder)
    out = tmp_path / "p.csv"
    r = invoke(classifier, folder, "-o", out, "--skip-bad", "--workers", "0", "--batch-size", "2")
    assert r.exit_code == 0, r.output
    assert f"bad image: {bad}" in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("images/s; left out 1 bad images")
    rows = read_rows(out.read_text(encoding="utf-8"))
    assert [row[0] for row in rows[1:]] == [str(p) for p in sorted(folder.iterdir()) if p != bad]


def test_bad_file_without_skip_bad_writes_nothing(classifier, tmp_path):
    folder = images(tmp_path / "images", 4)
    bad = add_corrupt(folder)
    (tmp_path / "out").mkdir()
    r = invoke(classifier, folder, "-o", tmp_path / "out" / "p.csv", "--workers", "0")
    assert r.exit_code == 2
    assert str(bad) in r.stderr and "1 of 5 images could not be decoded" in r.stderr and "--skip-bad" in r.stderr
    assert list((tmp_path / "out").iterdir()) == []  # no CSV, no temporary file


def test_encoder_file_given_as_classifier_is_one_line(run, tmp_path):
    folder = images(tmp_path / "images", 2)
    (tmp_path / "out").mkdir()
    for wrong, what in ((run / "encoder.pth", "an encoder file"), (run / "checkpoint.pt", "a pretraining checkpoint")):
        r = invoke(wrong, folder, "-o", tmp_path / "out" / "p.csv")
        assert r.exit_code == 2 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and f"is {what}" in r.stderr and "simclr finetune" in r.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_classifier_given_as_encoder_is_refused(classifier, tmp_path):
    with pytest.raises(CheckpointError, match="is a classifier file"):
        load_encoder(classifier)
    out = tmp_path / "v.npy"
    with pytest.raises(CheckpointError, match="is a classifier file"):
        embed_images(images(tmp_path / "images", 2), classifier, out)
    assert not out.exists()


def test_output_folder_refused(classifier, tmp_path):
    folder = images(tmp_path / "images", 2)
    r = invoke(classifier, folder, "-o", tmp_path)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "is a folder" in r.stderr


def test_core_streams_to_a_stream(classifier, tmp_path):
    folder = images(tmp_path / "images", 3)
    events: list[str] = []
    stream = io.BytesIO()
    result = predict_images(classifier, folder, stdout=stream, top_k=2, num_workers=0,
                            callback=lambda event, d: events.append(event))
    rows = read_rows(stream.getvalue().decode("utf-8"))
    assert rows[0] == ["path", "class_1", "probability_1", "class_2", "probability_2"] and len(rows) == 4
    assert (result.rows, result.classes, result.top_k, result.output) == (3, 3, 2, "stdout")
    assert events[0] == "start" and events[-1] == "progress"
