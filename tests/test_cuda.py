"""The CUDA code paths, on a GPU only (skipped elsewhere; `benchmarks/gpu.py` runs them on a lent device):
no host sync inside a training step, pinned + non_blocking batches from a mapped folder, fp16 with its
GradScaler, and torch.compile. nccl and sync_bn need two GPUs and are not covered here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_cli.config import load_config
from simclr_cli.train import Trainer, epoch_order, pretrain

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = ["data.dataset=synthetic", "data.synthetic_size=512", "data.image_size=32", "model.width=16",
        "train.batch_size=128", "train.device=cuda", "train.epochs=1", "train.log_every=2"]


def tiny(out: Path, *extra: str):
    return load_config(None, [*TINY, f"train.output_dir={out}", *extra])


@pytest.mark.parametrize("method", ["simclr", "moco", "byol"])
def test_a_training_step_never_waits_on_the_host(tmp_path, method):
    """Between loss read-backs the step (batch cut, views, forward, loss, backward, optimiser, EMA) must
    queue work without a host-device sync: sync debug mode "error" raises on any."""
    trainer = Trainer(tiny(tmp_path, f"method.name={method}", "optim.name=lars", "train.precision=bf16"))
    order = epoch_order(len(trainer.data), 0, 0, trainer.device)
    trainer.train_step(trainer._batch(order, 0))  # first call: allocations, cuDNN choices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 3):
            trainer.train_step(trainer._batch(order, i))
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
    x = trainer._batch(epoch_order(len(trainer.data), 0, 0, torch.device("cpu")), 0)
    assert x.device.type == "cuda" and x.dtype == torch.uint8 and x.shape == (32, 3, 32, 32)
    assert torch.isfinite(trainer.train_step(x))


def test_fp16_trains_with_its_scaler_and_resumes(tmp_path):
    summary = pretrain(tiny(tmp_path, "train.precision=fp16"))
    assert summary["final_loss"] is not None and np.isfinite(summary["final_loss"])
    from simclr_cli.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path / "checkpoint.pt")["scaler"]  # the GradScaler's state travels
    pretrain(tiny(tmp_path, "train.precision=fp16", "train.epochs=2"), resume=True)


def test_compile_trains(tmp_path):
    summary = pretrain(tiny(tmp_path, "train.compile=true", "train.precision=bf16"))
    assert np.isfinite(summary["final_loss"])
