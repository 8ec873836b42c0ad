"""Optimisers and learning-rate schedules for pretraining.

Owns LARS (You et al. 2017, in the form SimCLR trains with), the split of a model's parameters into
decayed and excluded groups, `build_optimizer()` over OPTIMIZERS, and `build_scheduler()` over
SCHEDULES. The schedule object is driven by the training loop with `step_batch()` after every
optimiser step and `step_epoch(loss)` after every epoch; with the optimiser's, its `state_dict()`
is all a resumed run needs to continue exactly where it stopped.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adam", "adamw", "lars")
SCHEDULES = ("cosine", "plateau", "constant")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017, as used by SimCLR).

    For each parameter tensor w with gradient g, in groups not flagged `lars_exclude`:
        trust = eta * ||w|| / (||g|| + weight_decay * ||w||)   (1 when ||w|| or the denominator is 0)
        v <- momentum * v + lr * trust * (g + weight_decay * w)
        w <- w - v                       (nesterov: w <- w - (momentum * v + lr * trust * d))
    Groups with `lars_exclude=True` (biases, norm layers) get neither weight decay nor the trust
    ratio: plain momentum SGD. As in SimCLR's implementation, lr sits inside the momentum buffer,
    so with a constant lr this equals torch.optim.SGD(momentum=...) on excluded parameters.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS needs lr, momentum, weight_decay >= 0 and eta > 0; got {lr=}, "
                             f"{momentum=}, {weight_decay=}, {eta=}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        nesterov=nesterov, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        lr, momentum = group["lr"], group["momentum"]
        d = p.grad
        if group["lars_exclude"]:
            scaled_lr = lr  # a Python float: a tensor made from it per parameter per step is a host-to-device copy
        else:
            wd = group["weight_decay"]
            w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
            denominator = g_norm + wd * w_norm
            # torch.where, not `if`: no host sync per parameter, so a GPU step stays asynchronous.
            trust = torch.where((w_norm > 0) & (denominator > 0),
                                group["eta"] * w_norm / denominator, torch.ones_like(w_norm))
            scaled_lr = lr * trust
            if wd != 0:
                d = d.add(p, alpha=wd)
        step = d * scaled_lr
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = step.clone()
        else:
            state["momentum_buffer"].mul_(momentum).add_(step)
        v = state["momentum_buffer"]
        p.sub_(v * momentum + step if group["nesterov"] else v)


# Parameters that get no weight decay and no LARS adaptation, whatever their shape: a ViT's class token and
# position embeddings (torchvision's names and timm's) are 3-D, yet decaying them pulls the model towards
# forgetting where a patch is.
UNDECAYED_NAMES = ("cls_token", "class_token", "dist_token", "reg_token", "pos_embed", "pos_embedding",
                   "position_embeddings", "absolute_pos_embed", "relative_position_bias_table")
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into [decayed weights, excluded parameters].

    Excluded, as in SimCLR: biases, every parameter of a norm layer (BatchNorm, LayerNorm, GroupNorm,
    InstanceNorm, and any 1-D parameter), class tokens and position embeddings. Decaying a norm layer's scale
    only fights the normalisation, and their tiny norms would make the trust ratio meaningless. Empty groups
    are dropped.
    """
    in_norm = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    decayed, excluded = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            leaf = name.rsplit(".", 1)[-1]
            skip = p.ndim <= 1 or id(p) in in_norm or leaf == "bias" or leaf in UNDECAYED_NAMES
            (excluded if skip else decayed).append(p)
    groups = [
        {"params": decayed, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]
    return [g for g in groups if g["params"]]


def _devices(groups: list[dict]) -> set[str]:
    return {p.device.type for g in groups for p in g["params"]}


def _implementation(groups: list[dict], name: str, grad_scaler: bool) -> dict:
    """Fast-path keyword for torch's optimisers: fused kernels on CUDA, foreach elsewhere.

    fused=True on CUDA does the update in a few kernels instead of several per tensor (not measured: no GPU
    has been lent yet). foreach is accepted on any device and torch falls back to a per-tensor loop where it
    has no kernel, so the CPU stays correct. Not fused SGD under a GradScaler (fp16): fused SGD tells the
    scaler it handles overflow itself, yet on a skipped step it still creates its momentum buffers, with
    torch.empty_like, and leaves them unwritten; the next step then adds whatever that memory held (seen
    here on torch 2.14's CPU kernel, and reported for 2.11's CUDA one: fp16's routine overflow on the first
    steps put inf in the momentum). Fused Adam and AdamW create zeros on a skipped step, which is exactly
    their initial state, so they stay fused (tests/test_optim.py checks both).
    """
    if _devices(groups) == {"cuda"} and not (grad_scaler and name == "sgd"):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    grad_scaler: bool = False,
) -> torch.optim.Optimizer:
    """The optimiser `name` (one of OPTIMIZERS) over `param_groups(model, weight_decay)`. `grad_scaler`: the
    steps go through a GradScaler (fp16), whose skipped steps the optimiser must leave untouched."""
    groups = param_groups(model, weight_decay)
    fast = _implementation(groups, name, grad_scaler)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **fast)
    if name == "adam":  # L2 penalty added to the gradient
        return torch.optim.Adam(groups, lr=lr, betas=betas, **fast)
    if name == "adamw":  # decoupled weight decay
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **fast)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


