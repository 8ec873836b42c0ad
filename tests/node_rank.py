"""What each rank runs under the two torchrun agents of tests/test_nodes.py (a script: torchrun starts it by path).

  node_rank.py step DIR   one DDP step of tests/ranks.py's `shard_step` on the inputs in DIR/inputs.pt; this
                          rank's results, and the agent (GROUP_RANK) and local rank it ran as, go to DIR/rank<RANK>.pt
  node_rank.py cli ARGS   `python -m simclr_cli ARGS`, each folder-cache build this process decodes appended as a
                          line "RANK PID" to the file $SIMCLR_TEST_BUILDS; with $SIMCLR_TEST_STEP_S, every
                          training step sleeps that many seconds first (a run slow enough to be killed mid-way)
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def step(folder: Path) -> None:
    from ranks import TIMEOUT_S, shard_step  # tests/ranks.py, beside this script

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))  # torchrun's environment
    try:
        result = shard_step(rank, world, inputs["state"], inputs["x1"], inputs["x2"])
        where = {"node": int(os.environ["GROUP_RANK"]), "local_rank": int(os.environ["LOCAL_RANK"]), "world": world}
        torch.save({"result": result, **where}, folder / f"rank{rank}.pt")
        dist.barrier()  # nobody tears down while another rank may still be in a collective
    finally:
        dist.destroy_process_group()


def cli(args: list[str]) -> None:
    from simclr_cli.cli import main
    from simclr_cli.data import cache

    build = cache._build

    def counted(*a, **kw):
        with open(os.environ["SIMCLR_TEST_BUILDS"], "a") as log:
            log.write(f"{os.environ.get('RANK')} {os.getpid()}\n")
        return build(*a, **kw)

    cache._build = counted
    pause = float(os.environ.get("SIMCLR_TEST_STEP_S", 0))
    if pause:
        from simclr_cli.train.loop import Trainer

        train_step = Trainer.train_step

        def slowed(self, x):
            time.sleep(pause)
            return train_step(self, x)

        Trainer.train_step = slowed
    sys.argv = ["simclr_cli", *args]
    main()


if __name__ == "__main__":
    if sys.argv[1] == "step":
        step(Path(sys.argv[2]))
    else:
        cli(sys.argv[2:])
