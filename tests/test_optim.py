"""Optimisers and schedules: parameter groups, LARS by hand, schedule values, exact resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from simclr_cli.train import optim
from simclr_cli.train.optim import LARS, OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler, param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def _batch() -> torch.Tensor:
    return torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def test_param_groups_exclude_biases_and_norm_layers() -> None:
    model = _tiny_model()
    model[0].bias.requires_grad_(False)  # frozen parameters are left out entirely
    decayed, excluded = param_groups(model, weight_decay=1e-4)
    assert decayed["weight_decay"] == 1e-4 and decayed["lars_exclude"] is False
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decayed["params"]) == ids([model[0].weight, model[3].weight])
    assert ids(excluded["params"]) == ids([model[1].weight, model[1].bias, model[3].bias])


def test_lars_step_matches_hand_computation() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    lr, momentum, wd, eta = 0.5, 0.9, 0.1, 0.01
    opt = LARS([{"params": [w], "weight_decay": wd, "lars_exclude": False}],
               lr=lr, momentum=momentum, eta=eta)
    grads = [torch.tensor([[0.0, 1.5]]), torch.tensor([[2.0, 0.0]])]

    w.grad = grads[0].clone()  # ||g|| = 1.5
    opt.step()
    trust = eta * 5.0 / (1.5 + wd * 5.0)  # 0.025
    v = lr * trust * torch.tensor([[0.0 + 0.3, 1.5 + 0.4]])  # g + wd * w
    expected = torch.tensor([[3.0, 4.0]]) - v
    torch.testing.assert_close(w.data, expected)

    w.grad = grads[1].clone()
    opt.step()
    w_norm = math.hypot(*expected[0].tolist())
    trust = eta * w_norm / (2.0 + wd * w_norm)
    v = momentum * v + lr * trust * (grads[1] + wd * expected)
    torch.testing.assert_close(w.data, expected - v)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], v)


def test_lars_zero_weights_use_trust_one() -> None:
    w = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=0.1, momentum=0.0, eta=0.001)
    w.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(w.data, torch.full((2, 2), -0.1))


def test_lars_excluded_params_are_plain_momentum_sgd() -> None:
    torch.manual_seed(0)
    bias = nn.Parameter(torch.randn(5))
    reference = nn.Parameter(bias.detach().clone())
    lars = LARS([{"params": [bias], "weight_decay": 0.5, "lars_exclude": True}], lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD([reference], lr=0.1, momentum=0.9)
    for _ in range(3):
        g = torch.randn(5)
        bias.grad, reference.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(bias.data, reference.data)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_build_optimizer_steps_all_params(name: str) -> None:
    model = _tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, name, lr=0.1, weight_decay=1e-4)
    _train_step(model, opt, _batch())
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_step_the_grad_scaler_skips_leaves_weights_and_state_untouched(name: str, monkeypatch) -> None:
    """fp16: the GradScaler skips a step whose gradients overflowed. The optimiser is chosen as on a GPU
    (fused where that is safe), its kernels run here on the CPU; fused SGD would leave uninitialised
    momentum behind on the skipped step and add it on the next one."""
    monkeypatch.setattr(optim, "_devices", lambda groups: {"cuda"})
    try:  # fused SGD on the CPU from torch 2.3, fused Adam and AdamW from 2.4
        {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(name, torch.optim.SGD)(
            [nn.Parameter(torch.zeros(1))], lr=0.1, fused=True)
    except (RuntimeError, ValueError, TypeError):
        pytest.skip("this torch has no fused optimiser of this kind on the CPU")
    model, reference = _tiny_model(), _tiny_model()
    opt = build_optimizer(model, name, lr=0.1, weight_decay=1e-4, grad_scaler=True)
    ref_opt = build_optimizer(reference, name, lr=0.1, weight_decay=1e-4, grad_scaler=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(_batch()).sum() * float("inf")).backward()  # every gradient overflows
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    for state in opt.state.values():  # nothing, or the initial state (fused Adam: zeros at step 0)
        assert "momentum_buffer" not in state
        assert all(not torch.is_tensor(v) or not v.any() for v in state.values()), state
    opt.zero_grad(set_to_none=True)
    scaler.scale(model(_batch()).sum()).backward()  # a good step: the same as the reference's first one
    scaler.step(opt)
    scaler.update()
    reference(_batch())  # the skipped step's forward: the same BatchNorm running statistics
    reference(_batch()).sum().backward()
    ref_opt.step()
    for (key, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=key)


def test_fused_kernels_on_cuda_except_sgd_under_a_grad_scaler(monkeypatch) -> None:
    monkeypatch.setattr(optim, "_devices", lambda groups: {"cuda"})
    groups = param_groups(_tiny_model(), 0.0)
    assert optim._implementation(groups, "sgd", grad_scaler=False) == {"fused": True}
    assert optim._implementation(groups, "sgd", grad_scaler=True) == {"foreach": True}
    assert optim._implementation(groups, "adamw", grad_scaler=True) == {"fused": True}
    monkeypatch.setattr(optim, "_devices", lambda groups: {"cpu"})
    assert optim._implementation(groups, "sgd", grad_scaler=False) == {"foreach": True}


def test_unknown_names_raise_listing_choices() -> None:
    model = _tiny_model()
    with pytest.raises(ValueError, match="sgd, adam, adamw, lars"):
        build_optimizer(model, "rmsprop", lr=0.1)
    opt = build_optimizer(model, "sgd", lr=0.1)
    with pytest.raises(ValueError, match="cosine, plateau, constant"):
        build_scheduler(opt, "step", total_steps=10)


def _lrs(name: str, steps: int, **kwargs) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, name, **kwargs)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        sched.step_batch()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_warmup_cosine_values() -> None:
    lrs = _lrs("cosine", 120, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert lrs[0] == pytest.approx(0.1)  # step 0: lr / warmup_steps
    assert lrs[4] == pytest.approx(0.5)
    assert lrs[9] == pytest.approx(1.0)  # last warmup step reaches the base lr
    assert lrs[10] == pytest.approx(1.0)  # cosine starts at the top
    assert lrs[60] == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lrs[110] == pytest.approx(0.1)  # min_lr at total_steps, and it stays there
    assert lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_constant_with_and_without_warmup() -> None:
    assert _lrs("constant", 5, total_steps=5) == [1.0] * 6
    assert _lrs("constant", 5, total_steps=5, warmup_steps=2) == pytest.approx([0.5, 1, 1, 1, 1, 1])


def test_plateau_reduces_after_patience() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "plateau", total_steps=100, plateau_factor=0.5, plateau_patience=2)
    for epoch_loss, lr_after in [(1.0, 1.0), (0.9, 1.0), (0.95, 1.0), (0.95, 1.0), (0.95, 0.5)]:
        sched.step_batch()  # batches never move a plateau lr
        sched.step_epoch(epoch_loss)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_after)


def test_plateau_ignores_epochs_during_warmup() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "plateau", total_steps=100, warmup_steps=4, plateau_patience=0)
    lrs = []
    for _ in range(3):  # two steps per epoch
        sched.step_batch()
        sched.step_batch()
        sched.step_epoch(1.0)  # never improves after the first epoch counted
        lrs.append(opt.param_groups[0]["lr"])
    # warmup ends after 4 steps; the epoch then counted sets `best`, the next one cuts.
    assert lrs == pytest.approx([0.75, 1.0, 0.5])


def _run(model, opt, sched, steps: int, x: torch.Tensor) -> list[float]:
    lrs = []
    for step in range(steps):
        _train_step(model, opt, x)
        sched.step_batch()
        if step % 3 == 2:
            sched.step_epoch(1.0)  # a loss that never improves, so plateau cuts too
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_resumes_exactly(name: str, schedule: str) -> None:
    x = _batch()

    def build(model: nn.Module):
        opt = build_optimizer(model, name, lr=0.05, weight_decay=1e-3, nesterov=name == "sgd")
        return opt, build_scheduler(opt, schedule, total_steps=20, warmup_steps=4, min_lr=1e-3,
                                    plateau_patience=1)

    model = _tiny_model()
    opt, sched = build(model)
    _run(model, opt, sched, 7, x)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict(),
                           "schedule": sched.state_dict()})
    lrs_straight = _run(model, opt, sched, 8, x)

    resumed = _tiny_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2, sched2 = build(resumed)
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["schedule"])
    lrs_resumed = _run(resumed, opt2, sched2, 8, x)

    assert lrs_resumed == lrs_straight
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_lars_state_dict_holds_momentum_buffers() -> None:
    model = _tiny_model()
    opt = build_optimizer(model, "lars", lr=0.1)
    _train_step(model, opt, _batch())
    state = opt.state_dict()["state"]
    assert len(state) == len(list(model.parameters()))
    assert all("momentum_buffer" in s for s in state.values())
