"""The evaluate wing: what is done with a trained encoder. Frozen features are scored by the evaluations of
registry.EVALUATIONS (kNN in `knn.py` and the linear probe in `linear.py`, each an `evaluation.Evaluation`
that `simclr probe` runs in turn and that declares its columns of the probe's table); `inference.py` is the
one way an encoder is loaded and run for probe, embed, neighbors and report; `export.py` writes the encoder
in the formats of EXPORTS (`simclr extract`).

A new evaluation on frozen features: a function (features, options) -> {figure: value} and its `Evaluation`
(name, function, columns) in a file here, one line in registry.EVALUATIONS, and its tests (copy
tests/test_evaluate.py's cases). A new export format: see export.py.
"""

from __future__ import annotations

from simclr_cli.evaluate.evaluation import Column, Evaluation, Features, evaluations
from simclr_cli.registry import EVALUATIONS

__all__ = ["EVALUATIONS", "Column", "Evaluation", "Features", "evaluations"]
