"""Multi-crop (augment.small_crops) and progressive views (augment.view_size_start) in the pretraining loop:
the small views' shapes and loss, two gloo ranks against one process, and bit-exact resume with both on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import straight_and_resumed, tiny_config
from ranks import run_ranks  # tests/ranks.py

from simclr_cli.config import ConfigError, load_config
from simclr_cli.methods import Views
from simclr_cli.methods.simclr import SimCLRMethod, nt_xent
from simclr_cli.train import Trainer, pretrain
from simclr_cli.runtime import broadcast_buffers, wrap_ddp
from simclr_cli.train.loop import start_panel
from simclr_cli.train.state import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
# on top of the shared tiny run (tests/conftest.py)
RUN = {"optim.warmup_epochs": 1, "augment.small_crops": 2, "augment.small_crop_size": 8}
TEMPERATURE = 0.2


def test_small_views_have_their_size_and_follow_both_views(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.epochs=1", **RUN))
    shapes, original = [], trainer.augment.small

    def spy(x, generator, n, size, scale):
        small = original(x, generator, n, size, scale)
        shapes.append((tuple(small.shape), n, size, scale))
        return small
    trainer.augment.small = spy
    trainer.run()
    assert shapes and all(s == ((2 * 16, 3, 8, 8), 2, 8, (0.08, 0.35)) for s in shapes)
    assert "2 x 8 px (multi-crop)" in start_panel(trainer)["views"]


def _loss_by_hand(model, views, small, b):
    """The documented loss: NT-Xent of the two views, and of each small view with each of them (its two
    pairs averaged), all 1 + m terms averaged."""
    _, z = model(views)
    _, zs = model(small)
    terms = [nt_xent(z[:b], z[b:], TEMPERATURE)]
    for k in range(len(small) // b):
        zk = zs[k * b:(k + 1) * b]
        terms.append((nt_xent(zk, z[:b], TEMPERATURE) + nt_xent(zk, z[b:], TEMPERATURE)) / 2)
    return sum(terms) / len(terms)


def test_multicrop_loss_averages_the_pairs_and_reaches_the_small_views():
    cfg = load_config(None, ["model.width=8", f"loss.temperature={TEMPERATURE}"])
    torch.manual_seed(0)
    method = SimCLRMethod(cfg)
    model = method.model.eval()
    g = torch.Generator().manual_seed(1)
    views, small = torch.randn(8, 3, 16, 16, generator=g), torch.randn(12, 3, 8, 8, generator=g)  # b = 4, m = 3
    small.requires_grad_()
    loss = method.loss(model, Views(views, small), torch.autocast("cpu", enabled=False))
    assert loss.item() == pytest.approx(_loss_by_hand(model, views, small, 4).item(), abs=1e-6)
    assert loss.item() != pytest.approx(method.loss(model, Views(views), torch.autocast("cpu", enabled=False)).item(),
                                        abs=1e-3)
    loss.backward()
    assert small.grad is not None and small.grad.abs().sum() > 0  # the small views are trained on


@pytest.mark.parametrize("override", ["method.name=moco", "method.name=byol", "augment.preset=baseline"])
def test_multicrop_is_refused_outside_simclr_views(override):
    with pytest.raises(ConfigError, match="small_crops"):
        load_config(None, ["augment.small_crops=2", override])


# --- two gloo ranks: two forwards (views, small views) in one DDP step ----------------------------------------

def _tiny_method() -> SimCLRMethod:
    torch.manual_seed(0)
    method = SimCLRMethod(load_config(None, ["model.width=8", "model.head_out=16", f"loss.temperature={TEMPERATURE}"]))
    method.model.eval()  # BN on running statistics: per-image, so ranks and one process compute one function
    return method


def _rank_worker(rank: int, state: dict, x1, x2, s1, out_dir: str) -> None:
    method = _tiny_method()
    method.model.load_state_dict(state)
    net = wrap_ddp(method.model, torch.device("cpu"))  # as the Trainer wraps it
    broadcast_buffers(method.model)
    n = len(x1) // 2
    mine = slice(rank * n, (rank + 1) * n)
    loss = method.loss(net, Views(torch.cat([x1[mine], x2[mine]]), s1[mine]), torch.autocast("cpu", enabled=False))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in method.model.named_parameters()}
    torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_ranks_with_small_views_give_the_loss_and_gradients_of_one_process(tmp_path):
    g = torch.Generator().manual_seed(2)
    x1, x2 = torch.randn(2, 8, 3, 16, 16, generator=g)
    s1 = torch.randn(8, 3, 8, 8, generator=g)  # one small view per image
    method = _tiny_method()
    state = {k: v.clone() for k, v in method.model.state_dict().items()}
    run_ranks(_rank_worker, (state, x1, x2, s1, str(tmp_path)), 2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = method.loss(method.model, Views(torch.cat([x1, x2]), s1), torch.autocast("cpu", enabled=False))
    single.backward()
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(single.item(), abs=1e-5)
    for name, p in method.model.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], p.grad, atol=1e-5, rtol=0, msg=name)


# --- bit-exact resume with both on ----------------------------------------------------------------------------

def _run_state(out: Path):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in r.items() if k not in ("views_per_s", "data_wait")} for r in lines if r["kind"] not in ("eval", "resume")]
    return metrics, load_checkpoint(out / "checkpoint.pt")["model"]


def test_resume_mid_epoch_is_bit_exact_with_small_and_progressive_views(tmp_path, monkeypatch):
    # stopped mid-epoch 2, after the views have grown from 8 px
    runs = straight_and_resumed(tmp_path, monkeypatch, "augment.view_size_start=8", **RUN)
    (m1, w1), (m2, w2) = (_run_state(run) for run in runs)
    assert m1 == m2
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def _train_rank(rank: int, out: str) -> None:
    """A real run on two ranks, batch norm in training mode, two forwards (views, small views) per step."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    summary = pretrain(tiny_config(Path(out), "train.epochs=1", **RUN))
    Path(out, f"rank{rank}.json").write_text(json.dumps(summary["steps"]))


def test_two_ranks_train_with_small_views(tmp_path):
    """DDP broadcast rank 0's buffers at each of the two forwards, and up to torch 2.11 backward then failed
    ("modified by an inplace operation"); the Trainer broadcasts them once a step instead."""
    run_ranks(_train_rank, (str(tmp_path),))
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [3, 3]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["world_size"] == 2
