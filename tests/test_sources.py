"""Registry entries that carry their own policy: the data sources of registry.SOURCES and the evaluations of
registry.EVALUATIONS. Each built-in source declares what the probe, finetune and the training loader ask
(root, labels, map or stream, downloads, normalisation); a source or an evaluation added to the registry
is used by `load_dataset` and `simclr probe` like a built-in one, with no other change; the probe's table
is built from the columns the evaluations declare, and shows today's columns for the built-ins.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.cli.display import probe_table
from simclr_cli.config import ConfigError, DataConfig, config_from_dict
from simclr_cli.data import NORMALIZATION, DataOptions, ImageSet, Source, load_dataset
from simclr_cli.data.synthetic import make_synthetic
from simclr_cli.errors import DatasetError
from simclr_cli.score.evaluation import Column, Evaluation, table_columns
from simclr_cli.score.finetune import FinetuneOptions
from simclr_cli.score.probe import run_probe
from simclr_cli.files import atomic_save
from simclr_cli.models import ResNetEncoder
from simclr_cli.models.encoder_file import encoder_payload
from simclr_cli.registry import BUILT_IN, EVALUATIONS, REGISTRIES, SOURCES

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {"COLUMNS": "160", "NO_COLOR": "1"}


def encoder_file(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = config_from_dict({"data": {"image_size": 16}, "model": {"width": 8}})
    return atomic_save(encoder_payload(ResNetEncoder("resnet18", "cifar", 8), cfg, mean=NORMALIZATION["cifar10"][0],
                                       std=NORMALIZATION["cifar10"][1]), path)


def load_toy(d: DataConfig, split: str, size: int, seed: int, progress=None, notice=None) -> ImageSet:
    """Synthetic gratings under another name: 30 images a split, seeded as the built-in one."""
    data = make_synthetic(30, size, seed, split)
    return ImageSet(data.images, data.labels, data.classes, f"toy/{split}")


@pytest.fixture
def added():
    """Adds entries to a registry for one test and removes them after, whatever happens."""
    names: list[tuple] = []

    def add(registry, name: str, entry) -> None:
        registry.add(name, entry, origin="test")
        names.append((registry, name))
    yield add
    for registry, name in names:
        registry.remove(name)


# --- the built-in sources' declared policy -----------------------------------------------------------------

def test_built_in_sources_declare_their_policy(tmp_path):
    assert REGISTRIES["sources"] is SOURCES and REGISTRIES["evaluations"] is EVALUATIONS
    assert SOURCES.names() == ["cifar10", "cifar100", "folder", "synthetic", "webdataset"]
    assert all(SOURCES.origin(name) == BUILT_IN for name in SOURCES.names())
    for name in ("cifar10", "cifar100"):
        s = SOURCES[name]
        assert (s.downloads, s.has_labels, s.kind, s.needs_root, s.uses_root) == (True, True, "map", False, True)
        assert (s.Options, s.RULES) == (None, ())  # their settings are DataConfig's flat keys
        assert s.normalization == NORMALIZATION[name]
    folder, synthetic = SOURCES["folder"], SOURCES["synthetic"]
    assert (folder.needs_root, folder.downloads, folder.kind, folder.has_labels) == (True, False, "map", True)
    assert (synthetic.needs_root, synthetic.uses_root, synthetic.downloads) == (False, False, False)
    assert synthetic.kind == "map"
    assert folder.normalization == synthetic.normalization == NORMALIZATION["imagenet"]
    shards = SOURCES["webdataset"]  # streamed into pretraining, read whole by probe and finetune
    assert (shards.kind, shards.has_labels, shards.needs_root, shards.downloads) == ("stream", True, False, False)
    assert shards.load_whole is not None and shards.Options().urls == [] and shards.Options().buffer == 1000
    assert all(SOURCES[n].help and "\n" not in SOURCES[n].help for n in SOURCES.names())


def test_a_source_checks_its_own_config(tmp_path):
    with pytest.raises(ConfigError, match="the folder dataset needs 'data.root' set to a folder of images"):
        SOURCES["folder"].check(DataConfig(dataset="folder"))
    SOURCES["folder"].check(DataConfig(dataset="folder", root=str(tmp_path)))
    SOURCES["cifar10"].check(DataConfig(dataset="cifar10"))  # a default place: no root needed
    (tmp_path / "train").mkdir(), (tmp_path / "test").mkdir()
    assert not SOURCES["folder"].seeded_split(tmp_path) and SOURCES["folder"].seeded_split(tmp_path / "train")
    missing = SOURCES["cifar10"].missing(DataConfig(root=str(tmp_path), download=False))
    assert missing == tmp_path / "cifar-10-batches-py"
    assert SOURCES["cifar10"].missing(DataConfig(root=str(tmp_path), download=True)) is None
    with pytest.raises(ValueError, match="kind"):
        Source(load_toy, NORMALIZATION["imagenet"], "x", kind="table")


def test_one_bundle_of_evaluation_data_options():
    assert DataOptions().synthetic_size == DataConfig().synthetic_size == FinetuneOptions().synthetic_size
    assert isinstance(FinetuneOptions(), DataOptions)
    d = FinetuneOptions(dataset="folder", root="/x", num_workers=0, synthetic_size=7).data_config()
    assert (d.dataset, d.root, d.download, d.num_workers, d.synthetic_size) == ("folder", "/x", False, 0, 7)


def test_cli_dataset_help_comes_from_the_sources():
    for command in ("probe", "finetune"):
        r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "2000", "NO_COLOR": "1"})
        assert r.exit_code == 0, r.output
        for name in SOURCES.names():
            assert f"{name} ({SOURCES[name].help})" in " ".join(r.output.split()), (command, name)


# --- a source added to the registry is used like a built-in -----------------------------------------------

def test_an_added_source_is_loaded_and_probed(tmp_path, added):
    added(SOURCES, "toy", Source(load_toy, ((0.5,) * 3, (0.25,) * 3), "gratings under another name",
                                 uses_root=False))
    train = load_dataset(DataConfig(dataset="toy"), "train", seed=1, image_size=16)
    assert train.name == "toy/train" and train.images.shape == (30, 3, 16, 16)
    encoder = encoder_file(tmp_path / "enc.pth")
    r = CliRunner().invoke(app, ["probe", str(encoder), "--dataset", "toy", "--device", "cpu", "--precision", "fp32",
                                 "--json", str(tmp_path / "p.json")], env=ENV)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["dataset"]["name"] == "toy" and report["dataset"]["root"] is None
    assert report["dataset"]["train_size"] == 30 and 0 <= report["results"]["trained"]["knn_top1"] <= 1


def test_an_added_sources_policy_is_asked(tmp_path, added):
    norm = NORMALIZATION["imagenet"]
    added(SOURCES, "shards", Source(load_toy, norm, "tar shards", kind="stream"))
    added(SOURCES, "unlabelled", Source(load_toy, norm, "no labels", has_labels=False))
    added(SOURCES, "rooted", Source(load_toy, norm, "a root", needs_root=True, layout="DIR/<shard>.tar"))
    with pytest.raises(DatasetError, match="the shards source streams its data into pretraining; .* a map source"):
        load_dataset(DataConfig(dataset="shards"), "train")
    encoder = encoder_file(tmp_path / "enc.pth")
    with pytest.raises(DatasetError, match="the unlabelled dataset has no labels"):
        run_probe(encoder, "unlabelled", device="cpu")
    with pytest.raises(DatasetError, match=r"the rooted dataset needs --data-dir DIR \(DIR/<shard>.tar\)"):
        run_probe(encoder, "rooted", device="cpu")
    with pytest.raises(ConfigError, match="the rooted dataset needs 'data.root' set to"):
        SOURCES["rooted"].check(DataConfig(dataset="rooted"))
    SOURCES.remove("shards")
    with pytest.raises(DatasetError, match="unknown dataset 'shards'"):
        load_dataset(DataConfig(dataset="shards"), "train")


# --- evaluations declare their columns --------------------------------------------------------------------

def old_probe_table(report: dict) -> Table:
    """The table as cli/display.py built it before the columns moved into the evaluations: the oracle."""
    table = Table(title=f"{report['dataset']['name']} test split ({report['dataset']['test_size']} images)")
    for col in ("encoder", "linear top-1", "linear top-5", "kNN top-1", "L2 (held-out)", "extract img/s"):
        table.add_column(col, justify="left" if col == "encoder" else "right")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    for name, r in report["results"].items():
        table.add_row(name.replace("_", " "), pct(r["linear_top1"]), pct(r["linear_top5"]), pct(r["knn_top1"]),
                      f"{r['weight_decay']:g}", f"{r['images_per_s']:.0f}")
    return table


def rendered(table: Table) -> str:
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_the_built_in_columns_give_todays_table():
    results = {"trained": {"linear_top1": 0.91234, "linear_top5": 0.99871, "knn_top1": 0.8765, "weight_decay": 1e-4,
                           "images_per_s": 1234.56},
               "random_init": {"linear_top1": 0.3, "linear_top5": None, "knn_top1": 0.125, "weight_decay": 0.1,
                               "images_per_s": 99.4}}
    report = {"dataset": {"name": "cifar10", "test_size": 10000}, "results": results}
    assert rendered(probe_table(report)) == rendered(old_probe_table(report))
    assert "91.23%" in rendered(probe_table(report)) and "0.0001" in rendered(probe_table(report))
    assert [c.header for c in table_columns()] == ["linear top-1", "linear top-5", "kNN top-1", "L2 (held-out)"]


def mean_norm(features, opts: dict) -> dict:
    return {"mean_norm": features.test.norm(dim=1).mean().item()}


def test_an_added_evaluation_is_a_probe_column(tmp_path, added):
    added(EVALUATIONS, "norm", Evaluation("mean norm", mean_norm, (Column("mean |h|", "mean_norm", ".3f"),)))
    encoder = encoder_file(tmp_path / "enc.pth")
    r = CliRunner().invoke(app, ["probe", str(encoder), "--dataset", "synthetic", "--synthetic-size", "40",
                                 "--device", "cpu", "--precision", "fp32", "--json", str(tmp_path / "p.json")], env=ENV)
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "p.json").read_text())["results"]["trained"]
    assert result["mean_norm"] > 0 and "norm_s" in result
    header = next(line for line in r.output.splitlines() if "encoder" in line and "extract img/s" in line)
    assert header.index("L2 (held-out)") < header.index("mean |h|") < header.index("extract img/s")
    assert f"{result['mean_norm']:.3f}" in r.output and "mean norm..." in r.output
    EVALUATIONS.remove("norm")
    assert "mean |h|" not in [c.header for c in table_columns()]
