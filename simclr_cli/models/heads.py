"""Projection heads, and the encoder + head module the contrastive methods train."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """g(h) = z. Two layers: Linear-ReLU-Linear (SimCLR v1). Three: two Linear-BN-ReLU blocks, then Linear (v2).

    `forward(h, layer=k)` returns the output of the first k blocks (k=0 is h itself), for probing from a
    chosen head layer as SimCLR v2 does.
    """

    def __init__(self, dim_in: int, hidden: int | None = None, dim_out: int = 128, layers: int = 2):
        super().__init__()
        hidden = hidden or dim_in
        self.layers = layers
        dims = [dim_in] + [hidden] * (layers - 1)
        blocks: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            norm = nn.BatchNorm1d(b) if layers > 2 else nn.Identity()
            blocks.append(nn.Sequential(nn.Linear(a, b, bias=layers == 2), norm, nn.ReLU(inplace=True)))
        blocks.append(nn.Sequential(nn.Linear(dims[-1], dim_out)))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, h: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        for block in self.blocks[: self.layers if layer is None else layer]:
            h = block(h)
        return h


class EncoderWithHead(nn.Module):
    """Encoder f and projection head g: x -> h = f(x) -> z = g(h). The loss sees z; users get h. What simclr
    and moco train; byol's online network names its encoder the same way."""

    def __init__(self, encoder: nn.Module, head: ProjectionHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)  # (B, feature_dim)
        return h, self.head(h)  # (B, head_out)

    @staticmethod
    def split_state(state: dict) -> tuple[dict, dict]:
        """A trained model's state dict (a checkpoint's "model") -> (encoder's, head's), by the attribute
        names above; the head's is empty for byol, whose projector and predictor are not exported."""
        parts: dict[str, dict] = {"encoder": {}, "head": {}}
        for key, value in state.items():
            part, _, name = key.partition(".")
            if part in parts:
                parts[part][name] = value
        return parts["encoder"], parts["head"]
