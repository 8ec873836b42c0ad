"""The GPU run, prepared for the day a device is lent: one command that ends inside --budget-min minutes
(default 9: the device tool stops a command at 10 minutes and lends 15 minutes of device time a session,
its start-up included) and writes each stage's result to OUT/gpu.jsonl the moment the stage ends, so a run
that is cut short still returns everything it measured.

    # here, once: the offline CIFAR-10 copy travels in an ignored folder (19 MB of the 64 MiB carried), and
    # timm (pure Python, unpacked: the device has no registry, and the mae stage's ViT is timm's)
    mkdir -p .gpu-data && cp ../shared/data/* .gpu-data/ && echo /.gpu-data/ >> .git/info/exclude
    pip download --no-deps -d /tmp/w timm && python3 -m zipfile -e /tmp/w/timm-*.whl .gpu-data/site
    # the device command (carry [".gpu-data"], timeout_s 600): make_cifar10.py ~10-20 s, then 9 minutes
    python3 .gpu-data/make_cifar10.py /tmp/data && PYTHONPATH=.:.gpu-data/site python3 benchmarks/gpu.py --data-root /tmp/data --out $OUT
    # every stage on a CPU in about a minute, to know the script works (tests/test_benchmarks.py runs it):
    python benchmarks/gpu.py --device cpu --tiny --data-root DIR --out runs/gpu-tiny

OUT receives gpu.jsonl (a first line with the versions, the device, its compute capability and the budget,
then one line per stage: name, ok, seconds, timeout_s, result, command; flushed and fsync'ed per line),
gpu.log (every child's whole output, written as it comes) and pretrain-metrics.jsonl (the loss curve).

The deadline is set when this script starts; the script itself never imports torch. Each step, the
environment report and the roi_align probe included, runs as a child process (`sys.executable`) in its own
process group, killed at its timeout: what the budget has left, less the reserves of the stages after it
and a 15 s margin, and at most its cap, so a hang (a torch import or a CUDA context that never returns)
costs no more than the cap. A stage that fails or is cut is recorded and the next one runs; only a failed
environment or roi_align (no usable torch or device) stops the run. The two stages whose time is least
predictable, the torch.compile ones, come last: a slow compile is cut by its timeout instead of costing the
pretraining. The pretrain stage's steps/s counts from its first step to its last logged one (whose loss
read-back waits for the device); the set-up before the first step (torch import, CIFAR loaded twice,
calibration with its cuDNN choices, model build) is reported beside it, not divided into it.

The plan for 9 minutes (540 s) on one H200. Every number is an estimate: no GPU has run this script yet.
  stage                reserve  cap   estimate
  environment             -     60 s  ~10 s: interpreter, torch import, CUDA context, the versions
  roi_align               -     60 s  ~10 s: the same, and one roi_align (a CPU-only torchvision fails here
                                      at once)
  cuda tests             60 s  120 s  ~1 min: tests/test_cuda.py but compile, ~10 small tests at width 16
                                      (no host sync in a step, pinned folder batches, fp16 and its scaler,
                                      cuDNN/TF32 settings; the two-GPU ones skip), pytest start-up included
  throughput eager       40 s   90 s  ~40 s: throughput.py at batch 512 x (5 + 20) steps per row, bf16
  pretrain               60 s    -    30 s of start-up, CIFAR loaded twice, calibration and encoder write,
                                      then examples/cifar10.yaml (quality.pretrain_for: the cosine ends at
                                      the planned time) for what is left: 540 - 20 - 60 - 40 - 30 - 60 - 40
                                      - 40 - 90 - 60 - 15 (margin) = 85 s of training when the stages before take
                                      their estimates. Every second they save goes to it; every second they
                                      overrun comes off it, down to 30 s, and then off their own timeouts
  probe                  60 s  120 s  ~45 s: kNN (k=200) and linear top-1 on the test split, `simclr probe`'s
                                      protocol (50,000 + 10,000 images through the encoder, then the fits)
  dino, mae              40 s   60 s  each: its CPU example (examples/cpu-dino.yaml, cpu-mae.yaml) on the
                                      device, ~20 s of set-up, the rest training: that the method runs
                                      there (bf16, its steps/s, a finite last loss), not its quality
  throughput compiled    90 s    -    cold inductor compiles of the step, 1.5-2.5 min by estimate; it gets
                                      its reserve plus what the pretrain and probe left unspent (~105-120 s
                                      in all), so it may well be cut
  compile test           60 s    -    `pytest -m cuda -k compile`: one more cold compile, at width 16; the
                                      rest of the budget less the 15 s margin, ~60 s, so it too may be cut
--budget-min 9 (the default) ends a minute inside the command's cap; --budget-min 8 takes the minute from the
pretraining.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

STARTED = time.monotonic()  # the budget counts from here; torch is imported after, inside the functions that use it

REPO = Path(__file__).resolve().parents[1]
MARGIN_S = {"gpu": 15.0, "tiny": 3.0}  # kept after the last stage: the summary, a killed child's clean-up
PROBE_CAP_S = {"gpu": 60.0, "tiny": 20.0}  # environment and roi_align, each: ~10 s (gpu, estimated), ~4 s (tiny)
PRETRAIN_FIXED_S = {"gpu": 30.0, "tiny": 10.0}  # of the pretrain stage's timeout, not training: see above
TINY_TRAIN_S = 3.0  # --tiny trains this long at most: the point is that every stage runs, not the figure
# Seconds kept for each stage while the stages before it are planned, and its timeout at most (none: the
# time left). gpu: the estimates above; the pretrain's 60 s are its 30 s of set-up and 30 s of training at
# least. tiny: 1.5x what each took here (2 CPU cores, fake CIFAR, width 8): ~4 s a child, 3 s of it the
# torch import, the pretrain ~6 s.
RESERVE_S = {"gpu": {"cuda tests": 60, "throughput eager": 40, "pretrain": 60, "probe": 60, "dino": 40, "mae": 40,
                     "throughput compiled": 90, "compile test": 60},
             "tiny": {"cuda tests": 6, "throughput eager": 6, "pretrain": 13, "probe": 6, "dino": 12, "mae": 12,
                      "throughput compiled": 6, "compile test": 6}}
CAP_S = {"gpu": {"cuda tests": 120, "throughput eager": 90, "probe": 120, "dino": 60, "mae": 60},
         "tiny": {"cuda tests": 30, "throughput eager": 30, "probe": 30, "dino": 30, "mae": 30}}
# The methods' stages: each its CPU example, unchanged but for the device, the time and the log interval; of
# its timeout this much is set-up (torch import, CIFAR loaded twice, calibration, encoder write), not training.
METHOD_CONFIGS = {"dino": "cpu-dino.yaml", "mae": "cpu-mae.yaml"}
METHOD_FIXED_S = {"gpu": 20.0, "tiny": 8.0}
THROUGHPUT_ROWS = ("ceiling", "simclr-cli step", "simclr-cli / ceiling")


@dataclass
class Stage:
    name: str
    argv: Callable[[float], list[str]]  # the child's command, given the stage's timeout in seconds
    reserve_s: float  # kept for this stage while the stages before it are planned
    cap_s: float = math.inf  # its timeout at most
    pick: Callable[[str], str] = lambda out: (out.strip().splitlines() or ["(no output)"])[-1]  # result text
    fields: Callable[[str], dict] = lambda out: {}  # keys a child that succeeded adds to its line


def plan_seconds(budget_s: float, elapsed_s: float, later_s: float, cap_s: float = math.inf) -> float:
    """A stage's timeout: what the budget has left after `elapsed_s`, less `later_s` (the reserves of the
    stages after it and the margin), at most `cap_s`; 0 when nothing is left. For the pretrain stage this is
    what sets the training time, so it shrinks second for second with the time the stages before it took."""
    return max(0.0, min(cap_s, budget_s - elapsed_s - later_s))


def record(path: Path, line: dict) -> None:
    """One JSON line, on disk before the next stage starts: a run cut short keeps every line written."""
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_child(argv: list[str], timeout_s: float, log: Path) -> tuple[int | None, str]:
    """(exit code, or None when killed at the timeout; its output). The output goes to `log` as it comes, so
    a killed child's last words are kept; the whole process group is killed (torch.compile's workers too)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "ab") as f:
        start = f.tell()
        child = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            rc = child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            rc = None
    with open(log, "rb") as f:
        f.seek(start)
        return rc, f.read().decode(errors="replace")


