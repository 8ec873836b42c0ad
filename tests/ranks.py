"""Running a function on N gloo ranks for a test, in a way that cannot flake or hang.

Each rank joins over TCP on a port that was free a moment ago (not a shared file, not 29500), with a
timeout on every collective; when the function returns, all ranks meet at a barrier before the group is
torn down, so no rank closes its connections while another is still sending (a rank that did used to die
with SIGABRT, "terminate called without an active exception", about one run in three on an AMX machine).
The parent waits with a deadline and kills the ranks if it passes. With `join=False` the ranks get
torchrun's environment instead and join the group themselves, as `simclr pretrain` does under torchrun
(it then owns the group: its barrier at the end, its teardown).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60  # per collective, and the parent's deadline for the whole group


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple, join: bool) -> None:
    torch.set_num_threads(1)  # the ranks share this machine's two cores
    if not join:  # what torchrun sets; the function's own init_process_group reads it
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        fn(rank, *args)
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        fn(rank, *args)
        dist.barrier()  # nobody tears down while another rank may still be in a collective
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., None], args: tuple[Any, ...] = (), world: int = 2, join: bool = True) -> None:
    """Call fn(rank, *args) on `world` spawned processes inside one gloo group (`join=False`: in torchrun's
    environment, to join it themselves); raise if any rank fails or the group is not done within TIMEOUT_S
    seconds. `fn` must be a module-level function."""
    context = mp.start_processes(_rank_entry, args=(world, free_port(), fn, args, join), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S + 30  # start-up (importing torch) comes on top of the collectives
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            raise TimeoutError(f"{world} gloo ranks were not done after {TIMEOUT_S + 30} s")
