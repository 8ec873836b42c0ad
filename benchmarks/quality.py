"""Representation quality at equal wall-clock: recipes or methods pretrained, probed and fine-tuned, beside
the untrained floor of each architecture.

Each recipe pretrains on the real CIFAR-10 copy for a fixed wall-clock budget (default 10 minutes): a few
calibration steps measure its speed and plan where the cosine schedule ends; at every log the plan is
redone from the speed measured so far in the run, so the decay ends, and training stops, at the step the
budget allows (a fraction of an epoch counts). A hard stop at the budget catches a machine that slows.
Every encoder is then probed on the validation split (a fixed 5,000 of the training images; the rest fit
the probe and are the kNN bank), which chooses among the CPU recipe's variants (`--try`) by kNN, and
fine-tuned whole on 10% of the labels (`simclr finetune`'s protocol, FINETUNE_EPOCHS epochs for every row),
scored on the validation split. Each final row (the chosen variant, the original design, other families)
is probed and fine-tuned once on the test split. Each distinct architecture among the final rows has an
untrained floor, named by its architecture: that network untrained, probed and fine-tuned from scratch
(`simclr finetune --compare`'s random-init twin) on both splits. One table, all measured here;
report.json keeps every figure and the seconds each probe and fine-tune took.

    python benchmarks/quality.py --data-root DIR                # DIR holds cifar-10-batches-py/
    python benchmarks/quality.py --data-root DIR --budget-min 3 # a quicker look
    python benchmarks/quality.py --data-root DIR --methods      # simclr, moco, byol, dino and mae (--only NAME)
    python benchmarks/quality.py --data-root DIR --try t01=loss.temperature=0.1 --try b256=train.batch_size=256
    python benchmarks/quality.py --data-root DIR --no-baseline --family vit=examples/cpu-vit.yaml   # other backbones

With --methods, each method runs its recipe (METHOD_SETTINGS) for the same wall-clock, every row final; a
momentum method's extra forward pass through its target network costs it steps.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from simclr_cli.config import load_config
from simclr_cli.models.encoder_file import load_encoder
from simclr_cli.score.finetune import FinetuneOptions, partial_path, run_finetune
from simclr_cli.score.probe import run_probe
from simclr_cli.train import Trainer

CALIBRATION_STEPS = 5
BUDGET_USE = 0.92  # first plan, from calibration: leaves room for an unmeasured data load
DEADLINE_USE = 0.97  # re-plans aim the last step here: room for the last log window and the encoder write


# Each method's recipe (None: --recipe, the CPU recipe) and its changes to it for a short budget on a CPU.
# Chosen by reading the papers' and solo-learn's CIFAR settings, not by a search here: a lower final
# momentum than 1.0 (the target must move within a few thousand steps), moco's temperature between the
# recipe's 0.05 and MoCo v2's 0.2, byol's projector and predictor 256 wide (the width-8 encoder's h has 64
# dimensions). dino and mae run their own recipes as written (mae's ViT: a masked autoencoder needs patches).
METHOD_SETTINGS = {
    "simclr": (None, []),
    "moco": (None, ["method.name=moco", "loss.temperature=0.1", "method.moco.queue_size=4096",
                    "method.moco.momentum=0.99", "method.moco.momentum_end=0.999"]),
    "byol": (None, ["method.name=byol", "model.head_hidden=256", "method.byol.predictor_hidden=256",
                    "method.byol.momentum=0.99", "method.byol.momentum_end=0.999"]),
    "dino": ("examples/cpu-dino.yaml", []),
    "mae": ("examples/cpu-mae.yaml", []),
}

# Fine-tuning, the same for every row and floor: `simclr finetune`'s protocol (the SimCLR paper's: batch
# 256, SGD lr 0.05 with Nesterov momentum and a cosine, crops and flips, no weight decay; from h, seed 0) on
# a class-balanced 10% of the labels (4,500 of the 45,000 images the validation split leaves; 5,000 of the
# 50,000 for the test split), for 5 epochs rather than the paper's 30: on 2 AVX2 cores in fp32 one such
# fine-tune of the width-8 ResNet took 27-34 s, of cpu-mae.yaml's ViT 103-122 s (its scoring included).
FINETUNE_LABELS = "10%"
FINETUNE_EPOCHS = 5


class BudgetSpent(Exception):
    pass


def calibrate(cfg) -> tuple[float, int]:
    """(training steps per second, steps per epoch) of a config, from a few steps on this machine."""
    trainer = Trainer(cfg)
    batch = trainer.data.images[: trainer.local_batch]
    for _ in range(2):  # warm-up: first-call allocations
        trainer.train_step(batch).item()
    start = time.perf_counter()
    for _ in range(CALIBRATION_STEPS):
        trainer.train_step(batch).item()
    return CALIBRATION_STEPS / (time.perf_counter() - start), trainer.steps_per_epoch


def replan(step: int, now: float, first: tuple[int, float] | None, deadline: float, planned: int) -> int:
    """The step the budget allows, from the run's own speed between its first log (`first`: step, time) and
    now; `planned` until two logs have been seen."""
    if first is None or step <= first[0] or now <= first[1]:
        return planned
    rate = (step - first[0]) / (now - first[1])
    return max(step, step + int((deadline - now) * rate))


def pretrain_for(config: str, data_dir: str, out: Path, budget_s: float, extra: list[str], watch=None) -> dict:
    """`watch(event, data)`, if given, sees every event of the run before the budget's own watch (a caller's
    timing: benchmarks/gpu.py times the steps from the first one)."""
    overrides = [f"data.root={data_dir}", "data.download=false", f"train.output_dir={out}", "train.eval_every=0",
                 "train.checkpoint_every=1000000"] + extra
    cfg = load_config(config, overrides)
    rate, steps_per_epoch = calibrate(cfg)
    plan = {"steps": max(1, int(budget_s * BUDGET_USE * rate)), "first": None}
    # Epochs with headroom: the run may prove faster than its calibration; the stop below ends it.
    epochs = 2 * math.ceil(plan["steps"] / steps_per_epoch) + 1
    cfg = load_config(config, overrides + [f"train.epochs={epochs}"])
    start = time.perf_counter()
    deadline = start + budget_s * DEADLINE_USE

    def aim() -> None:  # warmup + cosine: the decay ends at the planned step, not at an epoch's end
        if per_step is not None and per_step.decay:
            per_step.total_steps = max(plan["steps"], per_step.warmup_steps + 1)

    def steer(event: str, data: dict) -> None:
        if watch is not None:
            watch(event, data)
        if event != "log":
            return
        now = time.perf_counter()
        plan["steps"] = replan(data["step"], now, plan["first"], deadline, plan["steps"])
        plan["first"] = plan["first"] or (data["step"], now)
        aim()
        if data["step"] >= plan["steps"] or now - start > budget_s:
            raise BudgetSpent()

    trainer = Trainer(cfg, steer)
    per_step = getattr(trainer.scheduler, "per_step", None)
    aim()
    try:
        trainer.run()
        stopped = False
    except BudgetSpent:
        stopped = time.perf_counter() - start > budget_s
    encoder = trainer.write_encoder()
    return {"encoder": str(encoder), "steps_planned": plan["steps"], "epochs_done": trainer.state.epoch,
            "steps": trainer.state.step, "train_s": time.perf_counter() - start, "hit_budget": stopped,
            "steps_per_s": rate, "steps_per_epoch": trainer.steps_per_epoch}


def probe_both(encoder: str, data_dir: str, random_init: bool, splits: tuple[str, ...], labels: str = "all") -> dict:
    """kNN and linear top-1 on each of `splits` ("val", "test"); each with its seconds (`probe_s`: loading,
    features, kNN and the linear fit). `labels`: --probe-labels, smoke runs only."""
    out = {}
    for split in splits:
        res = run_probe(encoder, "cifar10", data_dir, random_init=random_init, split=split, labels=labels)
        model = "random_init" if random_init else "trained"
        out[split] = {**res["results"][model], "probe_s": res["timing"]["total_s"]}
    return out


def fine_tune(encoder: str, data_dir: str, split: str, compare: bool) -> dict:
    """`simclr finetune`'s report for the encoder on FINETUNE_LABELS, scored on `split`. Its results: the
    encoder fine-tuned ("pretrained"); with `compare`, also its untrained twin fine-tuned from scratch
    ("random_init": the floor, the same network `run_probe(random_init=True)` probes) and the frozen linear
    probe on the same labels ("linear_probe"). The classifier is written beside the encoder."""
    output = Path(encoder).with_name(f"classifier-{split}.pth")
    partial_path(output).unlink(missing_ok=True)  # an earlier invocation's, of an encoder since overwritten
    opts = FinetuneOptions(dataset="cifar10", root=data_dir, download=False, labels=FINETUNE_LABELS, split=split,
                           epochs=FINETUNE_EPOCHS, compare=compare)
    return run_finetune(encoder, output, opts)


def architecture(encoder: str) -> dict:
    """What an encoder file builds (its spec) at what image size: final rows that share it share a floor."""
    loaded = load_encoder(encoder)
    return {**loaded.encoder.describe(), "image_size": loaded.image_size}


def floor_names(rows: dict, finals: list[str]) -> dict[str, str]:
    """{final row: its floor's name} for the first final row (the chosen first) of each architecture:
    'untrained resnet18 w8', or h's size where it has no width ('untrained timm:vit_tiny_patch16_224 h96')."""
    firsts, names = {}, {}
    for name in finals:
        firsts.setdefault(json.dumps(rows[name]["arch"], sort_keys=True), name)
    for name in firsts.values():
        a = rows[name]["arch"]
        label = f"untrained {a['arch']} " + (f"w{a['width']}" if "width" in a else f"h{a['feature_dim']}")
        names[name] = label if label not in names.values() else f"{label} ({name}'s)"
    return names


def plan_rows(args) -> list[tuple[str, str, list[str]]]:
    """(row name, recipe, overrides) in the order they pretrain; --set reaches the rows of --recipe only."""
    if args.methods:
        return [(name, recipe or args.recipe, [*extra, *args.set] if recipe is None else extra)
                for name, (recipe, extra) in METHOD_SETTINGS.items() if not args.only or name in args.only]
    tries = [(f"cpu recipe + {t.split('=', 1)[0]}", args.recipe, [*args.set, *t.split("=", 1)[1].split(",")])
             for t in args.tries]
    families = [(f"{f.split('=', 1)[0]} recipe", f.split("=", 1)[1], []) for f in args.families]
    baseline = [] if args.no_baseline else [("original design", args.baseline, [])]
    return [("cpu recipe", args.recipe, args.set), *tries, *families, *baseline]


def pick_finals(args, rows: dict) -> tuple[str, list[str]]:
    """The variant chosen on validation kNN, and the rows whose test split is scored: with --methods every
    method's; else the chosen variant, the original design and the other families."""
    candidates = list(rows) if args.methods else [n for n in rows if n.startswith("cpu recipe")]
    chosen = max(candidates, key=lambda n: rows[n]["val"]["knn_top1"])
    others = [n for n in rows if n != chosen and (args.methods or n == "original design" or
                                                  n.endswith(" recipe") and n != "cpu recipe")]
    return chosen, [chosen, *others]


def pretrain_rows(args, out: Path, rows: dict) -> dict:
    """Every planned row pretrained for the budget and probed on the validation split, into `rows`."""
    for name, config, extra in plan_rows(args):
        print(f"pretraining {name} ({config} {' '.join(extra)}) for {args.budget_min:g} min ...", flush=True)
        run = pretrain_for(config, args.data_dir, out / name.replace(" ", "-").replace("+", "plus"),
                           args.budget_min * 60, extra)
        epochs = run["steps"] / run["steps_per_epoch"]
        print(f"  {run['steps']} steps ({epochs:.2f} epochs) in {run['train_s']:.0f} s", flush=True)
        val = probe_both(run["encoder"], args.data_dir, False, ("val",), args.probe_labels)["val"]
        rows[name] = {"run": run, "recipe": config, "overrides": extra, "arch": architecture(run["encoder"]),
                      "note": f"{epochs:.2f} ep, {run['steps']} steps, {run['train_s']:.0f} s", "val": val}
        print(f"  validation: kNN {pct(val['knn_top1'])}, linear {pct(val['linear_top1'])} "
              f"({val['probe_s']:.0f} s)", flush=True)
    return rows


def score_row(args, rows: dict, name: str, final: bool, floor: str | None) -> dict:
    """A row's fine-tune on the validation split; a final row's test probe and fine-tune; where it stands
    for an architecture, that architecture's floor (probed untrained, fine-tuned from scratch) on both.
    Returns the fine-tuning protocol, the same for every row."""
    row, encoder = rows[name], rows[name]["run"]["encoder"]
    if final:
        row["test"] = probe_both(encoder, args.data_dir, False, ("test",), args.probe_labels)["test"]
    if floor is not None:
        untrained = probe_both(encoder, args.data_dir, True, ("val", "test"), args.probe_labels)
        rows[floor] = {**untrained, "note": "-", "run": None, "arch": row["arch"], "floor_of": name, "finetune": {}}
    row["finetune"], row["linear_10pct"] = {}, {}
    for split in ("val", "test") if final else ("val",):
        report = fine_tune(encoder, args.data_dir, split, floor is not None)
        row["finetune"][split] = report["results"]["pretrained"]
        if floor is not None:
            rows[floor]["finetune"][split] = report["results"]["random_init"]
            row["linear_10pct"][split] = report["results"]["linear_probe"]  # frozen, on the same labels
        done = ", ".join(f"{m} {100 * r['top1']:.2f}% in {r['seconds']:.0f} s" for m, r in report["results"].items())
        print(f"  {split} fine-tune top-1: {done}", flush=True)
    return report["protocol"]


def pct(value) -> str:
    return f"{100 * value:8.2f}%" if value is not None else "       -"


def print_table(report: dict) -> None:
    rows = report["runs"]
    width = max(len(n) for n in rows) + 1
    print(f"\nCIFAR-10, pretraining budget {report['budget_min']:g} min each on this machine; chosen on val: "
          f"{report['chosen']}; ft: fine-tuned on {FINETUNE_LABELS} of the labels for {FINETUNE_EPOCHS} epochs")
    print(f"{'encoder':<{width}} {'val kNN':>9} {'val lin':>9} {'val ft':>9} {'test kNN':>9} {'test lin':>9} "
          f"{'test ft':>9}  pretraining")
    for name, r in rows.items():
        v, t, ft = r["val"], r.get("test", {}), r.get("finetune", {})
        print(f"{name:<{width}} {pct(v['knn_top1'])} {pct(v['linear_top1'])} {pct(ft.get('val', {}).get('top1'))} "
              f"{pct(t.get('knn_top1'))} {pct(t.get('linear_top1'))} {pct(ft.get('test', {}).get('top1'))}  "
              f"{r['note']}")
    print("\n".join(f"{name}: {json.dumps(r['arch'])}" for name, r in rows.items() if r.get("floor_of")))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", "--data-dir", dest="data_dir", required=True, help="holds cifar-10-batches-py/")
    p.add_argument("--budget-min", type=float, default=10.0, help="pretraining wall-clock per recipe, minutes")
    p.add_argument("--recipe", default="examples/cpu.yaml", help="the CPU recipe")
    p.add_argument("--baseline", default="examples/baseline.yaml", help="the original design")
    p.add_argument("--out", default="runs/quality", help="run directories and report.json")
    p.add_argument("--set", action="append", default=[], help="override for the CPU recipe's rows only")
    p.add_argument("--try", dest="tries", action="append", default=[],
                   help="a variant of the CPU recipe, NAME=key=value[,key=value]; chosen on the validation split")
    p.add_argument("--methods", action="store_true", help="compare the methods of METHOD_SETTINGS instead")
    p.add_argument("--only", action="append", default=[], choices=list(METHOD_SETTINGS),
                   help="with --methods: this method only (repeatable)")
    p.add_argument("--family", dest="families", action="append", default=[],
                   help="NAME=RECIPE.yaml: another backbone's recipe, a final row of its own (test scored once)")
    p.add_argument("--no-baseline", action="store_true", help="leave out the original design's row")
    p.add_argument("--probe-labels", default="all", help="smoke runs only: fit the probes (and the kNN bank) on this "
                   "share of the labels, e.g. 10%%; the table's figures are measured with all")
    args = p.parse_args()
    if args.only and not args.methods:
        p.error("--only picks among the methods: add --methods")
    return args


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    report = {"budget_min": args.budget_min, "probe_labels": args.probe_labels,
              "finetune": {"labels": FINETUNE_LABELS, "epochs": FINETUNE_EPOCHS}}
    report["runs"] = rows = pretrain_rows(args, out, {})
    report["chosen"], finals = pick_finals(args, rows)
    report["finals"], floors = finals, floor_names(rows, finals)
    for name in list(rows):  # floors join `rows` as their architecture's first final row is scored
        print(f"scoring {name} ...", flush=True)
        report["finetune"]["protocol"] = score_row(args, rows, name, name in finals, floors.get(name))
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))  # each row's, as it ends
    print_table(report)


if __name__ == "__main__":
    main()
