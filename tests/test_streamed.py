"""The `webdataset` data source: pretraining streams tar shards (written by `simclr shards`) through the loop's
usual calls: an epoch is the shards' count or data.webdataset.samples_per_epoch, resume mid-epoch is exact, bad
samples are named notices, and bad settings or shards are one line each."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import pretrained_tiny, straight_and_resumed, tiny_config, tiny_set_args
from PIL import Image
from test_methods import assert_same, run_state
from test_stream import write_tar  # tests/test_stream.py
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.config import load_config
from simclr_cli.data import load_dataset, load_train_set
from simclr_cli.data.shards import write_shards
from simclr_cli.errors import DatasetError
from simclr_cli.runtime import DistInfo
from simclr_cli.serve.embed import embed_images
from simclr_cli.train import Trainer, pretrain
from simclr_cli.train.state import load_checkpoint


def png(i: int, size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 images in 3 class folders, written as shards of at most 8 (6 shards, a train series only) with their
    index."""
    root = tmp_path_factory.mktemp("streamed")
    for i in range(48):
        (root / "img" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / "img" / f"c{i % 3}" / f"{i:02d}.png").write_bytes(png(i))
    write_shards(root / "img", root / "shards", max_count=8)
    return root / "shards"


def stream_args(urls: str | list[str], *extra: str) -> list[str]:
    """The settings of a streamed run over `urls` (quoted: a brace range is no plain YAML scalar in a list)."""
    listed = ", ".join(f"'{u}'" for u in ([urls] if isinstance(urls, str) else urls))
    return ["data.dataset=webdataset", f"data.webdataset.urls=[{listed}]", "data.num_workers=0", *extra]


def test_pretraining_streams_the_shards_and_an_epoch_is_their_count(tmp_path, shards):
    r = CliRunner().invoke(app, ["pretrain", "-o", str(tmp_path / "run"),
                                 *tiny_set_args(*stream_args(str(shards)))])
    assert r.exit_code == 0, r.output
    assert "webdataset, 6 shards, 48 images (3, 16, 16)" in " ".join(r.output.split())
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["step"] == 9 and ckpt["epoch"] == 3  # 48 samples / 16 a batch x 3 epochs
    logs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["loss"]) for x in logs if x["kind"] == "log")
    r = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--device", "cpu"])  # the curves, and why no map
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "report" / "curves.png").is_file()
    assert "webdataset data streams its shards: no map" in " ".join(r.output.split())


def test_samples_per_epoch_sets_the_epoch(tmp_path, shards):
    cfg = tiny_config(tmp_path, *stream_args(str(shards), "data.webdataset.samples_per_epoch=80"), epochs=1)
    pretrain(cfg)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 5  # 80 / 16: the shards read again to fill it


def test_resume_mid_epoch_with_two_workers_is_bit_exact(tmp_path, monkeypatch, shards):
    urls = str(shards / "train-{000000..000005}.tar")
    straight, resumed = (run_state(run) for run in straight_and_resumed(
        tmp_path, monkeypatch, *stream_args(urls, "data.num_workers=2", "data.webdataset.buffer=10")))
    assert straight[0] == resumed[0]
    assert_same(straight[1], resumed[1])


def test_a_bad_image_mid_shard_is_a_named_notice_and_the_epoch_keeps_its_length(tmp_path):
    bad = tmp_path / "bad.tar"  # 16 good: the one step of 16 needs every one of them
    write_tar(bad, [(f"k{i:02d}", {"png": png(100 + i)[:50] if i == 3 else png(100 + i)}) for i in range(17)])
    notices = []
    trainer = Trainer(tiny_config(tmp_path / "run", *stream_args(str(bad)), epochs=1),
                      callback=lambda event, data: notices.append(data["message"]) if event == "notice" else None)
    trainer.run()
    assert trainer.state.step == 1
    named = [m for m in notices if "passed over sample" in m]
    assert len(named) == 1 and "sample k03 of " + str(bad) in named[0], notices


@pytest.mark.parametrize("extra, message", [
    (["data.webdataset.urls=[]"], "the webdataset source needs its shards: set data.webdataset.urls"),
    (["data.webdataset.urls=['/nowhere/train-{000000..000003}.tar']"],
     "shard /nowhere/train-000000.tar does not exist (4 of 4 shards are missing)"),
    (["data.webdataset.timeout=0"], "'data.webdataset.timeout' must be > 0; got 0"),
    (["data.size_dataset_train=10"], "set data.webdataset.samples_per_epoch=10 instead"),
])
def test_bad_settings_are_one_line(tmp_path, shards, extra, message):
    sets = tiny_set_args(*stream_args(str(shards)), *extra)
    r = CliRunner().invoke(app, ["pretrain", "-o", str(tmp_path / "run"), *sets])
    assert r.exit_code != 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in " ".join(r.stderr.split()) and "Traceback" not in r.output, r.output


def test_an_empty_shard_and_a_shard_without_images_are_one_line(tmp_path, shards):
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w", format=tarfile.USTAR_FORMAT):
        pass
    labels = tmp_path / "labels.tar"
    write_tar(labels, [(f"k{i:02d}", {"cls": b"1"}) for i in range(20)])
    for shard, says in ((empty, "holds no samples"), (labels, str(labels))):
        cfg = tiny_config(tmp_path / "run", *stream_args([str(shard), f"{shards}/train-000000.tar"]), epochs=1)
        with pytest.raises(DatasetError) as err:
            Trainer(cfg).run()
        assert says in str(err.value) and "\n" not in str(err.value)


