"""Shared fixtures: tiny fake CIFAR batch files, and the real offline CIFAR-10 copy when one can be built; and
the tiny pretraining run most tests start from (`tiny_overrides`, `tiny_set_args`, `tiny_config`)."""

from __future__ import annotations

import fcntl
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

pytest.register_assert_rewrite("ranks")  # tests/ranks.py's assert_one_process: failures show their values

if TYPE_CHECKING:
    from simclr_cli.config import Config

REPO = Path(__file__).resolve().parents[1]
MAKE_CIFAR10 = REPO.parent / "shared" / "data" / "make_cifar10.py"  # CI checks out ../shared beside the repo
REAL_CIFAR10_CACHE = Path("/tmp/simclr-test-data")  # built once per machine (about 10-20 s), then reused


# The tiny pretraining run: 48 synthetic images of 16x16 px, a width-8 ResNet, batches of 16 (3 steps an epoch),
# fp32 pinned so that compared runs agree under any SIMCLR_PRECISION, on the CPU, 3 epochs, the loss read back
# every 2 steps. Each test file states only how its runs differ from it.
TINY_SETTINGS: dict[str, Any] = {
    "data.dataset": "synthetic", "data.synthetic_size": 48, "data.image_size": 16, "model.width": 8,
    "train.batch_size": 16, "train.precision": "fp32", "train.device": "cpu", "train.log_every": 2,
    "train.epochs": 3,
}


def tiny_overrides(*extra: str, **changes: Any) -> list[str]:
    """The tiny run as `section.key=value` texts (what --set takes), with `changes` applied, then `extra` texts.

    A change names a shared setting by its last part (`epochs=1`) or any setting by its dotted key
    (`**{"optim.warmup_epochs": 1}`, added after the shared ones); None drops a shared setting, so the config's
    default applies. `extra` texts come last, so they win over both, as later --set texts do.
    """
    settings = dict(TINY_SETTINGS)
    by_name = {key.rpartition(".")[2]: key for key in settings}
    for name, value in changes.items():
        if "." not in name and name not in by_name:
            raise TypeError(f"tiny_overrides: '{name}' is no shared setting ({', '.join(by_name)}); "
                            "name others by their dotted key")
        key = by_name.get(name, name)
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    return [f"{key}={value}" for key, value in settings.items()] + list(extra)


def tiny_set_args(*extra: str, **changes: Any) -> list[str]:
    """`tiny_overrides(*extra, **changes)` as command-line arguments: ["--set", "data.dataset=synthetic", ...]."""
    return [arg for text in tiny_overrides(*extra, **changes) for arg in ("--set", text)]


def tiny_config(out: Path | str, *extra: str, **changes: Any) -> Config:
    """The tiny run's Config writing to `out`: `tiny_overrides(**changes)`, train.output_dir, then `extra`."""
    from simclr_cli.config import load_config

    return load_config(None, tiny_overrides(f"train.output_dir={out}", *extra, **changes))


def pretrained_tiny(out: Path) -> Path:
    """One epoch of the tiny run on 32 px images at the config's precision, no monitor: the run directory the
    export and predict tests read (checkpoint.pt, encoder.pth)."""
    from simclr_cli.train import pretrain

    pretrain(tiny_config(out, "train.eval_every=0", "data.val_size=8", synthetic_size=32, image_size=32, epochs=1,
                         precision=None, log_every=None))
    return out


def straight_and_resumed(tmp_path: Path, monkeypatch, *extra: str, stop_at: int = 5,
                         **changes: Any) -> tuple[Path, Path]:
    """The tiny run (with `extra` and `changes`) twice: straight through, and stopped by SIGTERM after step
    `stop_at` (with the shared settings, a log window left open mid-epoch 2), then resumed. Their run folders."""
    import signal

    from simclr_cli.train import Trainer, pretrain
    from simclr_cli.train.interrupt import StopRequested
    from simclr_cli.train.state import load_checkpoint

    pretrain(tiny_config(tmp_path / "straight", *extra, **changes))
    original = Trainer.train_step

    def train_step(self, x):
        loss = original(self, x)
        if self.state.step + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss
    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(StopRequested):
        pretrain(tiny_config(tmp_path / "stopped", *extra, **changes))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")["step"] == stop_at
    pretrain(tiny_config(tmp_path / "stopped", *extra, **changes), resume=True)
    return tmp_path / "straight", tmp_path / "stopped"


