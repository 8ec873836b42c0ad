"""The GPU run, prepared for the day a device is lent: one command inside the device tool's limits (10 minutes
per command, 15 minutes of device time a session, 64 MiB carried), ending in one table.

    # here, once: the offline CIFAR-10 copy travels in an ignored folder (19 MB)
    mkdir -p .gpu-data && cp ../shared/data/* .gpu-data/ && echo /.gpu-data/ >> .git/info/exclude
    # the device command (carry [".gpu-data"], timeout_s 600); about 9 minutes:
    python .gpu-data/make_cifar10.py /tmp/data && PYTHONPATH=. python benchmarks/gpu.py --data-root /tmp/data --out $OUT
    # end to end on a CPU, to know it works (about 2 minutes):
    python benchmarks/gpu.py --data-root DIR --device cpu --tiny

Steps, in order, each timed; a failing step is reported and the next one still runs:
  1. a one-line CUDA `roi_align`: a CPU-only torchvision (or no GPU) fails here at once
  2. the tests marked `cuda` (pinned + non_blocking batches, fp16 with GradScaler, compile, no host sync
     inside a training step)
  3. benchmarks/throughput.py: views/s of the step against the model-only ceiling at batch 512, bf16,
     channels_last, without and with torch.compile
  4. examples/cifar10.yaml pretrained for --train-min minutes (the cosine schedule planned to end there, as
     benchmarks/quality.py does), then kNN top-1 on the test split (k=200) with `simclr probe`'s protocol
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

REPO = Path(__file__).resolve().parents[1]


def step_roi_align(device: str) -> str:
    x = torch.arange(16.0, device=device).view(1, 1, 4, 4)
    boxes = [torch.tensor([[0.0, 0.0, 3.0, 3.0]], device=device)]
    y = torchvision.ops.roi_align(x, boxes, output_size=2, aligned=True)  # fails at once without CUDA kernels
    return f"roi_align on {y.device}: {y.flatten().tolist()}"


def step_tests(device: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_cuda.py")], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    if done.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"cuda tests: {last}\n{done.stdout[-3000:]}")
    return last


def step_throughput(device: str, tiny: bool) -> str:
    rows = []
    for compiled in ((False,) if tiny else (False, True)):
        args = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--device", device, "--precision",
                "bf16" if device.startswith("cuda") else "fp32", "--no-loaders"]
        args += ["--batch", "32", "--steps", "2", "--set", "model.width=8"] if tiny else ["--batch", "512", "--steps", "20", "--warmup", "5"]
        args += ["--compile"] if compiled else []
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"throughput.py{' --compile' if compiled else ''}: {done.stderr[-2000:]}")
        rows += [f"{'compiled' if compiled else 'eager'}: {line}" for line in done.stdout.splitlines()
                 if line.startswith(("ceiling", "simclr-cli step", "simclr-cli / ceiling"))]
    return "\n".join(rows)


def step_pretrain(data_root: str, device: str, minutes: float, out: Path, tiny: bool) -> str:
    spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    from simclr_cli.probe import run_probe

    extra = [f"train.device={device}", "train.log_every=50"]
    if tiny:
        extra += ["model.width=8", "data.size_dataset_train=1024", "train.batch_size=128", "train.log_every=2",
                  "train.precision=fp32"]
    run = quality.pretrain_for(str(REPO / "examples" / "cifar10.yaml"), data_root, out / "cifar10", minutes * 60, extra)
    probe = run_probe(run["encoder"], "cifar10", data_root, device=device, precision="auto")["results"]["trained"]
    epochs = run["steps"] / run["steps_per_epoch"]
    return (f"{run['steps']} steps ({epochs:.2f} epochs) in {run['train_s']:.0f} s; test split: kNN top-1 "
            f"{100 * probe['knn_top1']:.2f}%, linear top-1 {100 * probe['linear_top1']:.2f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="folder holding cifar-10-batches-py/")
    p.add_argument("--device", default="cuda")
    p.add_argument("--train-min", type=float, default=6.0, help="pretraining wall-clock, minutes")
    p.add_argument("--out", type=Path, default=Path("runs/gpu"), help="run directory and gpu.json")
    p.add_argument("--tiny", action="store_true", help="a few seconds per step: to check the script on a CPU")
    args = p.parse_args()
    minutes = 0.3 if args.tiny else args.train_min
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""), flush=True)
    steps = [("roi_align", lambda: step_roi_align(args.device)), ("cuda tests", lambda: step_tests(args.device)),
             ("throughput", lambda: step_throughput(args.device, args.tiny)),
             ("pretrain + kNN", lambda: step_pretrain(args.data_root, args.device, minutes, args.out, args.tiny))]
    results = {}
    for name, run in steps:
        t0 = time.perf_counter()
        try:
            results[name] = {"ok": True, "result": run()}
        except Exception as err:  # report it and go on: one broken step must not cost the others' minutes
            results[name] = {"ok": False, "result": f"{type(err).__name__}: {err}"}
        results[name]["seconds"] = time.perf_counter() - t0
        print(f"\n## {name} ({'ok' if results[name]['ok'] else 'FAILED'}, {results[name]['seconds']:.0f} s)\n"
              f"{results[name]['result']}", flush=True)
        if name == "roi_align" and not results[name]["ok"]:
            break  # no usable device: nothing after this can run
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(results, indent=2))
    sys.exit(0 if all(r["ok"] for r in results.values()) else 1)


if __name__ == "__main__":
    main()
