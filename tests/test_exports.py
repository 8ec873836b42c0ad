"""The encoder for other runtimes: ONNX (onnxruntime), TorchScript (plain torch) and safetensors, for the
built-in ResNet and a torchvision family; each file checked when written, carrying its preprocessing, and
the README's onnxruntime snippet reproducing `simclr embed`'s rows."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.errors import CheckpointError, MissingExtraError, OptionError
from simclr_cli.exports import onnx as export_onnx
from simclr_cli.exports import portable
from simclr_cli.serve.embed import embed_images
from simclr_cli.exports.extract import extract_encoder
from simclr_cli.exports.portable_files import write_torchscript
from simclr_cli.score.probe import run_probe
from simclr_cli.models.encoder_file import LoadedEncoder, load_encoder
from simclr_cli.train import pretrain

onnxruntime = pytest.importorskip("onnxruntime")  # the test extra installs onnx, onnxruntime, onnxscript
pytestmark = pytest.mark.usefixtures("one_thread")

# on top of the shared tiny run (tests/conftest.py); None: the config's default
RUN = {"synthetic_size": 32, "image_size": 32, "epochs": 1, "width": None, "precision": None, "log_every": None,
       "train.eval_every": 0, "data.val_size": 8}
DYNAMO = "dynamo" in inspect.signature(torch.onnx.export).parameters  # torch.export's ONNX exporter
MODELS = {"built-in ResNet": ["model.arch=resnet18", "model.width=8"],
          "MobileNet": ["model.arch=torchvision:mobilenet_v3_small"]}


@pytest.fixture(scope="module", params=list(MODELS))
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    pretrain(tiny_config(out, *MODELS[request.param], **RUN))
    return out


def images(folder: Path, n: int = 5) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):  # sizes and formats that take the resize, the crop and JPEG's draft decoding
        pixels = rng.integers(0, 256, (30 + 9 * i, 50 - 4 * i, 3), np.uint8)
        Image.fromarray(pixels).save(folder / (f"{i}.jpg" if i % 2 else f"{i}.png"), quality=90)
    return folder


def reference(run: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_encoder(run / "encoder.pth").encoder.eval()(x)


def test_onnx_round_trips_with_dynamic_axes(run, tmp_path):
    info = extract_encoder(run / "checkpoint.pt", tmp_path / "e.onnx", "onnx")
    assert info["parity"] < portable.TOLERANCE and info["dynamic"] == ["batch", "height", "width"]
    session = onnxruntime.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["simclr-cli"])
    assert meta["image_size"] == 32 and meta["output_dim"] == load_encoder(run / "encoder.pth").feature_dim
    for shape in ((1, 3, 32, 32), (5, 3, 32, 32), (2, 3, 40, 48)):  # the batch, and a convnet's size, are free
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        got = session.run(None, {"images": x.numpy()})[0]
        np.testing.assert_allclose(got, reference(run, x).numpy(), atol=1e-4, rtol=1e-4)


def test_torchscript_runs_with_torch_alone(run, tmp_path):
    info = extract_encoder(run / "checkpoint.pt", tmp_path / "e.pt", "torchscript")
    assert info["parity"] < portable.TOLERANCE
    code = ("import sys, json, torch; sys.modules['simclr_cli'] = sys.modules['torchvision'] = None\n"
            f"extra = {{'simclr-cli.json': ''}}; m = torch.jit.load({str(tmp_path / 'e.pt')!r}, _extra_files=extra)\n"
            "torch.manual_seed(1); x = torch.randn(3, 3, 32, 32)\n"
            "print(json.dumps({'h': m(x).tolist(), 'meta': json.loads(extra['simclr-cli.json'])}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    torch.manual_seed(1)
    np.testing.assert_allclose(np.array(out["h"]), reference(run, torch.randn(3, 3, 32, 32)).numpy(), atol=1e-5)
    assert out["meta"]["mean"] == list(load_encoder(run / "encoder.pth").mean)
    with pytest.raises(CheckpointError, match="is a TorchScript file, for torch.jit.load without simclr-cli"):
        load_encoder(tmp_path / "e.pt")  # what embed and probe say of it


def test_safetensors_holds_the_library_keys_and_loads_back(run, tmp_path):
    from safetensors import safe_open

    info = extract_encoder(run / "checkpoint.pt", tmp_path / "e.safetensors", "safetensors")
    assert info["parity"] < portable.TOLERANCE
    with safe_open(str(tmp_path / "e.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()["simclr-cli"])
    assert not any(k.startswith("net.") for k in keys) and meta["model"]["arch"] == info["arch"]
    loaded = load_encoder(tmp_path / "e.safetensors")  # probe and embed take it as it is
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder.eval()(x), reference(run, x), rtol=0, atol=1e-6)


def test_a_vit_exports_from_its_encoder_file_with_a_dynamic_batch_and_its_own_size(tmp_path):
    pytest.importorskip("timm")
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}
    pretrain(tiny_config(tmp_path / "run", "model.arch=timm:vit_tiny_patch16_224", f"model.kwargs={json.dumps(kwargs)}",
                         **RUN))
    info = extract_encoder(tmp_path / "run" / "encoder.pth", tmp_path / "e.onnx", "onnx")  # an encoder file too
    assert info["parity"] < portable.TOLERANCE and info["dynamic"] == ["batch"]
    session = onnxruntime.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], reference(tmp_path / "run", x).numpy(),
                               atol=1e-4, rtol=1e-4)


def test_embed_with_the_onnx_file_gives_the_rows_of_the_pth(run, tmp_path):
    extract_encoder(run / "checkpoint.pt", tmp_path / "e.onnx", "onnx")
    folder = images(tmp_path / "images")
    embed_images(folder, run / "encoder.pth", tmp_path / "pth.npy", device="cpu")
    result = embed_images(folder, tmp_path / "e.onnx", tmp_path / "onnx.npy", device="cpu")
    assert result.rows == 5
    np.testing.assert_allclose(np.load(tmp_path / "onnx.npy"), np.load(tmp_path / "pth.npy"), atol=1e-4, rtol=1e-4)
    found = {}
    for name in ("e.onnx", "pth"):  # neighbors too: the same similarities (a tiny run's h can tie, so not paths)
        encoder = tmp_path / name if name != "pth" else run / "encoder.pth"
        result = CliRunner().invoke(app, ["neighbors", str(folder / "0.png"), "--index", str(folder), "--encoder",
                                          str(encoder), "-k", "3", "--precision", "fp32"])
        assert result.exit_code == 0, result.output
        found[name] = [n["similarity"] for n in json.loads(result.stdout)["neighbors"]]
    np.testing.assert_allclose(found["e.onnx"], found["pth"], atol=1e-4)
    assert found["e.onnx"][0] == pytest.approx(1.0, abs=1e-4)  # the query itself is in the index


def test_probe_takes_the_onnx_file(run, tmp_path):
    """Its features are the .pth's (the embed test above); a tiny run's h ties, so its scores are not compared."""
    extract_encoder(run / "checkpoint.pt", tmp_path / "e.onnx", "onnx")
    report = run_probe(tmp_path / "e.onnx", "synthetic", device="cpu", synthetic_size=40)
    trained = report["results"]["trained"]
    assert trained["feature_dim"] == load_encoder(run / "encoder.pth").feature_dim
    assert 0 <= trained["knn_top1"] <= 1 and 0 <= trained["linear_top1"] <= 1
    with pytest.raises(OptionError, match="holds no architecture to rebuild untrained"):
        run_probe(tmp_path / "e.onnx", "synthetic", device="cpu", synthetic_size=40, random_init=True)


def readme_snippet(model: str, image_paths: list[Path]) -> np.ndarray:
    """The README's onnxruntime snippet, line for line (numpy, Pillow and onnxruntime only)."""
    import onnxruntime as ort
    from PIL import Image, ImageOps

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["simclr-cli"])
    size, mean, std = meta["image_size"], np.array(meta["mean"]), np.array(meta["std"])
    rows = []
    for path in image_paths:
        img = Image.open(path)
        img.draft("RGB", (size, size))  # JPEG: decode at the smallest scale >= size, as simclr embed does
        img = ImageOps.exif_transpose(img).convert("RGB")
        w, h = img.size
        s = min(w, h)  # the centre square of the shorter side, resized to size x size
        img = img.resize((size, size), Image.Resampling.BILINEAR, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))
        x = (np.asarray(img, np.float32) / 255 - mean) / std
        rows.append(session.run(None, {"images": x.transpose(2, 0, 1)[None].astype(np.float32)})[0][0])
    return np.stack(rows)


