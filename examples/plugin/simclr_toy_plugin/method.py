"""Alignment and uniformity on the hypersphere (Wang & Isola 2020, "Understanding Contrastive Representation
Learning through Alignment and Uniformity on the Hypersphere"), as a simclr-cli method.

With z the unit projections of the two views of each image:
    align   = mean_i ||z1_i - z2_i||^alpha                          (positives close; alpha = 2)
    uniform = log mean_{i != j} exp(-t ||z_i - z_j||^2)            (all views spread out; t = 2)
    loss    = align + uniformity_weight * (uniform(z1) + uniform(z2)) / 2
Settings are `method.align.*` (the Options dataclass below); the encoder and head are simclr-cli's own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from simclr_cli.config import Config
from simclr_cli.methods import Method, Views
from simclr_cli.models import build_model


@dataclass
class AlignUniformOptions:
    alpha: float = 2.0  # exponent of the alignment distance
    t: float = 2.0  # uniformity's Gaussian potential scale
    uniformity_weight: float = 1.0  # lambda: uniformity against alignment


def uniformity(z: torch.Tensor, t: float) -> torch.Tensor:
    """log of the mean Gaussian potential over every pair of distinct rows of unit z (B, D)."""
    return torch.pdist(z, p=2).pow(2).mul(-t).exp().mean().log()


class AlignUniform(Method):
    Options = AlignUniformOptions
    RULES = [("alpha", lambda v: v > 0, "> 0"), ("t", lambda v: v > 0, "> 0"),
             ("uniformity_weight", lambda v: v >= 0, ">= 0")]

    def __init__(self, cfg: Config) -> None:
        self.model = build_model(cfg.model, cfg.data.image_size)  # encoder + projection head, exported
        self.options: AlignUniformOptions = cfg.method.options

    def loss(self, net: torch.nn.Module, views: Views, ctx: contextlib.AbstractContextManager) -> torch.Tensor:
        b, o = views.pair.shape[0] // 2, self.options
        with ctx:
            _, z = net(views.pair)  # (2B, head_out)
        z = F.normalize(z.float(), dim=1)  # fp32 loss under any autocast
        align = (z[:b] - z[b:]).norm(dim=1).pow(o.alpha).mean()
        return align + o.uniformity_weight * (uniformity(z[:b], o.t) + uniformity(z[b:], o.t)) / 2
