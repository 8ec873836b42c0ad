"""Pretraining methods: each one builds the networks it trains, computes its loss on a batch of views and
does what its networks need after the optimiser step. The training loop calls a method object and never
branches on which one it is:

    method.model                        the module the optimiser trains; `.encoder` is exported, `.head`
                                        (None for byol) goes into the encoder file beside it
    method.to(device, memory_format)    every network the method holds, on the training device
    method.loss(net, views, ctx)        the loss of 2B views (first B: view 1, last B: view 2), the forward
                                        passes inside `ctx` (autocast); `net` is `model` as wrapped (DDP);
                                        simclr also takes `small`, the multi-crop views (augment.small_crops)
    method.after_step(step, total)      after optimiser step `step` of `total`: EMA update, enqueue
    method.state_dict() / load_state_dict()   what a checkpoint must carry beyond `model`

simclr: NT-Xent over the batch. moco: an EMA key encoder and a queue of past keys as negatives (MoCo v2,
the momentum encoder of SimCLR v2). byol: an EMA target and a predictor, no negatives.
"""

from __future__ import annotations

import torch

from simclr_cli.config import Config
from simclr_cli.methods.byol import BYOLMethod
from simclr_cli.methods.ema import WithTarget
from simclr_cli.methods.moco import MoCoMethod
from simclr_cli.methods.simclr import SimCLRMethod

METHODS = {"simclr": SimCLRMethod, "moco": MoCoMethod, "byol": BYOLMethod}


def build_method(cfg: Config) -> SimCLRMethod | MoCoMethod | BYOLMethod:
    """The method `method.name` names, its networks built from `cfg.model` (call after torch.manual_seed)."""
    return METHODS[cfg.method.name](cfg)


def convert_sync_batchnorm(method: SimCLRMethod | MoCoMethod | BYOLMethod) -> None:
    """model.sync_bn: every BatchNorm of every network the method runs normalises over the global batch,
    the target network's too (left as it was, it would keep each rank's own batch statistics)."""
    method.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method.model)
    if isinstance(method, WithTarget):
        method.target.net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method.target.net)
