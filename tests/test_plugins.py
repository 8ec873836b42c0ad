"""Plugins: a package outside this repository adds a method, a data source, an export format and an
evaluation through entry points, and
`simclr` uses them like built-in ones; a plugin that fails to import is a warning, never a broken CLI.

The package is examples/plugin, installed here the way pip would leave it for the import system (the
package on sys.path beside a .dist-info folder with its METADATA and entry_points.txt), without pip or a
network. Its entry points are read from its own pyproject.toml, so the test installs what the README shows.
"""

from __future__ import annotations

import json
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.registry import REGISTRIES

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "plugin"
TINY = tiny_overrides("train.eval_every=0", dataset=None, synthetic_size=None, device=None, epochs=1, log_every=1)


def install(site: Path, name: str, version: str, entry_points: dict[str, dict[str, str]]) -> None:
    """What `pip install` leaves for importlib.metadata: NAME-VERSION.dist-info with METADATA, entry_points.txt."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items()) + "\n"
        for group, points in entry_points.items()))


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """examples/plugin installed into a folder on sys.path, and a second package whose entry is broken."""
    site = tmp_path / "site"
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    shutil.copytree(PLUGIN / "simclr_toy_plugin", site / "simclr_toy_plugin")
    install(site, project["name"], project["version"], project["entry-points"])
    install(site, "broken-plugin", "9.9", {"simclr_cli.methods": {"broken": "no_such_module_here:Method"}})
    monkeypatch.syspath_prepend(str(site))
    for registry in REGISTRIES.values():
        registry.reload()
    yield project
    for registry in REGISTRIES.values():
        registry.reload()  # sys.path is restored by now: the plugins are gone again
    for module in [m for m in sys.modules if m.startswith("simclr_toy_plugin")]:
        del sys.modules[module]


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_simclr_list_names_every_entry_and_where_it_comes_from(plugin):
    result = run("list")
    assert result.exit_code == 0, result.output
    rows = {tuple(line.split()[:2]): line for line in result.stdout.splitlines()[1:]}
    assert "built-in" in rows["methods", "simclr"] and "built-in" in rows["sources", "cifar10"]
    assert "simclr-toy-plugin 0.1.0" in rows["methods", "align"]
    for group, name in [("sources", "checkerboards"), ("exports", "json"), ("evaluations", "centroid")]:
        assert "simclr-toy-plugin 0.1.0" in rows[group, name]
    assert "failed to import: ModuleNotFoundError" in rows["methods", "broken"]
    assert {group for group, _ in rows} == set(REGISTRIES)


def test_pretrain_with_the_plugins_method_and_source(plugin, tmp_path):
    out = tmp_path / "run"
    sets = [*TINY, "method.name=align", "method.align.uniformity_weight=0.5", "data.dataset=checkerboards",
            "data.checkerboards.images=48", "data.checkerboards.classes=3", "data.val_size=8"]
    result = run("pretrain", "--output-dir", str(out), "--device", "cpu", *(a for kv in sets for a in ("--set", kv)))
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["method"] == {"name": "align", "align": {"alpha": 2.0, "t": 2.0, "uniformity_weight": 0.5}}
    assert written["data"]["checkerboards"] == {"images": 48, "classes": 3}
    assert (out / "encoder.pth").is_file()
    probe = run("probe", str(out / "encoder.pth"), "--dataset", "checkerboards", "--device", "cpu",
                "--json", str(tmp_path / "probe.json"))
    assert probe.exit_code == 0, probe.output
    header = " ".join(line for line in probe.output.splitlines() if line.startswith("┃"))  # the table's head
    assert "kNN" in header and "centroid" in header  # the plugin's evaluation is a column of the table
    figures = json.loads((tmp_path / "probe.json").read_text())
    assert 0 <= figures["results"]["trained"]["centroid_top1"] <= 1
    exported = run("extract", str(out / "checkpoint.pt"), "--format", "json", "-o", str(tmp_path / "e.json"))
    assert exported.exit_code == 0, exported.output
    assert json.loads((tmp_path / "e.json").read_text())["model"]["arch"] == "resnet18"


@pytest.mark.parametrize("sets,message", [
    (["method.name=align", "method.align.t=0"], "'method.align.t' must be > 0; got 0"),
    (["method.name=align", "method.align.tt=1"], "unknown config key 'method.align.tt': did you mean 't'?"),
    (["data.dataset=checkerboards", "data.checkerboards.images=1"], "'data.checkerboards.images' must be >= 2"),
    (["method.name=broken"], "'method.name' 'broken' comes from broken-plugin 9.9, which failed to import"),
])
def test_a_plugins_settings_are_checked_in_one_line(plugin, tmp_path, sets, message):
    out = tmp_path / "refused"
    result = run("pretrain", "--output-dir", str(out), *(a for kv in [*TINY, *sets] for a in ("--set", kv)))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_a_broken_plugin_is_one_warning_and_the_cli_still_runs(plugin, tmp_path):
    from simclr_cli.registry import METHODS

    with pytest.warns(UserWarning, match="the method plugin 'broken' .* failed to import and is left out"):
        METHODS.load(next(e for e in METHODS.entries() if e.name == "broken"))
    result = run("pretrain", "--output-dir", str(tmp_path / "run"), "--device", "cpu",
                 *(a for kv in [*TINY, "data.dataset=synthetic", "data.synthetic_size=32"] for a in ("--set", kv)))
    assert result.exit_code == 0, result.output
