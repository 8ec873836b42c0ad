"""The command line: the Typer app (`app.py`), the commands of each wing (`train.py`, `evaluate.py`), their
shared options (`options.py`) and the Rich display (`display.py`). The only wing that imports typer or rich."""

from simclr_cli.cli.app import app, main

__all__ = ["app", "main"]
