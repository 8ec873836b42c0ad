"""What pretraining buys with few labels: the three rows of `simclr finetune --compare` at 1% and 10% of
CIFAR-10's labels, like with like.

Each row chooses its own setting on the validation split (a fixed 5,000 of the training images, fitted on
the label subset of the rest), then scores the test split once with it:
  fine-tuned     the pretrained encoder fine-tuned with the paper's protocol; the learning rate from the grid
  random init    the same network untrained, the same protocol; the learning rate from the same grid, its own
  linear probe   logistic regression on the pretrained encoder's frozen features; no learning rate (full-batch
                 L-BFGS), its setting is the L2 strength, from the probe's grid (score.linear.WEIGHT_DECAYS),
                 chosen here on the same validation split as the others rather than on a tenth of the subset
The best validation top-1 wins; ties go to the smaller rate or the stronger L2. Every validation figure and
the chosen setting are printed per row; OUT/report.json holds them with the test figures. An interrupted
fine-tune continues where it stopped when the same command is run again.

    python benchmarks/finetune.py runs/cpu/encoder.pth --data-root DIR      # grid: the paper's rate x 0.5, 1, 2
    python benchmarks/finetune.py runs/cpu/encoder.pth --data-root DIR --labels 1% --lr 0.025 --lr 0.1
    python benchmarks/finetune.py ENC --dataset synthetic --labels 10% --epochs 1 --out /tmp/ft   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from simclr_cli.score.finetune import FinetuneOptions, FinetuneRun, partial_path
from simclr_cli.score.finetune_loop import scaled_lr
from simclr_cli.score.linear import WEIGHT_DECAYS

LR_SCALES = (0.5, 1.0, 2.0)  # the default grid: these times the paper's 0.05 x batch / 256
ROWS = {"pretrained": "fine-tuned", "random_init": "random init", "linear_probe": "linear probe"}


def quiet(event: str, data: dict) -> None:
    pass


def open_run(encoder: str, output: Path, opts: FinetuneOptions) -> FinetuneRun:
    """A finetune run writing `output`, continuing an interrupted one there."""
    opts.resume = partial_path(output).exists()
    return FinetuneRun(Path(encoder), output, opts, quiet)


def fine_tune(encoder: str, out: Path, base: dict, labels: str, split: str, model: str, lr: float) -> dict:
    """One fine-tune of `model` ("pretrained" or "random_init") at learning rate `lr`, scored on `split`."""
    output = out / f"{split}-{labels.strip('%')}-{model}-lr{lr:g}.pth"
    run = open_run(encoder, output, FinetuneOptions(labels=labels, split=split, lr=lr, **base))
    t0 = time.perf_counter()
    result = run.fine_tune(model)
    run.partial.unlink(missing_ok=True)
    return {**result, "seconds": time.perf_counter() - t0, "protocol": run.protocol.describe(),
            "subset": run.info["subset"]}


def linear(encoder: str, out: Path, base: dict, labels: str, split: str, weight_decays) -> dict:
    """The linear probe at each L2 strength of `weight_decays` in turn, scored on `split`: {wd: result}.
    Features are extracted once (each result's seconds: that extraction and its own fit); each fit is the
    probe's own (`FinetuneRun.linear_probe`) with a grid of one."""
    run = open_run(encoder, out / f"{split}-{labels.strip('%')}-linear.pth", FinetuneOptions(labels=labels, split=split,
                                                                                            **base))
    t0 = time.perf_counter()
    features = run.features()
    extract_s, results = time.perf_counter() - t0, {}
    for wd in weight_decays:
        t0 = time.perf_counter()
        results[wd] = {**run.linear_probe(features, [wd]), "subset": run.info["subset"]}
        results[wd].update(seconds=extract_s + time.perf_counter() - t0, extract_s=extract_s)
    return results


def choose(validation: dict, prefer_smaller: bool) -> float:
    """The setting with the best validation top-1; ties to the smaller (learning rate) or larger (L2) one."""
    order = sorted(validation, reverse=not prefer_smaller)
    return max(order, key=lambda k: validation[k]["top1"])  # max keeps the first of equals


def row(encoder: str, out: Path, base: dict, labels: str, model: str, grid: list[float]) -> dict:
    """Choose the row's setting on validation, then score the test split once with it."""
    name, setting = ROWS[model], "weight decay" if model == "linear_probe" else "lr"
    if model == "linear_probe":
        validation = linear(encoder, out, base, labels, "val", grid)
    else:
        validation = {lr: fine_tune(encoder, out, base, labels, "val", model, lr) for lr in grid}
    for value, res in validation.items():
        extra = f", {res['protocol']['epochs']} epochs" if "protocol" in res else ""
        print(f"{labels} labels, {name}, validation, {setting} {value:g}: top-1 {100 * res['top1']:.2f}% "
              f"({res['seconds']:.0f} s{extra})", flush=True)
    chosen = choose(validation, prefer_smaller=model != "linear_probe")
    print(f"{labels} labels, {name}: chose {setting} {chosen:g}", flush=True)
    if model == "linear_probe":
        test = linear(encoder, out, base, labels, "test", [chosen])[chosen]
    else:
        test = fine_tune(encoder, out, base, labels, "test", model, chosen)
    print(f"{labels} labels ({test['subset']['images']} images), test, {name} ({setting} {chosen:g}): top-1 "
          f"{100 * test['top1']:.2f}% in {test['seconds']:.0f} s", flush=True)
    return {"setting": setting.replace(" ", "_"), "validation": {f"{k:g}": v for k, v in validation.items()},
            "chosen": chosen, "test": test}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("encoder")
    p.add_argument("--data-root", help="folder holding cifar-10-batches-py/ (not for --dataset synthetic)")
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100, folder (--data-root DIR) or synthetic")
    p.add_argument("--synthetic-size", type=int, default=2000, help="images of each synthetic split")
    p.add_argument("--labels", action="append", default=[], help="label shares (default: 1%% and 10%%)")
    p.add_argument("--lr", type=float, action="append", default=[],
                   help="the learning-rate grid of both fine-tuned rows (default: the paper's rate x 0.5, 1, 2)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the paper's, 60 at 1%%, 30 above)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", default="runs/finetune-benchmark", help="classifiers and report.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    base = {"dataset": args.dataset, "root": args.data_root, "synthetic_size": args.synthetic_size,
            "batch_size": args.batch_size, "epochs": args.epochs, "device": args.device, "precision": args.precision}
    grids = {"pretrained": sorted(args.lr) or [s * scaled_lr(args.batch_size) for s in LR_SCALES],
             "linear_probe": sorted(WEIGHT_DECAYS, reverse=True)}
    grids["random_init"] = grids["pretrained"]  # the same grid: like with like
    report = {}
    for labels in args.labels or ["1%", "10%"]:
        report[labels] = {model: row(args.encoder, out, base, labels, model, grids[model]) for model in ROWS}
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")  # each share as it ends
    for labels, rows in report.items():
        print(f"\n{labels} labels   | chosen on validation   | validation top-1 | test top-1")
        for model, r in rows.items():
            val = r["validation"][format(r["chosen"], "g")]["top1"]
            print(f"{ROWS[model]:12s} | {r['setting']:12s} {r['chosen']:<9g} | {100 * val:15.2f}% | "
                  f"{100 * r['test']['top1']:9.2f}%")
    return report


if __name__ == "__main__":
    main()