def write_fake_cifar(root: Path, name: str, n_per_batch: int = 6, seed: int = 0,
                     protocols: tuple[int, ...] = (2,)) -> dict:
    """Write CIFAR-10 ("cifar10") or CIFAR-100 ("cifar100") batch files in torchvision's layout under root.

    Dicts with bytes keys, b'data' uint8 (n, 3072) and b'labels' / b'fine_labels', like the originals.
    Batch files cycle through `protocols`. Returns {"train": (data, labels), "test": ..., "classes": [...]}.
    """
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, files = root / "cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)],
                                                        "test": ["test_batch"]}
        meta, label_key, names_key, n_classes = "batches.meta", b"labels", b"label_names", 10
    else:
        folder, files = root / "cifar-100-python", {"train": ["train"], "test": ["test"]}
        meta, label_key, names_key, n_classes = "meta", b"fine_labels", b"fine_label_names", 100
    folder.mkdir(parents=True, exist_ok=True)
    classes = [f"{name}_class_{i}" for i in range(n_classes)]
    with open(folder / meta, "wb") as f:
        pickle.dump({names_key: [c.encode() for c in classes]}, f, protocol=2)
    out: dict = {"classes": classes}
    k = 0
    for split, names in files.items():
        datas, labelss = [], []
        for fname in names:
            data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, n_classes, size=n_per_batch).tolist()
            batch = {b"batch_label": fname.encode(), label_key: labels, b"data": data}
            if name == "cifar100":
                batch[b"coarse_labels"] = [x // 5 for x in labels]
            with open(folder / fname, "wb") as f:
                pickle.dump(batch, f, protocol=protocols[k % len(protocols)])
            k += 1
            datas.append(data)
            labelss += labels
        out[split] = (np.concatenate(datas), np.array(labelss))
    return out


@pytest.fixture
def write_cifar():
    """The `write_fake_cifar` function, for tests that lay out batch files themselves."""
    return write_fake_cifar


@pytest.fixture
def fake_cifar10(tmp_path: Path) -> tuple[Path, dict]:
    """(root, expected) with root/cifar-10-batches-py/ holding 6 images per batch file."""
    return tmp_path, write_fake_cifar(tmp_path, "cifar10", protocols=(2, 4, 5))


@pytest.fixture
def fake_cifar100(tmp_path: Path) -> tuple[Path, dict]:
    """(root, expected) with root/cifar-100-python/ holding 6 train and 6 test images."""
    return tmp_path, write_fake_cifar(tmp_path, "cifar100")


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """A folder holding the real cifar-10-batches-py/: $SIMCLR_TEST_CIFAR10, else the offline copy built into
    /tmp/simclr-test-data by ../shared/data/make_cifar10.py. Skips when neither is available, except under CI
    (env CI set), which must exercise real data."""
    env = os.environ.get("SIMCLR_TEST_CIFAR10")
    if env:
        root = Path(env)
        if not (root / "cifar-10-batches-py").is_dir():
            pytest.fail(f"SIMCLR_TEST_CIFAR10={env} holds no cifar-10-batches-py/")
        return root
    if MAKE_CIFAR10.is_file():
        REAL_CIFAR10_CACHE.mkdir(parents=True, exist_ok=True)
        # The lock keeps two test runs on one machine from building into the same folder at once.
        with open(REAL_CIFAR10_CACHE / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            subprocess.run([sys.executable, str(MAKE_CIFAR10), str(REAL_CIFAR10_CACHE)], check=True,
                           stdout=subprocess.DEVNULL)  # idempotent: returns at once when already built
        return REAL_CIFAR10_CACHE
    reason = f"real CIFAR-10 unavailable: set SIMCLR_TEST_CIFAR10 or provide {MAKE_CIFAR10}"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny tensors: thread hand-off costs more than the maths (0.08 s against
    0.001 s per optimiser step measured here), and every compared run reduces in the same order."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def folder_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Image-folder caches of the tests go to a temporary folder, never to ~/.cache (subprocesses inherit it)."""
    monkeypatch.setenv("SIMCLR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "folder-cache"))
