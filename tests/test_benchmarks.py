"""benchmarks/quality.py plans the cosine schedule to end at the budget's step count, not at an epoch's end, and
its methods table fine-tunes every row and floors each architecture once; the other benchmarks print what
they measure."""

import importlib.util
import json
import re
import subprocess
import sys

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


def test_each_method_runs_its_own_recipe_and_set_reaches_the_cpu_recipe_only():
    """dino and mae pretrain from their own recipes (mae's ViT), the rest from the CPU recipe with their
    settings and --set; every row's recipe loads with its overrides; --only keeps the methods it names."""
    import argparse

    from simclr_cli.config import load_config

    quality = load_quality()
    args = argparse.Namespace(methods=True, only=[], recipe="examples/cpu.yaml", set=["optim.lr=0.2"])
    rows = {name: (config, extra) for name, config, extra in quality.plan_rows(args)}
    assert list(rows) == ["simclr", "moco", "byol", "dino", "mae"]
    assert rows["dino"] == ("examples/cpu-dino.yaml", []) and rows["mae"] == ("examples/cpu-mae.yaml", [])
    assert rows["simclr"] == ("examples/cpu.yaml", ["optim.lr=0.2"]) and rows["moco"][1][-1] == "optim.lr=0.2"
    for name, (config, extra) in rows.items():
        cfg = load_config(REPO / config, extra)
        assert cfg.method.name == name and (cfg.optim.lr == 0.2) == (config == args.recipe)
    assert load_config(REPO / rows["mae"][0]).model.arch.startswith("timm:")
    args.only = ["mae", "simclr"]
    assert [name for name, _, _ in quality.plan_rows(args)] == ["simclr", "mae"]


def test_the_methods_table_fine_tunes_every_row_and_floors_each_architecture_once(tmp_path, monkeypatch, capsys):
    """--methods on stand-ins for pretraining, probing and fine-tuning (their own tests are elsewhere): a
    validation and a test fine-tune for every method, one untrained floor per architecture among the final
    rows, named by it (the ResNet's from the chosen row, the ViT's from mae), fine-tuned from scratch through
    the same fine-tune's compare; the table shows both fine-tune columns and report.json keeps them."""
    import sys
    from pathlib import Path

    quality = load_quality()
    knn = {"simclr": 0.5, "moco": 0.4, "byol": 0.3, "dino": 0.6, "mae": 0.2}  # dino is chosen on validation
    resnet = {"arch": "resnet18", "stem": "cifar", "width": 8, "feature_dim": 64, "image_size": 32}
    vit = {"arch": "timm:vit_tiny_patch16_224", "kwargs": {"depth": 6}, "stem": None, "feature_dim": 96,
           "image_size": 32}
    tunes = []

    def pretrain_for(config, data_dir, out, budget_s, extra):
        return {"encoder": str(out / "encoder.pth"), "steps": 10, "steps_per_epoch": 5, "train_s": budget_s}

    def probe_both(encoder, data_dir, random_init, splits, labels="all"):
        score = 0.1 if random_init else knn[Path(encoder).parent.name]
        return {split: {"knn_top1": score, "linear_top1": score, "probe_s": 1.0} for split in splits}

    def fine_tune(encoder, data_dir, split, compare):
        tunes.append((Path(encoder).parent.name, split, compare))
        results = {"pretrained": {"top1": knn[Path(encoder).parent.name] + 0.05, "seconds": 1.0}}
        if compare:
            results |= {"random_init": {"top1": 0.15, "seconds": 1.0}, "linear_probe": {"top1": 0.12, "seconds": 1.0}}
        return {"results": results, "protocol": {"epochs": quality.FINETUNE_EPOCHS}}

    monkeypatch.setattr(quality, "pretrain_for", pretrain_for)
    monkeypatch.setattr(quality, "probe_both", probe_both)
    monkeypatch.setattr(quality, "fine_tune", fine_tune)
    monkeypatch.setattr(quality, "architecture", lambda encoder: vit if "mae" in encoder else resnet)
    monkeypatch.setattr(sys, "argv", ["quality.py", "--data-root", "d", "--methods", "--out", str(tmp_path)])
    quality.main()
    assert sorted(tunes) == sorted((n, s, n in ("dino", "mae")) for n in knn for s in ("val", "test"))
    report = json.loads((tmp_path / "report.json").read_text())
    floors = ["untrained resnet18 w8", "untrained timm:vit_tiny_patch16_224 h96"]
    assert report["chosen"] == "dino" and list(report["runs"]) == [*knn, *floors]  # floors after the methods
    for floor, of in zip(floors, ("dino", "mae")):
        r = report["runs"][floor]
        assert r["floor_of"] == of and r["val"]["knn_top1"] == r["test"]["knn_top1"] == 0.1
        assert r["finetune"]["val"]["top1"] == r["finetune"]["test"]["top1"] == 0.15
        assert report["runs"][of]["linear_10pct"]["test"]["top1"] == 0.12
    assert report["runs"]["byol"]["finetune"]["test"]["top1"] == pytest.approx(0.35)
    assert report["finetune"] == {"labels": "10%", "epochs": quality.FINETUNE_EPOCHS,
                                  "protocol": {"epochs": quality.FINETUNE_EPOCHS}}
    table = capsys.readouterr().out.split("chosen on val: dino")[1].splitlines()[1:]
    assert table[0].split() == ["encoder", "val", "kNN", "val", "lin", "val", "ft", "test", "kNN", "test", "lin",
                                "test", "ft", "pretraining"]
    rows = {line[:40].strip(): line[40:].split() for line in table[1:8]}
    assert rows["byol"][:6] == ["30.00%", "30.00%", "35.00%", "30.00%", "30.00%", "35.00%"]
    assert rows[floors[1]] == ["10.00%", "10.00%", "15.00%", "10.00%", "10.00%", "15.00%", "-"]


