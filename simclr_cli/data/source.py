"""What a data source is: the entry `registry.SOURCES` maps a `data.dataset` name to, carrying its own policy.

A `Source` says how one split is loaded and everything the rest of the tool asks before loading it: the
normalisation of its images, whether it needs `data.root`, whether its splits carry labels (probe and
finetune need them), whether it is a map (one indexable split, an `ImageSet`) or a stream (iterable shards),
whether loading may download (then one process per machine goes first), its own options, and a line of help.
The probe, finetune, the training loader and the `--dataset` help ask the entry; none of them lists names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from simclr_cli.config import DataConfig
from simclr_cli.errors import ConfigError

Normalization = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel of pixel/255
KINDS = ("map", "stream")

# Per-channel mean and std of pixel/255 over each training set. CIFAR-10's std is over all pixels
# (0.247, ...); the often-copied (0.2023, 0.1994, 0.2010) is the mean of per-image stds (0.201, 0.199,
# 0.201 on the offline copy), which understates the spread the encoder sees.
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass(frozen=True)
class Source:
    """One data source. Only `load`, `normalization` and `help` have no default."""

    # (data config, split "train"|"test", image size in px, seed, progress(done, total, bad) | None,
    # notice(message) | None) -> the split as an ImageSet (uint8 (N, 3, size, size), labels or None, classes)
    load: Callable[..., object]
    normalization: Normalization  # of its training images; folders of photos: NORMALIZATION["imagenet"]
    help: str  # one line: what it is and what data.root holds (the --dataset help and `simclr list`)
    needs_root: bool = False  # data.root must be set: there is no default place for its data
    root_holds: str = "a folder of images"  # what data.root must name, for the message when it is missing
    layout: str = ""  # where a command's --data-dir DIR must hold what, for the probe's message
    uses_root: bool = True  # False: made in memory (synthetic): no data.root is read or reported
    has_labels: bool = True  # its splits can carry class labels (a folder: when it has class subfolders)
    kind: str = "map"  # "map": load gives an indexable split | "stream": a `streamed.StreamSet` (pretraining only)
    downloads: bool = False  # load may write under data.root (a download): one writer per machine goes first
    # Its own settings, `data.NAME.KEY` (a plugin's source; the built-ins read DataConfig's flat keys): a dataclass,
    # whose instance the loader finds as data config `.options`, and (setting, test, what it must be) rules.
    Options: type | None = None
    RULES: tuple = ()
    # (data config) -> the folder that must exist when data.download is off and that is absent, else None:
    # the probe stops with one line before extracting anything
    missing: Callable[[DataConfig], Path | None] | None = None
    # (data.root) -> True when the test split is carved out of the data by the seed (a flat folder's 80/20):
    # then the probe needs the pretraining seed to keep pretraining images out of its test split
    seeded_split: Callable[[Path], bool] | None = None
    # A stream source's split held whole, for probe and finetune: load's signature, an ImageSet back; None: they
    # cannot read it (pretraining streams `load`'s StreamSet)
    load_whole: Callable[..., object] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"a Source's kind is one of {', '.join(KINDS)}; got {self.kind!r}")

    def check(self, d: DataConfig) -> None:
        """The config's rules for this source (config.validate asks it): a root where one is needed."""
        if self.needs_root and not d.root:
            raise ConfigError(f"the {d.dataset} dataset needs 'data.root' set to {self.root_holds}")


__all__ = ["KINDS", "NORMALIZATION", "Normalization", "Source"]
