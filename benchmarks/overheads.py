"""The README's overhead and threshold figures, each measured by one section of this script:

- loggers: what each installed live logger (TensorBoard, W&B offline, MLflow's file store) costs per step
  record: its own write call, and `Loggers.write` as the loop calls it once per log window (what the step
  sees); metrics.jsonl's append beside them, and the time to open and to close each;
- stop: the per-step stop check, `StopFlag.check` in one process, `RankAgreedStop.check` (one integer
  all-reduced over gloo) on 2 ranks on this machine;
- health: `score/health.py`'s figures of untrained networks, one per recipe in examples/ (each
  architecture and projector the project ships), as the kNN monitor measures them on held-out images,
  next to the collapse warning's absolute thresholds.

    python benchmarks/overheads.py --data-root DIR       # DIR holds cifar-10-batches-py/; all three, ~4 min here
    python benchmarks/overheads.py --only loggers stop   # no data needed
    python benchmarks/overheads.py --only health --data-root DIR --recipes cpu cifar10 --seeds 3
    python benchmarks/overheads.py --tiny                # every section in seconds (tests/test_benchmarks.py)

Without --data-root the health section measures the synthetic dataset's images (gratings), not CIFAR-10.
Nothing leaves the machine: W&B runs offline and MLflow writes a file store, both in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["cpu", "cifar10", "baseline", "moco", "byol", "cpu-mobilenet", "cpu-vit"]  # examples/NAME.yaml
LOGGERS = ["tensorboard", "wandb", "mlflow"]
STOP_TIMEOUT_S = 120  # the 2-rank stop section's deadline, torch imports included: a hung rank is killed


def machine() -> str:
    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def ms(seconds: float) -> str:
    return f"{1000 * seconds:8.3f}"


# --- loggers -----------------------------------------------------------------------------------------------

def step_records(first: int, n: int) -> list[dict]:
    """`n` step records as the loop writes them (LossWindow.record), steps first .. first + n - 1."""
    from simclr_cli.train.readback import LossWindow

    return [LossWindow(step - 1, "cpu").record([5.0 - step / 1000], 1, step, 0.1 * (1 - step / 10_000), 256)
            for step in range(first, first + n)]


def quiet_environment(folder: Path) -> None:
    """W&B offline with its files under `folder`, MLflow's tracking URI a file store there: nothing sent."""
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        os.environ[key] = str(folder / "wandb-home" / key.lower())
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", MLFLOW_TRACKING_URI=(folder / "mlruns").as_uri(),
                      MLFLOW_ALLOW_FILE_STORE="true")
    os.environ.pop("WANDB_API_KEY", None)


def time_each(fn, items) -> list[float]:
    out = []
    for item in items:
        t = time.perf_counter()
        fn(item)
        out.append(time.perf_counter() - t)
    return out


def measure_loggers(records: int, folder: Path) -> list[tuple[str, str]]:
    """Rows (logger, figures): per record its own write and the loop's `Loggers.write`, in ms."""
    from simclr_cli.config import load_config
    from simclr_cli.errors import MissingExtraError
    from simclr_cli.rundir import RunDir, scalars
    from simclr_cli.runtime import DistInfo
    from simclr_cli.train.loggers import open_loggers
    from simclr_cli.train.trackers import check_loggers

    quiet_environment(folder)
    facts = {"device": "cpu", "benchmark": "overheads.py"}
    rows = []
    jsonl = RunDir(folder / "jsonl")
    jsonl.path.mkdir(parents=True)
    append = time_each(jsonl.append, step_records(1, records))
    rows.append(("metrics.jsonl", f"{ms(statistics.mean(append))} {ms(statistics.median(append))} "
                                  f"{ms(max(append))}  {'-':>8}  {'-':>8} {'-':>8}  (always written)"))
    for name in LOGGERS:
        try:
            check_loggers([name])
        except MissingExtraError:
            rows.append((name, "not installed"))
            continue
        cfg = load_config(None, [f"train.output_dir={folder / name}", f"train.loggers=[{name}]"])
        rundir = RunDir(cfg.train.output_dir)
        rundir.path.mkdir(parents=True)
        t = time.perf_counter()
        with contextlib.ExitStack() as stack:
            opened = stack.enter_context(open_loggers(cfg, rundir, facts, 0, lambda event, data: None, DistInfo()))
            open_s = time.perf_counter() - t
            (logger,) = opened.loggers
            own = time_each(lambda r: logger.write(r, scalars(r)), step_records(1, records))  # its own call
            loop = time_each(opened.write, step_records(records + 1, records))  # as the loop calls it
            t = time.perf_counter()
        close_s = time.perf_counter() - t
        rows.append((name, f"{ms(statistics.mean(own))} {ms(statistics.median(own))} {ms(max(own))}  "
                           f"{ms(statistics.mean(loop))}  {ms(open_s)} {ms(close_s)}"))
    if "wandb" in sys.modules:  # its service process would otherwise run on beside the next sections
        sys.modules["wandb"].teardown()
    return rows


