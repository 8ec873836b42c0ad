"""Configuration: nested dataclasses holding every default, YAML loading, `--set` overrides and validation.

Precedence: dataclass defaults < YAML file < `--set section.key=value` < dedicated CLI flags. One concept
keeps one name everywhere (YAML key, dataclass field, flag). The resolved config is written to the run
directory and into every checkpoint, so later commands rebuild the encoder from the file alone.

Longer than 300 lines: every setting, its default, unit and rule, is here and nowhere else.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from simclr_cli.errors import ConfigError
from simclr_cli.owned import checked_options, option_hint, settings
from simclr_cli.registry import LOGGERS, METHODS, PRESETS, SOURCES
from simclr_cli.runtime import PRECISIONS
from simclr_cli.typed import build


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # a name of data.SOURCES: cifar10 | cifar100 | folder | synthetic | webdataset
    root: str | None = None  # data folder (folder dataset: the image folder); None -> $SIMCLR_DATA_DIR or ~/.cache
    download: bool = True  # cifar10/100 only: fetch with torchvision when the files are missing
    size_dataset_train: int | None = None  # keep a fixed random subset of this many training images
    image_size: int = 32  # pixels, side of the square views fed to the encoder
    num_workers: int = 2  # image-decoding worker processes (folder datasets, webdataset shards)
    synthetic_size: int = 2000  # images per split of the synthetic dataset
    cache: bool = True  # folder: decode once into one uint8 file on disk and map it (false: decode into memory)
    cache_dir: str | None = None  # folder cache location; None -> $SIMCLR_CACHE_DIR or ~/.cache/simclr-cli/folders
    skip_bad: bool = False  # folder: leave out files that do not decode (else they are named and the run stops)
    val_size: int = 5000  # labelled training images held out as the validation split (capped at a tenth)
    read_ahead: int = 2  # folder through the cache: batches read on a background thread ahead of the step (0: off)
    # The named source's own settings, written `data.NAME.KEY`: an instance of its Options dataclass (a plugin's
    # source; the built-in ones read the keys above); None for a source without any.
    options: Any = None


@dataclass
class AugmentConfig:
    preset: str = "simclr"  # registry.PRESETS: simclr (the paper's CIFAR recipe) | baseline (the original design's)
    crop_scale_min: float = 0.08  # simclr: smallest crop area as a fraction of the image
    jitter_strength: float = 1.0  # simclr: multiplies colour jitter 0.4/0.4/0.4/0.1
    view_size: int | None = None  # pixels of each training view; null = data.image_size (what probes use)
    view_size_start: int | None = None  # progressive views: this size first, rising to view_size by the end; null = off
    small_crops: int = 0  # simclr: extra small views per image (multi-crop), each a positive of both views
    small_crop_size: int = 12  # pixels of each small view
    small_crop_scale: list[float] = field(default_factory=lambda: [0.08, 0.35])  # small views' crop area range


@dataclass
class ModelConfig:
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 (built in) | torchvision:NAME | timm:NAME (models.ENCODERS)
    stem: str = "auto"  # auto (imagenet from data.image_size 64 up, else cifar) | cifar (small images: 3x3 stride-1 first conv, no max-pool; see README Backbones) | imagenet (as designed)
    width: int = 64  # built-in ResNets: channels of the first stage; 64 is torchvision's, smaller is faster on a CPU
    kwargs: dict[str, Any] = field(default_factory=dict)  # torchvision/timm: constructor keywords, e.g. {img_size: 32, patch_size: 4}
    init: str | None = None  # warm start: a weights file (encoder file, checkpoint, torchvision/timm state dict) | pretrained (the library's own weights; needs the network) | null
    head_hidden: int | None = None  # projection head hidden units; None -> the encoder's feature dim
    head_out: int = 128  # projection z dimension
    head_layers: int = 2  # linear layers in the projection head: 2 = SimCLR v1, 3 = SimCLR v2
    sync_bn: bool = False  # SyncBatchNorm across ranks (distributed runs only)


@dataclass
class MethodConfig:
    name: str = "simclr"  # a name of registry.METHODS: simclr | moco (EMA key encoder + queue) | byol | dino | mae
    # The named method's own settings, written `method.NAME.KEY` (method.moco.queue_size): an instance of the
    # method's Options dataclass, which holds their defaults (methods/NAME.py); None for a method without any.
    options: Any = None


@dataclass
class LossConfig:
    temperature: float = 0.5  # NT-Xent (simclr) and InfoNCE (moco) temperature tau; byol has none


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw | lars
    lr: float = 0.06  # peak learning rate (after warmup)
    momentum: float = 0.9  # sgd / lars momentum
    nesterov: bool = False  # sgd only
    weight_decay: float = 5e-4  # L2 penalty; biases and norm layers are excluded
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam / adamw
    schedule: str = "cosine"  # cosine (warmup + cosine) | plateau (ReduceLROnPlateau on epoch loss) | constant
    warmup_epochs: float = 10.0  # linear warmup length in epochs (cosine and constant)
    min_lr: float = 0.0  # cosine: final learning rate
    plateau_factor: float = 0.5  # plateau: lr multiplier on a plateau
    plateau_patience: int = 5  # plateau: epochs without improvement before reducing


@dataclass
class TrainConfig:
    epochs: int = 100  # passes over the training set
    batch_size: int = 256  # global batch (all ranks together), images; each gives two views
    seed: int = 0  # seeds the model, data order, augmentations and a flat folder's split; 0 .. 2**32 - 1
    device: str = "auto"  # auto (cuda > mps > cpu) | cuda | cuda:N | mps | cpu
    precision: str = "auto"  # auto (bf16 where the hardware has it, else fp32) | fp32 | bf16 | fp16
    channels_last: bool = True  # NHWC memory format for convolutions
    compile: bool = False  # torch.compile the model
    output_dir: str = "runs/simclr"  # run directory: config, metrics, checkpoints, encoder
    log_every: int = 20  # steps between loss read-backs (each one is a host sync)
    checkpoint_every: int = 1  # epochs between checkpoints
    keep_last: int = 0  # also keep this many older epoch checkpoints (0: only checkpoint.pt)
    eval_every: int = 10  # epochs between kNN monitor evaluations (0: only at the end)
    eval_split: str = "val"  # monitor queries: val (held out of the training split; the rest is the bank) | test
    knn_k: int = 200  # kNN monitor neighbours
    knn_temperature: float = 0.1  # kNN monitor vote temperature
    loggers: list[str] = field(default_factory=list)  # live loggers beside metrics.jsonl (registry.LOGGERS): any of tensorboard, wandb, mlflow (each an extra)
    log_project: str = "simclr"  # wandb: the project; mlflow: the experiment (the run is named after output_dir)
    dist_timeout_min: float = 30.0  # several processes: minutes a collective may wait for the others before the run fails


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# model.stem auto: the ImageNet stem (7x7 stride-2 conv + max-pool, 4x fewer pixels after it) from 64 px up;
# below that its downsampling leaves too little: a 32 px CIFAR image would be 8x8 after the stem.
IMAGENET_STEM_FROM = 64
# data.dataset, model.arch and method.name name entries of the registries (`registry.py`), which check them,
# with a close match; a method's own settings and rules are its entry's (`method_section`, `check_method`).
CHOICES = {
    "augment.preset": PRESETS,  # the registries' names, plugins' included
    "model.stem": ("auto", "cifar", "imagenet"),
    "optim.name": ("sgd", "adam", "adamw", "lars"),
    "optim.schedule": ("cosine", "plateau", "constant"),
    "train.precision": PRECISIONS,
    "train.eval_split": ("val", "test"),
}

# (key, test, what the value must be): checked after every load and override.
RULES = [
    ("loss.temperature", lambda v: v > 0, "> 0"),
    ("train.batch_size", lambda v: v >= 2, ">= 2 (NT-Xent needs negatives)"),
    # Seeds are combined as seed * 1_000_003 + ... into torch generators, which take 64 bits.
    ("train.seed", lambda v: 0 <= v < 2**32, "in 0 .. 4294967295"),
    ("train.epochs", lambda v: v >= 1, ">= 1"),
    ("train.output_dir", lambda v: v.strip() != "", "a folder name, not empty"),
    ("train.log_every", lambda v: v >= 1, ">= 1"),
    ("train.checkpoint_every", lambda v: v >= 1, ">= 1"),
    ("train.keep_last", lambda v: v >= 0, ">= 0"),
    ("train.eval_every", lambda v: v >= 0, ">= 0"),
    ("train.knn_k", lambda v: v >= 1, ">= 1"),
    ("train.knn_temperature", lambda v: v > 0, "> 0"),
    ("train.loggers", lambda v: set(v) <= set(LOGGERS.names()) and len(set(v)) == len(v),
     lambda: f"a list of distinct names of {', '.join(LOGGERS.names())}"),
    ("train.log_project", lambda v: v.strip() != "", "a name, not empty"),
    ("train.dist_timeout_min", lambda v: v > 0, "> 0 (minutes)"),
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("optim.min_lr", lambda v: v >= 0, ">= 0"),
    ("optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ("optim.plateau_factor", lambda v: 0 < v < 1, "in (0, 1)"),
    ("optim.plateau_patience", lambda v: v >= 0, ">= 0"),
    ("augment.crop_scale_min", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("augment.jitter_strength", lambda v: v >= 0, ">= 0"),
    ("augment.view_size", lambda v: v is None or v >= 8, ">= 8 or null"),
    ("augment.view_size_start", lambda v: v is None or v >= 8, ">= 8 or null"),
    ("augment.small_crops", lambda v: v >= 0, ">= 0"),
    ("augment.small_crop_size", lambda v: v >= 8, ">= 8"),
    ("augment.small_crop_scale", lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "two numbers 0 < min <= max <= 1"),
    # Under 8, torch 2.14's CPU backward of a channels_last 1x1 stride-2 convolution (the ResNet shortcut)
    # with fewer than 8 input channels corrupts the heap: the process hangs or aborts in free().
    ("model.width", lambda v: v >= 8, ">= 8"),
    ("model.head_out", lambda v: v >= 1, ">= 1"),
    ("model.head_layers", lambda v: v in (2, 3), "2 or 3"),
    ("model.head_hidden", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("data.image_size", lambda v: v >= 8, ">= 8"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("data.synthetic_size", lambda v: v >= 2, ">= 2"),
    ("data.val_size", lambda v: v >= 1, ">= 1"),
    ("data.read_ahead", lambda v: v >= 0, ">= 0"),
    ("data.size_dataset_train", lambda v: v is None or v >= 2, ">= 2 or null"),
]


def get_value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: Config) -> Config:
    for key, choices in CHOICES.items():
        if get_value(cfg, key) not in choices:
            raise ConfigError(f"'{key}' must be one of {', '.join(choices)}; got {get_value(cfg, key)!r}")
    for key, test, what in RULES:
        if not test(get_value(cfg, key)):
            what = what() if callable(what) else what  # a registry's names, as they are now
            raise ConfigError(f"'{key}' must be {what}; got {get_value(cfg, key)!r}")
    if cfg.model.stem == "auto":  # the written config.yaml and checkpoints hold the stem this chose
        cfg.model.stem = "imagenet" if cfg.data.image_size >= IMAGENET_STEM_FROM else "cifar"
    final = cfg.augment.view_size or cfg.data.image_size
    if cfg.augment.view_size_start is not None and cfg.augment.view_size_start > final:
        raise ConfigError(f"'augment.view_size_start' ({cfg.augment.view_size_start}) must not exceed the final view "
                          f"size ({final}, augment.view_size or data.image_size): progressive views grow")
    method, cfg.method.options = checked_options(METHODS, "method", cfg.method.name, cfg.method.options)
    if cfg.augment.small_crops and not (method.multi_crop and cfg.augment.preset == "simclr"):
        takes = ", ".join(n for n in METHODS.names() if getattr(METHODS[n], "multi_crop", False))
        raise ConfigError(f"'augment.small_crops' (multi-crop) needs a method that takes it ({takes}) and "
                          f"augment.preset=simclr; got {cfg.method.name} with {cfg.augment.preset}: set "
                          "augment.small_crops=0")
    smallest = min(final, cfg.augment.view_size_start or final)  # the global views' smallest size
    if cfg.augment.small_crops and cfg.augment.small_crop_size > smallest:
        raise ConfigError(f"'augment.small_crop_size' ({cfg.augment.small_crop_size}) must not exceed the global views "
                          f"({smallest} px): multi-crop's small views are the local ones; set augment.small_crop_size "
                          f"<= {smallest}")
    if cfg.data.dataset in SOURCES:  # an unknown name is the data wing's one line (`data.check_source`)
        source, cfg.data.options = checked_options(SOURCES, "data", cfg.data.dataset, cfg.data.options)
        source.check(cfg.data)
    if cfg.optim.nesterov and (cfg.optim.name not in ("sgd", "lars") or cfg.optim.momentum == 0):
        raise ConfigError(f"'optim.nesterov' needs optim.name sgd or lars with optim.momentum > 0; got "
                          f"{cfg.optim.name} with momentum {cfg.optim.momentum:g}: set optim.nesterov=false")
    return cfg


def method_section(raw: Any) -> MethodConfig:
    """The `method:` mapping -> MethodConfig: `name`, and the named method's own settings (`owned.settings`)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("'method' must be a mapping of keys to values")
    name = build(MethodConfig, {"name": raw.get("name", MethodConfig.name)}).name
    return MethodConfig(name, settings(METHODS, "method", raw, name))


