"""`simclr list`: every registry's entries and where each comes from (built in, or which installed package
through which entry point), and the one-line warning a plugin that fails to import gets."""

from __future__ import annotations

import sys
import warnings
from typing import Annotated

import typer

from simclr_cli.registry import REGISTRIES, PluginWarning

LIST_EXAMPLE = "Example: simclr list · simclr list methods"


def _one_line(message, category, filename, lineno, file=None, line=None, _shown=warnings.showwarning):
    """A plugin's failure is one line on stderr; any other warning is shown as Python shows it."""
    if issubclass(category, PluginWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _shown(message, category, filename, lineno, file, line)


def warn_in_one_line() -> None:
    warnings.showwarning = _one_line


def list_entries(
    registry: Annotated[str | None, typer.Argument(help=f"One registry: {', '.join(REGISTRIES)}. Default: all.",
                                                   show_default=False)] = None,
) -> None:
    """Print every registry's entries, built in or from a plugin package, one per line: registry, name,
    where it comes from and what it points at. A plugin that fails to import is listed with the reason."""
    if registry is not None and registry not in REGISTRIES:
        print(f"error: no registry {registry!r}: choose one of {', '.join(REGISTRIES)}", file=sys.stderr)
        raise typer.Exit(2)
    rows = [("registry", "name", "from", "target")]
    for group, reg in REGISTRIES.items():
        if registry not in (None, group):
            continue
        for entry in reg.entries():
            with warnings.catch_warnings():  # the failure is this table's row, not a warning besides
                warnings.simplefilter("ignore", PluginWarning)
                reg.load(entry)
            origin = entry.origin if entry.failure is None else f"{entry.origin} (failed to import: {entry.failure})"
            rows.append((group, entry.name, origin, entry.target))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
