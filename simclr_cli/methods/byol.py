"""BYOL (Grill et al. 2020): an online encoder, projector and predictor learn to predict, from one view,
an EMA target network's projection of the other view. No negatives.

With p the online prediction and z' the target projection, per pair (the paper's eq. 2):
    loss = || p/||p|| - z'/||z'|| ||^2 = 2 - 2 cos(p, z')
summed over both view orders (eq. 3's symmetrised loss), averaged over the batch. The target, online
encoder + projector in EMA, gets no gradient; its momentum rises from `method.byol.momentum` to
`method.byol.momentum_end` (the paper: 0.996 to 1) on a cosine.
Projector and predictor are Linear-BN-ReLU-Linear, as in the paper. The exported encoder is the online one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from simclr_cli.config import Config
from simclr_cli.methods.base import Views
from simclr_cli.methods.ema import MOMENTUM_RULES, EmaTarget, MomentumOptions, WithTarget, momentum_at
from simclr_cli.models import build_encoder


def mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim_out))


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p_i, z_i), averaged over rows, in fp32; z is the target's (no gradient flows into it)."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


class Projected(nn.Module):
    """encoder -> projector (-> predictor, online only): x -> (h, projection or prediction)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        self.encoder, self.projector, self.predictor = encoder, projector, predictor
        self.head = None  # the encoder file carries no head: BYOL's projector is not probed from

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)  # (B, feature_dim)
        z = self.projector(h)  # (B, head_out)
        return h, self.predictor(z) if self.predictor is not None else z


@dataclass
class BYOLOptions(MomentumOptions):
    predictor_hidden: int | None = None  # predictor hidden units; None -> the projector's hidden size


class BYOLMethod(WithTarget):
    Options = BYOLOptions
    RULES = [*MOMENTUM_RULES, ("predictor_hidden", lambda v: v is None or v >= 1, ">= 1 or null")]

    def __init__(self, cfg: Config) -> None:
        m, options = cfg.model, cfg.method.options
        encoder = build_encoder(m, cfg.data.image_size)
        hidden = m.head_hidden or encoder.feature_dim
        projector = mlp(encoder.feature_dim, hidden, m.head_out)
        self.target = EmaTarget(Projected(encoder, projector))  # encoder + projector, before the predictor
        self.model = Projected(encoder, projector, mlp(m.head_out, options.predictor_hidden or hidden, m.head_out))
        self.momentum = (options.momentum, options.momentum_end)
        self.averaged = Projected(encoder, projector)  # the online part the target follows (shares the modules)

    def health_head(self) -> nn.Module:
        return self.model.projector  # no head is exported; the projector is what follows the encoder

    def loss(self, net: torch.nn.Module, views: Views, ctx: contextlib.AbstractContextManager) -> torch.Tensor:
        """views.pair (2B, ...): each view's prediction against the target's projection of the other view."""
        b = views.pair.shape[0] // 2
        p, z = self.outputs(net, views, ctx)  # (2B, head_out) each: predictions, target projections
        return byol_loss(p[:b], z[b:]) + byol_loss(p[b:], z[:b])

    def after_step(self, step: int, total_steps: int) -> None:
        self.target.update(self.averaged, momentum_at(step, total_steps, *self.momentum))