def show(line: dict) -> None:
    timeout = f" of {line['timeout_s']:.0f}" if line.get("timeout_s") is not None else ""
    status = "ok" if line["ok"] else "FAILED"
    head = f"[{line['at_s']:4.0f} s] {line['name']}: {status}, {line['seconds']:.0f}{timeout} s"
    print(head + "\n    " + line["result"].replace("\n", "\n    "), flush=True)


def run_stages(stages: list[Stage], budget_s: float, started: float, jsonl: Path, log: Path,
               margin_s: float, stop_at_failure: bool = False) -> list[dict]:
    """Each stage in turn with its planned timeout; a line in `jsonl` as each ends. With `stop_at_failure`,
    a stage that fails or is cut ends the list: the stages after it need what it checks."""
    lines = []
    for i, stage in enumerate(stages):
        t0 = time.monotonic()
        later_s = sum(s.reserve_s for s in stages[i + 1:]) + margin_s
        timeout = plan_seconds(budget_s, t0 - started, later_s, stage.cap_s)
        argv = stage.argv(timeout)
        line = {"name": stage.name, "ok": False, "timed_out": False, "rc": None, "timeout_s": round(timeout, 1),
                "left_s": round(budget_s - (t0 - started), 1), "command": shlex.join(argv)}
        if timeout < stage.reserve_s / 2:  # it could not finish by its own estimate: leave the time to the rest
            line["result"] = f"skipped: {timeout:.0f} s left for it, under half its {stage.reserve_s:.0f} s estimate"
        else:
            with open(log, "a") as f:
                f.write(f"\n===== {stage.name} (timeout {timeout:.0f} s): {line['command']}\n")
            rc, out = run_child(argv, timeout, log)
            tail = "\n".join(out.strip().splitlines()[-15:])
            line.update(rc=rc, timed_out=rc is None, ok=rc == 0)
            line["result"] = (stage.pick(out) if rc == 0 else f"timed out after {timeout:.0f} s\n{tail}" if rc is None
                              else f"exit {rc}\n{tail}")
            line.update(stage.fields(out) if rc == 0 else {})
        line["seconds"] = round(time.monotonic() - t0, 1)
        line["at_s"] = round(time.monotonic() - started, 1)
        record(jsonl, line)
        show(line)
        lines.append(line)
        if stop_at_failure and not line["ok"]:
            break
    return lines


