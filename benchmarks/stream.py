"""Tar shards streamed into pretraining, beside the folder cache, measured in one run.

From an image folder with train/<class>/ (the CIFAR-10 copy: make_cifar10.py DIR --folder), writes tar shards
with `simclr shards`' writer (--per-shard samples each), serves them from an S3 endpoint on 127.0.0.1 (moto,
the `test` extra), and reports:
  delivered    images/s reaching the loop as uint8 batches (--batch, 128) with no step behind them (each way the
               same --samples images, the first 10% not timed: worker start-up): the folder decoded from its
               files, the local shards and the same shards on S3, 2 workers each; and the local shards decoded
               in the main process (0 workers), whose inverse is the CPU time one image costs
  at the step  the CPU recipe's step (examples/cpu.yaml at its final 24-pixel views, its precision) fed from
               the folder's decoded cache, the local shards and the S3 shards (2 workers): images/s and the
               share of the step's wall time spent waiting for the next batch (--steps steps after 2 of warm-up)
  memory       one epoch of the train series streamed (2 workers, batches dropped) in a fresh process, and
               the same with every shard named --times times (links to the same tar files: times the shard
               count and the samples, no more disk): peak PSS of the process and its workers together, sampled
               at 20 Hz, and of the main process alone
  cores        the cores a GPU step needs at the images/s of the public CIFAR-10 runs the README cites,
               from the per-image cost: cores = images/s x seconds per image

    python3 ../shared/data/make_cifar10.py DIR --folder
    python benchmarks/stream.py --jpeg DIR/cifar10-jpeg --work /tmp/stream-bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from loopback_s3 import s3_store  # benchmarks/loopback_s3.py

from simclr_cli.config import load_config
from simclr_cli.data.images import iter_decoded, list_images
from simclr_cli.data.shards import write_shards
from simclr_cli.data.stream import ShardStream, stream_batches
from simclr_cli.data.stream_io import read_index
from simclr_cli.train import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "cpu.yaml"
# images/s a GPU step consumed in the public CIFAR-10 ResNet-18 runs the README cites (epochs x 50,000 / seconds)
GPU_RATES = {"lightly SimCLR, A6000 (200 epochs, 87 min)": 200 * 50_000 / (87 * 60),
             "best public SimCLR, A100 (500 epochs, 99 min)": 500 * 50_000 / (99 * 60)}


def timed(batches, images: int) -> float:
    """Images/s of an iterator of batches over `images` images, timed from the batch that passes the first 10%."""
    seen, start, t0 = 0, None, time.perf_counter()
    for batch in batches:
        seen += len(batch.images)
        if start is None and seen >= images // 10:
            start, t0 = seen, time.perf_counter()
    return (seen - start) / (time.perf_counter() - t0)


def delivered(urls: list[str], counts: list[int], size: int, workers: int, samples: int, batch: int) -> float:
    stream = ShardStream(urls, counts, size, batch_size=batch, samples=samples)
    return timed(stream_batches(stream, workers), samples)


def folder_delivered(paths: list[Path], size: int, samples: int, batch: int) -> float:
    return timed(iter_decoded(paths[:samples], size, batch_size=batch, num_workers=2), samples)


def recipe(data: list[str]):
    return load_config(RECIPE, [*data, "augment.view_size_start=null", "train.device=cpu", "data.num_workers=2",
                                "train.output_dir=/tmp/unused", "train.eval_every=0"])


def at_step(cfg, steps: int) -> tuple[float, float, str]:
    """(images/s, share of the time waiting for batches, precision) of `steps` training steps after 2 of
    warm-up."""
    trainer = Trainer(cfg)
    order = trainer.batches.order(0, 0)
    with trainer.batches.stream(order, range(steps + 2)) as batches:
        for _ in range(2):
            trainer.train_step(next(batches))
        wait, t0 = 0.0, time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t
            trainer.train_step(batch)
        seconds = time.perf_counter() - t0
    return cfg.train.batch_size * steps / seconds, wait / seconds, trainer.precision


# A fresh process streams one epoch and samples the proportional set size of itself and its workers at 20 Hz.
MEMORY_PROBE = """
import json, os, sys, threading, time
peak = {"total": 0, "main": 0}
def pss(pid):
    try:
        return next(int(l.split()[1]) for l in open(f"/proc/{pid}/smaps_rollup") if l.startswith("Pss:")) / 1024
    except (OSError, StopIteration):
        return 0
def sample():
    me = os.getpid()
    while True:
        try:
            kids = [int(c) for c in open(f"/proc/{me}/task/{me}/children").read().split()]
        except OSError:
            kids = []
        main = pss(me)
        peak["main"], peak["total"] = max(peak["main"], main), max(peak["total"], main + sum(pss(k) for k in kids))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
