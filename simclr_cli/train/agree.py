"""What the ranks of a run must settle alike before they go on: one rank's refusal stops every rank.

A rank that raised a user error alone would leave the others waiting in their next collective: torchrun's
agent stops them when that rank exits, but under srun, mpirun or a hand-made launcher they would wait out
`train.dist_timeout_min`. So a step that can refuse on some ranks only (opening the live loggers on rank 0,
reading checkpoint.pt on each node) runs inside `together`, and its outcome is exchanged before any rank
moves on: one small message per rank over the CPU group (`DistInfo.control`), once per run, never per step.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch.distributed as dist

from simclr_cli.errors import RuntimeSetupError, UserError
from simclr_cli.runtime import DistInfo

T = TypeVar("T")


def together(ranks: DistInfo, action: Callable[[], T]) -> T:
    """`action()` on this rank, its outcome agreed by every rank: when it raised a user error on any rank,
    every rank raises the error of the lowest such rank, the same class and the same line (so the CLI on each
    node prints the same line and exits with the same code). Any other exception is sent on as one line too:
    the rank that raised it re-raises its own (with its traceback), the others stop with that line.
    Collective: every rank calls it at the same point. One process: `action()` alone."""
    if not ranks.enabled:
        return action()
    result, failure, own = None, None, None
    try:
        result = action()
    except UserError as err:
        failure = own = err
    except Exception as err:  # a bug or a broken file system: the others must not wait for this rank
        own = err
        text = str(err).strip().splitlines()
        failure = RuntimeSetupError(f"rank {ranks.rank} failed ({type(err).__name__}"
                                    f"{': ' + text[0] if text else ''}); its own output has the traceback")
    failures: list = [None] * ranks.world_size
    dist.all_gather_object(failures, failure, group=ranks.control)
    first = next((f for f in failures if f is not None), None)
    if first is None:
        return result
    if own is not None and not isinstance(own, UserError):
        raise own
    raise first
