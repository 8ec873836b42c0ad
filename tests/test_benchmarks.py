"""benchmarks/quality.py plans the cosine schedule to end at the budget's step count, not at an epoch's end."""

import importlib.util
import json

from conftest import REPO, write_fake_cifar


def load_quality():
    spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_budget_ends_the_cosine_mid_epoch(tmp_path, monkeypatch):
    quality = load_quality()
    write_fake_cifar(tmp_path / "data", "cifar10", n_per_batch=40)  # 200 training images
    # No timing in a test: a "measured" 0.0285 steps/s over a 600 s budget plans 17 steps, and the run takes
    # a few seconds, far inside the wall-clock stop.
    monkeypatch.setattr(quality, "calibrate", lambda cfg: (0.0285, 12))
    monkeypatch.setattr(quality, "BUDGET_USE", 1.0)
    extra = ["model.width=8", "train.batch_size=16", "train.log_every=1", "optim.lr=0.1", "optim.warmup_epochs=0",
             "optim.min_lr=0"]
    run = quality.pretrain_for("examples/cpu.yaml", str(tmp_path / "data"), tmp_path / "run", 600, extra)
    # 200 images / 16 = 12 steps per epoch: 17 steps are one epoch and 5 steps of the next.
    assert run["steps_per_epoch"] == 12 and run["steps_planned"] == 17
    assert run["steps"] == 17 and not run["hit_budget"]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in steps if r["kind"] == "step"]
    assert len(lrs) == 17 and lrs[0] > 0.09  # starts at the peak (no warmup) ...
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 1e-9  # ... and reaches min_lr at step 17
    assert (tmp_path / "run" / "encoder.pth").stat().st_size > 0