def _field_hint(section: str, name: str, *more: str) -> Any:
    """The type of Config.section.name, or None when there is no such key (validation names it later)."""
    if more:  # method.NAME.KEY, data.NAME.KEY: an entry's own setting
        return option_hint({"method": METHODS, "data": SOURCES}[section], name, more[0])
    sections = get_type_hints(Config)
    if section not in sections:
        return None
    return get_type_hints(sections[section]).get(name)


def _is_text(hint: Any) -> bool:
    return hint is str or (get_origin(hint) in (Union, types.UnionType) and str in get_args(hint))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=0.5' -> (['optim', 'lr'], 0.5); an entry's own setting has three (method.moco.queue_size). The value is read as YAML (numbers, true/false, lists, null),
    except for a key that holds text (a path, a device, a name): there it is the text as typed, so
    `train.output_dir=runs/exp #3` keeps its '#3' and `train.output_dir=42` is the folder '42'."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not (len(parts) == 2 or (len(parts) == 3 and parts[0] in ("method", "data"))) or not all(parts):
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. optim.lr=0.5 (a method's "
                          "or source's own setting: method.NAME.KEY=value, data.NAME.KEY=value)")
    hint = _field_hint(*parts)
    if _is_text(hint):
        optional = hint is not str
        return parts, None if optional and value.strip() in ("", "null", "~") else value
    try:
        return parts, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return parts, value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: give a YAML config file (see examples/ for a starting point)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (see examples/ for a starting point)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem}); Python tags (!!python/...) are refused")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; give a YAML config")
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, optim, ...)")
    return raw or {}


