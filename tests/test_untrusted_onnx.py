"""ONNX files whose simclr-cli metadata is malformed (not JSON, not an object, a key missing, a value of the
wrong type or out of range, sizes the graph contradicts): `simclr embed`, `neighbors` and `probe` each refuse
them in one line naming the field, exit code 2, no traceback, nothing written.

The files are built with onnx.helper (three nodes: the mean of each channel), not exported, so each case
costs milliseconds; a file with good metadata embeds, so the refusals are the metadata's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import app

onnx = pytest.importorskip("onnx")  # the test extra installs onnx and onnxruntime
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = {"format": "simclr-cli/portable-encoder", "format_version": 1, "image_size": 16, "output_dim": 3,
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "output": "h",
        "model": {"arch": "channel-mean", "stem": "cifar"}, "provenance": {"seed": 0}}


def tiny_onnx(path: Path, meta, size: int | str = "height", out_dim: int = 3) -> Path:
    """An encoder in three nodes: images (N, 3, H, W) -> the mean of each channel (N, 3) (padded to out_dim
    outputs); `meta` stored as the simclr-cli metadata (a str as it is, anything else as JSON)."""
    width = size if isinstance(size, int) else "width"
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, width])
    y = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", out_dim])
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("Pad", ["flat", "pads"], ["h"])]
    pads = helper.make_tensor("pads", TensorProto.INT64, [4], [0, 0, 0, out_dim - 3])
    graph = helper.make_graph(nodes, "channel_mean", [x], [y], initializer=[pads])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # onnxruntime 1.16 and later read it
    entry = model.metadata_props.add()
    entry.key, entry.value = "simclr-cli", meta if isinstance(meta, str) else json.dumps(meta)
    onnx.save(model, str(path))
    return path


def images(folder: Path, n: int = 3) -> Path:
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 24, 3), np.uint8)).save(folder / f"{i}.png")
    return folder


def without(key: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != key}


# (case, the metadata, what the line must name)
BAD = [
    ("not JSON", '{"image_size": 16, mean: [0.5]}', "metadata is not JSON"),
    ("nested deeper than the parser", "[" * 100_000, "metadata is not JSON"),
    ("a list", [16, [0.5, 0.5, 0.5]], "metadata is a JSON list, not an object"),
    ("a string", "\"image_size=16\"", "metadata is a JSON str, not an object"),
    ("no image_size", without("image_size"), "has no 'image_size'"),
    ("no mean", without("mean"), "has no 'mean'"),
    ("no output_dim", without("output_dim"), "has no 'output_dim'"),
    ("no model", without("model"), "has no 'model' mapping"),
    ("image_size a string", {**GOOD, "image_size": "16"}, "'image_size' must be an integer"),
    ("image_size a bool", {**GOOD, "image_size": True}, "'image_size' must be an integer"),
    ("image_size huge", {**GOOD, "image_size": 10 ** 9}, "'image_size' must be in [8, 1024]"),
    ("output_dim a float", {**GOOD, "output_dim": 3.5}, "'output_dim' must be an integer"),
    ("mean two values", {**GOOD, "mean": [0.5, 0.5]}, "'mean' must be a list of 3"),
    ("mean a string inside", {**GOOD, "mean": [0.5, "0.5", 0.5]}, "'mean' must be a number"),
    ("mean a mapping", {**GOOD, "mean": {"r": 0.5}}, "'mean' must be a list of 3"),
    ("std zero", {**GOOD, "std": [0.25, 0, 0.25]}, "'std' must be in [1e-06"),
    ("output unknown", {**GOOD, "output": "z"}, "'output' must be one of 'h', 'logits'"),
    ("model a list", {**GOOD, "model": ["resnet18"]}, "'model' must be a mapping"),
    ("model.arch missing", {**GOOD, "model": {"stem": "cifar"}}, "'model.arch' must be a string"),
    ("provenance a string", {**GOOD, "provenance": "run 3"}, "'provenance' must be a mapping"),
    ("another format", {**GOOD, "format": "someone-else"}, "'format' is \"someone-else\""),
    ("a newer version", {**GOOD, "format_version": 2}, "'format_version' is 2;"),
]


def commands(tmp_path: Path, encoder: Path) -> dict[str, list[str]]:
    folder = tmp_path / "images"
    return {"embed": ["embed", str(folder), "--encoder", str(encoder), "-o", str(tmp_path / "out" / "h.npy"),
                      "--device", "cpu", "--workers", "0"],
            "neighbors": ["neighbors", str(folder / "0.png"), "--index", str(folder), "--encoder", str(encoder),
                          "--device", "cpu", "--workers", "0"],
            "probe": ["probe", str(encoder), "--dataset", "synthetic", "--device", "cpu",
                      "--json", str(tmp_path / "out" / "probe.json")]}


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def refused(tmp_path: Path, encoder: Path, *parts: str) -> None:
    """Every command that takes an ONNX encoder: exit 2, one line naming `parts`, nothing written."""
    (tmp_path / "out").mkdir(exist_ok=True)
    before = files(tmp_path)
    for name, args in commands(tmp_path, encoder).items():
        result = CliRunner().invoke(app, args)
        err = result.stderr.strip()
        assert result.exit_code == 2, (name, result.output, result.exception)
        assert "Traceback" not in result.output + result.stderr, name
        assert len(err.splitlines()) == 1 and err.startswith("error: "), (name, err)
        for part in (str(encoder), *parts):
            assert part in err, (name, err)
        assert files(tmp_path) == before, name  # no output, no partial file, no cache


@pytest.mark.parametrize("case, meta, part", BAD, ids=[case for case, _, _ in BAD])
def test_malformed_onnx_metadata_is_one_line_naming_the_field(tmp_path, case, meta, part):
    images(tmp_path / "images")
    refused(tmp_path, tiny_onnx(tmp_path / "e.onnx", meta), part, "export the encoder again with `simclr extract")


def test_metadata_the_graph_contradicts_is_one_line(tmp_path):
    """A graph fixed to 16 pixels described as 24; a graph giving 5 values described as 3."""
    images(tmp_path / "images")
    refused(tmp_path, tiny_onnx(tmp_path / "size.onnx", {**GOOD, "image_size": 24}, size=16),
            "'image_size' is 24, but the model takes 16x16 images")
    refused(tmp_path, tiny_onnx(tmp_path / "dim.onnx", GOOD, out_dim=5), "'output_dim' is 3, but the model gives")


def test_a_good_tiny_file_embeds(tmp_path):
    """The same builder with good metadata: every command above accepts it (the refusals are the metadata's)."""
    folder = images(tmp_path / "images")
    encoder = tiny_onnx(tmp_path / "e.onnx", GOOD)
    (tmp_path / "out").mkdir()
    args = commands(tmp_path, encoder)
    result = CliRunner().invoke(app, args["embed"])
    assert result.exit_code == 0, result.output
    h = np.load(tmp_path / "out" / "h.npy")
    pixels = np.stack([np.asarray(Image.open(folder / f"{i}.png").resize((16, 16), Image.Resampling.BILINEAR),
                                  np.float32) for i in range(3)])
    np.testing.assert_allclose(h, (pixels / 255 - 0.5).mean(axis=(1, 2)) / 0.25, atol=0.05)  # the channel means
    result = CliRunner().invoke(app, args["neighbors"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["neighbors"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
