"""The linear probe: multinomial logistic regression on standardised frozen features by full-batch L-BFGS,
its L2 strength chosen on a held-out share of the train split, never on the test split."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Sequence

import torch

from simclr_cli.errors import DatasetError
from simclr_cli.score.evaluation import Column, Evaluation, Features

WEIGHT_DECAYS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # L2 grid for the linear probe, strongest first


def holdout_split(labels: torch.Tensor, fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, held out): a seeded `fraction` of each class (at least one of any class with two or more)."""
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = max(1, round(fraction * len(idx))) if len(idx) >= 2 else 0
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def _standardiser(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-dimension (x - mean) / std from `x`; dimensions that never vary are only centred. "Never varies"
    is relative to the dimension's own size (float rounding of a constant), not an absolute floor: an
    untrained MobileNet's h is ~1e-9 and every dimension varies at that scale."""
    mu, sd = x.mean(0), x.std(0)
    sd = torch.where(sd > 1e-5 * x.abs().amax(0), sd, torch.ones_like(sd))
    return lambda t: (t - mu) / sd


def logits(x: torch.Tensor, classifier: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    W, b = classifier
    return torch.addmm(b, x, W.T)  # (N, C)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 100,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, full-batch L-BFGS: minimise mean cross-entropy + wd/2 ||W||^2.
    Convex, so the result depends on the data and wd only; `init` warm-starts from a nearby solution.

    The gradient is written out, (softmax - onehot) / N, rather than left to autograd: on 45,000 x 512
    features it costs 80 ms of CPU per evaluation against autograd's 390 ms (x.T @ g is a slow GEMM shape).
    """
    n, rows = x.shape[0], torch.arange(x.shape[0], device=x.device)
    W = init[0].clone() if init else torch.zeros(num_classes, x.shape[1], device=x.device)  # (C, D), like nn.Linear
    b = init[1].clone() if init else torch.zeros(num_classes, device=x.device)  # (C,)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=10, tolerance_grad=1e-6,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        logp = logits(x, (W, b)).log_softmax(dim=1)  # (N, C)
        loss = -logp[rows, y].mean() + 0.5 * weight_decay * W.square().sum()
        g = logp.exp_()  # softmax, (N, C)
        g[rows, y] -= 1
        g /= n
        W.grad = torch.mm(g.T, x) + weight_decay * W  # (C, D)
        b.grad = g.sum(0)
        return loss

    with torch.no_grad():
        opt.step(closure)
    return W, b


def _topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    return (logits.topk(min(k, logits.shape[1]), dim=1).indices == y[:, None]).any(1).float().mean().item()


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's intra-op thread count set to `n` for the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, weight_decays: Sequence[float] = WEIGHT_DECAYS,
                 val_fraction: float = 0.1, seed: int = 0, max_iter: int = 100, select_iter: int = 50,
                 device: torch.device | None = None) -> dict:
    """Linear evaluation on frozen features. The L2 strength is chosen by accuracy on a held-out
    `val_fraction` of the train split (ties go to the stronger one; `select_iter` L-BFGS iterations per
    strength, warm-started along the grid), then the classifier is refit on the whole train split
    (`max_iter` iterations) and scored once on the test split. On `device` (a GPU: the fit runs there; the
    default, the CPU)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    x, y = train_feats.float().to(device), train_labels.long().to(device)
    # One thread on a machine of two cores: the probe's ops are memory-bound passes over the features, where
    # a second thread gains little and, on a busy machine, loses much to synchronisation. On CIFAR-10
    # random-init features (45,000 x 512) one L-BFGS evaluation took 65 ms with 1 thread and 160 ms with 2,
    # on this 2-core CPU with other jobs running; a 270 x 64 fit took 0.23 s against 8.6 s. With more cores
    # (a GPU machine's 16) the threads stay as they are.
    with _threads(1 if device.type == "cpu" and (os.cpu_count() or 1) <= 2 else None):
        return _linear_probe(x, y, test_feats.float().to(device), test_labels.long().to(device), num_classes,
                             weight_decays, val_fraction, seed, max_iter, select_iter)


def _linear_probe(x, y, x_test, y_test, num_classes, weight_decays, val_fraction, seed, max_iter,
                  select_iter) -> dict:
    fit_idx, val_idx = (i.to(y.device) for i in holdout_split(y.cpu(), val_fraction, seed))
    if len(val_idx) == 0 or len(fit_idx) == 0:
        raise DatasetError(f"the linear probe needs at least two training images of some class; got {len(y)}")
    scale = _standardiser(x[fit_idx])
    xf, xv = scale(x[fit_idx]), scale(x[val_idx])
    grid, solutions, best, init = {}, {}, None, None
    for wd in sorted(weight_decays, reverse=True):  # strongest first: each fit warm-starts the next
        init = solutions[wd] = fit_logistic(xf, y[fit_idx], num_classes, wd, select_iter, init)
        grid[wd] = _topk_accuracy(logits(xv, init), y[val_idx], 1)
        if best is None or grid[wd] > grid[best]:
            best = wd
    scale = _standardiser(x)
    classifier = fit_logistic(scale(x), y, num_classes, best, max_iter, solutions[best])  # warm: stats barely move
    test = logits(scale(x_test), classifier)  # (M, C)
    return {"top1": _topk_accuracy(test, y_test, 1),
            "top5": _topk_accuracy(test, y_test, 5) if num_classes > 5 else None,
            "weight_decay": best, "val_top1": grid[best],
            "train_top1": _topk_accuracy(logits(scale(x), classifier), y, 1),
            "grid": {f"{wd:g}": acc for wd, acc in grid.items()}, "val_size": len(val_idx)}


def linear(f: Features, opts: dict) -> dict:
    """Linear probe top-1 (top-5 with more than 5 classes), its L2 strength chosen on a held-out 10% of train."""
    result = linear_probe(f.train, f.train_labels, f.test, f.test_labels, f.num_classes, seed=opts["seed"],
                          device=f.train.device)
    return {"linear_top1": result["top1"], "linear_top5": result["top5"], "weight_decay": result["weight_decay"],
            "linear": result}


LINEAR = Evaluation("linear probe", linear, (  # the entry of registry.EVALUATIONS
    Column("linear top-1", "linear_top1", position=10), Column("linear top-5", "linear_top5", position=20),
    Column("L2 (held-out)", "weight_decay", "g", position=40)))
