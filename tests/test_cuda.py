"""The CUDA code paths, on a GPU only (skipped elsewhere; `benchmarks/gpu.py` runs them on a lent device):
no host sync inside a training step, pinned + non_blocking batches from a mapped folder, fp16 with its
GradScaler (unfused SGD), cuDNN and TF32 settings, read-ahead of pinned batches, and torch.compile. The two-GPU
tests (nccl, SyncBatchNorm in every network, the sharded kNN monitor) skip on a machine with one GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_overrides
from PIL import Image

from simclr_cli.config import load_config
from simclr_cli.data.batches import epoch_order
from simclr_cli.train import Trainer, pretrain
from simclr_cli.train.loop import start_panel

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# on top of the shared tiny run (tests/conftest.py); None: the config's default
RUN = {"synthetic_size": 512, "image_size": 32, "width": 16, "batch_size": 128, "precision": None, "device": "cuda",
       "epochs": 1}


@pytest.mark.parametrize("method", ["simclr", "moco", "byol"])
def test_a_training_step_never_waits_on_the_host(tmp_path, method):
    """Between loss read-backs the step (batch cut, views, forward, loss, backward, optimiser, EMA) must
    queue work without a host-device sync: sync debug mode "error" raises on any."""
    trainer = Trainer(tiny_config(tmp_path, f"method.name={method}", "optim.name=lars", "train.precision=bf16", **RUN))
    order = epoch_order(len(trainer.data), 0, 0, trainer.device)
    trainer.train_step(trainer.batches.get(order, 0))  # first call: allocations, cuDNN choices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 3):
            trainer.train_step(trainer.batches.get(order, i))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_mapped_folder_moves_pinned_batches(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(80):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(tmp_path / "images" / c / f"{i}.png")
    cfg = load_config(None, ["data.dataset=folder", f"data.root={tmp_path / 'images'}", "data.image_size=32",
                             f"data.cache_dir={tmp_path / 'cache'}", "model.width=16", "train.batch_size=32",
                             "train.device=cuda", f"train.output_dir={tmp_path / 'run'}", "train.epochs=1"])
    trainer = Trainer(cfg)
    assert trainer.data.mapped
    x = trainer.batches.get(epoch_order(len(trainer.data), 0, 0, torch.device("cpu")), 0)
    assert x.device.type == "cuda" and x.dtype == torch.uint8 and x.shape == (32, 3, 32, 32)
    assert torch.isfinite(trainer.train_step(x))


def test_fp16_trains_with_its_scaler_and_resumes(tmp_path):
    summary = pretrain(tiny_config(tmp_path, "train.precision=fp16", **RUN))
    assert summary["final_loss"] is not None and np.isfinite(summary["final_loss"])
    from simclr_cli.train.state import load_checkpoint
    assert load_checkpoint(tmp_path / "checkpoint.pt")["scaler"]  # the GradScaler's state travels
    pretrain(tiny_config(tmp_path, "train.precision=fp16", "train.epochs=2", **RUN), resume=True)


def test_compile_trains(tmp_path):
    summary = pretrain(tiny_config(tmp_path, "train.compile=true", "train.precision=bf16", **RUN))
    assert np.isfinite(summary["final_loss"])


def test_auto_precision_on_this_gpu_is_native():
    device = torch.device("cuda", 0)
    expected = "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    from simclr_cli.runtime import resolve_precision

    assert resolve_precision("auto", device) == expected


@pytest.mark.parametrize("precision, tf32", [("fp32", True), ("bf16", False)])
def test_the_start_panel_shows_cudnn_benchmark_and_tf32(tmp_path, precision, tf32):
    trainer = Trainer(tiny_config(tmp_path, f"train.precision={precision}", **RUN))
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32 == tf32
    assert start_panel(trainer)["cuda"] == f"cudnn.benchmark on, TF32 {'on' if tf32 else 'off'} for fp32 matmuls and convolutions"


def test_fp16_sgd_is_unfused_and_its_first_steps_stay_finite(tmp_path):
    """fp16's loss scale starts at 65536 and overflows on the first steps; fused SGD would leave garbage in
    the momentum on those skipped steps. Unfused, the weights and the momentum stay finite."""
    trainer = Trainer(tiny_config(tmp_path, "train.precision=fp16", "optim.name=sgd", **RUN))
    assert not trainer.optimizer.defaults.get("fused")
    order = epoch_order(len(trainer.data), 0, 0, trainer.device)
    for i in range(4):
        trainer.train_step(trainer.batches.get(order, i))
    buffers = [s["momentum_buffer"] for s in trainer.optimizer.state.values() if "momentum_buffer" in s]
    assert all(torch.isfinite(b).all() for b in buffers)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    bf16 = Trainer(tiny_config(tmp_path / "bf16", "train.precision=bf16", "optim.name=sgd", **RUN))
    assert bf16.optimizer.defaults.get("fused")  # no scaler: the fused kernels are safe


def test_a_mapped_folder_reads_pinned_batches_ahead(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(96):
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(tmp_path / "images" / f"{i}.png")
    cfg = load_config(None, ["data.dataset=folder", f"data.root={tmp_path / 'images'}", "data.image_size=32",
                             f"data.cache_dir={tmp_path / 'cache'}", "model.width=16", "train.batch_size=32",
                             "train.device=cuda", f"train.output_dir={tmp_path / 'run'}", "train.epochs=1"])
    trainer = Trainer(cfg)
    order = epoch_order(len(trainer.data), 0, 0, torch.device("cpu"))
    assert trainer.batches.read(order, 0).is_pinned()
    with trainer.batches.stream(order, range(trainer.steps_per_epoch)) as batches:
        got = [x for x in batches]
    assert len(got) == 3 and all(x.device.type == "cuda" for x in got)
    assert all(torch.equal(x.cpu(), trainer.data.images[order[32 * i:32 * (i + 1)]]) for i, x in enumerate(got))


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@two_gpus
@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_two_gpus_with_sync_bn_and_the_sharded_monitor(tmp_path, method):
    """nccl, SyncBatchNorm (the target network's too) and the monitor's gathered features, on two GPUs."""
    import subprocess
    import sys

    out = tmp_path / "run"
    sets = tiny_overrides("train.eval_every=1", "model.sync_bn=true", f"method.name={method}",
                          **{**RUN, "device": None, "log_every": None, "epochs": 2})  # the device: --device
    done = subprocess.run([sys.executable, "-m", "simclr_cli", "pretrain", "--nproc", "2", "--device", "cuda",
                           "-o", str(out), *[a for kv in sets for a in ("--set", kv)]],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert len(evals) == 2 and all(0 <= r["knn_top1"] <= 1 for r in evals)
