"""Runtime: device choice, numeric precision, torch.distributed set-up, RNG state and device descriptions.

Precision `auto` means bf16 autocast where the hardware runs it natively (CUDA GPUs of compute capability
8.0 and up, CPUs with AMX or AVX512-BF16), fp16 with a GradScaler for training on older GPUs (fp32 for probe
and embed there, which allow no fp16), and fp32 elsewhere. Measured on an AVX2-only AMD EPYC (2 cores), a ResNet-18 training
step ran at 30.5 views/s in fp32 + channels_last and 2.0 views/s under bf16 autocast: bf16 without
hardware support is emulated and 15x slower, so `auto` must not pick it there.

`SIMCLR_PRECISION=fp32|bf16` decides what `auto` means on this machine, whatever its hardware: the test
suite runs under both to cover the other kind of CPU (AVX2-only, where auto is fp32, and AMX, where it is
bf16). An explicit precision is never overridden.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from simclr_cli.errors import RuntimeSetupError


Callback = Callable[[str, dict], None]  # how the core reports: callback(event, data), never print


DEVICE_TYPES = ("cpu", "cuda", "mps")  # what the training loop, probe and embed run on
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16")  # probe and embed: no fp16 (it needs a loss scale to be safe)
PRECISION_ENV = "SIMCLR_PRECISION"  # forces what `auto` resolves to (fp32 or bf16)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES or (device.type != "cuda" and device.index):
        raise RuntimeSetupError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeSetupError(f"device '{name}' asked for but no CUDA GPU is visible: use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise RuntimeSetupError(f"device '{name}' asked for but {count} CUDA GPU{'s are' if count > 1 else ' is'} "
                                f"visible: use cuda:0..cuda:{count - 1}, cuda or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeSetupError("device 'mps' asked for but MPS is not available: use --device cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return device


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX-BF16 or AVX512-BF16 instructions, where oneDNN runs bf16 natively."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def forced_precision() -> str | None:
    """$SIMCLR_PRECISION (fp32 or bf16) when set: what `auto` means here regardless of the hardware."""
    value = os.environ.get(PRECISION_ENV, "").strip().lower()
    if not value:
        return None
    if value not in ("fp32", "bf16"):
        raise RuntimeSetupError(f"{PRECISION_ENV}={value!r} is not a precision: set it to fp32 or bf16, or unset it")
    return value


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Compute capability 8.0 and up (A100, RTX 30xx, H100, ...). `torch.cuda.is_bf16_supported()` also says
    yes on a T4, V100 or RTX 20xx, where bf16 is emulated: slow, and missing from some kernels."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: str, device: torch.device, allowed: tuple[str, ...] = PRECISIONS) -> str:
    """'auto' | 'fp32' | 'bf16' | 'fp16' -> the precision actually used on this device; `auto` resolves
    inside `allowed` (probe and embed allow no fp16: a GPU without native bf16 gives them fp32)."""
    if precision not in allowed:
        raise RuntimeSetupError(f"unknown precision {precision!r}: use {', '.join(allowed)}")
    if precision == "auto" and forced_precision():
        precision = forced_precision()
    if precision == "auto":
        if device.type == "cuda":
            if cuda_has_native_bf16(device):
                return "bf16"
            return "fp16" if "fp16" in allowed else "fp32"
        if device.type == "cpu" and cpu_has_fast_bf16():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise RuntimeSetupError("fp16 is not supported on the CPU: use precision bf16 or fp32")
    return precision


def configure_cuda(device: torch.device, precision: str, training: bool) -> str | None:
    """The CUDA library settings a run uses, set process-wide; what the start panel shows (None off CUDA).

    cudnn.benchmark: cuDNN times its convolution algorithms on the first batch of each shape and keeps the
    fastest (the shapes here are fixed, or a few with progressive views). GPU results are not bitwise
    reproducible between processes either way (cudnn.deterministic is off), so nothing is lost.
    TF32 (10-bit mantissa, as bf16 has 7) for fp32 matmuls and convolutions when training in fp32, where it
    is what bf16 autocast would give anyway. Off otherwise: under autocast the loss is meant to be fp32, and
    fp32 probe and embed rows are meant to agree with the CPU's within ~1e-5 (cuDNN's own default for
    convolutions is TF32 on, so it is switched off explicitly).
    """
    if device.type != "cuda":
        return None
    torch.backends.cudnn.benchmark = True
    tf32 = training and precision == "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return f"cudnn.benchmark on, TF32 {'on' if tf32 else 'off'} for fp32 matmuls and convolutions"


def autocast(device: torch.device, precision: str):
    """Context manager for the forward pass; fp32 runs without autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: object = None  # the group small CPU messages go through (a stop agreed every step); None: the default

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def is_main_process() -> bool:
    """Rank 0 of a torchrun group, or a process on its own: the one that prints and writes."""
    return int(os.environ.get("RANK", 0)) == 0


