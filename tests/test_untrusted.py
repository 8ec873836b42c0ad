"""Bad input and untrusted files: each is refused with one line and exit code 2 before training starts,
and nothing in a file ever runs (pickles load with weights_only=True, YAML with safe_load, paths are never
handed to a shell)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny_set_args
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.files import CHECKPOINT_FORMAT

SETS = tiny_set_args(epochs=1, log_every=None)  # the shared tiny run (tests/conftest.py), one epoch


pytestmark = pytest.mark.usefixtures("one_thread")


def pretrain_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["pretrain", *args])
    assert "Traceback" not in result.output + result.stderr
    return result.exit_code, result.stderr.strip()


def assert_one_line(text: str, *parts: str) -> None:
    assert len(text.splitlines()) == 1, text
    assert text.startswith("error: ")
    for part in parts:
        assert part in text, text


class CreatesFile:
    """Unpickling this object calls open(path, "w"): it creates a file. Stands in for any code a pickle runs."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, how):
    run = tmp_path / "run"
    run.mkdir()
    pwned = tmp_path / "pwned"
    payload = {"format": CHECKPOINT_FORMAT, "model": CreatesFile(pwned)}
    with open(run / "checkpoint.pt", "wb") as f:
        torch.save(payload, f) if how == "torch.save" else pickle.dump(payload, f, protocol=2)
    assert not pwned.exists()
    code, err = pretrain_cli(*SETS, "--resume", "--output-dir", str(run))
    assert code == 2
    assert_one_line(err, str(run / "checkpoint.pt"), "refused")
    assert not pwned.exists()
    # The payload is real: a plain (not weights_only) load would have run it.
    with open(run / "checkpoint.pt", "rb") as f:
        torch.load(f, weights_only=False) if how == "torch.save" else pickle.load(f)
    assert pwned.exists()


def test_yaml_python_tag_is_refused(tmp_path):
    pwned = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"train:\n  epochs: !!python/object/apply:os.system ['touch {pwned}']\n")
    code, err = pretrain_cli("--config", str(config), "--output-dir", str(tmp_path / "run"))
    assert code == 2
    assert_one_line(err, str(config), "Python tags (!!python/...) are refused")
    assert not pwned.exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["$(touch pwned)", "`touch pwned`", "$HOME; touch pwned"])
def test_paths_in_configs_are_used_as_given(tmp_path, monkeypatch, text):
    monkeypatch.chdir(tmp_path)  # a shell would run `touch pwned` here
    code, err = pretrain_cli("--set", "data.dataset=cifar10", "--set", f"data.root={text}", "--set",
                             "data.download=false", "--output-dir", f"run {text}")
    assert code == 2
    assert_one_line(err, f"not found under {text}")  # the literal text, not expanded
    assert not (tmp_path / "pwned").exists()
    assert list(tmp_path.iterdir()) == []  # a failed run makes no output directory, literal or expanded


@pytest.mark.parametrize("args, parts", [
    (["--set", "optim.lr=-1"], ["'optim.lr' must be > 0; got -1"]),
    (["--set", "optim.lrr=0.1"], ["unknown config key 'optim.lrr': did you mean 'lr'?"]),
    (["--set", "train.precision=fp8"], ["'train.precision' must be one of"]),
    (["--set", "data.synthetic_size=8"], ["train.batch_size 16 is larger than the 8 training images"]),
    (["--set", "data.dataset=cifar10", "--set", "data.download=false"], ["CIFAR-10 not found under"]),
    (["--config", "missing.yaml"], ["config file not found: missing.yaml"]),
])
def test_bad_input_is_one_line_and_exit_2_before_training(tmp_path, monkeypatch, args, parts):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIMCLR_DATA_DIR", str(tmp_path / "no-data"))
    code, err = pretrain_cli(*SETS, *args, "--output-dir", "run")
    assert code == 2
    assert_one_line(err, *parts)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_output_dir_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # A path under a regular file: not even root can make it (chmod would not stop root).
    for out in (blocker / "run", blocker):
        code, err = pretrain_cli(*SETS, "--output-dir", str(out))
        assert code == 2
        assert_one_line(err, f"output directory {out}", "is a file, not a folder", "choose another --output-dir")


