"""benchmarks/quality.py plans the cosine schedule to end at the budget's step count, not at an epoch's end."""

import importlib.util
import json

import pytest

from conftest import REPO, write_fake_cifar


def load_quality():
    spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TickClock:
    """perf_counter stand-in: each call is `tick` seconds after the last. With log_every=1 the watch reads it
    once per step, so the run "measures" exactly 1/tick steps per second, whatever this machine's speed."""

    def __init__(self, tick):
        self.tick, self.now = tick, 0.0

    def perf_counter(self):
        self.now += self.tick
        return self.now


@pytest.mark.parametrize("calibrated_steps", [10, 17, 30])
def test_budget_ends_the_cosine_mid_epoch_at_the_measured_speed(tmp_path, monkeypatch, calibrated_steps):
    quality = load_quality()
    write_fake_cifar(tmp_path / "data", "cifar10", n_per_batch=40)  # 200 training images
    # The calibration plans `calibrated_steps` in the 600 s budget; the run itself then takes 582/17.5 s per
    # step, so at every log the plan is redone to 17 steps before the deadline (0.97 x 600 s = 582 s).
    monkeypatch.setattr(quality, "calibrate", lambda cfg: (calibrated_steps / 600, 12))
    monkeypatch.setattr(quality, "BUDGET_USE", 1.0)
    monkeypatch.setattr(quality, "time", TickClock(582 / 17.5))
    extra = ["model.width=8", "train.batch_size=16", "train.log_every=1", "optim.lr=0.1", "optim.warmup_epochs=0",
             "optim.min_lr=0"]
    run = quality.pretrain_for("examples/cpu.yaml", str(tmp_path / "data"), tmp_path / "run", 600, extra)
    # 200 images / 16 = 12 steps per epoch: 17 steps are one epoch and 5 steps of the next.
    assert run["steps_per_epoch"] == 12 and run["steps_planned"] == 17
    assert run["steps"] == 17 and not run["hit_budget"]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in steps if r["kind"] == "step"]
    assert len(lrs) == 17 and lrs[0] > 0.09  # starts at the peak (no warmup) ...
    # The first re-plan needs two logs, so it sets the lr from step 3 on; a longer plan may lift it a little.
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 1e-9  # ... and reaches min_lr at step 17
    assert (tmp_path / "run" / "encoder.pth").stat().st_size > 0


def test_replan_follows_the_runs_own_speed():
    quality = load_quality()
    assert quality.replan(20, 10.0, None, 100.0, 50) == 50  # one log seen: keep the calibrated plan
    assert quality.replan(40, 20.0, (20, 10.0), 100.0, 50) == 200  # 2 steps/s, 80 s left: 40 + 160
    assert quality.replan(40, 120.0, (20, 10.0), 100.0, 50) == 40  # past the deadline: stop now


def test_the_folder_benchmark_runs_end_to_end_and_prints_what_it_measured(tmp_path):
    """benchmarks/folder.py at a tiny size (fake CIFAR, 120 JPEGs): every row of the table is printed."""
    import subprocess
    import sys

    write_fake_cifar(tmp_path / "data", "cifar10", n_per_batch=40)  # 240 images to upsample
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "folder.py"), "--data-root", str(tmp_path / "data"),
                           "--work", str(tmp_path / "work"), "--images", "100", "--small", "90", "--big", "120",
                           "--steps", "1", "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in done.stdout.splitlines()
            if line.startswith("|")}
    assert len(rows) == 12 and all(v > 0 or name.endswith("(s)") for name, v in rows.items()), rows
    assert 0.3 < rows["mapped / in memory"] < 3
    assert len(list((tmp_path / "work" / "jpeg-120").rglob("*.jpg"))) == 120


def test_the_probe_speed_benchmark_prints_every_row(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "probe_speed.py"), "--width", "8", "--images", "32",
                           "--batch", "16", "--no-compile"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    rows = lines[[i for i, ln in enumerate(lines) if ln.startswith("lever")][0] + 1:]
    names = ["as probe runs it", "contiguous", "batch 128", "batch 1024", "torch.inference_mode", "batch norm folded",
             "1 thread"]
    assert [any(ln.startswith(n) for ln in rows) for n in names] == [True] * len(names), done.stdout
    for ln in rows:
        assert float(ln.split()[-3]) > 0  # images/s measured, not blank


@pytest.mark.slow
def test_the_gpu_script_runs_end_to_end_on_a_cpu(tmp_path, cifar10_root):
    """benchmarks/gpu.py --device cpu --tiny: every step ok (the cuda tests skip), the table and gpu.json."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--data-root", str(cifar10_root),
                           "--device", "cpu", "--tiny", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert list(results) == ["roi_align", "cuda tests", "throughput", "pretrain + kNN"]
    assert all(r["ok"] for r in results.values()) and "kNN top-1" in results["pretrain + kNN"]["result"]