def test_the_folder_benchmark_runs_end_to_end_and_prints_what_it_measured(tmp_path):
    """benchmarks/folder.py at a tiny size (fake CIFAR, 120 JPEGs): every row of the table is printed."""
    import subprocess
    import sys

    write_fake_cifar(tmp_path / "data", "cifar10", n_per_batch=40)  # 240 images to upsample
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "folder.py"), "--data-root", str(tmp_path / "data"),
                           "--work", str(tmp_path / "work"), "--images", "100", "--small", "90", "--big", "120",
                           "--steps", "1", "--rounds", "1", "--finetune-labels", "50%"],  # 10% leaves a class of 3 none
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in done.stdout.splitlines()
            if line.startswith("|")}
    assert len(rows) == 18 and all(v > 0 or name.endswith("(s)") for name, v in rows.items()), rows
    assert {"90 images: finetune 50% peak anon. (MB)", "120 images: finetune 50% peak anon. (MB)"} <= rows.keys()
    # one timed step per way: a ratio of speeds is noise here, so the check is that the table is consistent
    ratio = rows["views/s, mapped, read ahead"] / rows["views/s, in memory"]
    assert rows["mapped read ahead / in memory"] == pytest.approx(ratio, rel=1e-2, abs=1e-3)  # printed to 3 places
    for way in ("mapped, read ahead", "mapped, read when needed", "in memory"):
        assert 0 < rows[f"data wait, {way} (% of step time)"] < 100
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


def load_gpu():
    import sys

    spec = importlib.util.spec_from_file_location("gpu", REPO / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


GPU_STAGES = ["environment", "roi_align", "cuda tests", "throughput eager", "pretrain", "probe", "dino", "mae",
              "throughput compiled", "compile test"]


def test_the_gpu_script_runs_every_stage_on_a_cpu(tmp_path):
    """benchmarks/gpu.py --device cpu --tiny on fake CIFAR: a line per stage in gpu.jsonl, in order, each ok
    (the cuda tests skip on a CPU), the probe's kNN figure, and the summary table."""
    import re
    import subprocess
    import sys

    write_fake_cifar(tmp_path / "data", "cifar10", n_per_batch=40)  # 200 training images, 40 test
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny",
                           "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--work",
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(line) for line in (tmp_path / "out" / "gpu.jsonl").read_text().splitlines()]
    assert [line["name"] for line in lines] == GPU_STAGES
    assert all(line["ok"] for line in lines), lines
    env, stages = lines[0], {line["name"]: line for line in lines}
    assert env["torch"] and env["torchvision"] and env["device"] == "cpu" and env["budget_s"] == 90
    assert "skipped" in stages["cuda tests"]["result"] and "skipped" in stages["compile test"]["result"]
    assert re.search(r"kNN top-1 \d+\.\d\d%", stages["probe"]["result"]), stages["probe"]
    assert "simclr-cli step" in stages["throughput eager"]["result"]
    for name in ("dino", "mae"):  # each method's CPU example ran, timed, with a finite loss
        assert re.search(rf"^{name} \(cpu-{name}.yaml\): \d+ steps .* steps/s over \d+ steps, last logged loss "
                         r"\d+\.\d{4};", stages[name]["result"]), stages[name]
    assert all(line["at_s"] < 90 for line in lines)  # inside the budget
    assert (tmp_path / "out" / "pretrain-metrics.jsonl").stat().st_size > 0
    table = done.stdout[done.stdout.index("\nstage "):]
    assert all(f"{name:<20} ok" in table for name in GPU_STAGES[1:]), done.stdout


