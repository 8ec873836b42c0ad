"""An image folder as a dataset: its classes (first-level subfolders), its train/test split (its own train/
and test/, else a seeded 80/20 per class), and its images, through the decoded cache (`data.cache`) or
decoded into memory (data.cache: false)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from simclr_cli.config import DataConfig
from simclr_cli.data.cache import Progress, load_cached
from simclr_cli.data.imageset import ImageSet
from simclr_cli.data.images import IMAGE_EXTENSIONS, decode_all, list_images
from simclr_cli.data.mapped import MappedImages
from simclr_cli.data.source import NORMALIZATION, Source
from simclr_cli.errors import DatasetError

TEST_FRACTION = 0.2  # share of each class held out as "test" when a folder has no train/ and test/


def _folder_labels(paths: list[Path], bases: list[Path]) -> tuple[list[str] | None, list[int] | None]:
    """Classes from first-level subfolders when every image sits in one (names sorted), else (None, None)."""
    rel = [p.relative_to(b).parts for p, b in zip(paths, bases)]
    if not rel or any(len(r) < 2 for r in rel):
        return None, None
    classes = sorted({r[0] for r in rel})
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index[r[0]] for r in rel]


def _split_indices(n: int, labels: list[int] | None, split: str, seed: int, test_fraction: float) -> list[int]:
    """A seeded split of range(n), stratified by label: round(test_fraction * class size) of each class
    (at least 1 when the class has 2+ images) go to "test"; indices come back sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    groups: dict[int, list[int]] = {}
    for i in perm:  # each group keeps the shuffled order
        groups.setdefault(0 if labels is None else labels[i], []).append(i)
    chosen = []
    for members in groups.values():
        n_test = max(1, round(test_fraction * len(members))) if len(members) >= 2 else 0
        chosen += members[:n_test] if split == "test" else members[n_test:]
    return sorted(chosen)


def has_split_folders(root: Path) -> bool:
    """True when an image folder brings its own split: root/train/ and root/test/."""
    return (root / "train").is_dir() and (root / "test").is_dir()


class FolderSplit(NamedTuple):
    paths: list[Path]  # every image of the folder, in a fixed order (train/ then test/ when presplit)
    keep: list[int]  # positions in `paths` of this split's images, ascending
    labels: list[int] | None  # class of each path
    classes: list[str] | None


def folder_split(root: Path, split: str, seed: int, test_fraction: float) -> FolderSplit:
    """Which images of an image folder make up `split`, and their classes.

    With root/train/ and root/test/ the split is that subfolder (classes shared by both). Otherwise, with
    class subfolders, a seeded split of the whole folder, stratified by class, holds out `test_fraction` as
    "test" (for the kNN monitor and `simclr probe`, which split with the same seed); without labels there is
    nothing a test split could be used for, so "train" is every image.
    """
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist: set data.root to a folder of images")
    presplit = has_split_folders(root)
    parts = {s: list_images(root / s) for s in ("train", "test")} if presplit else {"all": list_images(root)}
    paths = [p for ps in parts.values() for p in ps]
    bases = [root / s if presplit else root for s, ps in parts.items() for _ in ps]
    if not paths:
        raise DatasetError(f"no images under {root} ({', '.join(IMAGE_EXTENSIONS)}): point data.root at a folder "
                           "of images")
    classes, labels = _folder_labels(paths, bases)
    if presplit:
        start = 0 if split == "train" else len(parts["train"])
        keep = list(range(start, start + len(parts[split])))
    elif labels is None:
        if split == "test":
            raise DatasetError(f"{root} has neither class subfolders nor train/ and test/: there is no labelled "
                               "test split (put the images in DIR/<class>/ folders)")
        keep = list(range(len(paths)))
    else:
        keep = _split_indices(len(paths), labels, split, seed, test_fraction)
    if not keep:
        raise DatasetError(f"the {split} split of {root} is empty: add images, or give it train/ and test/ "
                           "subfolders")
    return FolderSplit(paths, keep, labels, classes)


def load_folder(d: DataConfig, split: str, size: int, seed: int, progress: Progress | None = None,
                notice: Callable[[str], None] | None = None) -> ImageSet:
    """One split of the image folder `data.root`. Through the cache, the split is a view of the whole folder's
    map (bad files left out when data.skip_bad); without it, the split's images are decoded into memory."""
    if not d.root:
        raise DatasetError("the folder dataset needs a root: set data.root to a folder of images")
    root = Path(d.root).expanduser()
    paths, keep, labels, classes = folder_split(root, split, seed, TEST_FRACTION)
    if d.cache:
        mapped, kept = load_cached(root, paths, size, cache_dir=Path(d.cache_dir).expanduser() if d.cache_dir
                                   else None, num_workers=d.num_workers, skip_bad=d.skip_bad,
                                   progress=progress, notice=notice)
        row = {position: r for r, position in enumerate(kept)}  # position in `paths` -> row of `mapped`
        keep = [i for i in keep if i in row]
        if not keep:
            raise DatasetError(f"none of the images of the {split} split of {root} could be decoded: check the files")
        images: torch.Tensor | MappedImages = mapped.select(np.array([row[i] for i in keep], dtype=np.int64))
    else:
        images = decode_all([paths[i] for i in keep], size, d.num_workers)
    tensor_labels = None if labels is None else torch.tensor([labels[i] for i in keep], dtype=torch.int64)
    return ImageSet(images, tensor_labels, classes, f"folder/{split}")


# Folders get ImageNet's statistics: they are usually photos.
FOLDER = Source(load_folder, NORMALIZATION["imagenet"], "an image folder DIR: DIR/train/<class>/* and "
                "DIR/test/<class>/*, or DIR/<class>/* split 80/20, or unlabelled DIR/* (pretraining only)",
                needs_root=True, layout="DIR/train/<class>/, DIR/test/<class>/ or DIR/<class>/",
                seeded_split=lambda root: not has_split_folders(root))  # registry.SOURCES["folder"]
