"""Two torchrun agents on this machine as two "nodes" (`--nnodes=2`, c10d rendezvous on 127.0.0.1, gloo), as
`torchrun` runs on each of two machines: one DDP step across them is one process's step, and `simclr pretrain`
under them, sharing one run directory and one folder cache, trains exactly as `simclr pretrain --nproc 2` does;
one agent SIGKILLed mid-run and started again, the other restarts its rank (--max-restarts) and, with
--auto-resume, the run ends with the unbroken run's weights.

Both agents would try to serve the rendezvous store on 127.0.0.1, so node 0 is pinned as its host (is_host).
Each agent runs in a session of its own and torchrun starts every rank in another, so no process group holds
them all: every process a test starts carries SIMCLR_TEST_NODES_RUN=<an id of its own> in its environment
(torchrun hands its environment to the ranks, forked data workers inherit it), and the clean-up after each
run, passed or failed, kills exactly the processes that carry it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_set_args
from PIL import Image
from ranks import assert_one_process, free_port, global_batch  # tests/ranks.py

from simclr_cli.files import safe_load
from simclr_cli.train.state import load_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NODE_RANK = Path(__file__).with_name("node_rank.py")  # what each rank runs
MARK = "SIMCLR_TEST_NODES_RUN"
DEADLINE_S = 150  # for all processes of one run, start-up included
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
# the shared tiny run (tests/conftest.py) on an image folder: of 64 images 52 train (3 steps of 16 an epoch), 2
# epochs, the kNN monitor at the end only, the folder decoded in the rank's own process (no DataLoader workers)
RUN = tiny_set_args("train.eval_every=0", "data.num_workers=0", dataset="folder", synthetic_size=None, epochs=2)


def _kill_marked(mark: str) -> None:
    """SIGKILL every process whose environment carries MARK=mark, until none is left."""
    needle = f"{MARK}={mark}".encode()
    for _ in range(10):
        found = 0
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
                    found += 1
            except OSError:  # gone meanwhile, or not ours to read
                pass
        if not found:
            return
        time.sleep(0.1)


def run_marked(commands: list[list[str]], logs: list[Path], env: dict) -> list[int | None]:
    """Start each command (its output to its log), wait for all within DEADLINE_S, then kill whatever is left
    of them, ranks included. Their exit codes, None for one that was still running."""
    mark = uuid.uuid4().hex
    procs = []
    try:
        procs = [_start(command, log, env, mark) for command, log in zip(commands, logs)]
        deadline = time.monotonic() + DEADLINE_S
        return [_wait(proc, deadline) for proc in procs]
    finally:
        _kill_marked(mark)
        for proc in procs:
            proc.wait()


def _start(command: list[str], log: Path, env: dict, mark: str) -> subprocess.Popen:
    """`command` in a session of its own, its output to `log`, MARK=mark in its environment."""
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**env, MARK: mark},
                                start_new_session=True)


def _wait(proc: subprocess.Popen, deadline: float) -> int | None:
    """Its exit code once it exits before `deadline` (time.monotonic), else None."""
    try:
        return proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None


def agent_command(node: int, per_node: int, port: int, run_id: str, args: list[str], *options: str,
                  conf: str = "") -> list[str]:
    """torchrun as agent `node` of two (node 0 hosts the rendezvous store), its ranks running `node_rank.py args`."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc-per-node={per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
            f"--rdzv-conf=is_host={str(node == 0).lower()},join_timeout=60{conf}", "--monitor-interval=0.1",
            *options, str(NODE_RANK), *args]


def run_nodes(folder: Path, per_node: int, args: list[str], env: dict = ENV) -> str:
    """Two torchrun agents of `per_node` ranks each, rendezvousing on 127.0.0.1, every rank running
    `node_rank.py args`; their output (folder/agent<node>.log) once both exited 0, else the test fails with it."""
    port, run_id = free_port(), f"nodes-{uuid.uuid4().hex[:12]}"
    commands = [agent_command(node, per_node, port, run_id, args) for node in (0, 1)]
    logs = [folder / f"agent{node}.log" for node in (0, 1)]
    codes = run_marked(commands, logs, env)
    text = "".join(f"--- agent {node} (exit {code}) ---\n{log.read_text()}" for node, (code, log) in
                   enumerate(zip(codes, logs)))
    assert codes == [0, 0], text[-6000:]
    return text