def test_the_training_set_is_the_stream_and_has_no_labels_ahead(tmp_path, shards):
    data = load_train_set(load_config(None, [*stream_args(str(shards)), "train.batch_size=16"]), DistInfo())
    assert len(data) == 48 and data.labels is None and data.image_shape == (3, 32, 32)


def test_embed_reads_shards_in_shard_order_and_names_each_row(tmp_path, shards):
    encoder = pretrained_tiny(tmp_path / "run") / "encoder.pth"
    by_path = embed_images(shards.parent / "img", encoder, tmp_path / "folder.npy", paths_out=tmp_path / "folder.txt",
                           device="cpu", num_workers=0)
    folder_rows = dict(zip((str(p.relative_to(shards.parent / "img")) for p in by_path.paths),
                           np.load(tmp_path / "folder.npy")))
    result = embed_images(str(shards), encoder, tmp_path / "shards.npy", paths_out=tmp_path / "shards.txt",
                          device="cpu", num_workers=0)
    names = (tmp_path / "shards.txt").read_text().splitlines()
    index = json.loads((shards / "index.json").read_text())["series"]["train"]["shards"]
    expected = []  # (shard URL, key, source path) in shard order, each tar read in its own member order
    for shard in index:
        url = f"{shards}/{shard['name']}"
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    expected.append((url, m.name[:-5], json.loads(tar.extractfile(m).read())["path"]))
    assert names == [f"{u}#{k}" for u, k, _ in expected] == [str(n) for n in result.paths]
    rows = np.load(tmp_path / "shards.npy")
    assert rows.shape == (48, len(folder_rows["c0/00.png"]))
    np.testing.assert_allclose(rows, np.stack([folder_rows[p] for _, _, p in expected]), atol=1e-5, rtol=0)


def test_embed_of_a_shard_with_a_bad_image_writes_nothing_unless_told_to_skip(tmp_path, shards):
    encoder = pretrained_tiny(tmp_path / "run") / "encoder.pth"
    bad = tmp_path / "bad.tar"
    write_tar(bad, [(f"k{i}", {"png": png(200 + i)[:50] if i == 2 else png(200 + i)}) for i in range(5)])
    r = CliRunner().invoke(app, ["embed", str(bad), "-e", str(encoder), "-o", str(tmp_path / "v.npy"),
                                 "--device", "cpu"])
    assert r.exit_code == 2 and not (tmp_path / "v.npy").exists(), r.output
    assert f"{bad}#k2" in r.output and "1 of 5 images could not be decoded" in " ".join(r.output.split())
    result = embed_images(str(bad), encoder, tmp_path / "v.npy", skip_bad=True, device="cpu", num_workers=0)
    assert result.rows == 4 and np.load(tmp_path / "v.npy").shape[0] == 4 and f"{bad}#k2" not in result.paths


@pytest.fixture(scope="module")
def split_shards(tmp_path_factory) -> Path:
    """A folder with train/<class>/ (30 images) and test/<class>/ (12), and its shards (train and test series)."""
    root = tmp_path_factory.mktemp("split")
    for split, n in (("train", 30), ("test", 12)):
        for i in range(n):
            (root / "img" / split / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
            (root / "img" / split / f"c{i % 3}" / f"{i:02d}.png").write_bytes(png(1000 * (split == "test") + i))
    write_shards(root / "img", root / "shards", max_count=7)
    return root


def test_probe_reads_labelled_shards_as_it_reads_their_folder(tmp_path, split_shards):
    encoder = pretrained_tiny(tmp_path / "run") / "encoder.pth"
    figures = {}
    for dataset, where in (("webdataset", split_shards / "shards"), ("folder", split_shards / "img")):
        out = tmp_path / f"{dataset}.json"
        r = CliRunner().invoke(app, ["probe", str(encoder), "--dataset", dataset, "--data-dir", str(where),
                                     "--device", "cpu", "--precision", "fp32", "--json", str(out)])
        assert r.exit_code == 0, r.output
        report = json.loads(out.read_text())
        figures[dataset] = report["results"]["trained"]
        assert (report["dataset"]["train_size"], report["dataset"]["test_size"]) == (30, 12)
    assert figures["webdataset"]["knn_top1"] == pytest.approx(figures["folder"]["knn_top1"], abs=1e-6)


def test_probe_on_shards_without_a_test_series_or_labels_is_one_line(tmp_path, shards):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(6):
        (flat / f"{i}.png").write_bytes(png(i))
    write_shards(flat, tmp_path / "flat-shards")
    encoder = pretrained_tiny(tmp_path / "run") / "encoder.pth"
    for where, says in ((shards, "have no test series"), (tmp_path / "flat-shards", "have no test series"),
                        (tmp_path, "no shard index (index.json) in")):
        r = CliRunner().invoke(app, ["probe", str(encoder), "--dataset", "webdataset", "--data-dir", str(where),
                                     "--device", "cpu"])
        assert r.exit_code != 0 and "Traceback" not in r.output, r.output
        assert says in " ".join(r.output.split()), r.output
    cfg = load_config(None, stream_args(str(shards)))
    with pytest.raises(DatasetError, match="have no test series"):
        load_dataset(cfg.data, "test")


def test_two_ranks_pretrain_from_the_shards(tmp_path, shards):
    """`simclr pretrain --nproc 2`: each rank streams 3 of the 6 shards (24 samples, 3 local batches of 8)."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "simclr_cli", "pretrain", "--nproc", "2", "-o", str(out),
                        "--device", "cpu", *tiny_set_args(*stream_args(str(shards)), epochs=1)],
                       capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "120"})
    assert r.returncode == 0, r.stdout + r.stderr
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
