"""Representation quality at equal wall-clock: the CPU recipe against the original design, and untrained.

Each recipe pretrains on the real CIFAR-10 copy for a fixed wall-clock budget (default 10 minutes): a few
calibration steps measure its speed and plan where the cosine schedule ends; at every log the plan is
redone from the speed measured so far in the run, so the decay ends, and training stops, at the step the
budget allows (a fraction of an epoch counts). A hard stop at the budget catches a machine that slows.
Then every encoder, and an untrained one of each architecture, is probed on the validation split (a fixed
5,000 of the training images; the rest fit the probe and are the kNN bank): that is what chooses among the
CPU recipe's variants (`--try`). The test split is probed once per final row: the chosen variant, the
original design and the untrained floors. One table, all measured here.

    python benchmarks/quality.py --data-root DIR                # DIR holds cifar-10-batches-py/
    python benchmarks/quality.py --data-root DIR --budget-min 3 # a quicker look
    python benchmarks/quality.py --data-root DIR --methods      # simclr, moco and byol on the CPU recipe
    python benchmarks/quality.py --data-root DIR --try t01=loss.temperature=0.1 --try b256=train.batch_size=256
    python benchmarks/quality.py --data-root DIR --no-baseline --family vit=examples/cpu-vit.yaml   # other backbones

With --methods, each method runs the CPU recipe with its own short-budget settings (METHOD_SETTINGS) for
the same wall-clock: a momentum method's extra forward pass through its target network costs it steps.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from simclr_cli.config import load_config
from simclr_cli.score.probe import run_probe
from simclr_cli.train import Trainer

CALIBRATION_STEPS = 5
BUDGET_USE = 0.92  # first plan, from calibration: leaves room for an unmeasured data load
DEADLINE_USE = 0.97  # re-plans aim the last step here: room for the last log window and the encoder write


# Each method's changes to the CPU recipe for a short budget on a CPU. Chosen by reading the papers' and
# solo-learn's CIFAR settings, not by a search here: a lower final momentum than 1.0 (the target must move
# within a few thousand steps), moco's temperature between the recipe's 0.05 and MoCo v2's 0.2, byol's
# projector and predictor 256 wide (the width-8 encoder's h has 64 dimensions).
METHOD_SETTINGS = {
    "simclr": [],
    "moco": ["method.name=moco", "loss.temperature=0.1", "method.moco.queue_size=4096",
             "method.moco.momentum=0.99", "method.moco.momentum_end=0.999"],
    "byol": ["method.name=byol", "model.head_hidden=256", "method.byol.predictor_hidden=256",
             "method.byol.momentum=0.99", "method.byol.momentum_end=0.999"],
}


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


def probe_both(encoder: str, data_dir: str, random_init: bool, test: bool) -> dict:
    """kNN and linear top-1 on the validation split, and on the test split when `test`."""
    out = {}
    for split in ("val", "test") if test else ("val",):
        res = run_probe(encoder, "cifar10", data_dir, random_init=random_init, split=split)
        out[split] = res["results"]["random_init" if random_init else "trained"]
    return out


def plan_rows(args) -> list[tuple[str, str, list[str]]]:
    if args.methods:
        return [(name, args.recipe, [*extra, *args.set]) for name, extra in METHOD_SETTINGS.items()]
    tries = [(f"cpu recipe + {t.split('=', 1)[0]}", args.recipe, [*args.set, *t.split("=", 1)[1].split(",")])
             for t in args.tries]
    families = [(f"{f.split('=', 1)[0]} recipe", f.split("=", 1)[1], []) for f in args.families]
    baseline = [] if args.no_baseline else [("original design", args.baseline, [])]
    return [("cpu recipe", args.recipe, args.set), *tries, *families, *baseline]


def pct(value) -> str:
    return f"{100 * value:8.2f}%" if value is not None else "       -"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", "--data-dir", dest="data_dir", required=True, help="folder holding cifar-10-batches-py/ (data.root)")
    p.add_argument("--budget-min", type=float, default=10.0, help="pretraining wall-clock per recipe, minutes")
    p.add_argument("--recipe", default="examples/cpu.yaml", help="the CPU recipe")
    p.add_argument("--baseline", default="examples/baseline.yaml", help="the original design")
    p.add_argument("--out", default="runs/quality", help="run directories and report.json")
    p.add_argument("--set", action="append", default=[], help="override for the CPU recipe only")
    p.add_argument("--try", dest="tries", action="append", default=[],
                   help="a variant of the CPU recipe, NAME=key=value[,key=value]; chosen on the validation split")
    p.add_argument("--methods", action="store_true", help="compare simclr, moco and byol on the CPU recipe instead")
    p.add_argument("--family", dest="families", action="append", default=[],
                   help="NAME=RECIPE.yaml: another backbone's recipe, a final row of its own (test scored once)")
    p.add_argument("--no-baseline", action="store_true", help="leave out the original design's row")
    args = p.parse_args()
    out = Path(args.out)
    rows, report = {}, {"budget_min": args.budget_min, "runs": {}}
    for name, config, extra in plan_rows(args):
        print(f"pretraining {name} ({config} {' '.join(extra)}) for {args.budget_min:g} min ...", flush=True)
        run = pretrain_for(config, args.data_dir, out / name.replace(" ", "-").replace("+", "plus"),
                           args.budget_min * 60, extra)
        epochs = run["steps"] / run["steps_per_epoch"]
        print(f"  {run['steps']} steps ({epochs:.2f} epochs) in {run['train_s']:.0f} s", flush=True)
        rows[name] = {"run": run, "note": f"{epochs:.2f} ep, {run['steps']} steps, {run['train_s']:.0f} s",
                      "val": probe_both(run["encoder"], args.data_dir, False, False)["val"]}
        print(f"  validation: kNN {pct(rows[name]['val']['knn_top1'])}, linear {pct(rows[name]['val']['linear_top1'])}",
              flush=True)
    candidates = [n for n in rows if n.startswith("cpu recipe")] if not args.methods else list(rows)
    chosen = max(candidates, key=lambda n: rows[n]["val"]["knn_top1"])
    finals = [chosen] + ([n for n in rows if n == "original design" or n.endswith(" recipe") and n != "cpu recipe"]
                         if not args.methods else
                         [n for n in rows if n != chosen])
    for name in finals:  # the test split, once per final row (and for the untrained floor of each architecture)
        rows[name]["test"] = probe_both(rows[name]["run"]["encoder"], args.data_dir, False, True)["test"]
        if not args.methods or name == chosen:
            both = probe_both(rows[name]["run"]["encoder"], args.data_dir, True, True)
            rows[f"untrained ({name} arch)"] = {"val": both["val"], "test": both["test"], "note": "-", "run": None}
    report["runs"] = rows
    report["chosen"] = chosen
    print(f"\nCIFAR-10, pretraining budget {args.budget_min:g} min each on this machine; chosen on val: {chosen}")
    print(f"{'encoder':<34} {'val kNN':>9} {'val lin':>9} {'test kNN':>9} {'test lin':>9}  pretraining")
    for name, r in rows.items():
        t = r.get("test", {})
        print(f"{name:<34} {pct(r['val']['knn_top1'])} {pct(r['val']['linear_top1'])} {pct(t.get('knn_top1'))} "
              f"{pct(t.get('linear_top1'))}  {r['note']}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