@pytest.mark.parametrize("per_node", [1, 2])
def test_two_nodes_give_the_loss_and_gradients_of_one_process(tmp_path: Path, per_node: int) -> None:
    """One DDP step on the ranks of two torchrun agents (per_node ranks each) gives one process's loss and grads."""
    state, x1, x2 = global_batch()
    torch.save({"state": state, "x1": x1, "x2": x2}, tmp_path / "inputs.pt")
    run_nodes(tmp_path, per_node, ["step", str(tmp_path)])
    world = 2 * per_node
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert {s["world"] for s in saved} == {world}
    assert sorted((s["node"], s["local_rank"]) for s in saved) == [(n, i) for n in (0, 1) for i in range(per_node)]
    assert_one_process([s["result"] for s in saved], state, x1, x2)


# --- simclr pretrain under two agents ---------------------------------------------------------------------


def _write_folder(root: Path, n: int = 64) -> Path:
    """n RGB images of varied sizes, PNG and JPEG, in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(16, 40, size=2)
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
        image.save(root / "ab"[i % 2] / f"{i}.{'jpg' if i % 3 else 'png'}")
    return root


@pytest.fixture(scope="module")
def node_run(tmp_path_factory) -> tuple[Path, str]:
    """`simclr pretrain` under two agents of one rank each, on one run directory and one folder cache: (its
    folder, holding images/, run/, cache/ and builds, the folder-cache builds one line each; the agents' output)."""
    base = tmp_path_factory.mktemp("nodes")
    env = {**ENV, "SIMCLR_CACHE_DIR": str(base / "cache"), "SIMCLR_TEST_BUILDS": str(base / "builds")}
    args = ["cli", "pretrain", "-o", str(base / "run"), *RUN, "--set", f"data.root={_write_folder(base / 'images')}"]
    return base, run_nodes(base, 1, args, env)


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without what the clock decides (throughput, waits, the monitor's time)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("views_per_s", "data_wait", "eval_s")} for r in lines]


def test_two_nodes_share_one_run_directory_and_one_folder_cache(node_run) -> None:
    """Under two agents the folder is decoded once into one cache, and rank 0 alone writes the run directory."""
    base, output = node_run
    assert len((base / "builds").read_text().splitlines()) == 1  # one rank decoded; the other mapped its cache
    caches = list((base / "cache").iterdir())
    assert len(caches) == 1
    assert sorted(p.name for p in caches[0].iterdir()) == [".build.lock", "images.npy", "index.json"]
    assert output.count("simclr pretrain 0.") == 1 and output.count("done: 2 epochs") == 1
    assert "16 global = 2 ranks x 8" in output
    steps = [(r["kind"], r["step"]) for r in _records(base / "run")]
    # a line every 2 steps and at each epoch's end, the kNN monitor's at the run's end: a second writer doubles them
    assert steps == [("step", 2), ("step", 3), ("epoch", 3), ("step", 5), ("step", 6), ("epoch", 6), ("eval", 6)]
    ckpt = load_checkpoint(base / "run" / "checkpoint.pt")
    assert (ckpt["world_size"], ckpt["epoch"], ckpt["step"]) == (2, 2, 6)


def _tensors(obj, name: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts and lists, by its path of keys."""
    if isinstance(obj, torch.Tensor):
        return {name: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{name}/{key}").items()}


def test_two_nodes_train_as_nproc_2_does(node_run, tmp_path: Path) -> None:
    """The run under two agents equals `simclr pretrain --nproc 2` bit for bit: weights, optimiser, every loss."""
    base, _ = node_run
    env = {**ENV, "SIMCLR_CACHE_DIR": str(tmp_path / "cache")}  # a cache of its own: built again, the same
    command = [sys.executable, "-m", "simclr_cli", "pretrain", "--nproc", "2", "-o", str(tmp_path / "run"), *RUN,
               "--set", f"data.root={base / 'images'}"]
    code = run_marked([command], [tmp_path / "nproc.log"], env)
    assert code == [0], (tmp_path / "nproc.log").read_text()[-6000:]
    assert _records(tmp_path / "run") == _records(base / "run")
    nodes, local = load_checkpoint(base / "run" / "checkpoint.pt"), load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    plain = ("epoch", "step", "history", "epoch_losses", "world_size", "train_images")
    assert [nodes[k] for k in plain] == [local[k] for k in plain] and nodes["world_size"] == 2
    assert _unequal(base / "run", tmp_path / "run") == []


def _unequal(run: Path, other: Path) -> list[str]:
    """The tensors of the two runs' checkpoint.pt (weights, BN statistics, momentum, random generators) and
    encoder.pth that are not torch.equal, by name; the test fails at once where their names differ."""
    mine, theirs = (_tensors(load_checkpoint(r / "checkpoint.pt")) for r in (run, other))
    assert mine.keys() == theirs.keys() and len(mine) > 20
    encoders = [safe_load(r / "encoder.pth")["state_dict"] for r in (run, other)]
    assert encoders[0].keys() == encoders[1].keys()
    return ([k for k in mine if not torch.equal(mine[k], theirs[k])] +
            [f"encoder.pth:{k}" for k, v in encoders[0].items() if not torch.equal(v, encoders[1][k])])


# --- one agent killed mid-run: torchrun restarts, --auto-resume continues -----------------------------------


def run_killed(folder: Path, args: list[str], env: dict, after: Path) -> tuple[list[int | None], float]:
    """Two agents (--max-restarts=1) run `node_rank.py args`; once `after` exists, agent 1 and its rank are
    SIGKILLed and agent 1 is started again, as a scheduler would (output: folder/agent0.log, agent1.log,
    agent1-again.log). The exit codes of agent 0 and the new agent 1 (None: still running at the deadline) and
    the seconds from the kill to their end; whatever is left of them is killed."""
    port, run_id = free_port(), f"elastic-{uuid.uuid4().hex[:12]}"
    conf = ",keep_alive_interval=1,keep_alive_max_attempt=2"  # a dead agent leaves the rendezvous in 2 s, not 15
    commands = [agent_command(node, 1, port, run_id, args, "--max-restarts=1", conf=conf) for node in (0, 1)]
    marks, procs = [uuid.uuid4().hex for _ in range(3)], []
    deadline = time.monotonic() + DEADLINE_S
    try:
        procs = [_start(commands[node], folder / f"agent{node}.log", env, marks[node]) for node in (0, 1)]
        while not after.exists() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.02)
        assert after.exists(), f"no {after}: agents {[p.poll() for p in procs]}\n{_logs(folder)}"
        _kill_marked(marks[1])  # agent 1 and its rank, in a session of its own
        killed = time.monotonic()
        procs.append(_start(commands[1], folder / "agent1-again.log", env, marks[2]))
        codes = [_wait(procs[0], deadline), _wait(procs[2], deadline)]
        return codes, time.monotonic() - killed
    finally:
        for mark in marks:
            _kill_marked(mark)
        for proc in procs:
            proc.wait()


def _logs(folder: Path) -> str:
    """The agents' logs in folder, the last 6000 characters."""
    return "".join(f"--- {log.name} ---\n{log.read_text()}" for log in sorted(folder.glob("agent*.log")))[-6000:]


def test_a_killed_node_restarts_and_resumes_to_the_unbroken_weights(node_run, tmp_path: Path) -> None:
    """An agent SIGKILLed mid-run and started again: both resume from checkpoint.pt and end as the unbroken run."""
    base, _ = node_run
    run = tmp_path / "run"
    env = {**ENV, "SIMCLR_CACHE_DIR": str(tmp_path / "cache"), "SIMCLR_TEST_BUILDS": str(tmp_path / "builds"),
           "SIMCLR_TEST_STEP_S": "0.5",  # 1.5 s an epoch: agent 1 is killed in epoch 2, before its first step ends
           # the agents' store shared with the ranks (torch's default) hangs a new agent in the next round: a
           # node kept from round 0 never publishes that round's MASTER_ADDR (pytorch/pytorch#135712, #147064)
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    args = ["cli", "pretrain", "-o", str(run), *RUN, "--set", f"data.root={base / 'images'}",
            "--set", "train.dist_timeout_min=0.5", "--auto-resume"]  # gloo fails at once; at worst in 30 s
    codes, seconds = run_killed(tmp_path, args, env, after=run / "checkpoint.pt")
    assert codes == [0, 0], f"exit codes {codes}\n{_logs(tmp_path)}"
    print(f"from the kill to the end: {seconds:.1f} s")
    records = _records(run)
    assert [r for r in records if r["kind"] == "resume"] == [{"kind": "resume", "epoch": 1, "step": 3}]
    assert [r for r in records if r["kind"] != "resume"] == _records(base / "run")  # every loss, the kNN top-1
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert (ckpt["world_size"], ckpt["epoch"], ckpt["step"]) == (2, 2, 6)
    assert _unequal(run, base / "run") == []
