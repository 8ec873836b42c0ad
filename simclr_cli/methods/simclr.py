"""SimCLR (Chen et al. 2020): one encoder and projection head on both views, the NT-Xent loss over all 2N
views (eq. 1 and Algorithm 1), and multi-crop's small views (augment.small_crops).

`nt_xent()` is the vectorised loss used in training (negatives gathered across ranks when torch.distributed
runs with more than one process); tests/test_loss.py holds the slow oracle written line by line from
Algorithm 1. Notation follows the paper: `z` are projections, `s_ij` cosine similarities, `temperature` is
tau. A batch of N images gives 2N views; row i of `z1` and row i of `z2` are the positive pair.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from simclr_cli.augment import Augmenter
from simclr_cli.config import Config
from simclr_cli.methods.base import Method, Views, with_small_views
from simclr_cli.models import build_model


class SimCLRMethod(Method):
    multi_crop = True

    def __init__(self, cfg: Config) -> None:
        self.model = build_model(cfg.model, cfg.data.image_size)  # encoder + 2- or 3-layer head (SimCLR v1 / v2)
        self.temperature = cfg.loss.temperature
        a = cfg.augment
        self.small_crops = (a.small_crops, a.small_crop_size, tuple(a.small_crop_scale))

    def views(self, augment: Augmenter, x: torch.Tensor, generator: torch.Generator, size: int) -> Views:
        """The pair, then (multi-crop) the small views, drawn after both."""
        return with_small_views(augment, x, generator, size, self.small_crops)

    def loss(self, net: torch.nn.Module, views: Views, ctx: contextlib.AbstractContextManager) -> torch.Tensor:
        """views.pair (2B, 3, S, S): one forward, so batch norm sees both views; the loss in fp32.
        views.small (mB, 3, s, s), multi-crop: m small views per image, in a second forward (another size, so
        its own batch statistics). Each small view is contrasted with each of the two views, NT-Xent over
        that pair's 2B views, and the loss is the mean over the 1 + m pairs of views (a small view's two
        pairs count as one)."""
        b = views.pair.shape[0] // 2
        with ctx:
            _, z = net(views.pair)  # (2B, head_out)
        loss = nt_xent(z[:b], z[b:], self.temperature)
        if views.small is None:
            return loss
        with ctx:
            _, zs = net(views.small)  # (mB, head_out)
        pairs = [(nt_xent(zk, z[:b], self.temperature) + nt_xent(zk, z[b:], self.temperature)) / 2
                 for zk in zs.split(b)]
        return (loss + sum(pairs)) / (1 + len(pairs))


def _check_inputs(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (n, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 1:
        raise ValueError("nt_xent needs at least one image (n >= 1)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _gather_world(gather: bool) -> tuple[int, int]:
    """(rank, world_size) of the group negatives are drawn from; (0, 1) when not gathering."""
    # Only asked when gathering, so the single-process path makes no distributed calls at all.
    if gather and dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world > 1:
            return dist.get_rank(), world
    return 0, 1


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = True
) -> torch.Tensor:
    """NT-Xent loss over this rank's n images, with negatives from every rank.

    Args:
        z1: (n, D) projections of the first view of this rank's n images.
        z2: (n, D) projections of the second view; row i of z2 is the positive of row i of z1.
        temperature: tau > 0 in s_ij / tau.
        gather: when torch.distributed is initialised with world size W > 1, all-gather z from
            every rank so each local row is scored against all 2N = 2nW views. Ignored otherwise.

    Returns:
        A 0-dim fp32 tensor: the mean over this rank's 2n rows of
        -log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) ), j being i's other view.
        It is computed in fp32 even under bf16/fp16 autocast: the logsumexp over 2N terms at
        tau = 0.1 loses too much in bf16's 8-bit mantissa.

    Gradients across ranks. Rank r's loss is L_r = 1/(2n) sum of its own rows, so the loss of one
    process on the whole batch is L = 1/(2N) sum over all rows = (1/W) sum_r L_r. z_r (rank r's
    local z) enters L_r through its rows and every L_r' through the gathered columns.
    `torch.distributed.nn.functional.all_gather` is differentiable, and its backward sums the
    column gradients of every rank's loss into z_r (a reduce-scatter), so after backward
    z_r.grad = sum_r' dL_r'/dz_r = W * dL/dz_r. DDP then averages parameter gradients over the W
    ranks, which divides by W: each parameter receives exactly dL/dparam, the single-process
    gradient on the whole batch. Every rank must therefore call backward on this loss (the
    all-gather's backward is itself a collective). With n = 1 and W = 1 the loss is log(1) = 0:
    the positive is the only candidate.
    """
    _check_inputs(z1, z2, temperature)
    n = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1.float(), z2.float()], dim=0), dim=1)  # (2n, D), unit rows
        z_all, rank = _gathered(z, gather)  # (2N, D)
        logits = z @ z_all.T / temperature  # (2n, 2N): s_ik / tau
        rows = torch.arange(2 * n, device=z.device)  # (2n,)
        self_cols = rank * 2 * n + rows  # (2n,): where each local row sits among the columns
        # Each row keeps its finite positive, so -inf never makes a whole row -inf and log_softmax stays
        # finite; masked entries get exactly zero gradient. A comparison, not an indexed write of True: on
        # CUDA that write copies a host scalar and waits for it.
        self_mask = torch.arange(z_all.shape[0], device=z.device)[None, :] == self_cols[:, None]  # (2n, 2N)
        logits = logits.masked_fill(self_mask, float("-inf"))
        # Row i < n (view 1) pairs with i + n (view 2) and vice versa, offset to this rank's block.
        targets = rank * 2 * n + (rows + n) % (2 * n)  # (2n,)
        return F.cross_entropy(logits, targets)


def _gathered(z: torch.Tensor, gather: bool) -> tuple[torch.Tensor, int]:
    """(every rank's z stacked in rank order, this rank): columns [z1_0; z2_0; z1_1; z2_1; ...]."""
    rank, world = _gather_world(gather)
    if world == 1:
        return z, rank
    # Imported here: torch.distributed.nn is absent from builds without distributed.
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # torch 2.14 marks it deprecated; it is still the gather with a backward
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(z), dim=0), rank
