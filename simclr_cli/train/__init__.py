"""The train wing: the pretraining loop (`loop.py`) and how a run starts (`start.py`), the run state and its
checkpoint (`state.py`), what a start or resume may do (`preflight.py`) and what every rank settles alike
(`agree.py`), the kNN monitor, the live loggers (`loggers.py`, `trackers.py`), optimisers and schedules,
the loss read-back, stops by signal, and `--nproc` (`launch.py`)."""

from simclr_cli.train.loop import Trainer
from simclr_cli.train.start import pretrain

__all__ = ["Trainer", "pretrain"]
