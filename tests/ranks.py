"""Running a function on N gloo ranks for a test, in a way that cannot flake or hang.

Each rank joins over TCP on a port that was free a moment ago (not a shared file, not 29500), with a
timeout on every collective; when the function returns, all ranks meet at a barrier before the group is
torn down, so no rank closes its connections while another is still sending (a rank that did used to die
with SIGABRT, "terminate called without an active exception", about one run in three on an AMX machine).
The parent waits with a deadline and kills the ranks if it passes. With `join=False` the ranks get
torchrun's environment instead and join the group themselves, as `simclr pretrain` does under torchrun
(it then owns the group: its barrier at the end, its teardown).

Below that, the one DDP step of NT-Xent that two spawned ranks (tests/test_distributed.py) and the ranks of two
torchrun agents (tests/test_nodes.py) take, and the check that their results are one process's.
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


# --- one DDP step of NT-Xent on a fixed global batch, against one process -----------------------------------
# Taken by spawned ranks (tests/test_distributed.py) and by ranks under two torchrun agents (tests/test_nodes.py).

TEMPERATURE = 0.2
BATCH = 8  # images in the global batch: fixed views, no augmentation


def tiny_model() -> torch.nn.Module:
    from simclr_cli.config import ModelConfig
    from simclr_cli.models import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(width=8, head_out=16))


def one_step(model: torch.nn.Module, x1: torch.Tensor, x2: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """What Trainer.train_step does, without augmentation: both views in one forward, NT-Xent, backward."""
    from simclr_cli.methods.simclr import nt_xent

    n = len(x1)
    _, z = model(torch.cat([x1, x2]))  # (2n, D)
    loss = nt_xent(z[:n], z[n:], TEMPERATURE, gather=gather)
    loss.backward()
    return loss.detach()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def global_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(weights, views 1, views 2) of BATCH images; BatchNorm's running statistics are taken from this batch, so
    eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(2, BATCH, 3, 16, 16, generator=g)
    model = tiny_model()
    with torch.no_grad():
        model.train()(torch.cat([x1, x2]))
    return {k: v.clone() for k, v in model.state_dict().items()}, x1, x2


def shard_step(rank: int, world: int, state: dict, x1: torch.Tensor, x2: torch.Tensor) -> dict:
    """This rank's step on its shard under DDP, inside an initialised group: {"eval": (loss, grads) with BN on
    running statistics, "train": the same with BN on the rank's own views, "local": the loss without the gather}."""
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_model()
    model.load_state_dict(state)
    net = DistributedDataParallel(model)
    n = len(x1) // world
    mine = slice(rank * n, (rank + 1) * n)  # this rank's shard of the global batch
    result: dict = {}
    for mode in ("eval", "train"):
        net.train(mode == "train")
        net.zero_grad(set_to_none=True)
        result[mode] = (one_step(net, x1[mine], x2[mine]), grads(model))
    net.zero_grad(set_to_none=True)
    with net.no_sync():  # no gradient all-reduce: only the loss value matters here
        result["local"] = one_step(net, x1[mine], x2[mine], gather=False)
    return result


def assert_one_process(ranks: list[dict], state: dict, x1: torch.Tensor, x2: torch.Tensor) -> None:
    """The ranks' `shard_step` results against one process on the whole batch: with eval-mode BN the mean loss
    and every rank's every gradient equal it; with training-mode BN (statistics per rank) the gradients differ,
    and so does the loss without the gather (fewer negatives), so the equality is not vacuous."""
    from simclr_cli.methods.simclr import nt_xent

    model = tiny_model()
    for mode in ("eval", "train"):
        model.load_state_dict(state)
        model.train(mode == "train")
        model.zero_grad(set_to_none=True)
        single_loss, single_grads = one_step(model, x1, x2), grads(model)
        rank_loss = torch.stack([r[mode][0] for r in ranks]).mean()  # what Trainer logs: the mean over ranks
        if mode == "eval":
            assert abs(rank_loss.item() - single_loss.item()) <= 1e-5, (rank_loss.item(), single_loss.item())
            assert len(single_grads) == len(list(model.parameters()))
            for r in ranks:  # DDP leaves the same averaged gradient on every rank
                for name, grad in single_grads.items():
                    torch.testing.assert_close(r["eval"][1][name], grad, atol=1e-5, rtol=0, msg=name)
        else:
            worst = max((ranks[0]["train"][1][k] - v).abs().max().item() for k, v in single_grads.items())
            assert worst > 1e-4  # per-rank BN statistics: a different function, hence the eval-mode check
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        _, z = model(torch.cat([x1, x2]))
    single = nt_xent(z[:BATCH], z[BATCH:], TEMPERATURE).item()
    local_only = torch.stack([r["local"] for r in ranks]).mean().item()  # fewer negatives than 2N - 2
    assert abs(local_only - single) > 1e-2