def build_stages(args, work: Path) -> list[Stage]:
    mode = "tiny" if args.tiny else "gpu"
    reserve, cap = RESERVE_S[mode], CAP_S[mode]
    py, here = sys.executable, str(Path(__file__).resolve())
    data = ["--data-root", str(args.data_root), "--device", args.device, "--work", str(work)]
    data += ["--tiny"] if args.tiny else []

    def pytest(select: str) -> Callable[[float], list[str]]:
        return lambda timeout: [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-k", select,
                                "tests/test_cuda.py"]

    def throughput(compiled: bool) -> Callable[[float], list[str]]:
        argv = [py, "benchmarks/throughput.py", "--device", args.device, "--no-loaders"]
        argv += (["--precision", "fp32", "--batch", "32", "--steps", "2", "--set", "model.width=8"] if args.tiny else
                 ["--precision", "bf16", "--batch", "512", "--steps", "20", "--warmup", "5"])
        argv += ["--compile"] if compiled and not args.tiny else []  # a CPU compile takes minutes: eager under --tiny
        return lambda timeout: argv

    def pick_rows(out: str) -> str:
        return "\n".join(line for line in out.splitlines() if line.startswith(THROUGHPUT_ROWS))

    def train_s(timeout: float, fixed_s: float = PRETRAIN_FIXED_S[mode]) -> str:
        seconds = max(1.0, timeout - fixed_s)
        return f"{min(seconds, TINY_TRAIN_S) if args.tiny else seconds:.0f}"

    def method_argv(name: str) -> Callable[[float], list[str]]:
        return lambda timeout: [py, here, "--stage", name, "--train-s", train_s(timeout, METHOD_FIXED_S[mode]), *data]

    return [
        Stage("cuda tests", pytest("not compile"), reserve["cuda tests"], cap["cuda tests"]),
        Stage("throughput eager", throughput(False), reserve["throughput eager"], cap["throughput eager"], pick_rows),
        Stage("pretrain", lambda timeout: [py, here, "--stage", "pretrain", "--train-s", train_s(timeout),
                                           "--out", str(args.out), *data], reserve["pretrain"]),
        Stage("probe", lambda timeout: [py, here, "--stage", "probe", *data], reserve["probe"], cap["probe"]),
        *[Stage(name, method_argv(name), reserve[name], cap[name]) for name in METHOD_CONFIGS],
        Stage("throughput compiled", throughput(True), reserve["throughput compiled"], pick=pick_rows),
        Stage("compile test", pytest("compile"), reserve["compile test"]),
    ]