def test_a_stage_past_its_timeout_is_recorded_before_the_next_one_runs(tmp_path):
    """run_stages kills a stage at its timeout and writes its line at once; the next stage, which prints
    the last line on disk when it starts, sees it, and runs to the end."""
    import sys
    import time

    gpu = load_gpu()
    jsonl, log = tmp_path / "gpu.jsonl", tmp_path / "gpu.log"
    hang = "import time; print('started', flush=True); time.sleep(60)"
    last_line = f"print(open({str(jsonl)!r}).read().splitlines()[-1])"
    stages = [gpu.Stage("hangs", lambda timeout: [sys.executable, "-c", hang], reserve_s=1, cap_s=2),
              gpu.Stage("next", lambda timeout: [sys.executable, "-c", last_line], reserve_s=1)]
    start = time.monotonic()
    hung, after = gpu.run_stages(stages, 30, start, jsonl, log, margin_s=1)
    assert time.monotonic() - start < 15
    assert not hung["ok"] and hung["timed_out"] and hung["timeout_s"] == 2 and 2 <= hung["seconds"] < 10
    assert hung["result"].startswith("timed out after 2 s") and "started" in hung["result"]  # its output kept
    assert after["ok"] and json.loads(after["result"]) == hung  # on disk before the next stage started
    assert [json.loads(line)["name"] for line in jsonl.read_text().splitlines()] == ["hangs", "next"]


def test_the_pretraining_time_is_what_the_later_stages_leave():
    """The planned pretraining shrinks second for second with the time the stages before it took."""
    import argparse
    from pathlib import Path

    gpu = load_gpu()
    reserve = gpu.RESERVE_S["gpu"]
    later = sum(reserve[name] for name in ("probe", "dino", "mae", "throughput compiled", "compile test"))
    later += gpu.MARGIN_S["gpu"]
    assert later == 305  # 60 + 40 + 40 + 90 + 60 + 15 s
    assert gpu.plan_seconds(540, 120, later) == 115  # 2 minutes spent before the pretraining
    assert gpu.plan_seconds(540, 180, later) == 55  # a minute more spent: a minute less
    assert gpu.plan_seconds(540, 240, later) == 0  # nothing left
    assert gpu.plan_seconds(480, 10, 100, cap_s=120) == 120  # a cap bounds what a hang can take
    args = argparse.Namespace(tiny=False, device="cuda", data_root=Path("d"), out=Path("o"))
    pretrain = {s.name: s for s in gpu.build_stages(args, Path("w"))}["pretrain"]
    argv = pretrain.argv(115)
    assert argv[argv.index("--train-s") + 1] == "85"  # less the 30 s of start-up, calibration and writing


def test_a_hanging_environment_step_is_cut_by_its_timeout_and_recorded(tmp_path):
    """The parent's own steps run as children with timeouts: a torch import that never returns (a `torch`
    that sleeps, first on PYTHONPATH) is killed, recorded as timed out, and ends the run with exit 1."""
    import os
    import subprocess
    import sys
    import time

    (tmp_path / "hang").mkdir()
    (tmp_path / "hang" / "torch.py").write_text("import time\ntime.sleep(600)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hang")}
    start = time.monotonic()
    # --budget-min 0.1: 6 s, less the 3 s margin: the environment child gets about 3 s
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny",
                           "--budget-min", "0.1", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=30, cwd=REPO, env=env)
    assert time.monotonic() - start < 20
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [json.loads(line) for line in (tmp_path / "out" / "gpu.jsonl").read_text().splitlines()]
    assert [line["name"] for line in lines] == ["environment"]  # roi_align and the stages never started
    (env_line,) = lines
    assert env_line["timed_out"] and not env_line["ok"] and 2 <= env_line["timeout_s"] <= 3.5
    assert env_line["result"].startswith(f"timed out after {env_line['timeout_s']:.0f} s")
    assert "environment          FAILED" in done.stdout


