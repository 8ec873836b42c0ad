"""Starting or resuming a run, decided before any data or model is built, so a wrong start or resume
fails in a second with one line: the config a run resolves to, what a resume may change, what several
processes need. `simclr pretrain` asks these in one process, and once in the launcher under --nproc; on
several ranks (whatever started them) rank 0 asks and every rank starts as it decided (`start_together`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from simclr_cli.artifacts import Checkpoint
from simclr_cli.config import Config, config_from_dict, config_to_dict, load_config, merge_overrides, read_yaml
from simclr_cli.data import check_source
from simclr_cli.errors import CheckpointError, ConfigError, RuntimeSetupError, UserError
from simclr_cli.methods import check_method
from simclr_cli.models import check_model
from simclr_cli.rundir import RunDir
from simclr_cli.runtime import DistInfo
from simclr_cli.train.agree import together
from simclr_cli.train.trackers import check_loggers
from simclr_cli.train.state import check_same_step, load_checkpoint


def check_names(cfg: Config) -> None:
    """The names the config gives the registries (data.dataset, model.arch and the keywords and sizes it is
    built from, method.name) exist, and the live loggers' packages import: one line with the closest name or
    the extra, before any data is read."""
    check_source(cfg.data.dataset)
    check_model(cfg.model, cfg.data.image_size)  # the name, and the keywords and sizes it is built from
    check_method(cfg.method.name)
    check_loggers(cfg.train.loggers)


# Keys a resumed run may change; anything else would make "resume" a different run.
RESUMABLE_KEYS = {"train.epochs", "train.log_every", "train.checkpoint_every", "train.keep_last",
                  "train.eval_every", "train.output_dir", "train.device", "train.dist_timeout_min", "data.root",
                  "data.num_workers", "data.cache", "data.cache_dir", "data.download", "data.read_ahead",
                  "train.loggers", "train.log_project"}


def resolve_config(config: str | Path | None, overrides: list[str], values: dict[str, Any], resume: bool,
                   auto_resume: bool = False) -> tuple[Config, bool]:
    """(the run's config, whether it resumes). The config: defaults < YAML < --set < flags. `--resume`
    without `--config` continues the run as it was configured: its own config.yaml, with this command's
    --set and flags on top. `--auto-resume` resumes when the run directory holds a checkpoint.pt and starts
    the run otherwise: what a restarted job (`torchrun --max-restarts`, a requeued cluster job) runs. On
    several ranks each rank resolves its own, and `start_together` replaces it with rank 0's."""
    if resume and auto_resume:
        raise ConfigError("--resume and --auto-resume: give one (--auto-resume also starts a run that has no "
                          "checkpoint yet)")
    cfg = load_config(config, overrides, values)
    run = RunDir(cfg.train.output_dir)
    if auto_resume:
        resume = run.checkpoint.exists()
    if config is None and resume and run.config.is_file():
        cfg = config_from_dict(merge_overrides(read_yaml(run.config), overrides, values))
    return cfg, resume


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume_config(saved: dict, cfg: Config) -> list[str]:
    """Changed keys between the checkpoint's config and this run's; refuse any that are not safe."""
    # Read as this version reads it: a method's own settings in their place (method.NAME.KEY), and a key the
    # saved config lacks (written before the key existed) with the default it had then.
    old, new, default = (_flatten(config_to_dict(c)) for c in (config_from_dict(saved), cfg, Config()))
    changed = sorted(k for k in new if old.get(k, default.get(k)) != new[k])
    unsafe = [k for k in changed if k not in RESUMABLE_KEYS]
    if unsafe:
        diffs = ", ".join(f"{k}: {old.get(k, default.get(k))!r} -> {new[k]!r}" for k in unsafe)
        raise ConfigError(f"resume refused, the config changed ({diffs}); only {', '.join(sorted(RESUMABLE_KEYS))} "
                          "may change on resume: start a new run with another --output-dir instead")
    return [f"{k}: {old.get(k, default.get(k))!r} -> {new[k]!r}" for k in changed]


def _processes(world_size: int, local_size: int | None) -> str:
    """'4 processes', or on several nodes '4 processes (2 nodes x 2)'; local_size: the ranks of one node
    (None: torchrun's LOCAL_WORLD_SIZE, when set)."""
    local = local_size or int(os.environ.get("LOCAL_WORLD_SIZE") or world_size)
    nodes = f" ({world_size // local} nodes x {local})" if 0 < local < world_size and world_size % local == 0 else ""
    return f"{world_size} processes{nodes}"


def check_world(cfg: Config, world_size: int, device: torch.device, local_size: int | None = None) -> None:
    """Refuse what cannot run on `world_size` processes; `simclr pretrain --nproc` asks before it starts any."""
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must divide evenly over "
                          f"{_processes(world_size, local_size)}: pick a multiple of {world_size}")
    if cfg.model.sync_bn and world_size > 1 and device.type != "cuda":
        # torch's SyncBatchNorm raises on CPU tensors ("expected input tensor to be on GPU"): refuse up front.
        raise RuntimeSetupError(f"model.sync_bn needs CUDA GPUs; SyncBatchNorm has no {device.type} path: "
                                "set model.sync_bn=false (each rank then normalises over its own views)")


