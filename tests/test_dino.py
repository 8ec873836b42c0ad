"""DINO: the loss against a slow oracle written from the paper's Algorithm 1 (generalised to multi-crop), the
centre, the teacher's temperature ramp, the frozen last layer and clipping, two gloo ranks against one
process, bit-exact resume with multi-crop, a ViT, and each refusal in one line."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import straight_and_resumed, tiny_config, tiny_set_args
from ranks import run_ranks  # tests/ranks.py
from test_methods import assert_same, run_state
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.methods import build_method
from simclr_cli.methods.dino import dino_loss, ramp, update_center
from simclr_cli.train import pretrain
from simclr_cli.train.state import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
DINO = {"method.name": "dino", "method.dino.prototypes": 32, "method.dino.hidden": 32, "method.dino.bottleneck": 16,
        "optim.warmup_epochs": 1}
MULTI_CROP = {**DINO, "augment.small_crops": 2, "augment.small_crop_size": 8}


def oracle(student_views, teacher_views, center, tt, ts):
    """Algorithm 1, view pair by view pair and image by image, in float64: H(t, s) = -sum_k t_k log s_k."""
    total, pairs = 0.0, 0
    for q, t in enumerate(teacher_views):
        for v, s in enumerate(student_views):
            if v == q:
                continue
            per_image = []
            for i in range(len(t)):
                p_t = torch.softmax((t[i].double() - center[0].double()) / tt, dim=0)
                log_s = torch.log_softmax(s[i].double() / ts, dim=0)
                per_image.append(-(p_t * log_s).sum())
            total, pairs = total + torch.stack(per_image).mean(), pairs + 1
    return total / pairs


def test_loss_matches_algorithm_1_with_local_views_and_sends_no_gradient_into_the_teacher():
    g = torch.Generator().manual_seed(0)
    b, k = 5, 7
    student = torch.randn(4 * b, k, generator=g, requires_grad=True)  # 2 global + 2 local views
    teacher = torch.randn(2 * b, k, generator=g, requires_grad=True)
    center = torch.randn(1, k, generator=g)
    loss = dino_loss(student, teacher, center, 0.04, 0.1)
    expected = oracle(student.detach().split(b), teacher.detach().split(b), center, 0.04, 0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    # the global views are not scored against themselves: with 2 views only, 2 terms (global 1 vs 2, 2 vs 1)
    two = dino_loss(student[:2 * b], teacher, center, 0.04, 0.1)
    assert two.item() == pytest.approx(oracle(student.detach()[:2 * b].split(b), teacher.detach().split(b), center,
                                              0.04, 0.1).item(), rel=1e-5)


def test_center_follows_the_teachers_batch_mean_and_the_temperature_ramps():
    center, teacher = torch.ones(1, 3), torch.tensor([[0.0, 2.0, 4.0], [2.0, 2.0, 0.0]])
    update_center(center, teacher, 0.9)
    torch.testing.assert_close(center, 0.9 * torch.ones(1, 3) + 0.1 * torch.tensor([[1.0, 2.0, 2.0]]))
    assert [ramp(s, 10, 0.04, 0.07) for s in (0, 5, 10, 20)] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert ramp(0, 0, 0.04, 0.07) == 0.07  # no warm-up


@pytest.mark.parametrize("epochs, first", [(30, 0.04), (0, 0.07)])
def test_the_first_step_uses_the_ramps_start(tmp_path, epochs, first):
    """Before its first step the method does not know the run's length: the teacher is at the ramp's start
    (the end value only when there is no warm-up), not at its end."""
    method = build_method(tiny_config(tmp_path, **DINO, **{"method.dino.teacher_temp_epochs": epochs}))
    assert method.teacher_temp() == pytest.approx(first)
    method.after_step(1, 100)  # one step of 100 done: the ramp's clock runs
    warmed = method.teacher_temp()
    assert warmed == pytest.approx(0.07) if epochs == 0 else 0.04 < warmed < 0.041


def _dino_rank(rank: int, student: torch.Tensor, teacher: torch.Tensor, out_dir: str) -> None:
    b = teacher.shape[0] // 2
    n = b // 2  # this rank's share of each view's rows
    mine = lambda views: torch.cat([v[rank * n:(rank + 1) * n] for v in views.split(b)])  # noqa: E731
    local = mine(student).clone().requires_grad_()
    center = torch.zeros(1, student.shape[1])
    loss = dino_loss(local, mine(teacher), center, 0.05, 0.1)
    loss.backward()
    update_center(center, mine(teacher), 0.9)
    torch.save({"loss": loss.detach(), "grad": local.grad, "center": center}, os.path.join(out_dir, f"{rank}.pt"))


def test_two_ranks_give_the_loss_gradients_and_centre_of_one_process(tmp_path):
    g = torch.Generator().manual_seed(1)
    b, k = 8, 6
    student, teacher = torch.randn(3 * b, k, generator=g), torch.randn(2 * b, k, generator=g)
    run_ranks(_dino_rank, (student, teacher, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    whole = student.clone().requires_grad_()
    single = dino_loss(whole, teacher, torch.zeros(1, k), 0.05, 0.1)
    single.backward()
    center = torch.zeros(1, k)
    update_center(center, teacher, 0.9)
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(single.item(), abs=1e-6)
    for r in ranks:  # every rank centres with every rank's views
        torch.testing.assert_close(r["center"], center, atol=1e-6, rtol=0)
    # Each rank's rows, view by view, back in one process's order; DDP's average divides by the world size.
    n = b // 2
    grads = [r["grad"].split(n) for r in ranks]
    merged = torch.cat([torch.cat([grads[0][v], grads[1][v]]) for v in range(3)])
    torch.testing.assert_close(merged / 2, whole.grad, atol=1e-6, rtol=0)


def test_the_prototypes_stay_frozen_for_the_first_epoch_and_the_gradient_is_clipped(tmp_path):
    cfg = tiny_config(tmp_path, **{**DINO, "method.dino.clip_grad": 0.5, "method.dino.freeze_last_layer_epochs": 1})
    method = build_method(cfg)
    for p in method.model.parameters():
        p.grad = torch.full_like(p, 10.0)
    method.before_update(2, 9)  # step 2 of 3 epochs x 3 steps: still in the first epoch
    assert method.model.dino_head.prototypes.grad is None
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in method.model.parameters()
                                                 if p.grad is not None]))
    assert norm.item() == pytest.approx(0.5, rel=1e-4)
    for p in method.model.parameters():
        p.grad = torch.full_like(p, 10.0)
    method.before_update(3, 9)  # the second epoch: trained
    assert method.model.dino_head.prototypes.grad is not None


def test_a_trained_prototype_gain_is_frozen_with_the_prototypes_and_scales_the_logits(tmp_path):
    cfg = tiny_config(tmp_path, **{**DINO, "method.dino.norm_last_layer": "false",
                                   "method.dino.freeze_last_layer_epochs": 1})
    head = build_method(cfg).model.dino_head
    assert build_method(tiny_config(tmp_path, **DINO)).model.dino_head.gain is None  # the paper's default
    h = torch.randn(4, head.mlp[0].in_features)
    head.eval()
    with torch.no_grad():
        cosines = head(h)
        head.gain.copy_(torch.linspace(0.5, 3.0, head.gain.numel()))
        torch.testing.assert_close(head(h), cosines * head.gain)  # each prototype's column times its gain
    method = build_method(cfg)
    gain = method.model.dino_head.gain
    for p in method.model.parameters():
        p.grad = torch.ones_like(p)
    method.before_update(2, 9)  # the first epoch: the whole last layer is frozen
    assert gain.grad is None and method.model.dino_head.prototypes.grad is None
    gain.grad = torch.ones_like(gain)
    method.before_update(3, 9)
    assert gain.grad is not None


def test_the_teacher_follows_the_student_and_the_centre_moves(tmp_path):
    pretrain(tiny_config(tmp_path, **MULTI_CROP))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    student, teacher = ckpt["model"], ckpt["method"]["target"]
    assert student.keys() == teacher.keys()
    moved = [k for k in student if student[k].is_floating_point() and not torch.equal(student[k], teacher[k])]
    assert moved and all(torch.isfinite(v).all() for v in student.values() if v.is_floating_point())
    assert ckpt["method"]["step"] == 9 and torch.isfinite(ckpt["method"]["center"]).all()
    assert ckpt["method"]["center"].abs().sum() > 0  # it moved from zero


def test_resume_mid_epoch_with_local_views_is_bit_exact(tmp_path, monkeypatch):
    straight, resumed = (run_state(run) for run in straight_and_resumed(tmp_path, monkeypatch, **MULTI_CROP))
    assert straight[0] == resumed[0]
    assert_same(straight[1], resumed[1])  # student, teacher, centre and the schedules' clock


def test_a_vit_with_local_views_trains(tmp_path):
    pytest.importorskip("timm")
    vit = {"model.arch": "timm:vit_tiny_patch16_224", "model.kwargs": "{img_size: 16, patch_size: 4, depth: 1, "
           "embed_dim: 24, num_heads: 2, dynamic_img_size: true}",
           "method.dino.batch_norm": "false"}  # the paper's ViT head
    pretrain(tiny_config(tmp_path, **MULTI_CROP, **vit, epochs=1))
    assert load_checkpoint(tmp_path / "checkpoint.pt")["method"]["step"] == 3


@pytest.mark.parametrize("setting, message", [
    ("method.dino.prototypes=4", "'method.dino.prototypes' (4) must be at least the number of classes in the training "
                                 "data (10"),
    ("method.dino.prototypes=1", "'method.dino.prototypes' must be in [2, 262144]; got 1"),
    ("augment.small_crop_size=12", "'augment.small_crop_size' (12) must not exceed the global views (8 px)"),
])
def test_bad_settings_are_one_line(tmp_path, setting, message):
    sets = tiny_set_args(**MULTI_CROP, **{"augment.view_size": 8})
    r = CliRunner().invoke(app, ["pretrain", "-o", str(tmp_path / "run"), *sets, "--set", setting])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.output, r.output