def test_the_pretrain_speed_counts_from_the_first_step_and_the_set_up_is_apart(tmp_path, monkeypatch):
    """The pretrain stage on a fake clock: each Trainer build (data, model) takes 5 s and each step 1 s, so
    the speed is 1.00 steps/s whatever the set-up took, and the set-up (two builds, the calibration's 7
    steps) is 17 s, printed beside it."""
    import argparse
    import sys
    import types

    gpu, quality = load_gpu(), load_quality()
    monkeypatch.setitem(sys.modules, "quality", quality)
    clock = types.SimpleNamespace(now=0.0)
    fake_time = types.SimpleNamespace(monotonic=lambda: clock.now, perf_counter=lambda: clock.now)
    monkeypatch.setattr(gpu, "time", fake_time)
    monkeypatch.setattr(quality, "time", fake_time)

    class SlowSetUp(quality.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            clock.now += 5.0

        def train_step(self, x):
            clock.now += 1.0
            return super().train_step(x)

    monkeypatch.setattr(quality, "Trainer", SlowSetUp)
    write_fake_cifar(tmp_path / "data", "cifar10", n_per_batch=40)  # 200 training images: 6 steps an epoch
    (tmp_path / "out").mkdir()
    args = argparse.Namespace(device="cpu", tiny=True, data_root=tmp_path / "data", work=tmp_path / "work",
                              out=tmp_path / "out", train_s=30.0)
    result = gpu.pretrain_stage(args)
    # the budget's plan (30 s, 1 step/s, its deadline 0.97 x 30 s after the second build began) stops at step 24
    assert result.startswith("24 steps (4.00 epochs), 1.00 steps/s over the 24 steps of 24.0 s"), result
    assert "set-up before the first step 17.0 s" in result, result


def test_the_overheads_benchmark_prints_every_figure_the_readme_quotes():
    """benchmarks/overheads.py --tiny: a row per live logger (measured, or not installed), the stop check in
    one process and on 2 gloo ranks, and the untrained CPU recipe's health beside the collapse thresholds."""
    import re
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "overheads.py"), "--tiny"], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line.strip()}
    for name in ("metrics.jsonl", "tensorboard", "wandb", "mlflow"):
        assert rows[name] == ["not", "installed"] or float(rows[name][0]) > 0, done.stdout
    installed = [n for n in ("tensorboard", "wandb", "mlflow") if rows[n] != ["not", "installed"]]
    assert all(len(rows[n]) == 6 and all(float(v) > 0 for v in rows[n]) for n in installed), done.stdout
    stop = re.findall(r"^(1 process|2 gloo ranks): \S+ +([\d.]+) µs a step", done.stdout, re.M)
    assert [name for name, _ in stop] == ["1 process", "2 gloo ranks"] and all(float(v) > 0 for _, v in stop)
    cpu = re.search(r"^cpu +resnet18 w8, simclr, \w+ +([\d.]+) /(\d+) +([\d.]+) /(\d+) +([\d.]+) +(-[\d.]+) +([\d.]+) "
                    r" 0 of 1 +\d+ s$", done.stdout, re.M)  # rank_h, rank_z, z_std/unif, uniformity, alignment, warns
    assert cpu, done.stdout
    assert cpu[2] == cpu[4] == "64"  # 64 held-out images bound both ranks (h has 64 dimensions, z 128)
    assert 1 <= float(cpu[1]) <= 64 and 1 <= float(cpu[3]) <= 64 and float(cpu[5]) > 0
    assert "rank_h or rank_z under 2" in done.stdout and "z_std/unif under 0.01" in done.stdout


@pytest.mark.slow
def test_stream_benchmark_prints_every_row_it_measures(tmp_path):
    """benchmarks/stream.py end to end on 96 tiny images (S3 on the loopback included): every row a measured
    number, the second memory row streaming twice the shards and samples, the cores row its own arithmetic."""
    import numpy as np
    from PIL import Image

    for split, n in (("train", 96), ("test", 12)):
        for i in range(n):
            (tmp_path / "img" / split / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(i + 1000 * (split == "test")).integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "img" / split / f"c{i % 3}" / f"{i:03d}.png")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stream.py"), "--jpeg", str(tmp_path / "img"),
                           "--work", str(tmp_path / "work"), "--per-shard", "16", "--samples", "64", "--steps", "2",
                           "--times", "2", "--size", "16", "--batch", "8"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {name: float(value) for name, value in re.findall(r"^\| (.+?) +\| +([-\d.]+) \|$", done.stdout, re.M)}
    assert len(rows) == 17, done.stdout
    rates = [v for k, v in rows.items() if k.endswith("(images/s)")]
    waits = [v for k, v in rows.items() if "waiting for the batch" in k]
    assert len(rates) == 7 and all(v > 0 for v in rates) and len(waits) == 3 and all(0 <= v < 100 for v in waits)
    memory = {k: v for k, v in rows.items() if "peak PSS" in k}
    assert [k.split(":")[0] for k in memory][::2] == ["6 shards, 96 samples", "12 shards, 192 samples"]
    assert all(v > 50 for v in memory.values())  # torch alone is more: the sampler saw the processes
    ms = rows["CPU time per image, local shards (ms)"]
    assert ms == pytest.approx(1000 / rows["delivered, local shards, 0 workers (images/s)"], rel=1e-3, abs=1e-4)
    for name, cores in ((k, v) for k, v in rows.items() if k.startswith("cores to feed")):
        assert cores == pytest.approx(float(name.rsplit(": ", 1)[1].split()[0].replace(",", "")) * ms / 1000, abs=1e-3)
