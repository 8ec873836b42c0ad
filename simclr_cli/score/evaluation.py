"""What an evaluation is: the entry `registry.EVALUATIONS` maps a name to. `simclr probe` extracts frozen
features once and runs every registered evaluation on them in turn; each returns its figures, and declares
the columns of the probe's table that show them, so the table is built from the entries, not from a list.

A new evaluation: a file with its function and its `Evaluation`, one line in registry.EVALUATIONS (or an
entry point in the group `simclr_cli.evaluations`), and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from simclr_cli.registry import EVALUATIONS

# Columns are ordered by position: the built-ins take 10-40 (linear top-1, top-5, kNN top-1, L2), so a new
# evaluation's columns (default 50) come after them and before the probe's own "extract img/s".
DEFAULT_POSITION = 50


@dataclass
class Features:
    """Frozen features of a labelled train and test split, on the device the encoder ran on."""

    train: torch.Tensor  # (N, D) float32
    train_labels: torch.Tensor  # (N,) int64
    test: torch.Tensor  # (M, D)
    test_labels: torch.Tensor  # (M,)
    num_classes: int


@dataclass(frozen=True)
class Column:
    """One column of the probe's table: `header` over the figure `key` of the evaluation's result."""

    header: str
    key: str
    format: str = ".2%"  # a format spec for format(value, spec): ".2%" an accuracy 0.9123 as 91.23%
    position: int = DEFAULT_POSITION  # left to right by position, then in registry order

    def cell(self, result: dict) -> str:
        """The cell of one row: "-" where the figure is None (top-5 of 5 classes or fewer) or absent."""
        value = result.get(self.key)
        return "-" if value is None else format(value, self.format)


@dataclass(frozen=True)
class Evaluation:
    """A score of frozen features. run(features, options) -> {figure: value}; options hold knn_k,
    knn_temperature, seed (of any held-out split), batch_size and layer. Its figures are written to the
    probe's JSON under each model's result, beside "<registry name>_s", the seconds it took."""

    name: str  # what the progress line says while it runs ("kNN")
    run: Callable[[Features, dict], dict[str, Any]]
    columns: tuple[Column, ...] = ()


def evaluations() -> dict[str, Evaluation]:
    """Every evaluation that can run, in registry order: a plugin that fails to import is warned about and
    left out, never a broken probe."""
    return {e.name: ev for e in EVALUATIONS.entries() if (ev := EVALUATIONS.load(e)) is not None}


def table_columns() -> list[Column]:
    """The columns of every evaluation, left to right."""
    return sorted((c for ev in evaluations().values() for c in ev.columns), key=lambda c: c.position)


__all__ = ["Column", "Evaluation", "Features", "evaluations", "table_columns"]