from simclr_cli.data.stream import ShardStream, stream_batches
args = json.loads(sys.argv[1])
t0, n = time.perf_counter(), 0
for batch in stream_batches(ShardStream(args["urls"], args["counts"], args["size"], batch_size=args["batch"]), 2):
    n += len(batch.images)
time.sleep(0.2)
print(json.dumps({"samples": n, "seconds": time.perf_counter() - t0, **peak}))
"""


def memory(urls: list[str], counts: list[int], size: int, batch: int) -> dict:
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, json.dumps({"urls": urls, "counts": counts,
                                                                          "size": size, "batch": batch})],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the memory probe failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def linked(shards: Path, names: list[str], times: int) -> list[str]:
    """Every shard named `times` times: links x{t}-NAME in shards/linked/ to the same files."""
    out = shards / "linked"
    out.mkdir(exist_ok=True)
    paths = []
    for t in range(times):
        for name in names:
            link = out / f"x{t:02d}-{name}"
            if not link.exists():
                link.symlink_to(shards / name)
            paths.append(str(link))
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jpeg", type=Path, required=True, help="an image folder with train/<class>/ (and test/)")
    p.add_argument("--work", type=Path, default=Path("/tmp/simclr-stream-bench"), help="shards and cache go here")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    p.add_argument("--samples", type=int, default=20_000, help="images of each delivered row")
    p.add_argument("--steps", type=int, default=40, help="timed training steps of each at-the-step row")
    p.add_argument("--times", type=int, default=10, help="the second memory row names every shard this often")
    p.add_argument("--size", type=int, default=32, help="data.image_size: pixels images are decoded to")
    p.add_argument("--batch", type=int, default=128, help="images per batch (the CPU recipe's)")
    args = p.parse_args()
    torch.manual_seed(0)
    jpeg, work = args.jpeg.resolve(), args.work.resolve()
    shards = work / "shards"
    write_shards(jpeg, shards, max_count=args.per_shard)
    series = read_index(str(shards))["series"]["train"]["shards"]
    names, counts = [s["name"] for s in series], [int(s["samples"]) for s in series]
    local = [str(shards / n) for n in names]
    rows: dict[str, float] = {}
    size, batch = args.size, args.batch
    paths = list_images(jpeg / "train")
    rows["delivered, folder files decoded, 2 workers (images/s)"] = folder_delivered(paths, size, args.samples, batch)
    for workers in (2, 0):
        rows[f"delivered, local shards, {workers} workers (images/s)"] = delivered(local, counts, size, workers,
                                                                                 args.samples, batch)
    with s3_store({"shards": shards}, work) as bucket:
        remote = [f"{bucket}/shards/{n}" for n in names]
        rows["delivered, S3 shards, 2 workers (images/s)"] = delivered(remote, counts, size, 2, args.samples, batch)
        listed = ", ".join(repr(u) for u in remote)
        ways = {"folder cache": ["data.dataset=folder", f"data.root={jpeg}", f"data.cache_dir={work / 'cache'}"],
                "local shards": ["data.dataset=webdataset", f"data.webdataset.urls=['{shards}']"],
                "S3 shards": ["data.dataset=webdataset", f"data.webdataset.urls=[{listed}]"]}
        for way, data in ways.items():
            rate, wait, precision = at_step(recipe([*data, f"data.image_size={size}", f"train.batch_size={batch}"]),
                                            args.steps)
            rows[f"at the step, {way} (images/s)"] = rate
            rows[f"at the step, {way}: waiting for the batch (% of time)"] = 100 * wait
    for times in (1, args.times):
        m = memory(local if times == 1 else linked(shards, names, times), counts * times, size, batch)
        rows[f"{len(names) * times} shards, {m['samples']} samples: peak PSS, all processes (MB)"] = m["total"]
        rows[f"{len(names) * times} shards, {m['samples']} samples: peak PSS, main process (MB)"] = m["main"]
    cost = 1 / rows["delivered, local shards, 0 workers (images/s)"]
    rows["CPU time per image, local shards (ms)"] = 1000 * cost
    for name, rate in GPU_RATES.items():
        rows[f"cores to feed {name}: {rate:,.0f} images/s"] = rate * cost
    print(f"\n{torch.__version__}, {os.cpu_count()} CPUs, {args.size} px, batch {args.batch}, {len(names)} shards of "
          f"{args.per_shard}; at the step: {RECIPE.name}, {precision}")
    for name, value in rows.items():
        print(f"| {name:76s} | {value:12.4f} |")


if __name__ == "__main__":
    main()