def merge_overrides(raw: dict, overrides: list[str], values: dict[str, Any] | None = None) -> dict:
    """`raw` with each `--set` text applied, then `values` ({"train.output_dir": ...}: dedicated flags,
    taken as they are, never parsed). The caller's dict stays as it was."""
    raw = copy.deepcopy(raw)  # YAML may hold dates, bytes or sets: validation names them, a copy must not fail
    pairs = [parse_override(text) for text in overrides] + [(key.split("."), v) for key, v in (values or {}).items()]
    for parts, value in pairs:
        node = raw
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{'.'.join(parts[:depth + 1])}' must be a mapping of keys to values")
        node[parts[-1]] = value
    return raw


def config_from_dict(raw: dict | None) -> Config:
    if not isinstance(raw, dict):
        return validate(build(Config, raw))
    raw = dict(raw)
    method = method_section(raw.pop("method", None))
    data, own = raw.get("data"), None
    if isinstance(data, dict) and isinstance(data.get(data.get("dataset", DataConfig.dataset)), dict):
        data = dict(data)  # data.NAME.*: a source's own settings
        own = data.pop(data.get("dataset", DataConfig.dataset))
        raw["data"] = data
    cfg = dataclasses.replace(build(Config, raw), method=method)
    cfg.data.options = own
    return validate(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> Config:
    """defaults < the YAML file at `path` < `overrides` (--set texts) < `values` (dedicated flags, as given)."""
    raw = read_yaml(path) if path else {}
    return config_from_dict(merge_overrides(raw, overrides or [], values))


def config_to_dict(cfg: Config) -> dict:
    """The config as plain data, as YAML holds it: an entry's own settings under method.NAME, data.NAME."""
    out = dataclasses.asdict(cfg)
    for section, name in (("method", cfg.method.name), ("data", cfg.data.dataset)):
        options = out[section].pop("options")
        if options:
            out[section][name] = options
    return out


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_digest(cfg: Config) -> str:
    """Short stable fingerprint of a config, recorded in encoder files as provenance."""
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]
