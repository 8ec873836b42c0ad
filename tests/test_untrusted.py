"""Bad input and untrusted files: each is refused with one line and exit code 2 before training starts,
and nothing in a file ever runs (pickles load with weights_only=True, YAML with safe_load, paths are never
handed to a shell)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.files import CHECKPOINT_FORMAT

TINY = ["data.dataset=synthetic", "data.synthetic_size=48", "data.image_size=16", "model.width=8",
        "train.batch_size=16", "train.precision=fp32", "train.device=cpu", "train.epochs=1"]
SETS = [arg for kv in TINY for arg in ("--set", kv)]


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
