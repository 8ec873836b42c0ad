"""SimCLR (Chen et al. 2020): one encoder and projection head on both views, NT-Xent over all 2B of them."""

from __future__ import annotations

import contextlib

import torch

from simclr_cli.config import Config
from simclr_cli.loss import nt_xent
from simclr_cli.model import build_model


class SimCLRMethod:
    def __init__(self, cfg: Config) -> None:
        self.model = build_model(cfg.model)  # encoder + 2- or 3-layer head (SimCLR v1 / v2)
        self.temperature = cfg.loss.temperature

    def to(self, device: torch.device, memory_format: torch.memory_format) -> SimCLRMethod:
        self.model = self.model.to(device, memory_format=memory_format)
        return self

    def loss(self, net: torch.nn.Module, views: torch.Tensor, ctx: contextlib.AbstractContextManager,
             small: torch.Tensor | None = None) -> torch.Tensor:
        """views (2B, 3, S, S): one forward, so batch norm sees both views; the loss in fp32.

        small (mB, 3, s, s), multi-crop: m small views per image, in a second forward (another size, so
        its own batch statistics). Each small view is contrasted with each of the two views, NT-Xent over
        that pair's 2B views, and the loss is the mean over the 1 + m pairs of views (a small view's two
        pairs count as one)."""
        b = views.shape[0] // 2
        with ctx:
            _, z = net(views)  # (2B, head_out)
        loss = nt_xent(z[:b], z[b:], self.temperature)
        if small is None:
            return loss
        with ctx:
            _, zs = net(small)  # (mB, head_out)
        pairs = [(nt_xent(zk, z[:b], self.temperature) + nt_xent(zk, z[b:], self.temperature)) / 2
                 for zk in zs.split(b)]
        return (loss + sum(pairs)) / (1 + len(pairs))

    def after_step(self, step: int, total_steps: int) -> None:
        """Nothing: SimCLR has no second network to update."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError("the checkpoint carries a momentum method's state, this run is simclr")