def build_probes(args, budget_s: float) -> list[Stage]:
    """The two steps before the stages, each a child with a timeout: the versions and the device, then one
    roi_align on it. Either failing ends the run: nothing after them can work without torch or the device."""
    cap = PROBE_CAP_S["tiny" if args.tiny else "gpu"]
    here = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--data-root", str(args.data_root)]

    def facts(out: str) -> dict:
        return {**json.loads(out.strip().splitlines()[-1]), "budget_s": budget_s, "tiny": args.tiny}

    def said(out: str) -> str:
        f = facts(out)
        return (f"torch {f['torch']}, torchvision {f['torchvision']}, CUDA {f['cuda']}, {f['device']} "
                f"({f['device_name']}, capability {f['capability']}), budget {budget_s:.0f} s")

    return [Stage("environment", lambda timeout: [*here, "--stage", "environment"], 0, cap, said, facts),
            Stage("roi_align", lambda timeout: [*here, "--stage", "roi_align"], 0, cap)]


def environment(args) -> str:
    """The environment child: its facts as one JSON line."""
    from importlib.metadata import version

    import torch  # torchvision is not imported here (2 s of a 4 s child on this CPU): roi_align's child does

    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    name = (torch.cuda.get_device_name(0) if cuda else "no CUDA device" if args.device.startswith("cuda")
            else platform.processor() or platform.machine())
    return json.dumps({"torch": torch.__version__, "torchvision": version("torchvision"), "cuda": torch.version.cuda,
                       "python": platform.python_version(), "device": args.device, "device_name": name,
                       "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None})


def roi_align(args) -> str:
    """The roi_align child: one on the device, or the error that says why not."""
    import torch
    import torchvision

    x = torch.arange(16.0, device=args.device).view(1, 1, 4, 4)
    boxes = [torch.tensor([[0.0, 0.0, 3.0, 3.0]], device=args.device)]
    y = torchvision.ops.roi_align(x, boxes, output_size=2, aligned=True)  # fails at once without CUDA kernels
    return f"roi_align on {y.device}: {y.flatten().tolist()}"


class StepClock:
    """The loop's events on `time.monotonic`: when the first step starts (the "start" event, once the data, the
    model and the loggers are ready) and when the last logged step ended (its loss is read back there, so the
    device has done the work): the steps between them over the seconds between them is the training speed,
    with no set-up in it."""

    def __init__(self) -> None:
        self.first: tuple[int, float] | None = None  # (step, seconds) at the start event
        self.last: tuple[int, float] | None = None  # (step, seconds) at the latest log event

    def __call__(self, event: str, data: dict) -> None:
        if event == "start":
            self.first = (data["step"], time.monotonic())
        elif event == "log":
            self.last = (data["step"], time.monotonic())

    def timed(self) -> tuple[int, float]:
        """(steps, seconds) from the first step to the last logged one; (0, 0.0) before a log."""
        if self.first is None or self.last is None:
            return 0, 0.0
        return self.last[0] - self.first[0], self.last[1] - self.first[1]


def pretrain_stage(args) -> str:
    """The pretrain child: examples/cifar10.yaml for --train-s seconds; the encoder goes to WORK/cifar10."""
    t0 = time.monotonic()  # the set-up counts from here: the torch import (below) is part of it
    import quality  # benchmarks/quality.py: this script's folder is first on sys.path

    extra = [f"train.device={args.device}", "train.log_every=50"]
    if args.tiny:
        extra += ["model.width=8", "data.size_dataset_train=1024", "train.batch_size=32", "train.log_every=2",
                  "train.precision=fp32"]
    clock = StepClock()
    run = quality.pretrain_for(str(REPO / "examples" / "cifar10.yaml"), args.data_root, args.work / "cifar10",
                               args.train_s, extra, watch=clock)
    metrics = args.work / "cifar10" / "metrics.jsonl"
    shutil.copy(metrics, args.out / "pretrain-metrics.jsonl")
    losses = [r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "step"]
    epochs = run["steps"] / run["steps_per_epoch"]
    loss = f", last logged loss {losses[-1]:.3f}" if losses else ""
    steps, seconds = clock.timed()
    speed = (f"{steps / seconds:.2f} steps/s over the {steps} steps of {seconds:.1f} s from the first step to the "
             f"last logged one" if seconds > 0 else "no logged step to time")
    setup = f"{clock.first[1] - t0:.1f} s" if clock.first else "all of it"
    return (f"{run['steps']} steps ({epochs:.2f} epochs), {speed}; set-up before the first step {setup} (torch "
            f"import, data loaded twice, calibration, model); training budget {args.train_s:.0f} s{loss}")


def probe_stage(args) -> str:
    """The probe child: `simclr probe`'s protocol on the test split for the pretrain child's encoder."""
    from simclr_cli.score.probe import run_probe

    report = run_probe(args.work / "cifar10" / "encoder.pth", "cifar10", args.data_root, device=args.device,
                       precision="fp32" if args.tiny else "auto")
    res = report["results"]["trained"]
    return (f"test split: kNN top-1 {100 * res['knn_top1']:.2f}%, linear top-1 {100 * res['linear_top1']:.2f}% "
            f"({report['dataset']['train_size']} + {report['dataset']['test_size']} images, "
            f"{report['timing']['total_s']:.0f} s)")


def method_stage(args) -> str:
    """A dino or mae child: the method's CPU example on the device for --train-s seconds (bf16 where auto
    picks it), its steps/s from the first step to the last logged one, and its last loss: the method runs
    there end to end, encoder written. mae's example needs timm (see the module docstring)."""
    import quality

    extra = [f"train.device={args.device}", "train.log_every=10"]
    if args.tiny:
        extra += ["data.size_dataset_train=512", "train.batch_size=32", "train.log_every=2", "train.precision=fp32"]
    clock, out = StepClock(), args.work / args.stage
    run = quality.pretrain_for(str(REPO / "examples" / METHOD_CONFIGS[args.stage]), args.data_root, out,
                               args.train_s, extra, watch=clock)
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    losses = [r["loss"] for r in records if r["kind"] == "step"]
    steps, seconds = clock.timed()
    speed = f"{steps / seconds:.2f} steps/s over {steps} steps" if seconds > 0 else "no logged step to time"
    loss = f"last logged loss {losses[-1]:.4f}" if losses else "no loss logged"
    return (f"{args.stage} ({METHOD_CONFIGS[args.stage]}): {run['steps']} steps "
            f"({run['steps'] / run['steps_per_epoch']:.2f} epochs), "
            f"{speed}, {loss}; training budget {args.train_s:.0f} s")


CHILDREN = {"environment": environment, "roi_align": roi_align, "pretrain": pretrain_stage, "probe": probe_stage,
            **{name: method_stage for name in METHOD_CONFIGS}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, required=True, help="folder holding cifar-10-batches-py/")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-min", type=float, default=None, help="wall-clock for the whole run, minutes "
                   "(default 9; 1.5 with --tiny)")
    p.add_argument("--out", type=Path, default=Path("runs/gpu"), help="gpu.jsonl, gpu.log, pretrain-metrics.jsonl")
    p.add_argument("--work", type=Path, default=None, help="the pretraining run directory's parent (default: a "
                   "new temporary folder; its checkpoint and encoder are too big to come back from the device)")
    p.add_argument("--tiny", action="store_true", help="width 8, a few seconds per stage: the script on a CPU")
    p.add_argument("--stage", choices=sorted(CHILDREN), help=argparse.SUPPRESS)  # the children
    p.add_argument("--train-s", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:
        print(CHILDREN[args.stage](args), flush=True)
        return
    mode = "tiny" if args.tiny else "gpu"
    budget_s = 60 * (args.budget_min or (1.5 if args.tiny else 9.0))
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl, log = args.out / "gpu.jsonl", args.out / "gpu.log"
    jsonl.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    # a CPU-only torchvision, no GPU, or a hang: recorded, and nothing after them runs
    lines = run_stages(build_probes(args, budget_s), budget_s, STARTED, jsonl, log, MARGIN_S[mode],
                       stop_at_failure=True)
    if all(line["ok"] for line in lines):
        work = args.work or Path(tempfile.mkdtemp(prefix="simclr-gpu-"))
        lines += run_stages(build_stages(args, work), budget_s, STARTED, jsonl, log, MARGIN_S[mode])
    print(f"\n{'stage':<20} {'':<6} {'s':>5} {'timeout':>7}  result (first line; all in {jsonl})")
    for r in lines:
        timeout = f"{r['timeout_s']:.0f}" if r.get("timeout_s") is not None else "-"
        print(f"{r['name']:<20} {'ok' if r['ok'] else 'FAILED':<6} {r['seconds']:5.0f} {timeout:>7}  "
              f"{r['result'].splitlines()[0] if r['result'] else ''}")
    print(f"{time.monotonic() - STARTED:.0f} s of the {budget_s:.0f} s budget", flush=True)
    sys.exit(0 if all(r["ok"] for r in lines) else 1)


if __name__ == "__main__":
    main()
