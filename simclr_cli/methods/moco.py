"""A momentum encoder with a queue of negatives (MoCo v2, Chen et al. 2020; the memory SimCLR v2 adds).

The online encoder + projection head maps one view to a query q; an EMA copy of them maps the other view to
its key k+. Negatives are the last `method.moco.queue_size` keys of earlier batches, so their number does not depend on
the batch size. With q, k unit vectors and tau the temperature, per query (MoCo's Algorithm 1):
    loss = -log( exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_{k- in queue} exp(q.k- / tau)) )
Both view orders are scored and averaged (symmetric, as SimCLR v2 and MoCo v3 do); after the optimiser
step the target moves towards the online network and both views' keys, gathered from every rank, are
enqueued. The queue lives in fp32 whatever the autocast precision.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from simclr_cli.config import Config
from simclr_cli.methods.base import Views
from simclr_cli.methods.ema import MOMENTUM_RULES, EmaTarget, MomentumOptions, WithTarget, momentum_at
from simclr_cli.models import build_model


def info_nce_with_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """q, k (B, D) unnormalised, row i of k the positive of row i of q; queue (K, D) unit keys; fp32 mean."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    negative = q @ queue.T  # (B, K)
    logits = torch.cat([positive, negative], dim=1) / temperature  # (B, 1 + K)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))  # the positive: column 0


class KeyQueue:
    """The last `size` keys, unit rows in fp32; new keys overwrite the oldest, wrapping around."""

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        # Random unit vectors until real keys replace them (as MoCo starts), drawn from torch's seeded RNG.
        self.keys = F.normalize(torch.randn(size, dim, generator=generator), dim=1)  # (K, D)
        self.pointer = 0  # where the next key goes

    def push(self, keys: torch.Tensor) -> None:
        keys = F.normalize(keys.detach().float(), dim=1)[-len(self.keys):]  # more keys than slots: the newest
        index = (self.pointer + torch.arange(len(keys), device=keys.device)) % len(self.keys)
        self.keys[index] = keys
        self.pointer = (self.pointer + len(keys)) % len(self.keys)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of x, stacked in rank order (no gradient); x itself in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = torch.empty((dist.get_world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


@dataclass
class MoCoOptions(MomentumOptions):
    queue_size: int = 4096  # past keys kept as negatives (every rank's, gathered)


class MoCoMethod(WithTarget):
    Options = MoCoOptions
    RULES = [*MOMENTUM_RULES, ("queue_size", lambda v: v >= 1, ">= 1")]

    def __init__(self, cfg: Config) -> None:
        options: MoCoOptions = cfg.method.options
        self.model = build_model(cfg.model, cfg.data.image_size)  # online: encoder + projection head, the queries
        self.target = EmaTarget(self.model)  # keys
        self.queue = KeyQueue(options.queue_size, cfg.model.head_out)
        self.temperature = cfg.loss.temperature
        self.momentum = (options.momentum, options.momentum_end)
        self._keys: torch.Tensor | None = None  # this step's keys, enqueued after the optimiser step

    def to(self, device: torch.device, memory_format: torch.memory_format) -> MoCoMethod:
        super().to(device, memory_format)
        self.queue.keys = self.queue.keys.to(device)
        return self

    def loss(self, net: torch.nn.Module, views: Views, ctx: contextlib.AbstractContextManager) -> torch.Tensor:
        """views.pair (2B, ...): queries of both views against the keys of the other view and the queue."""
        b = views.pair.shape[0] // 2
        q, k = self.outputs(net, views, ctx)  # (2B, head_out) each: queries, keys
        self._keys = k.detach()
        return (info_nce_with_queue(q[:b], k[b:], self.queue.keys, self.temperature)
                + info_nce_with_queue(q[b:], k[:b], self.queue.keys, self.temperature)) / 2

    def after_step(self, step: int, total_steps: int) -> None:
        self.target.update(self.model, momentum_at(step, total_steps, *self.momentum))
        self.queue.push(gather_rows(self._keys))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "queue": self.queue.keys, "pointer": self.queue.pointer}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.queue.keys.copy_(state["queue"])
        self.queue.pointer = int(state["pointer"])
