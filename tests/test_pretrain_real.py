"""Pretraining on the real CIFAR-10 copy: a few steps, and the loss falls."""

import json

from simclr_cli.config import load_config
from simclr_cli.train import pretrain


def test_loss_falls_on_real_cifar10(cifar10_root, tmp_path):
    cfg = load_config("examples/quickstart.yaml", [
        f"data.root={cifar10_root}", "data.size_dataset_train=1536", "model.width=16", "train.batch_size=64",
        "train.epochs=1", "train.log_every=4", "optim.warmup_epochs=0", "optim.schedule=constant",
        "train.eval_every=0", f"train.output_dir={tmp_path / 'run'}",
    ])
    summary = pretrain(cfg)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r["kind"] == "step"]
    assert summary["steps"] == 24 and len(losses) == 6
    # Random init scores about log(2 * 64 - 1) = 4.84; a few SGD steps on real images pull the views together.
    assert losses[-1] < losses[0] - 0.05, losses
    assert (tmp_path / "run" / "encoder.pth").stat().st_size > 0
