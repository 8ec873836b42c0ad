"""Nearest class centroid as a simclr-cli evaluation: `simclr probe` runs it and shows one more column."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from simclr_cli.score import Column, Evaluation


def centroid(f, opts) -> dict:
    """Top-1 of assigning each test feature to the class whose mean unit train feature is the most similar."""
    train, test = F.normalize(f.train.float(), dim=1), F.normalize(f.test.float(), dim=1)
    means = torch.zeros(f.num_classes, train.shape[1], device=train.device).index_add_(0, f.train_labels, train)
    predicted = (test @ F.normalize(means, dim=1).T).argmax(dim=1)  # (M,)
    return {"centroid_top1": (predicted == f.test_labels).float().mean().item()}


CENTROID = Evaluation("nearest centroid", centroid, (Column("centroid top-1", "centroid_top1"),))
