"""What pretraining buys with few labels: `simclr finetune --compare` at 1% and 10% of CIFAR-10's labels.

For each label share, the fine-tuning learning rate is chosen on the validation split (the paper's 0.05 x
batch / 256 and the `--lr` values given), for the fine-tuned encoder; then the test split is scored once
with the chosen rate: fine-tuned from the encoder, the same protocol from random init, and the linear
probe on the same labels, each with its wall-clock.

    python benchmarks/finetune.py runs/cpu/encoder.pth --data-root DIR
    python benchmarks/finetune.py runs/cpu/encoder.pth --data-root DIR --labels 1% --lr 0.2 --out /tmp/ft
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from simclr_cli.evaluate.finetune import FinetuneOptions, run_finetune
from simclr_cli.evaluate.finetune_loop import scaled_lr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("encoder")
    p.add_argument("--data-root", required=True, help="folder holding cifar-10-batches-py/")
    p.add_argument("--labels", action="append", default=[], help="label shares (default: 1% and 10%)")
    p.add_argument("--lr", type=float, action="append", default=[], help="rates tried on validation besides the paper's")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default="runs/finetune-benchmark", help="classifiers and report.json")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    base = {"dataset": "cifar10", "root": args.data_root, "batch_size": args.batch_size}
    report = {}
    for labels in args.labels or ["1%", "10%"]:
        rates = [scaled_lr(args.batch_size), *args.lr]
        val = {}
        for lr in rates:
            r = run_finetune(args.encoder, out / f"val-{labels.strip('%')}-{lr:g}.pth",
                             FinetuneOptions(labels=labels, split="val", lr=lr, **base))
            val[lr] = r["results"]["pretrained"]
            print(f"{labels} labels, validation, lr {lr:g}: top-1 {100 * val[lr]['top1']:.2f}% "
                  f"({val[lr]['seconds']:.0f} s, {r['protocol']['epochs']} epochs)", flush=True)
        lr = max(val, key=lambda k: val[k]["top1"])
        r = run_finetune(args.encoder, out / f"test-{labels.strip('%')}.pth",
                         FinetuneOptions(labels=labels, split="test", lr=lr, compare=True, **base))
        report[labels] = {"validation": {f"{k:g}": v for k, v in val.items()}, "chosen_lr": lr, "test": r["results"],
                          "subset": r["subset"], "protocol": r["protocol"]}
        for name, res in r["results"].items():
            print(f"{labels} labels ({r['subset']['images']} images), test, {name}: top-1 {100 * res['top1']:.2f}% "
                  f"in {res['seconds']:.0f} s", flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
