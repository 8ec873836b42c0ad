"""The pretraining methods: simclr, moco (momentum encoder + queue), byol and dino, on one loop (dino's own
cases, and multi-crop, in tests/test_dino.py).

Each loss against a slow oracle written from its paper's pseudocode, the EMA update and its momentum
schedule, the queue (wrap-around, dtype), two gloo ranks (the queue gets both ranks' keys; gradients equal
one process on the global batch), bit-exact resume mid-epoch, and the CLI chain for every method.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import straight_and_resumed, tiny_set_args
from PIL import Image
from ranks import run_ranks  # tests/ranks.py
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.methods.byol import byol_loss
from simclr_cli.methods.ema import EmaTarget, momentum_at
from simclr_cli.methods.moco import KeyQueue, gather_rows, info_nce_with_queue
from simclr_cli.train.state import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = ("simclr", "moco", "byol", "dino")
RUN = {"method.moco.queue_size": 40, "method.dino.prototypes": 16, "method.dino.hidden": 32,
       "method.dino.bottleneck": 16, "optim.warmup_epochs": 1}  # on top of the shared tiny run (tests/conftest.py)


# --- the losses against their papers' pseudocode ---------------------------------------------------------

def moco_oracle(q, k, queue, t):
    """MoCo's Algorithm 1, one query at a time in float64: l_pos = q.k, l_neg = q.queue, CE on label 0."""
    total = 0.0
    for i in range(len(q)):
        qi, ki = q[i].double() / q[i].double().norm(), k[i].double() / k[i].double().norm()
        l_pos = (qi @ ki) / t
        l_neg = [(qi @ queue[j].double()) / t for j in range(len(queue))]
        total += -(l_pos - torch.logsumexp(torch.stack([l_pos, *l_neg]), 0))
    return total / len(q)


def byol_oracle(p, z):
    """BYOL eq. 2: the squared distance of the unit vectors, one pair at a time in float64."""
    return sum(((p[i].double() / p[i].double().norm() - z[i].double() / z[i].double().norm()) ** 2).sum()
               for i in range(len(p))) / len(p)


def test_moco_loss_matches_algorithm_1():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 8, generator=g)
    queue = F.normalize(torch.randn(10, 8, generator=g), dim=1)
    for t in (0.07, 0.2, 1.0):
        assert info_nce_with_queue(q, k, queue, t).item() == pytest.approx(moco_oracle(q, k, queue, t).item(),
                                                                           rel=1e-5)


def test_byol_loss_matches_eq_2_and_sends_no_gradient_into_the_target():
    g = torch.Generator().manual_seed(1)
    p, z = torch.randn(2, 5, 8, generator=g)
    p.requires_grad_(), z.requires_grad_()
    loss = byol_loss(p, z)
    assert loss.item() == pytest.approx(byol_oracle(p, z).item(), rel=1e-6)
    assert byol_loss(z, z).item() == pytest.approx(0.0, abs=1e-6) and 0 <= loss.item() <= 4
    loss.backward()
    assert z.grad is None and p.grad is not None


# --- EMA and its momentum schedule ----------------------------------------------------------------------

def test_momentum_rises_on_a_cosine_from_base_to_end():
    assert momentum_at(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99, 1.0) == pytest.approx(1.0) == momentum_at(150, 100, 0.99, 1.0)
    assert momentum_at(25, 100, 0.99, 1.0) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert momentum_at(37, 100, 0.9, 0.9) == pytest.approx(0.9)  # momentum_end = momentum: constant


def test_ema_update_moves_parameters_only():
    online = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    target = EmaTarget(online)
    assert not any(p.requires_grad for p in target.net.parameters())
    before = {k: v.clone() for k, v in target.net.state_dict().items()}
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
        online[1].running_mean.add_(5.0)
    target.update(online, 0.9)
    after = target.net.state_dict()
    for name, p in online.named_parameters():
        torch.testing.assert_close(after[name], 0.9 * before[name] + 0.1 * p.detach())
    torch.testing.assert_close(after["1.running_mean"], before["1.running_mean"])  # its own statistics


# --- the queue ------------------------------------------------------------------------------------------

