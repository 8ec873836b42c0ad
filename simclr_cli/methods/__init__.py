"""Pretraining methods: each one builds the networks it trains and computes its loss on a batch of views.

The training loop calls a method object and never branches on which one it is:
    method.model                    the module the optimiser trains (has `.encoder`, which is exported)
    method.loss(net, views, ctx)    the loss of one batch of 2B views (first B: view 1, last B: view 2),
                                    with the forward pass inside `ctx` (autocast)
"""

from __future__ import annotations

from simclr_cli.config import Config
from simclr_cli.methods.simclr import SimCLRMethod


def build_method(cfg: Config) -> SimCLRMethod:
    """The method a config asks for; SimCLR is the only one so far."""
    return SimCLRMethod(cfg)
