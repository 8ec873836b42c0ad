"""The score wing: what a trained encoder is scored by. Frozen features are scored by the evaluations of
registry.EVALUATIONS (kNN in `knn.py`, the linear probe in `linear.py`: each an `evaluation.Evaluation` that
declares its columns of the probe's table), which `simclr probe` runs in turn (`probe.py`); `finetune.py`
trains a classifier on the encoder (`finetune_loop.py`, label subsets in `labels.py`); `health.py` is the
representation's health the pretraining monitor reads. Encoders are loaded and run through `serve`.

A new evaluation on frozen features: a function (features, options) -> {figure: value} and its `Evaluation`
(name, function, columns) in a file here or in a plugin package, one line in registry.EVALUATIONS (or an
entry point in `simclr_cli.evaluations`), and its tests (copy tests/test_sources.py's toy evaluation).
"""

from __future__ import annotations

from simclr_cli.registry import EVALUATIONS
from simclr_cli.score.evaluation import Column, Evaluation, Features, evaluations

__all__ = ["EVALUATIONS", "Column", "Evaluation", "Features", "evaluations"]
