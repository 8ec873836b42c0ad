"""`simclr report`: every figure of a small run is a PNG of the expected size and not blank, from the run's
files alone (finished, stopped, or without an encoder yet), the page is offline, and missing extras or a
wrong folder are one line."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.config import DataConfig
from simclr_cli.errors import MissingExtraError
from simclr_cli import figures
from simclr_cli.report import _grid_rows, first_of_each_class, make_report, project_2d
from simclr_cli.rundir import read_metrics
from simclr_cli.train import pretrain

# on top of the shared tiny run (tests/conftest.py)
RUN = {"synthetic_size": 300, "image_size": 32, "batch_size": 50, "train.eval_every": 1, "optim.warmup_epochs": 0}
SIZES = {"curves.png": (1100, 700), "health.png": (1300, 700), "map.png": (900, 800)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A small run stopped after 2 epochs and resumed to 4, so the curves have a resume mark."""
    out = tmp_path_factory.mktemp("run") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(tiny_config(out, epochs=2, **RUN))
        pretrain(tiny_config(out, epochs=4, **RUN), resume=True)
    finally:
        torch.set_num_threads(threads)
    return out


def picture(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def not_blank(pixels: np.ndarray) -> bool:
    return pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_every_figure_of_a_small_run(run_dir, tmp_path):
    report = make_report(run_dir, output=tmp_path / "rep", map_method="pca", k=5, queries=10, num_workers=0)
    names = [name for name, _ in report.figures]
    assert names == ["curves.png", "health.png", "map.png", "neighbors.png"]
    for name in names:
        pixels = picture(tmp_path / "rep" / name)
        if name in SIZES:
            assert pixels.shape[1::-1] == SIZES[name], name
        assert not_blank(pixels), name
    grid = picture(tmp_path / "rep" / "neighbors.png")
    assert grid.shape[1::-1] == (int(100 * (1.25 * 6 + 0.3)), int(100 * (1.45 * 10 + 0.5)))
    page = (tmp_path / "rep" / "index.html").read_text()
    for name in names:
        assert f'src="{name}"' in page
    assert "<script" not in page and "http" not in page  # offline: nothing fetched from elsewhere
    assert "resumed at step" in page and "kNN top-1 (this report)" in page and "PCA" in page


def test_the_resume_is_marked_on_the_curves(run_dir, tmp_path):
    records = read_metrics(run_dir / "metrics.jsonl")
    resumes = [r for r in records if r["kind"] == "resume"]
    assert [(r["epoch"], r["step"]) for r in resumes] == [(2, 12)]  # 300 images / 50 per step = 6 steps an epoch
    figures.curves(records, tmp_path / "with.png", "t")
    figures.curves([r for r in records if r["kind"] != "resume"], tmp_path / "without.png", "t")
    with_mark, without = picture(tmp_path / "with.png"), picture(tmp_path / "without.png")
    assert with_mark.shape == without.shape and (with_mark != without).any(axis=2).sum() > 500  # a line + legend


def test_most_grid_neighbours_share_the_query_class(run_dir):
    from simclr_cli.data import load_dataset

    train, test = (load_dataset(DataConfig(dataset="synthetic", synthetic_size=300), s, image_size=32) for s in ("train", "test"))
    from simclr_cli.models.encoder_file import load_encoder
    from simclr_cli.models.features import extract_features

    loaded = load_encoder(run_dir / "encoder.pth")
    h = [extract_features(loaded.encoder, d.images, loaded.mean, loaded.std, 32, torch.device("cpu")) for d in (train, test)]
    rows = _grid_rows(train, test, h[0], h[1], queries=10, k=8)
    assert [r["caption"] for r in rows] == test.classes  # the first image of each class, in class order
    other = [n["other_class"] for r in rows for n in r["neighbors"]]
    assert np.mean(other) < 0.5, np.mean(other)


def test_a_run_without_an_encoder_gets_the_curves_and_a_note(run_dir, tmp_path):
    young = tmp_path / "young"
    young.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(run_dir / name, young / name)
    with open(young / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 99, "lo')  # a line being written right now
    r = CliRunner().invoke(app, ["report", str(young)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (young / "report").iterdir()) == ["curves.png", "health.png", "index.html"]
    assert "no encoder.pth or checkpoint.pt yet" in r.stderr and "index.html" in r.stderr


def test_a_stopped_run_is_drawn_from_its_checkpoint(run_dir, tmp_path):
    stopped = tmp_path / "stopped"
    shutil.copytree(run_dir, stopped, ignore=shutil.ignore_patterns("encoder.pth", "report"))
    report = make_report(stopped, map_method="pca", limit=100, num_workers=0)
    assert [n for n, _ in report.figures] == ["curves.png", "health.png", "map.png", "neighbors.png"]
    assert "checkpoint.pt" in report.facts["encoder"] and "epoch 4" in report.facts["encoder"]


def test_projections():
    h = torch.randn(120, 16) + torch.arange(120).remainder(3)[:, None].float() * 3
    xy, how = project_2d(h, "pca", 0)
    assert how == "PCA" and xy.shape == (120, 2) and np.isfinite(xy).all()
    assert first_of_each_class(torch.tensor([2, 0, 2, 1, 0]), 2) == [1, 3]


def test_tsne_where_scikit_learn_is_installed():
    pytest.importorskip("sklearn")
    xy, how = project_2d(torch.randn(60, 8), "auto", 0)
    assert how == "t-SNE" and xy.shape == (60, 2)


def test_missing_extras_are_one_line_naming_them(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # an import of it now raises ImportError
    with pytest.raises(MissingExtraError, match=r"simclr-cli\[map\]"):
        project_2d(torch.randn(10, 4), "tsne", 0)
    assert project_2d(torch.randn(10, 4), "auto", 0)[1] == "PCA"  # auto falls back
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    r = CliRunner().invoke(app, ["report", str(run_dir), "-o", str(tmp_path / "a"), "--tensorboard"])
    assert r.exit_code == 2 and r"simclr-cli[tensorboard]" in r.stderr and not (tmp_path / "a").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    r = CliRunner().invoke(app, ["report", str(run_dir), "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and "pip install 'simclr-cli[report]'" in r.stderr and not (tmp_path / "b").exists()
    assert len(r.stderr.strip().splitlines()) == 1


def test_tensorboard_gets_the_same_scalars(run_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_report(run_dir, output=tmp_path / "rep", map_method="pca", limit=60, num_workers=0, tensorboard=True)
    events = EventAccumulator(str(tmp_path / "rep" / "tensorboard"))
    events.Reload()
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"]
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in steps]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert len(events.Scalars("eval/knn_top1")) == 4  # one evaluation per epoch


def test_bad_report_input_is_one_line(run_dir, tmp_path):
    import yaml

    moved = tmp_path / "moved"  # a cifar10 run whose data is no longer where its config says
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("report"))
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    cfg["data"].update(dataset="cifar10", root=str(tmp_path / "gone"))
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    for args, message in [([tmp_path / "nowhere"], "is not a run directory"),
                          ([tmp_path / "runs[exp]"], f"{tmp_path / 'runs[exp]'} is not"),  # text, not Rich markup
                          ([run_dir, "--map", "umap"], "--map"),
                          ([run_dir, "-k", "0"], "-k"), ([moved], "pass --data-root")]:
        r = CliRunner().invoke(app, ["report", *map(str, args), "-o", str(tmp_path / "out")])
        assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "out").exists()
