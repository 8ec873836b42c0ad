"""Where `simclr probe`'s extraction time goes: one lever at a time against the path probe and embed run.

Each row extracts the same random uint8 32-pixel images through `features.extract_features` with an
untrained ResNet-18 (CIFAR stem, fp32 by default) and prints images/s, the ratio to the first row and the
largest difference from its rows (a lever that changes numbers must say by how much). Rows: the memory
format, the batch size, inference_mode, batch norm folded into the convolutions
(`torch.fx.experimental.optimization.fuse`), one thread, and torch.compile (its first call timed apart).

    python benchmarks/probe_speed.py                  # width 64, 1,024 images
    python benchmarks/probe_speed.py --width 8 --images 256
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.fx.experimental.optimization import fuse

from simclr_cli.config import ModelConfig
from simclr_cli.data import NORMALIZATION
from simclr_cli.models import build_model
from simclr_cli.models.features import extract_features, for_inference

CPU = torch.device("cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=512, help="probe's default batch size")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    args = p.parse_args()
    torch.manual_seed(0)
    encoder = build_model(ModelConfig(width=args.width, stem="cifar")).encoder
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    mean, std = NORMALIZATION["cifar10"]

    def rate(model, batch=args.batch, context=torch.no_grad):
        with context():
            extract_features(model, images[:batch], mean, std, 32, CPU, args.precision, batch)  # warm-up
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                rows = extract_features(model, images, mean, std, 32, CPU, args.precision, batch)
                best = min(best, time.perf_counter() - start)
        return args.images / best, rows

    base, _ = for_inference(copy.deepcopy(encoder), None, CPU)
    r0, rows0 = rate(base)
    print(f"ResNet-18 width {args.width}, {args.images} images of 32 px, {args.precision}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'lever':<44} {'images/s':>9} {'ratio':>6}  max |diff|")
    print(f"{'as probe runs it (channels_last, batch ' + str(args.batch) + ')':<44} {r0:9.1f} {1:6.2f}  -")

    def row(name, model, **kw):
        r, rows = rate(model, **kw)
        print(f"{name:<44} {r:9.1f} {r / r0:6.2f}  {(rows - rows0).abs().max().item():.2e}", flush=True)

    row("contiguous memory format", copy.deepcopy(encoder).eval())
    row("batch 128", base, batch=128)
    row("batch 1024", base, batch=1024)
    row("torch.inference_mode", base, context=torch.inference_mode)
    row("batch norm folded into the convolutions", fuse(copy.deepcopy(encoder).eval()).to(memory_format=torch.channels_last))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    row("1 thread", base)
    torch.set_num_threads(threads)
    if args.no_compile:
        return
    compiled = torch.compile(copy.deepcopy(base))
    start = time.perf_counter()
    with torch.no_grad():
        extract_features(compiled, images[:args.batch], mean, std, 32, CPU, args.precision, args.batch)
    print(f"torch.compile: first call {time.perf_counter() - start:.1f} s", flush=True)
    row("torch.compile", compiled)


if __name__ == "__main__":
    main()
