"""Image folders larger than memory: the decoded cache, measured in one run.

Builds a folder of JPEGs at 128-160 px with varied sizes and aspect ratios from the offline CIFAR-10 copy
(upsampled; past 60,000 images the same images mirrored), in class subfolders, then reports:
  decode        images/s decoding the 50,000-image folder without keeping anything (2 workers)
  cache build   images/s of the first run, which decodes into the cache (2 workers)
  restart       seconds for the second run to check the folder against the index and map the cache
  views/s       pretraining steps reading batches from the mapped cache as the loop does (read ahead on a
                thread, data.read_ahead=2, and read when needed, 0), against the same images held in memory as
                one tensor (alternated, median of the rounds); the page cache is warm
  data wait     the share of those steps' time the loop spent waiting for its batch (reading it, when it
                was not read ahead)
  memory        for 20,000 and 100,000 images (each its own process: cache build, then training steps):
                peak anonymous memory (what the process allocates) and peak resident file pages (shared
                libraries and the map's pages: page cache, which the kernel takes back under pressure)
  finetune      the same two folders, each in its own process, through the cache the memory rows built:
                `simclr finetune --labels 10%`'s set-up (splits, label subset) and its first steps, peak
                anonymous memory; the subset is read from the map, so this stays flat as the folder grows
                (held in memory, 10% of the 80,000 training images of 100,000 at 128 px would add 390 MB)

    python benchmarks/folder.py --data-root DIR --work /tmp/folder-bench     # DIR holds cifar-10-batches-py/
    python benchmarks/folder.py --data-root DIR --work W --images 2000 --big 4000 --steps 3   # a quick look
    python benchmarks/folder.py --data-root DIR --work W --images 1000 --small 5000 --big 20000 --steps 3
                                                   # the memory rows at N and 4N images, in a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simclr_cli.config import DataConfig, load_config
from simclr_cli.data import ImageSet, load_dataset, normalization_for
from simclr_cli.data.batches import Batches
from simclr_cli.data.images import iter_decoded, list_images
from simclr_cli.files import atomic_save
from simclr_cli.models import build_model
from simclr_cli.models.encoder_file import encoder_payload
from simclr_cli.train import Trainer


def _write(job: tuple[str, np.ndarray, int, int, int]) -> None:
    path, pixels, w, h, mirror = job
    img = Image.fromarray(pixels)
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else img
    img.resize((w, h), Image.Resampling.BICUBIC).save(path, quality=90)


def make_folder(root: Path, n: int, data_root: str) -> list[Path]:
    """n JPEGs under root/<class>/, sides 128-160 px drawn independently (aspect 0.8-1.25); kept if complete."""
    if root.is_dir() and len(list_images(root)) == n:
        return list_images(root)
    train = load_dataset(DataConfig(dataset="cifar10", root=data_root, download=False), "train")
    test = load_dataset(DataConfig(dataset="cifar10", root=data_root, download=False), "test")
    images = torch.cat([train.images, test.images]).permute(0, 2, 3, 1).numpy()  # (60000, 32, 32, 3)
    labels = torch.cat([train.labels, test.labels]).tolist()
    rng = np.random.default_rng(0)
    sides = rng.integers(128, 161, size=(n, 2))
    for c in train.classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    jobs = [(str(root / train.classes[labels[i % len(images)]] / f"{i:06d}.jpg"), images[i % len(images)],
             int(sides[i, 0]), int(sides[i, 1]), int(i >= len(images))) for i in range(n)]
    with Pool(2) as pool:
        pool.map(_write, jobs, chunksize=500)
    return list_images(root)


def link_folder(root: Path, paths: list[Path], n: int) -> Path:
    """A folder of n symlinks (the first n images, same classes): its own cache, no second copy of pixels."""
    if root.is_dir() and len(list_images(root)) == n:
        return root
    for p in paths[:n]:
        target = root / p.parent.name / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.symlink(p, target)
    return root


def decode_only(paths: list[Path], size: int) -> float:
    t0 = time.perf_counter()
    for _ in iter_decoded(paths, size, batch_size=64, num_workers=2):
        pass
    return len(paths) / (time.perf_counter() - t0)


def config(root: Path, size: int, cache_dir: Path, extra: list[str]):
    return load_config(None, ["data.dataset=folder", f"data.root={root}", f"data.image_size={size}",
                              f"data.cache_dir={cache_dir}", "model.width=16", "train.batch_size=64",
                              "train.device=cpu", "train.precision=fp32", "train.output_dir=/tmp/unused", *extra])


def timed_steps(trainer: Trainer, steps: int) -> tuple[float, float]:
    """(views/s, share of the time spent waiting for batches) of `steps` steps, batches taken as the loop
    takes them (read ahead when the images are mapped and data.read_ahead > 0; the epoch's batches again
    when `steps` passes its end)."""
    order = trainer.batches.order(0, 0)
    with trainer.batches.stream(order, [i % trainer.steps_per_epoch for i in range(steps + 1)]) as batches:
        trainer.train_step(next(batches))  # warm-up
        batches.wait_s = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(next(batches))
        seconds = time.perf_counter() - t0
    return 2 * trainer.cfg.train.batch_size * steps / seconds, batches.wait_s / seconds


def views_per_s(cfg, steps: int, rounds: int) -> dict[str, tuple[float, float]]:
    """{way: (views/s, data-wait share)} of the same trainer for the mapped cache read ahead, the mapped cache
    read when needed, and the images in memory; alternated `rounds` times, medians."""
    trainer = Trainer(cfg)
    mapped = trainer.data
    held = ImageSet(mapped.images[:], mapped.labels, mapped.classes, mapped.name)  # one tensor in memory
    ways = {"mapped, read ahead": (mapped, 2), "mapped, read when needed": (mapped, 0), "in memory": (held, 0)}
    measured: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
    for _ in range(rounds):
        for way, (data, depth) in ways.items():
            trainer.batches = Batches(data.images, cfg.train.batch_size, 0, trainer.local_batch, trainer.device,
                                      data.mapped, depth)
            measured[way].append(timed_steps(trainer, steps))
    return {way: (statistics.median(r for r, _ in runs), statistics.median(w for _, w in runs))
            for way, runs in measured.items()}


# Both probes run in a fresh process, sampling their own peak resident memory (MB) every 50 ms.
PEAK_SAMPLER = """
import threading, time
peak = {"RssAnon": 0, "RssFile": 0}
def sample():
    while True:
        for line in open("/proc/self/status"):
            key = line.split(":")[0]
            if key in peak:
                peak[key] = max(peak[key], int(line.split()[1]) // 1024)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
"""

MEMORY_PROBE = PEAK_SAMPLER + """
import json, sys
from pathlib import Path
from simclr_cli.config import load_config
from simclr_cli.train import Trainer
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
trainer = Trainer(load_config(None, args["config"]))
setup = time.perf_counter() - t0
order = trainer.batches.order(0, 0)
for i in range(args["steps"]):
    trainer.train_step(trainer.batches.get(order, i))
time.sleep(0.2)
print(json.dumps({"images": len(trainer.data), "setup_s": setup, **peak}))
"""


FINETUNE_PROBE = PEAK_SAMPLER + """
import json, sys, tempfile
from pathlib import Path
from simclr_cli.score import finetune_loop
from simclr_cli.score.finetune import FinetuneOptions, FinetuneRun
args = json.loads(sys.argv[1])
class Enough(Exception):
    pass
taken, augmented = [0], finetune_loop.augmented
def counted(*a, **kw):  # the loop's own augmentation, stopping it after `steps` steps
    if taken[0] == args["steps"]:
        raise Enough
    taken[0] += 1
    return augmented(*a, **kw)
finetune_loop.augmented = counted
out = tempfile.TemporaryDirectory()  # the classifier and state files, if an epoch is shorter than `steps`
t0 = time.perf_counter()
run = FinetuneRun(Path(args["encoder"]), Path(out.name) / "classifier.pth", FinetuneOptions(
    labels=args["labels"], dataset="folder", root=args["root"], epochs=1, batch_size=64, device="cpu",
    precision="fp32"), lambda event, data: None)
setup = time.perf_counter() - t0
try:
    run.fine_tune("pretrained")
except Enough:
    pass
time.sleep(0.2)
print(json.dumps({"images": len(run.images), "steps": taken[0], "setup_s": setup, **peak}))
"""


def write_encoder(path: Path, size: int) -> Path:
    """An untrained encoder file at `size` pixels, the width-16 ResNet-18 of the other rows."""
    cfg = load_config(None, [f"data.image_size={size}", "model.width=16"])
    model = build_model(cfg.model, size)
    mean, std = normalization_for("imagenet")
    return atomic_save(encoder_payload(model.encoder, cfg, model.head, mean=mean, std=std), path)


def finetune_memory_at(root: Path, encoder: Path, cache_dir: Path, steps: int, labels: str) -> dict:
    """A fresh process loads the folder as `simclr finetune` does (through the cache, already built), then
    fine-tunes `steps` steps; peaks sampled at 20 Hz."""
    args = {"root": str(root), "encoder": str(encoder), "labels": labels, "steps": steps}
    done = subprocess.run([sys.executable, "-c", FINETUNE_PROBE, json.dumps(args)], capture_output=True, text=True,
                          env={**os.environ, "SIMCLR_CACHE_DIR": str(cache_dir)})
    if done.returncode != 0:
        raise SystemExit(f"finetune on {root} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def clear(cache_dir: Path, root: Path, size: int) -> None:
    for old in cache_dir.glob(f"{root.name}-{size}px-*"):
        for f in old.iterdir():
            f.unlink()


def memory_at(root: Path, size: int, cache_dir: Path, steps: int) -> dict:
    """A fresh process builds the folder's cache, then trains `steps` steps from it; peaks sampled at 20 Hz."""
    clear(cache_dir, root, size)
    cfg = ["data.dataset=folder", f"data.root={root}", f"data.image_size={size}", f"data.cache_dir={cache_dir}",
           "model.width=16", "train.batch_size=64", "train.device=cpu", "train.precision=fp32",
           "train.output_dir=/tmp/unused"]
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, json.dumps({"config": cfg, "steps": steps})],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="folder holding cifar-10-batches-py/")
    p.add_argument("--work", type=Path, default=Path("/tmp/simclr-folder-bench"), help="folders and caches go here")
    p.add_argument("--images", type=int, default=50_000, help="images of the decode, cache and views/s rows")
    p.add_argument("--small", type=int, default=20_000, help="images of the first memory row")
    p.add_argument("--big", type=int, default=100_000, help="images of the folder built, and of the second memory row")
    p.add_argument("--size", type=int, default=128, help="data.image_size: pixels the cache stores")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternations of mapped and in-memory")
    p.add_argument("--finetune-labels", default="10%", help="--labels of the finetune memory rows")
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    every = make_folder(args.work / f"jpeg-{args.big}", args.big, args.data_root)
    print(f"folder: {len(every)} JPEGs in {time.perf_counter() - t0:.0f} s", flush=True)
    root = link_folder(args.work / f"jpeg-{args.images}", every, args.images)
    paths = list_images(root)
    cache_dir = args.work / "cache"
    rows = {"decode only (images/s)": decode_only(paths, args.size)}
    data = DataConfig(dataset="folder", root=str(root), num_workers=2, cache_dir=str(cache_dir))
    clear(cache_dir, root, args.size)  # the first run must really decode
    t0 = time.perf_counter()
    load_dataset(data, "train", image_size=args.size)
    rows["first run: decode into the cache (images/s)"] = len(paths) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    load_dataset(data, "train", image_size=args.size)
    rows["second run: check and map (s)"] = time.perf_counter() - t0
    speeds = views_per_s(config(root, args.size, cache_dir, []), args.steps, args.rounds)
    for way, (rate, _) in speeds.items():
        rows[f"views/s, {way}"] = rate
    rows["mapped read ahead / in memory"] = speeds["mapped, read ahead"][0] / speeds["in memory"][0]
    for way, (_, wait) in speeds.items():
        rows[f"data wait, {way} (% of step time)"] = 100 * wait
    small = link_folder(args.work / f"jpeg-{args.small}", every, args.small)
    encoder = write_encoder(args.work / "encoder.pth", args.size)
    for n, folder in ((args.small, small), (args.big, args.work / f"jpeg-{args.big}")):
        m = memory_at(folder, args.size, cache_dir, args.steps)
        rows[f"{n} images: peak anonymous memory (MB)"] = m["RssAnon"]
        rows[f"{n} images: peak resident file pages (MB)"] = m["RssFile"]
        rows[f"{n} images: cache build + set-up (s)"] = m["setup_s"]
        f = finetune_memory_at(folder, encoder, cache_dir, args.steps, args.finetune_labels)
        rows[f"{n} images: finetune {args.finetune_labels} peak anon. (MB)"] = f["RssAnon"]
    print(f"\n{torch.__version__}, {os.cpu_count()} CPUs, {args.size} px cache, width 16, batch 64, fp32")
    for name, value in rows.items():
        print(f"| {name:48s} | {value:10.3f} |" if isinstance(value, float) else f"| {name:48s} | {value:10d} |")


if __name__ == "__main__":
    main()