# --- the per-step stop check -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_rank(rank: int, world: int, port: int, checks: int, results) -> None:
    """One gloo rank: RankAgreedStop.check back to back, as the loop asks it before every step; the mean
    seconds per check go to `results`."""
    import torch
    import torch.distributed as dist

    from simclr_cli.train.interrupt import RankAgreedStop, StopFlag

    torch.set_num_threads(1)  # the ranks share this machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        stop = RankAgreedStop(StopFlag())
        for _ in range(max(10, checks // 10)):  # warm-up: the first collectives set up the connections
            stop.check()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(checks):
            stop.check()
        results.put((rank, (time.perf_counter() - t) / checks))
        dist.barrier()  # nobody tears down while another rank may still be in a collective
    finally:
        dist.destroy_process_group()


def measure_stop(checks: int, world: int = 2) -> list[tuple[str, str]]:
    from simclr_cli.train.interrupt import StopFlag

    flag, n = StopFlag(), 100 * checks
    t = time.perf_counter()
    for _ in range(n):
        flag.check()
    rows = [("1 process: StopFlag.check", f"{1e6 * (time.perf_counter() - t) / n:10.3f} µs a step")]
    context = multiprocessing.get_context("spawn")
    results, port = context.Queue(), free_port()
    ranks = [context.Process(target=stop_rank, args=(r, world, port, checks, results)) for r in range(world)]
    for p in ranks:
        p.start()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for p in ranks:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in ranks:
        if p.is_alive():
            p.kill()
    got = dict(results.get(timeout=1) for _ in ranks if not results.empty())
    if len(got) < world or any(p.exitcode != 0 for p in ranks):
        rows.append((f"{world} gloo ranks", f"FAILED (exit codes {[p.exitcode for p in ranks]})"))
    else:
        slowest = max(got.values())
        rows.append((f"{world} gloo ranks: RankAgreedStop.check", f"{1e6 * slowest:10.3f} µs a step (the slower "
                                                                  f"rank; {checks} checks back to back)"))
    return rows


# --- health of untrained networks --------------------------------------------------------------------------

def untrained_health(recipe: str, seed: int, images: int, data_root: Path | None, precision: str | None,
                     folder: Path) -> tuple[dict, str, str]:
    """(health, collapse warning or "", architecture) of `recipe`'s network at its initial weights for
    `seed`, on the `images` held-out images of the kNN monitor's validation split, measured as a run's
    first evaluation measures it (Monitor.health: eval mode, the run's precision, two views of 512)."""
    from simclr_cli.config import load_config
    from simclr_cli.score.health import collapse_warning
    from simclr_cli.train import Trainer
    from simclr_cli.train.monitor import load_monitor

    data = ([f"data.root={data_root}", "data.download=false", f"data.size_dataset_train={10 * images}"]
            if data_root else ["data.dataset=synthetic", f"data.synthetic_size={10 * images}"])
    # val_size is capped at a tenth of the training images: 10 x images keeps exactly `images` held out
    overrides = [*data, f"data.val_size={images}", f"train.seed={seed}", "train.device=cpu", "train.loggers=[]",
                 f"train.output_dir={folder / f'{recipe}-{seed}'}", "train.eval_split=val"]
    overrides += [f"train.precision={precision}"] if precision else []
    trainer = Trainer(load_config(str(REPO / "examples" / f"{recipe}.yaml"), overrides))
    monitor, why = load_monitor(trainer.cfg, trainer.data, trainer.mean, trainer.std, trainer.device,
                                trainer.precision)
    if monitor is None:
        raise RuntimeError(f"no kNN monitor for {recipe}: {why}")
    m = trainer.model
    projection = getattr(m, "head", None) or getattr(m, "projector", None)  # as Trainer.evaluate passes it
    h = monitor.features(m.encoder, monitor.queries, lambda done, total: None)  # eval mode, as the monitor's
    figures = monitor.health(m.encoder, projection, h, trainer.augment)
    arch = f"{trainer.cfg.model.arch} w{trainer.cfg.model.width}" if not trainer.cfg.model.arch.startswith(
        ("timm:", "torchvision:")) else trainer.cfg.model.arch.split(":", 1)[1]
    return figures, collapse_warning(None, figures) or "", f"{arch}, {trainer.cfg.method.name}, {trainer.precision}"


def span(values: list[float], fmt: str) -> str:
    low, high = format(min(values), fmt), format(max(values), fmt)
    return low if low == high else f"{low}..{high}"


def measure_health(recipes: list[str], seeds: int, images: int, data_root: Path | None, precision: str | None,
                   folder: Path) -> list[str]:
    from simclr_cli.score import health as H

    lines = [f"{'recipe':<14} {'network, method, precision':<42} {'rank_h':>18} {'rank_z':>16} {'z_std/unif':>12} "
             f"{'uniformity':>14} {'alignment':>12}  warns    time"]
    warned = {}
    for recipe in recipes:
        t = time.perf_counter()
        try:
            runs = [untrained_health(recipe, seed, images, data_root, precision, folder) for seed in range(seeds)]
        except Exception as err:  # an extra not installed (timm for cpu-vit): the row says so, the rest run
            lines.append(f"{recipe:<14} skipped: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
            continue
        f = [r[0] for r in runs]
        most_h = round(f[0]["rank_h"] / f[0]["rank_h_ratio"])
        most_z = round(f[0]["rank_z"] / f[0]["rank_z_ratio"])
        lines.append(f"{recipe:<14} {runs[0][2]:<42} "
                     f"{span([x['rank_h'] for x in f], '.1f') + f' /{most_h}':>18} "
                     f"{span([x['rank_z'] for x in f], '.1f') + f' /{most_z}':>16} "
                     f"{span([x['z_std'] / x['z_std_uniform'] for x in f], '.3f'):>12} "
                     f"{span([x['uniformity'] for x in f], '.3f'):>14} "
                     f"{span([x['alignment'] for x in f], '.3f'):>12}  "
                     f"{sum(bool(r[1]) for r in runs)} of {seeds} {time.perf_counter() - t:6.0f} s")
        warned.update({recipe: r[1] for r in runs[::-1] if r[1]})  # the first seed's warning, if any
    lines.append(f"collapse warning (absolute, score/health.py): rank_h or rank_z under {H.MIN_RANK:g}, or "
                 f"z_std/unif under {H.STD_FLOOR:g}; against the run's first evaluation: rank_z under "
                 f"{H.RANK_DROP:g} x, z_std under {H.STD_DROP:g} x its value")
    lines += [f"{recipe} untrained: {warning}" for recipe, warning in warned.items()]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=["loggers", "stop", "health"], default=["loggers", "stop", "health"])
    p.add_argument("--records", type=int, default=300, help="step records written to each logger, twice")
    p.add_argument("--checks", type=int, default=2000, help="stop checks timed on each gloo rank")
    p.add_argument("--data-root", type=Path, default=None, help="folder holding cifar-10-batches-py/ (health); "
                   "without it, the synthetic dataset")
    p.add_argument("--recipes", nargs="+", default=RECIPES, help="examples/NAME.yaml, for the health section")
    p.add_argument("--seeds", type=int, default=3, help="initial weights per recipe (train.seed 0, 1, ...)")
    p.add_argument("--images", type=int, default=1024, help="held-out images the health is measured on")
    p.add_argument("--precision", default=None, help="train.precision for the health (default: each recipe's)")
    p.add_argument("--tiny", action="store_true", help="a few records, checks and images, one seed, the CPU recipe")
    args = p.parse_args()
    if args.tiny:
        args.records, args.checks, args.seeds, args.images, args.recipes = 5, 20, 1, 64, ["cpu"]
    print(f"on {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="simclr-overheads-") as tmp:
        folder = Path(tmp)
        if "loggers" in args.only:
            print(f"\nlive loggers, ms per step record ({args.records} records each way; one process); opening and "
                  "closing, ms")
            print(f"{'':<14} {'own write call':^26}  {'Loggers':>8}")
            print(f"{'logger':<14} {'mean':>8} {'median':>8} {'max':>8}  {'.write':>8}  {'open':>8} {'close':>8}")
            for name, figures in measure_loggers(args.records, folder / "loggers"):
                print(f"{name:<14} {figures}", flush=True)
        if "stop" in args.only:
            print("\nper-step stop check")
            for name, figures in measure_stop(args.checks):
                print(f"{name:<42} {figures}", flush=True)
        if "health" in args.only:
            where = f"CIFAR-10 ({args.data_root})" if args.data_root else "the synthetic dataset"
            print(f"\nuntrained networks' health: {args.images} held-out images of {where}, seeds 0-{args.seeds - 1} "
                  "(low-high over the seeds)")
            for line in measure_health(args.recipes, args.seeds, args.images, args.data_root, args.precision,
                                       folder / "health"):
                print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