def start_together(ranks: DistInfo, cfg: Config, resume: bool, ckpt: dict | None,
                   refusal: UserError | None) -> tuple[Config, dict | None]:
    """(config, checkpoint) of every rank of a run, as rank 0 decided: rank 0's config, whether to resume,
    and the step of the checkpoint it resumes from. Each rank resolved its own config and, with
    --auto-resume, whether to resume, from the run directory as its node sees it; a node that does not see
    checkpoint.pt yet (a shared file system's attribute cache after a restart) would start from step 0 while
    the others resume, and the replicas would part silently. So rank 0 (`ckpt`: what its `preflight` loaded,
    or `refusal`: its one-line refusal) decides for all, each other rank reads the checkpoint itself, and a
    rank that cannot, or reads another step, stops every rank with one line. Collective."""
    step = Checkpoint(RunDir(cfg.train.output_dir).checkpoint, ckpt).step if ckpt else None
    decision = [config_to_dict(cfg), resume, step, refusal] if ranks.is_main else [None] * 4
    dist.broadcast_object_list(decision, src=0, group=ranks.control)
    saved, resume, step, refusal = decision
    if refusal is not None:
        raise refusal  # rank 0's line, on every rank
    cfg, mine = config_from_dict(saved), ckpt
    loaded = together(ranks, lambda: mine if ranks.is_main else _as_rank_0_decided(cfg, resume, step, ranks.rank))
    path = RunDir(cfg.train.output_dir).checkpoint
    check_same_step(ranks, Checkpoint(path, loaded).step if loaded else None, path)
    return cfg, loaded


def _as_rank_0_decided(cfg: Config, resume: bool, step: int | None, rank: int) -> dict | None:
    """This rank's checkpoint for rank 0's decision: the same file, or one line saying this node sees another."""
    path = RunDir(cfg.train.output_dir).checkpoint
    if resume and not path.is_file():
        raise CheckpointError(f"rank {rank} does not see {path}, which rank 0 resumes from (step {step}): every node "
                              "must see the run directory as rank 0 does; on a shared file system that caches file "
                              "attributes (NFS), start again once every node sees the file")
    if not resume and path.exists():
        raise CheckpointError(f"rank {rank} sees {path}, which rank 0 does not (it starts a new run there): every "
                              "node must see the run directory as rank 0 does; on a shared file system that caches "
                              "file attributes (NFS), start again once every node sees the same files")
    return preflight(cfg, resume)


def preflight(cfg: Config, resume: bool, load: bool = True) -> dict | None:
    """New run or resume, decided before anything is built: a new run never replaces another run's
    checkpoint; a resume needs a checkpoint whose config differs only in RESUMABLE_KEYS. Returns the
    loaded checkpoint (weights_only) for a resume, None for a new run or when `load` is False (the
    --nproc launcher: the ranks load it themselves)."""
    path = RunDir(cfg.train.output_dir).checkpoint
    if not resume:
        if path.exists():
            raise ConfigError(f"{path} already exists: add --resume to continue that run, or choose another "
                              "--output-dir")
        return None
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint: give --output-dir a run directory")
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: {path} does not exist (drop --resume to start a new run)")
    if not load:
        return None
    ckpt = Checkpoint(path, load_checkpoint(path))
    if not ckpt.has_config:
        raise CheckpointError(f"{path} holds no config: give the checkpoint.pt that `simclr pretrain` wrote")
    check_resume_config(ckpt.config, cfg)
    return ckpt.data
