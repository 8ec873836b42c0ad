"""The 60,000 CIFAR-10 images as tar shards against the same images as a folder: same recipe, seed and budget.

Writes the folder's train/ and test/ as shards with `simclr shards` (1,000 samples each), serves them from an
S3 endpoint on 127.0.0.1 (moto), and runs the README's quickstart recipe (examples/quickstart.yaml, 3 epochs of
390 steps) through the CLI, one process at a time:
  folder s0, s1       data.dataset=folder on the JPEG folder (its decoded cache), seeds 0 and 1: the noise
  shards s0, s1       data.dataset=webdataset on the local shards, seeds 0 and 1
  s3 s0, resumed      the same shards through s3:// URLs, stopped with SIGINT mid-epoch 2 and resumed: its
                      encoder must equal local shards s0's tensor for tensor (S3 reads the same bytes, and a
                      resume goes on with exactly the samples the unbroken run would have seen)
Every encoder is probed on the folder (kNN and linear, test split); shards s0's also through the shards, local
and on S3 (`--dataset webdataset`), which must give the folder's figures. `simclr embed` of the test shards,
local and on S3, must give the folder's vectors row for row (matched by each sample's path in its .json).
Each pretraining run's maximum resident set comes from /usr/bin/time -v (the main process).

    python3 ../shared/data/make_cifar10.py DIR --folder
    python benchmarks/stream_parity.py --jpeg DIR/cifar10-jpeg --work /tmp/parity    # about 32 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from loopback_s3 import s3_store  # benchmarks/loopback_s3.py

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
TIMED = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []


def simclr(*args: str, stdout=None) -> subprocess.CompletedProcess:
    done = subprocess.run([*TIMED, sys.executable, "-m", "simclr_cli", *args], stdout=stdout or subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"simclr {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def peak_mb(stderr: str) -> float:
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(found.group(1)) / 1024 if found else float("nan")


def pretrain_args(out: Path, data: list[str], seed: int) -> list[str]:
    sets = [*data, f"train.seed={seed}", "train.device=cpu"]
    return ["pretrain", "--config", str(RECIPE), "-o", str(out), *[x for s in sets for x in ("--set", s)]]


def pretrain(out: Path, data: list[str], seed: int) -> dict:
    if not (out / "encoder.pth").exists():
        t0 = time.perf_counter()
        done = simclr(*pretrain_args(out, data, seed))
        (out / "parity.json").write_text(json.dumps({"peak_mb": peak_mb(done.stderr),
                                                     "wall_s": time.perf_counter() - t0}))
    return json.loads((out / "parity.json").read_text())


def pretrain_interrupted(out: Path, data: list[str], seed: int, stop_after: int) -> dict:
    """Start the run, send SIGINT once metrics.jsonl shows step `stop_after`, then `--resume` it to the end."""
    if not (out / "encoder.pth").exists():
        t0 = time.perf_counter()
        run = subprocess.Popen([*TIMED, sys.executable, "-m", "simclr_cli", *pretrain_args(out, data, seed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while run.poll() is None and last_step(out) < stop_after:
            time.sleep(0.5)
        stopped_at = last_step(out)
        os.kill(child_pid(run.pid) if TIMED else run.pid, signal.SIGINT)
        first = run.communicate()[1]
        if run.returncode != 130 or not (out / "checkpoint.pt").exists():
            raise SystemExit(f"the stopped run ended with {run.returncode}, not a checkpoint:\n{first[-3000:]}")
        resumed_at = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
        done = simclr("pretrain", "--resume", "-o", str(out))
        (out / "parity.json").write_text(json.dumps({
            "peak_mb": max(peak_mb(first), peak_mb(done.stderr)), "wall_s": time.perf_counter() - t0,
            "stopped_after_step": stopped_at, "resumed_at_step": resumed_at}))
    return json.loads((out / "parity.json").read_text())


def last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(x).get("step", 0) for x in lines if x.strip().endswith("}")]
    return max(steps, default=0)


def child_pid(pid: int) -> int:
    """/usr/bin/time's child (the simclr process), which the signal is for."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else pid


def probe(encoder: Path, dataset: str, data_dir: str, out: Path) -> dict:
    if not out.exists():
        simclr("probe", str(encoder), "--dataset", dataset, "--data-dir", data_dir, "--json", str(out))
    return json.loads(out.read_text())


def embed(encoder: Path, source: str, out: Path) -> tuple[np.ndarray, list[str]]:
    if not out.with_suffix(".txt").exists():
        simclr("embed", source, "-e", str(encoder), "-o", str(out), "--paths", str(out.with_suffix(".txt")))
    return np.load(out), out.with_suffix(".txt").read_text().splitlines()