def test_bad_yaml_is_one_line(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("train:\n  epochs: [1, 2\n")
    code, err = pretrain_cli("--config", str(config))
    assert code == 2
    assert_one_line(err, f"{config} at line", "not valid YAML")


def test_a_checkpoint_that_is_not_one_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "model": {"w": torch.ones(1000)}}, run / "checkpoint.pt")
    whole = (run / "checkpoint.pt").read_bytes()
    for text in (whole[: len(whole) // 2], b"hello world"):  # a torn copy; a wrong file (KeyError inside torch)
        (run / "checkpoint.pt").write_bytes(text)
        code, err = pretrain_cli(*SETS, "--resume", "--output-dir", str(run))
        assert code == 2
        assert_one_line(err, "is truncated or not a PyTorch file")
    torch.save({"format": CHECKPOINT_FORMAT, "config": "nonsense"}, run / "checkpoint.pt")
    code, err = pretrain_cli(*SETS, "--resume", "--output-dir", str(run))
    assert code == 2
    assert_one_line(err, "holds no config")


def test_a_text_file_as_checkpoint_is_not_called_malicious(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"plain text, not a checkpoint")
    code, err = pretrain_cli(*SETS, "--resume", "--output-dir", str(run))
    assert code == 2
    assert_one_line(err, "is truncated or not a PyTorch file")


# --- Model descriptions from files: what a shared encoder, checkpoint, classifier or safetensors file may ask
# a model constructor for (models/spec.py). Each is refused in one line naming the field, before anything is
# built: no keyword reaches torchvision or timm unless it is on the allowlist, and every size is bounded.

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
EVIL = {"arch": "timm:resnet18", "stem": "cifar", "kwargs": {"checkpoint_path": "EVIL"}}
DESCRIPTIONS = {  # name -> (description, the field the line must name)
    "forbidden keyword": (EVIL, "'kwargs.checkpoint_path' is not a keyword"),
    "absurd width": ({"arch": "resnet18", "stem": "cifar", "width": 10**7}, "'width' must be in [8, 256]"),
    "absurd ViT width": ({"arch": "timm:vit_tiny_patch16_224", "stem": "cifar",
                          "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 10**6}},
                         "'kwargs.embed_dim' must be in [8, 4096]"),
    "a list for kwargs": ({"arch": "timm:resnet18", "stem": "cifar", "kwargs": ["checkpoint_path", "x"]},
                          "'kwargs' must be a mapping"),
    "a missing key": ({"arch": "resnet18", "width": 8}, "'stem' is missing"),
}


def write_file(kind: str, desc: dict, path: Path) -> Path:
    """A file of `kind` whose model description is `desc` (weights that would never be reached)."""
    from safetensors.torch import save_file

    from simclr_cli.files import CLASSIFIER_FORMAT, ENCODER_FORMAT

    native = {"format": ENCODER_FORMAT, "format_version": 1, **desc, "image_size": 16, "mean": MEAN, "std": STD,
              "state_dict": {"conv1.weight": torch.zeros(8, 3, 3, 3)}, "provenance": {}}
    if kind == "native":
        torch.save(native, path)
    elif kind == "checkpoint":
        torch.save({"format": CHECKPOINT_FORMAT, "encoder": {**desc, "image_size": 16, "mean": MEAN, "std": STD,
                                                             "head": None, "provenance": {}},
                    "model": {"encoder.conv1.weight": torch.zeros(8, 3, 3, 3)}, "config": {}, "step": 1}, path)
    elif kind == "classifier":
        torch.save({**native, "format": CLASSIFIER_FORMAT,
                    "classifier": {"head_layer": 0, "classes": ["a", "b"], "state_dict": {}}}, path)
    else:
        header = {"model": desc, "image_size": 16, "mean": MEAN, "std": STD, "provenance": {}}
        save_file({"conv1.weight": torch.zeros(8, 3, 3, 3)}, str(path), metadata={"simclr-cli": json.dumps(header)})
    return path


def use_file(kind: str, path: Path, tmp_path: Path) -> tuple[int, str, Path]:
    """The command a user gives the file to: predict for a classifier, embed for the others."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    Image.new("RGB", (20, 20), (10, 200, 30)).save(images / "a.png")
    out = tmp_path / ("out.csv" if kind == "classifier" else "out.npy")
    args = ["predict", str(path), str(images)] if kind == "classifier" else ["embed", str(images), "--encoder", str(path)]
    result = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert "Traceback" not in result.output + result.stderr
    return result.exit_code, result.stderr.strip(), out


@pytest.mark.parametrize("kind", ["native", "checkpoint", "classifier", "safetensors"])
@pytest.mark.parametrize("case", list(DESCRIPTIONS))
def test_a_file_asks_a_constructor_only_for_what_is_allowed(tmp_path, monkeypatch, kind, case):
    desc, field = DESCRIPTIONS[case]
    if kind == "safetensors" and case == "a missing key":
        desc = {"arch": "timm:resnet18", "kwargs": {}}
    monkeypatch.chdir(tmp_path)  # a relative "EVIL" resolves here
    pwned = tmp_path / "pwned"
    with open(tmp_path / "EVIL", "wb") as f:
        pickle.dump({"state_dict": CreatesFile(pwned)}, f, protocol=2)  # what timm's checkpoint_path would unpickle
    built = []
    import timm
    import torchvision

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(a) or pytest.fail("timm was reached"))
    monkeypatch.setattr(torchvision.models, "get_model", lambda *a, **k: built.append(a) or pytest.fail("reached"))
    path = write_file(kind, desc, tmp_path / f"file.{'safetensors' if kind == 'safetensors' else 'pth'}")
    code, err, out = use_file(kind, path, tmp_path)
    assert code == 2, err
    assert_one_line(err, str(path), field)
    assert not out.exists() and not pwned.exists() and not built


@pytest.mark.parametrize("kind", ["native", "classifier"])
def test_a_malformed_head_or_classifier_section_is_one_line(tmp_path, kind):
    desc = {"arch": "resnet18", "stem": "cifar", "width": 8}
    path = write_file(kind, desc, tmp_path / "file.pth")
    obj = torch.load(path, weights_only=True)
    if kind == "native":
        obj["head"], field = ["hidden", 8], "'head' must be a mapping"
    else:
        obj["classifier"], field = ["head_layer", 0], "'classifier' must be a mapping"
    torch.save(obj, path)
    code, err, out = use_file(kind, path, tmp_path)
    assert code == 2
    assert_one_line(err, str(path), field)
    assert not out.exists()


@pytest.mark.parametrize("header, field", [
    ({"model": ["resnet18"], "image_size": 16, "mean": MEAN, "std": STD}, "'model' is a list, not a mapping"),
    ({"model": {"arch": "resnet18", "stem": "cifar", "width": 8}, "mean": MEAN, "std": STD}, "'image_size' is missing"),
    ({"model": {"arch": "resnet18", "stem": "cifar", "width": 8}, "image_size": 16, "mean": [0.5], "std": STD},
     "'mean' must be 3 numbers in"),
])
def test_a_damaged_safetensors_description_is_one_line(tmp_path, header, field):
    from safetensors.torch import save_file

    path = tmp_path / "enc.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3)}, str(path), metadata={"simclr-cli": json.dumps(header)})
    code, err, out = use_file("safetensors", path, tmp_path)
    assert code == 2
    assert_one_line(err, str(path), field)
    assert not out.exists()


@pytest.mark.parametrize("sets, parts", [
    (["model.arch=torchvision:mobilenet_v3_small", "model.kwargs={nosuch: 1}"], ["'model.kwargs.nosuch' is not a keyword"]),
    # on the allowlist, but not MobileNetV3's: its constructor would swallow it without a word
    (["model.arch=torchvision:mobilenet_v3_small", "model.kwargs={qkv_bias: true}"],
     ["'model.kwargs.qkv_bias' is not a keyword torchvision:mobilenet_v3_small takes", "dropout"]),
    (["model.arch=timm:resnet18", "model.kwargs={checkpoint_path: evil.pth}"], ["'model.kwargs.checkpoint_path'"]),
    (["model.arch=timm:vit_tiny_patch16_224", "model.kwargs={img_size: 16, embed_dim: 1000000}"],
     ["'model.kwargs.embed_dim' must be in [8, 4096], not 1000000"]),
    (["model.arch=timm:vit_tiny_patch16_224", "model.kwargs={img_size: 16, patch_size: 4, embed_dim: 100}"],
     ["refuses model.kwargs", "divisible"]),  # an assertion in timm's constructor, not a traceback
    (["model.width=10000000"], ["'model.width' must be in [8, 256], not 10000000"]),
    # before any data is read: a missing CIFAR-10 would otherwise be the first line
    (["model.arch=torchvision:mobilenet_v3_small", "model.kwargs={qkv_bias: true}", "data.dataset=cifar10",
      "data.download=false", "data.root=nowhere"], ["'model.kwargs.qkv_bias' is not a keyword"]),
    (["model.arch=timm:resnet18", "model.kwargs={drop_rate: fast}"], ["'model.kwargs.drop_rate' must be a number"]),
])
def test_a_config_asks_a_constructor_only_for_what_it_declares(tmp_path, sets, parts):
    args = [arg for kv in sets for arg in ("--set", kv)]
    code, err = pretrain_cli(*SETS, *args, "--output-dir", str(tmp_path / "run"))
    assert code == 2
    assert_one_line(err, *parts)
    assert not (tmp_path / "run").exists()
