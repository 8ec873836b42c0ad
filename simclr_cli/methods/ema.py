"""The target network of the momentum methods: an exponential moving average of the online network.

After every optimiser step k of K, target <- m_k * target + (1 - m_k) * online, parameter by parameter, with
m_k rising from `momentum` to `momentum_end` on a cosine (BYOL, Grill et al. 2020, section 3.2:
m_k = 1 - (1 - m_0) (cos(pi k / K) + 1) / 2; momentum_end = momentum gives MoCo's constant m). The target
runs its own batch norm statistics (its buffers are its own, not averaged). It is never trained: no
gradients, not in the optimiser, not wrapped in DDP, and every rank updates it from the same weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch

from simclr_cli.methods.base import Method, Views


def momentum_at(step: int, total_steps: int, start: float, end: float) -> float:
    """m after `step` of `total_steps` optimiser steps: `start` at 0, `end` at total_steps and beyond."""
    progress = min(1.0, step / max(1, total_steps))
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


@dataclass
class MomentumOptions:
    momentum: float = 0.99  # EMA momentum of the target network at step 0
    momentum_end: float = 1.0  # ... at the last step, on a cosine (= momentum: constant)


MOMENTUM_RULES = [
    ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("momentum_end", lambda v: 0 <= v <= 1, "in [0, 1]"),
]


class EmaTarget:
    def __init__(self, online: torch.nn.Module) -> None:
        self.net = copy.deepcopy(online).requires_grad_(False)  # starts equal to the online network

    @torch.no_grad()
    def update(self, online: torch.nn.Module, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online, for every parameter (one fused op)."""
        target = [p for p in self.net.parameters()]
        source = [p.detach() for p in online.parameters()]
        torch._foreach_lerp_(target, source, 1.0 - momentum)


class WithTarget(Method):
    """What the momentum methods share: an online `model` and its EMA `target`, run, moved and saved
    together. Subclasses set both in __init__."""

    model: torch.nn.Module
    target: EmaTarget

    def outputs(self, net: torch.nn.Module, views: Views,
                ctx: contextlib.AbstractContextManager) -> tuple[torch.Tensor, torch.Tensor]:
        """(online output, target output) for the same 2B views; the target's without a graph."""
        with ctx:
            _, online = net(views.pair)  # (2B, head_out)
            with torch.no_grad():
                _, target = self.target.net(views.pair)  # (2B, head_out)
        return online, target

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, "target_net": self.target.net}

    @property
    def target_net(self) -> torch.nn.Module:
        return self.target.net

    @target_net.setter
    def target_net(self, net: torch.nn.Module) -> None:
        self.target.net = net

    def state_dict(self) -> dict:
        return {"target": self.target.net.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.target.net.load_state_dict(state["target"])