def key_paths(shards: Path) -> dict[str, str]:
    """Each test sample's key -> the folder path its .json names (relative to the folder)."""
    found = {}
    for tar in sorted(shards.glob("test-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    found[m.name[:-5]] = json.load(t.extractfile(m))["path"]
    return found


def tensors(obj, name: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a loaded file, by its path of keys."""
    if isinstance(obj, torch.Tensor):
        return {name: obj}
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in tensors(value, f"{name}/{key}").items()}
    return {}


def same_tensors(a: Path, b: Path) -> bool:
    x, y = tensors(torch.load(a, weights_only=True)), tensors(torch.load(b, weights_only=True))
    return len(x) > 0 and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def matched_rows(folder: tuple[np.ndarray, list[str]], shards: tuple[np.ndarray, list[str]],
                 keys: dict[str, str]) -> tuple[int, float]:
    """(rows matched, largest absolute difference) between the folder's vectors and the shards', each shard
    row (URL#KEY) matched to the folder row of the path its .json names."""
    at = {str(Path(p).as_posix()): i for i, p in enumerate(folder[1])}
    pairs = []
    for j, name in enumerate(shards[1]):
        path = keys[name.rsplit("#", 1)[1]]
        i = next((at[p] for p in (path, path.split("/", 1)[-1]) if p in at), None)
        if i is None:
            i = next(i for p, i in at.items() if p.endswith("/" + path))
        pairs.append((i, j))
    rows_f, rows_s = zip(*pairs)
    return len(pairs), float(np.abs(folder[0][list(rows_f)] - shards[0][list(rows_s)]).max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jpeg", type=Path, required=True, help="the image folder with train/<class>/ and test/<class>/")
    p.add_argument("--work", type=Path, default=Path("/tmp/simclr-stream-parity"), help="shards, runs, probes")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (simclr shards --max-count)")
    p.add_argument("--stop-after", type=int, default=580, help="step after which the S3 run gets SIGINT")
    p.add_argument("--set", action="append", default=[], help="a config override for every run (a quick look)")
    args = p.parse_args()
    jpeg, work = args.jpeg.resolve(), args.work.resolve()
    shards = work / "shards"
    t0 = time.perf_counter()
    simclr("shards", str(jpeg), str(shards), "--max-count", str(args.per_shard))
    index = json.loads((shards / "index.json").read_text())
    pattern = {s: index["series"][s]["pattern"] for s in ("train", "test")}
    print(f"shards: {sum(len(s['shards']) for s in index['series'].values())} in {shards} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    runs, cache = work / "runs", f"data.cache_dir={work / 'cache'}"
    with s3_store({"cifar": shards}, work) as bucket:
        s3 = f"{bucket}/cifar"
        data = {"folder": ["data.dataset=folder", f"data.root={jpeg}", cache],
                "shards": ["data.dataset=webdataset", f"data.webdataset.urls=['{shards}']", cache],
                "s3": ["data.dataset=webdataset", f"data.webdataset.urls=['{s3}/{pattern['train']}']", cache]}
        data = {way: [*sets, *args.set] for way, sets in data.items()}
        done = {f"{way} s{seed}": pretrain(runs / f"{way}-s{seed}", data[way], seed)
                for way in ("folder", "shards") for seed in (0, 1)}
        done["s3 s0, resumed"] = pretrain_interrupted(runs / "s3-s0", data["s3"], 0, args.stop_after)
        dirs = {name: runs / name.split(",")[0].replace(" ", "-") for name in done}
        probes = {name: probe(d / "encoder.pth", "folder", str(jpeg), work / f"probe-{d.name}.json")
                  for name, d in dirs.items()}
        enc = runs / "shards-s0" / "encoder.pth"
        probes["shards s0, probed on local shards"] = probe(enc, "webdataset", str(shards), work / "probe-wds.json")
        probes["shards s0, probed on S3 shards"] = probe(enc, "webdataset", s3, work / "probe-s3.json")
        vectors = {"folder": embed(enc, str(jpeg / "test"), work / "embed-folder.npy"),
                   "shards": embed(enc, str(shards / pattern["test"]), work / "embed-shards.npy"),
                   "s3": embed(enc, f"{s3}/{pattern['test']}", work / "embed-s3.npy")}
    report(done, probes, vectors, key_paths(shards), work, same_tensors(enc, runs / "s3-s0" / "encoder.pth"))


def report(done: dict, probes: dict, vectors: dict, keys: dict, work: Path, s3_equal: bool) -> None:
    rows = []
    for name, figures in probes.items():
        trained = figures["results"]["trained"]
        run = done.get(name, {})
        rows.append({"run": name, "knn": 100 * trained["knn_top1"], "linear": 100 * trained["linear_top1"],
                     "peak_mb": run.get("peak_mb"), "wall_s": run.get("wall_s")})
    n, gap = matched_rows(vectors["folder"], vectors["shards"], keys)
    same_s3 = bool(np.array_equal(vectors["shards"][0], vectors["s3"][0])) and [
        r.split("#")[1] for r in vectors["shards"][1]] == [r.split("#")[1] for r in vectors["s3"][1]]
    resumed = done["s3 s0, resumed"]
    summary = {"rows": rows, "embed_rows_matched": n, "embed_max_abs_diff_folder_vs_shards": gap,
               "embed_s3_equals_local": same_s3, "s3_resumed_encoder_equals_local_shards_s0": s3_equal,
               "s3_stopped_after_step": resumed["stopped_after_step"], "s3_resumed_at_step": resumed["resumed_at_step"]}
    (work / "parity.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{torch.__version__}, {os.cpu_count()} CPUs; examples/quickstart.yaml, 3 epochs; probes on the folder's "
          "test split unless named")
    print("| run | kNN % | linear % | peak RSS (MB) | wall (s) |\n|---|---|---|---|---|")
    for r in rows:
        extra = (f"{r['peak_mb']:.0f} | {r['wall_s']:.0f}" if r["peak_mb"] is not None else " | ")
        print(f"| {r['run']} | {r['knn']:.2f} | {r['linear']:.2f} | {extra} |")
    print(f"S3 run stopped after step {resumed['stopped_after_step']}, resumed at step "
          f"{resumed['resumed_at_step']}: encoder equal to local shards s0 tensor for tensor: {s3_equal}")
    print(f"embed of the test shards: {n} rows matched to the folder's by path, largest |difference| {gap:.3g}; "
          f"S3 rows equal to local: {same_s3}")


if __name__ == "__main__":
    main()