def check_device_for_ranks(device_name: str, world_size: int) -> None:
    """Under several processes each rank takes cuda:LOCAL_RANK; a fixed cuda:N would put them all on GPU N."""
    if world_size > 1 and device_name.strip().startswith("cuda:"):
        raise RuntimeSetupError(f"train.device={device_name} would put all {world_size} processes on one GPU: set "
                                "train.device=cuda (or auto), and each rank takes the GPU of its local rank; choose "
                                "the GPUs with CUDA_VISIBLE_DEVICES")


def init_distributed(device_name: str = "auto", timeout_min: float | None = None) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Without those variables this is a single process and nothing is initialised. nccl on CUDA, gloo on CPU;
    every collective gives up after `timeout_min` minutes (None: torch's default, 10 for nccl, 30 for gloo).
    Beside an nccl group, a gloo group carries the per-step stop agreement as a CPU message, so agreeing
    never makes the GPU wait.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    check_device_for_ranks(device_name, world_size)
    info = DistInfo(int(os.environ.get("RANK", 0)), world_size, int(os.environ.get("LOCAL_RANK", 0)))
    device = pick_device(device_name)
    if world_size > 1:
        timeout = {"timeout": datetime.timedelta(minutes=timeout_min)} if timeout_min else {}
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **timeout)
        if dist.get_backend() != "gloo":
            info.control = dist.new_group(backend="gloo", **timeout)
    return info, device


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP without its own buffer broadcast: DDP broadcasts rank 0's buffers at every forward, and multi-crop runs
    two forwards before one backward; up to torch 2.11 (what the GPU machine has) the second broadcast bumps
    the version of the batch norm statistics the first forward's graph saved, and backward fails ("modified by
    an inplace operation"). `broadcast_buffers` does the same broadcast once per step, before the forwards.
    torch 2.13 renamed the switch `forward_sync_buffers` and warns, on every rank, about the old name."""
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    switch = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **switch)


@torch.no_grad()
def broadcast_buffers(model: torch.nn.Module) -> None:
    """Every rank takes rank 0's buffers (batch norm's running statistics), one collective per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in model.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(part.view_as(b))


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def describe_device(device: torch.device, precision: str) -> dict[str, str]:
    """What the start-up panel shows about where the run happens."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        bf16 = "native bf16" if cuda_has_native_bf16(device) else "no native bf16"
        name = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, compute {props.major}.{props.minor}, {bf16}), "
                f"CUDA {torch.version.cuda}")
    elif device.type == "mps":
        name = f"Apple MPS ({platform.machine()})"
    else:
        bf16 = "bf16 hardware" if cpu_has_fast_bf16() else "no bf16 hardware"
        if forced_precision():
            bf16 += f", auto = {forced_precision()} by {PRECISION_ENV}"
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, {bf16}"
    return {"device": f"{device} - {name}", "precision": precision, "torch": torch.__version__}


def capture_rng(generator: torch.Generator | None = None) -> dict:
    """The RNG streams a resumed run continues: torch's CPU and CUDA streams and the augmentation generator
    (whose state only fits a generator on the same kind of device, so that kind is recorded beside it)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["augment"] = generator.get_state()
        state["augment_device"] = generator.device.type
    return state


def restore_rng(state: dict, generator: torch.Generator | None = None) -> bool:
    """Restore what `capture_rng` saved. Returns False when the augmentation stream could not be restored
    because the generator is on another kind of device than the one that saved it (the caller reseeds)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]  # one state per GPU of the machine that saved it; restore those this one has
        for index in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(saved[index], index)
    if generator is None or "augment" not in state:
        return True
    if state.get("augment_device", generator.device.type) != generator.device.type:
        return False
    try:
        generator.set_state(state["augment"])
    except RuntimeError:  # a checkpoint from before augment_device was recorded, saved on another device
        return False
    return True
