"""The evaluate wing: what is done with a trained encoder. Frozen features are scored by the evaluations in
EVALUATIONS (kNN and the linear probe, `simclr probe` runs each in turn); `inference.py` is the one way an
encoder is loaded and run for probe, embed, neighbors and report; `export.py` writes the encoder in the
formats of EXPORTS (`simclr extract`).

A new evaluation on frozen features: a function (features, options) -> {figure: value} in a file here, one
line in EVALUATIONS, and its tests (copy tests/test_evaluate.py's cases). A new export format: see export.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from simclr_cli.evaluate.knn import knn_accuracy
from simclr_cli.evaluate.linear import linear_probe


@dataclass
class Features:
    """Frozen features of a labelled train and test split, on the device the encoder ran on."""

    train: torch.Tensor  # (N, D) float32
    train_labels: torch.Tensor  # (N,) int64
    test: torch.Tensor  # (M, D)
    test_labels: torch.Tensor  # (M,)
    num_classes: int


class Evaluation(NamedTuple):
    title: str  # what the progress line says while it runs
    run: Callable[[Features, dict], dict]  # (features, options: knn_k, knn_temperature, seed) -> figures


def knn(f: Features, opts: dict) -> dict:
    """Weighted kNN top-1 on the test split, the bank the train split (Wu et al. 2018)."""
    return {"knn_top1": knn_accuracy(f.train, f.train_labels, f.test, f.test_labels, f.num_classes, opts["knn_k"],
                                     opts["knn_temperature"])}


def linear(f: Features, opts: dict) -> dict:
    """Linear probe top-1 (top-5 with more than 5 classes), its L2 strength chosen on a held-out 10% of train."""
    result = linear_probe(f.train, f.train_labels, f.test, f.test_labels, f.num_classes, seed=opts["seed"],
                          device=f.train.device)
    return {"linear_top1": result["top1"], "linear_top5": result["top5"], "weight_decay": result["weight_decay"],
            "linear": result}


EVALUATIONS: dict[str, Evaluation] = {"knn": Evaluation("kNN", knn), "linear": Evaluation("linear probe", linear)}

__all__ = ["EVALUATIONS", "Evaluation", "Features"]
