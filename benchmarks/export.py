"""What the exported encoder costs and gives: file size and parity per format, and `simclr embed` images/s
through onnxruntime against PyTorch fp32, on the same images in one run.

For each encoder (a run's encoder.pth or checkpoint.pt; `--width64` adds a width-64 ResNet-18 from a few
synthetic steps, whose size and speed do not depend on what it learned), every format is written with
`simclr extract`'s own function into a temporary folder: its size and the parity figure `extract` prints.
Then `simclr embed` runs the same image folder (CIFAR-10 test images as PNG files with --data-root, else
random pixels) with the .pth in fp32 and with the .onnx, alternating, `--rounds` times each: the best round
of each is printed, and their ratio. Both include decoding the files, as a user's `simclr embed` does.

    python benchmarks/export.py --encoder runs/cpu/encoder.pth --width64 --data-root DIR
    python benchmarks/export.py --width64 --images 256 --rounds 2     # a quick look
"""

from __future__ import annotations

import argparse
import pickle
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simclr_cli.config import load_config
from simclr_cli.serve.embed import embed_images
from simclr_cli.exports.extract import extract_encoder
from simclr_cli.train import pretrain

FORMATS = {"onnx": "encoder.onnx", "torchscript": "encoder.pt", "safetensors": "encoder.safetensors"}


def width64(folder: Path) -> Path:
    """A width-64 ResNet-18 (CIFAR stem) run from a few synthetic steps: its checkpoint."""
    pretrain(load_config(None, ["data.dataset=synthetic", "data.synthetic_size=64", "data.image_size=32",
                                "model.arch=resnet18", "model.width=64", "train.batch_size=32", "train.epochs=1",
                                "train.eval_every=0", "data.val_size=8", "train.device=cpu",
                                f"train.output_dir={folder}"]))
    return folder / "checkpoint.pt"


def image_folder(folder: Path, n: int, data_root: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if data_root:
        with open(Path(data_root) / "cifar-10-batches-py" / "test_batch", "rb") as f:
            pixels = pickle.load(f, encoding="bytes")[b"data"][:n].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(np.ascontiguousarray(p)).save(folder / f"{i:05d}.png")
    return folder


def timed_embed(folder: Path, encoder: Path, out: Path) -> float:
    t0 = time.perf_counter()
    result = embed_images(folder, encoder, out, device="cpu", precision="fp32", num_workers=0)
    return result.rows / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", action="append", default=[], help="an encoder.pth or checkpoint.pt (repeatable)")
    p.add_argument("--width64", action="store_true", help="add a width-64 ResNet-18")
    p.add_argument("--data-root", help="folder holding cifar-10-batches-py/ (test images); random pixels without")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        encoders = {Path(e).parent.name or e: Path(e) for e in args.encoder}
        if args.width64:
            encoders["resnet18 width 64"] = width64(tmp / "width64")
        folder = image_folder(tmp / "images", args.images, args.data_root)
        for name, source in encoders.items():
            out = tmp / name.replace(" ", "-")
            out.mkdir()
            pth = source if source.name != "checkpoint.pt" else source.parent / "encoder.pth"
            print(f"\n{name} ({source}): native .pth {pth.stat().st_size / 2**20:.2f} MiB")
            for fmt, file in FORMATS.items():
                info = extract_encoder(source, out / file, fmt)
                print(f"  {fmt:<12} {info['bytes'] / 2**20:6.2f} MiB   largest |h difference| to PyTorch fp32 "
                      f"{info['parity']:.2g}")
            speeds: dict[str, list[float]] = {"PyTorch fp32 (.pth)": [], "onnxruntime (.onnx)": []}
            for _ in range(args.rounds):
                speeds["PyTorch fp32 (.pth)"].append(timed_embed(folder, pth, out / "pth.npy"))
                speeds["onnxruntime (.onnx)"].append(timed_embed(folder, out / "encoder.onnx", out / "onnx.npy"))
            rows = np.load(out / "pth.npy"), np.load(out / "onnx.npy")
            base = max(speeds["PyTorch fp32 (.pth)"])
            for path, s in speeds.items():
                print(f"  simclr embed, {path:<20} best of {args.rounds}: {max(s):8.1f} images/s  "
                      f"({max(s) / base:.2f}x)  rounds: {', '.join(f'{v:.0f}' for v in s)}")
            print(f"  rows: {len(rows[0])}, largest |difference| .onnx vs .pth {np.abs(rows[0] - rows[1]).max():.2g}")


if __name__ == "__main__":
    main()