class WarmupCosine:
    """Per-step lr: linear warmup from lr/warmup_steps to lr, then cosine down to min_lr.

    Step s (0-based, the s-th optimiser step) uses
        lr * (s + 1) / warmup_steps                                  for s < warmup_steps
        min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,  p = (s - warmup_steps) / (total - warmup)
    with p capped at 1, so steps past total_steps stay at min_lr. With `decay=False` the lr stays
    at its base value after warmup (the constant schedule). The base lr of each group is read once
    from the optimiser and saved in state_dict(), so a rebuilt schedule resumes exactly.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 min_lr: float = 0.0, decay: bool = True) -> None:
        if total_steps < 1 or warmup_steps < 0 or min_lr < 0:
            raise ValueError(f"need total_steps >= 1, warmup_steps >= 0, min_lr >= 0; got "
                             f"{total_steps=}, {warmup_steps=}, {min_lr=}")
        self.optimizer = optimizer
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.min_lr, self.decay = min_lr, decay
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.step_count = 0  # optimiser steps taken so far; the next one is step `step_count`
        self._apply()

    def lr_at(self, step: int, base_lr: float) -> float:
        if step < self.warmup_steps:
            return base_lr * (step + 1) / self.warmup_steps
        if not self.decay:
            return base_lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.lr_at(self.step_count, base_lr)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "base_lrs": list(self.base_lrs),
                "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "min_lr": self.min_lr, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        for key in ("step_count", "total_steps", "warmup_steps", "min_lr", "decay"):
            setattr(self, key, state[key])
        self.base_lrs = list(state["base_lrs"])
        self._apply()


class Schedule:
    """What the training loop drives: `step_batch()` per optimiser step, `step_epoch(loss)` per epoch.

    `per_step` sets the lr every step (warmup, then cosine or constant). With `plateau`, per_step
    only runs the warmup and ReduceLROnPlateau owns the lr afterwards; epochs that end during
    warmup are not shown to it, so the warmup's rising lr is never mistaken for a plateau.
    """

    def __init__(self, name: str, per_step: WarmupCosine,
                 plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None) -> None:
        self.name, self.per_step, self.plateau = name, per_step, plateau

    def _in_warmup(self) -> bool:
        return self.per_step.step_count < self.per_step.warmup_steps

    def step_batch(self) -> None:
        if self.plateau is None or self._in_warmup():
            self.per_step.step()

    def step_epoch(self, epoch_loss: float) -> None:
        if self.plateau is not None and not self._in_warmup():
            self.plateau.step(epoch_loss)

    @property
    def total_steps(self) -> int:
        """The optimiser step the schedule plans to end at (the momentum methods follow it too)."""
        return self.per_step.total_steps

    def set_total_steps(self, total: int) -> int | None:
        """Move the schedule's end to optimiser step `total` (a resumed run with other train.epochs); the lr
        follows from the current step on. Returns the old end when it moved, else None."""
        old = self.per_step.total_steps
        if old == total:
            return None
        self.per_step.total_steps = total
        if self.plateau is None or self._in_warmup():
            self.per_step._apply()
        return old

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.per_step.optimizer.param_groups]

    def state_dict(self) -> dict:
        # The lrs themselves are saved too: after plateau cuts they cannot be recomputed from a step
        # count, and saving them makes the result independent of whether the optimiser's
        # state_dict is loaded before or after this schedule is rebuilt.
        return {"name": self.name, "per_step": self.per_step.state_dict(),
                "plateau": None if self.plateau is None else self.plateau.state_dict(),
                "lrs": self.get_last_lr()}

    def load_state_dict(self, state: dict) -> None:
        if state["name"] != self.name:
            raise ValueError(f"checkpoint has schedule {state['name']!r}, this run uses {self.name!r}")
        self.per_step.load_state_dict(state["per_step"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])
        for group, lr in zip(self.per_step.optimizer.param_groups, state["lrs"]):
            group["lr"] = lr


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr: float = 0.0,
    plateau_factor: float = 0.5,
    plateau_patience: int = 5,
) -> Schedule:
    """The schedule `name` (one of SCHEDULES); warmup applies to all three.

    cosine: warmup, then cosine from the optimiser's lr to min_lr at total_steps (optimiser steps).
    plateau: warmup, then ReduceLROnPlateau on the epoch loss (lr *= plateau_factor after
        plateau_patience epochs without improvement, never below min_lr), the original design's
        schedule. constant: warmup, then the optimiser's lr.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    per_step = WarmupCosine(optimizer, total_steps, warmup_steps, min_lr, decay=name == "cosine")
    plateau = None
    if name == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=plateau_factor, patience=plateau_patience, min_lr=min_lr)
    return Schedule(name, per_step, plateau)