def test_the_readme_snippet_reproduces_simclr_embed(run, tmp_path):
    extract_encoder(run / "checkpoint.pt", tmp_path / "e.onnx", "onnx")
    folder = images(tmp_path / "images")
    embed_images(folder, run / "encoder.pth", tmp_path / "h.npy", paths_out=tmp_path / "paths.txt", device="cpu")
    paths = [Path(p) for p in (tmp_path / "paths.txt").read_text().splitlines()]
    np.testing.assert_allclose(readme_snippet(str(tmp_path / "e.onnx"), paths), np.load(tmp_path / "h.npy"),
                               atol=1e-4, rtol=1e-4)


# --- bad input: one line, nothing written ---------------------------------------------------------------------


def test_a_file_beyond_the_tolerance_is_not_written(run, tmp_path, monkeypatch):
    """The check itself is made to see a difference (a real export agrees to ~1e-6): the file must vanish."""
    real = portable.check

    def strict(reference, got, what):
        return real(reference + 1.0, got, what)  # as if the runtime's h were off by 1
    monkeypatch.setattr(portable, "check", strict)
    for fmt, name in (("onnx", "e.onnx"), ("torchscript", "e.pt"), ("safetensors", "e.safetensors")):
        with pytest.raises(CheckpointError, match="nothing was written"):
            extract_encoder(run / "checkpoint.pt", tmp_path / name, fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_what_the_exporter_cannot_convert_is_one_line(run, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator aten::frobnicate, opset 18\nmore details")
    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(CheckpointError, match=r"could not be exported to ONNX opset 18 .*aten::frobnicate.*nothing"):
        extract_encoder(run / "checkpoint.pt", tmp_path / "e.onnx", "onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--format", "onnx", "--opset", "5"], "opset 5 is not one this exporter writes: use --opset 13 to"),
    (["--format", "onnx", "-o", "FOLDER"], "is a folder: give a file name, e.g."),
    (["--format", "pickle"], "unknown encoder format 'pickle': use native, torchvision, timm, onnx"),
])
def test_cli_bad_export_requests_are_one_line(run, tmp_path, args, message):
    args = [str(tmp_path) if a == "FOLDER" else a for a in args]
    result = CliRunner().invoke(app, ["extract", str(run / "checkpoint.pt"), *(["-o", str(tmp_path / "x.onnx")]
                                                                               if "-o" not in args else []), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.onnx").exists()


def test_a_missing_extra_is_named_before_any_work(run, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    with pytest.raises(MissingExtraError, match=r"pip install 'simclr-cli\[onnx\]'"):
        extract_encoder(run / "nonexistent-checkpoint.pt", tmp_path / "e.onnx", "onnx")  # before reading it
    with pytest.raises(MissingExtraError, match="onnxruntime"):
        export_onnx.OnnxEncoder(tmp_path / "e.onnx")


def test_an_onnx_file_that_takes_no_image_batch_is_refused(tmp_path):
    torch.onnx.export(torch.nn.Linear(10, 4), (torch.zeros(2, 10),), str(tmp_path / "linear.onnx"),
                      input_names=["x"], **({"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames
                                            else {}))
    images(tmp_path / "images", 1)
    with pytest.raises(CheckpointError, match=r"does not take a batch of RGB images \(N, 3, H, W\) but x \[2, 10\]"):
        embed_images(tmp_path / "images", tmp_path / "linear.onnx", tmp_path / "h.npy", device="cpu")
    assert not (tmp_path / "h.npy").exists()


# --- the parity check: relative to the output's own scale, constant output refused, a second size ------------


def test_zeros_against_a_tiny_scale_reference_are_refused():
    """An untrained MobileNet's h is ~3e-9: against a floor of 1, a file giving zeros passed."""
    reference = 3e-9 * torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(CheckpointError, match=r"differs from the PyTorch encoder by .*more than 0.0001 x its largest"):
        portable.check(reference, torch.zeros(4, 16), "the ONNX file")


def test_a_tiny_scale_reference_that_matches_passes():
    """fp32's own rounding at that scale (1e-6 relative, measured 6e-7 for the MobileNet) is well inside."""
    reference = 3e-9 * torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    got = reference * (1 + 1e-6 * torch.randn(4, 16, generator=torch.Generator().manual_seed(1)))
    assert 0 < portable.check(reference, got, "the ONNX file") < 1e-5 * 3e-9 * 4
    zero = torch.zeros(1, 16)  # one image: nothing to tell apart, and zero matches zero exactly
    assert portable.check(zero, zero.clone(), "the ONNX file with a batch of one") == 0.0


def test_a_constant_output_is_refused():
    """Rows that differ by 1e-5 of their size (as the 1-epoch MobileNet's: 1.8e-9 in 2.9e-4) are within the
    tolerance of their shared mean; a file giving that mean for every image is still refused."""
    g = torch.Generator().manual_seed(0)
    shared = torch.rand(1, 16, generator=g) * 3e-4
    reference = shared + 2e-9 * torch.randn(4, 16, generator=g)
    constant = reference.mean(0, keepdim=True).expand(4, 16)
    with pytest.raises(CheckpointError, match=r"the ONNX file gives one and the same output for 4 different images "
                                              r"\(the PyTorch encoder does not\): nothing was written"):
        portable.check(reference, constant, "the ONNX file")
    with pytest.raises(CheckpointError, match="the PyTorch encoder gives one and the same output for 4 different"):
        portable.check(shared.expand(4, 16), shared.expand(4, 16).clone(), "the ONNX file")


class Pooled(torch.nn.Module):
    """A convolution, ReLU and a global average pool, times `scale`: 1e-9 is an untrained MobileNet's |h|
    (measured 2.8e-9 at 32 pixels)."""

    convolutional, feature_dim = True, 4

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.conv, self.scale = torch.nn.Conv2d(3, 4, 3, padding=1), scale

    def forward(self, x):
        return self.scale * torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)

    def describe(self):
        return {"arch": "pooled", "stem": "cifar", "feature_dim": 4}


class SizeInTheTrace(torch.nn.Module):
    """A global average pool whose kernel is read off the feature map as Python ints: right at every size in
    PyTorch, but a trace (TorchScript, the TorchScript-based ONNX exporter) keeps the training size's kernel."""

    convolutional, feature_dim = True, 4

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.mix = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.mix(torch.relu(self.conv(x)))
        return torch.nn.functional.avg_pool2d(y, (int(y.shape[-2]), int(y.shape[-1]))).flatten(1)

    def describe(self):
        return {"arch": "size-in-the-trace", "stem": "cifar", "feature_dim": 4}


class FixedSize(SizeInTheTrace):
    """Convolutional, but its linear layer takes 16x16 maps alone: PyTorch itself refuses another size."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4 * 16 * 16, 4)

    def forward(self, x):
        return self.fc(self.mix(torch.relu(self.conv(x))).flatten(1))


def toy(kind: type, *args) -> LoadedEncoder:
    """`kind(*args)`, seeded, as a 16-pixel encoder file's contents."""
    torch.manual_seed(0)
    return LoadedEncoder(kind(*args).eval(), 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "toy encoder")


def test_a_torchscript_trace_that_keeps_the_training_size_is_not_written(tmp_path):
    with pytest.raises(CheckpointError, match=r"the TorchScript file at 24x32 pixels gives \(2, 8\), the PyTorch "
                                              r"encoder \(2, 4\): nothing was written"):
        write_torchscript(toy(SizeInTheTrace), tmp_path / "e.pt")
    assert not list(tmp_path.iterdir())


def test_an_onnx_file_that_declares_a_free_size_it_does_not_take_is_not_written(tmp_path, monkeypatch):
    """torch's TorchScript-based exporter declares height and width dynamic and keeps the traced kernel."""
    real = torch.onnx.export

    def traced_export(model, args, f, dynamo=None, dynamic_shapes=None, external_data=None, dynamic_axes=None, **kw):
        axes = {"images": {0: "batch", 2: "height", 3: "width"}, kw["output_names"][0]: {0: "batch"}}
        return real(model, args, f, **({"dynamo": False} if DYNAMO else {}), dynamic_axes=axes, **kw)
    monkeypatch.setattr(torch.onnx, "export", traced_export)
    with pytest.raises(CheckpointError, match=r"the ONNX file at 24x32 pixels gives \(2, 8\)"):
        export_onnx.write(toy(SizeInTheTrace), tmp_path / "e.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not DYNAMO, reason="torch.export's exporter (torch 2.5 and later)")
def test_an_onnx_file_that_fixed_its_size_says_so(tmp_path):
    """torch.export turns int(y.shape[-1]) into the training size: the file takes 16x16 alone, and says so."""
    info = export_onnx.write(toy(SizeInTheTrace), tmp_path / "e.onnx")
    assert info["dynamic"] == ["batch"]
    assert export_onnx.OnnxEncoder(tmp_path / "e.onnx").input_shape[2:] == [16, 16]


def test_a_convolutional_model_that_takes_one_size_exports_at_that_size(tmp_path):
    """PyTorch refuses 24x32 itself: the ONNX file is written with a fixed size, not refused for it."""
    info = export_onnx.write(toy(FixedSize), tmp_path / "e.onnx")
    assert info["dynamic"] == ["batch"] and info["parity"] < portable.TOLERANCE
    assert write_torchscript(toy(FixedSize), tmp_path / "e.pt")["parity"] < portable.TOLERANCE


def test_an_export_of_a_tiny_scale_encoder_passes_and_one_giving_zeros_is_not_written(tmp_path, monkeypatch):
    """h of ~1e-9: the true file agrees to ~1e-7 of that and is kept; zeros from onnxruntime are refused."""
    loaded = toy(Pooled, 1e-9)
    _, reference = portable.parity_batch(loaded)
    for fmt, write in (("onnx", export_onnx.write), ("pt", write_torchscript)):
        info = write(loaded, tmp_path / f"e.{fmt}")
        assert 0 <= info["parity"] < 1e-5 * float(reference.abs().max()), fmt
    real = onnxruntime.InferenceSession.run
    monkeypatch.setattr(onnxruntime.InferenceSession, "run",
                        lambda self, *args, **kw: [np.zeros_like(o) for o in real(self, *args, **kw)])
    with pytest.raises(CheckpointError, match=r"the ONNX file differs from the PyTorch encoder by .*: nothing was"):
        export_onnx.write(loaded, tmp_path / "zeros.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.onnx", "e.pt"]


def test_the_runtime_failing_at_the_second_size_is_one_line(tmp_path, monkeypatch):
    real = onnxruntime.InferenceSession.run

    def training_size_only(self, names, feeds, *args, **kw):
        if next(iter(feeds.values())).shape[-1] != 16:
            raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions\nindex: 3")
        return real(self, names, feeds, *args, **kw)
    monkeypatch.setattr(onnxruntime.InferenceSession, "run", training_size_only)
    with pytest.raises(CheckpointError, match=r"the ONNX file does not run at 24x32 pixels \(RuntimeError: "
                                              r"\[ONNXRuntimeError\] : 2 : INVALID_ARGUMENT : Got invalid dimensions "
                                              r"index: 3\): nothing was written"):
        export_onnx.write(toy(Pooled), tmp_path / "e.onnx")
    assert not list(tmp_path.iterdir())