def test_queue_wraps_around_keeps_fp32_unit_keys_and_the_newest():
    queue = KeyQueue(5, 4, torch.Generator().manual_seed(0))
    first, second = torch.randn(3, 4), torch.randn(3, 4)
    queue.push(first.bfloat16())
    queue.push(second)
    assert queue.keys.dtype == torch.float32 and queue.pointer == 1
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(5))
    unit = lambda x: F.normalize(x.float(), dim=1)  # noqa: E731
    torch.testing.assert_close(queue.keys[:3], torch.cat([unit(second[2:]), unit(first.bfloat16()[1:])]))
    torch.testing.assert_close(queue.keys[3:], unit(second[:2]))
    many = torch.randn(7, 4)
    queue.push(many)  # more keys than slots: the newest five, the pointer where the oldest of them went
    assert sorted(map(tuple, queue.keys.tolist())) == sorted(map(tuple, unit(many[2:]).tolist()))


# --- two gloo ranks ---------------------------------------------------------------------------------------

def _moco_rank(rank: int, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, out_dir: str) -> None:
    n = len(q) // 2
    mine = slice(rank * n, (rank + 1) * n)
    local = q[mine].clone().requires_grad_()
    loss = info_nce_with_queue(local, k[mine], queue, 0.2)
    loss.backward()
    pushed = KeyQueue(4 * n, q.shape[1])
    pushed.push(gather_rows(k[mine]))
    torch.save({"loss": loss.detach(), "grad": local.grad, "queue": pushed.keys}, os.path.join(out_dir, f"{rank}.pt"))


def test_two_ranks_fill_the_queue_with_both_ranks_keys_and_match_one_process(tmp_path):
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 8, 6, generator=g)
    queue = F.normalize(torch.randn(12, 6, generator=g), dim=1)
    run_ranks(_moco_rank, (q, k, queue, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:  # every rank holds every rank's keys, in rank order, after the first half of the slots
        torch.testing.assert_close(r["queue"][:8], F.normalize(k, dim=1))
    whole = q.clone().requires_grad_()
    single = info_nce_with_queue(whole, k, queue, 0.2)
    single.backward()
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(single.item(), abs=1e-6)
    # DDP averages parameter gradients over ranks: the per-row gradients divided by the world size.
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]) / 2, whole.grad, atol=1e-6, rtol=0)


# --- resume, bit for bit, for every method ------------------------------------------------------------------

def run_state(out) -> tuple[list, dict]:
    ckpt = load_checkpoint(out / "checkpoint.pt")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in r.items() if k not in ("views_per_s", "data_wait")} for r in lines if r["kind"] not in ("eval", "resume")]
    return metrics, {"model": ckpt["model"], **{f"method.{k}": v for k, v in ckpt["method"].items()}}


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("method", METHODS)
def test_resume_mid_epoch_is_bit_exact(tmp_path, monkeypatch, method):
    straight, stopped = straight_and_resumed(tmp_path, monkeypatch, f"method.name={method}", **RUN)
    straight, resumed = run_state(straight), run_state(stopped)
    assert straight[0] == resumed[0]  # every loss and lr
    assert_same(straight[1], resumed[1])  # weights, target network, queue and its pointer


# --- the CLI chain for every method ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_cli_chain_pretrain_extract_probe_embed(tmp_path, method):
    runner, out = CliRunner(), tmp_path / "run"
    sets = tiny_set_args(**RUN)
    r = runner.invoke(app, ["pretrain", "-o", str(out), *sets, "--set", f"method.name={method}",
                            "--set", "train.epochs=1"])
    assert r.exit_code == 0 and any(ln.split()[1:3] == ["method", method] for ln in r.stderr.splitlines()
                                    if len(ln.split()) > 2), r.output
    r = runner.invoke(app, ["extract", str(out / "checkpoint.pt"), "-o", str(tmp_path / "enc.pth")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["probe", str(tmp_path / "enc.pth"), "--dataset", "synthetic", "--synthetic-size", "40",
                            "--device", "cpu", "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["encoder"]["provenance"]["method"] == method  # the encoder file names its method
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
    r = runner.invoke(app, ["embed", str(tmp_path / "img"), "-e", str(tmp_path / "enc.pth"), "-o",
                            str(tmp_path / "v.npy"), "--num-workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "v.npy").shape == (3, 64)
