"""Datasets as one uint8 tensor each: CIFAR-10/100 from their pickle batches, image folders, synthetic images.

`load_dataset` returns an `ImageSet` whose `images` are uint8 (N, 3, H, W), ready to move to the training
device once and be augmented there in batches; nothing here runs per training step. Image-file decoding
(shared with `simclr embed`) lives in `images.py` and is re-exported here.
"""

from __future__ import annotations

import difflib
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from simclr_cli.config import DATASETS
from simclr_cli.errors import DatasetError, ImageDecodeError  # noqa: F401  (re-exported)
from simclr_cli.images import (IMAGE_EXTENSIONS, DecodedBatch, ImageFolderDataset,  # noqa: F401
                               decode_all, decode_image, has_split_folders, iter_decoded, list_images,
                               load_image_folder)

SPLITS = ("train", "test")

# Per-channel mean and std of pixel/255 over each training set. CIFAR-10's std is over all pixels
# (0.247, ...); the often-copied (0.2023, 0.1994, 0.2010) is the mean of per-image stds (0.201, 0.199,
# 0.201 on the offline copy), which understates the spread the encoder sees.
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

FOLDER_TEST_FRACTION = 0.2  # share of each class held out as "test" when a folder has no train/ and test/


@dataclass
class ImageSet:
    """A whole split in memory. `labels` is None when the data has no labels (a flat image folder)."""

    images: torch.Tensor  # uint8 (N, 3, H, W), contiguous
    labels: torch.Tensor | None  # int64 (N,)
    classes: list[str] | None  # class names, index = label
    name: str  # e.g. "cifar10/train"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"ImageSet images must be uint8 (N, 3, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        self.images = self.images.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int, seed: int) -> ImageSet:
        """A fixed random `n` of the images (seeded, kept in their original order); n >= len -> self."""
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        if n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n].sort().values.to(self.images.device)
        labels = None if self.labels is None else self.labels[idx]
        return ImageSet(self.images[idx], labels, self.classes, f"{self.name}[{n}]")

    def to(self, device: torch.device | str) -> ImageSet:
        labels = None if self.labels is None else self.labels.to(device)
        return ImageSet(self.images.to(device), labels, self.classes, self.name)


def default_data_root() -> Path:
    """$SIMCLR_DATA_DIR if set, else ~/.cache/simclr-cli/data."""
    env = os.environ.get("SIMCLR_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "simclr-cli" / "data"


def normalization_for(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for a dataset name. Folders and synthetic images get ImageNet's: folders
    are usually photos, and for synthetic data any stats near mid-grey work."""
    if name in NORMALIZATION:
        return NORMALIZATION[name]
    if name in ("folder", "synthetic"):
        return NORMALIZATION["imagenet"]
    known = ", ".join([*NORMALIZATION, "folder", "synthetic"])
    raise DatasetError(f"no normalization for {name!r}: use one of {known}")


def load_dataset(name: str, split: str, root: str | Path | None = None, *, download: bool = False,
                 image_size: int = 32, num_workers: int = 2, synthetic_size: int = 2000,
                 seed: int = 0) -> ImageSet:
    """Load one split ("train" or "test") of a dataset as uint8 tensors.

    root: folder holding cifar-10-batches-py/ or cifar-100-python/ (None: `default_data_root()`), or the
    image folder itself for "folder". image_size: output side in pixels; CIFAR is resized from 32 only when
    it differs. seed: picks the synthetic images and a folder's 80/20 split, so pass the same seed for
    both splits.
    """
    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetError(f"unknown dataset {name!r}{hint}: choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: use 'train' or 'test'")
    if image_size < 1 or num_workers < 0 or synthetic_size < 1:
        raise DatasetError(f"need image_size >= 1, num_workers >= 0, synthetic_size >= 1; got {image_size}, "
                           f"{num_workers}, {synthetic_size}")
    if name == "synthetic":
        return make_synthetic(synthetic_size, image_size, seed, split)
    if name == "folder":
        if root is None:
            raise DatasetError("the folder dataset needs a root: set data.root to a folder of images")
        images, labels, classes = load_image_folder(Path(root).expanduser(), split, image_size, num_workers,
                                                    seed, FOLDER_TEST_FRACTION)
        return ImageSet(images, labels, classes, f"folder/{split}")
    root = default_data_root() if root is None else Path(root).expanduser()
    images, labels, classes = _load_cifar(name, split, root, download)
    if image_size != images.shape[-1]:
        images = _resize_uint8(images, image_size)
    return ImageSet(images, labels, classes, f"{name}/{split}")


# --- CIFAR -----------------------------------------------------------------------------------------------

class _CifarSpec(NamedTuple):
    title: str  # for messages
    folder: str  # what torchvision's archive extracts to
    files: dict[str, tuple[str, ...]]  # split -> batch files
    meta: str  # file with the class names
    label_key: str
    names_key: str


_CIFAR = {
    "cifar10": _CifarSpec("CIFAR-10", "cifar-10-batches-py",
                          {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
                          "batches.meta", "labels", "label_names"),
    "cifar100": _CifarSpec("CIFAR-100", "cifar-100-python", {"train": ("train",), "test": ("test",)},
                           "meta", "fine_labels", "fine_label_names"),
}


CIFAR_FOLDERS = {name: spec.folder for name, spec in _CIFAR.items()}  # what each archive extracts to


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only callables a CIFAR pickle may name: numpy's array/dtype rebuilders, under both the numpy 1
    (numpy.core) and numpy 2 (numpy._core) module paths, and the bytes decoder protocol-2 pickles use."""
    import _codecs
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                              ("_codecs", "encode"): _codecs.encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dicts, lists, strings and numbers, and refuses any other global, so a
    crafted file cannot run code (plain `pickle.load` would call whatever the file names)."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DatasetError(f"refusing to unpickle {module}.{name}") from None


def _read_pickle(path: Path) -> dict:
    """A CIFAR pickle as a dict with str keys (Python 2 originals and Python 3 rewrites alike)."""
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="latin1").load()  # latin1: how Python 2 str bytes map
    except DatasetError as e:
        raise DatasetError(f"{path} is not a CIFAR file ({e}): replace it with the original download") from None
    except Exception as e:  # truncated or not a pickle at all
        raise DatasetError(f"cannot read {path} ({type(e).__name__}: {e}): replace it with the original "
                           "download") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path} is not a CIFAR file (holds a {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _as_str(s: str | bytes) -> str:
    return s.decode("utf-8") if isinstance(s, bytes) else str(s)


def _read_batch(path: Path, spec: _CifarSpec, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch file -> uint8 (n, 3, 32, 32) images and int64 (n,) labels, in file order."""
    d = _read_pickle(path)
    data, labels = d.get("data"), d.get(spec.label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path} is not a {spec.title} batch (no uint8 'data' of shape (n, 3072)): "
                           "replace it with the original download")
    try:
        labels = torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1))
    except (TypeError, ValueError):
        labels = torch.empty(0, dtype=torch.int64)
    if len(labels) != len(data) or (len(labels) and (labels.min() < 0 or labels.max() >= n_classes)):
        raise DatasetError(f"{path} has missing or out-of-range '{spec.label_key}': replace it with the "
                           "original download")
    if not data.flags.writeable:  # e.g. protocol-5 buffers; torch warns on read-only memory
        data = data.copy()
    return torch.from_numpy(data).view(-1, 3, 32, 32), labels  # each row: R, G, B planes of 32x32


def _download_cifar(spec: _CifarSpec, name: str, root: Path) -> None:
    """torchvision's archive, md5-checked, extracted under root. Calls the download helper directly, not the
    dataset class: that class would then plain-pickle.load every file and throw the result away."""
    import torchvision.datasets as tvd
    from torchvision.datasets import utils as tv_utils

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    try:
        tv_utils.download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5,
                                              remove_finished=True)
    except Exception as e:
        raise DatasetError(f"downloading {spec.title} into {root} failed ({type(e).__name__}: {e}): check the "
                           f"network, or put {spec.folder}/ under data.root by hand") from None


def _load_cifar(name: str, split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    spec = _CIFAR[name]
    folder = root / spec.folder
    needed = (*spec.files[split], spec.meta)
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing and download:
        _download_cifar(spec, name, root)
        missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise DatasetError(f"{spec.title} not found under {root} (no {folder / missing[0]}): run with "
                           f"data.download: true, or point data.root at a folder holding {spec.folder}/")
    names = _read_pickle(folder / spec.meta).get(spec.names_key)
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{folder / spec.meta} has no '{spec.names_key}': replace it with the original "
                           "download")
    classes = [_as_str(c) for c in names]
    batches = [_read_batch(folder / f, spec, len(classes)) for f in spec.files[split]]
    images = torch.cat([x for x, _ in batches]) if len(batches) > 1 else batches[0][0].clone()
    return images, torch.cat([y for _, y in batches]), classes


def _resize_uint8(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> (N, 3, size, size), bilinear with antialias, in chunks to bound float memory."""
    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        out[i:i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


# --- synthetic -------------------------------------------------------------------------------------------

SYNTHETIC_CLASSES = 10


def make_synthetic(n: int, size: int, seed: int, split: str, chunk: int = 512) -> ImageSet:
    """`n` labelled images of 10 classes, balanced, deterministic from (seed, split).

    Class c is a sinusoidal grating between two colours, at orientation c * 18 degrees and 2 + c % 4 cycles
    per image. The class templates come from `seed` alone, so train and test share them; each image draws
    its own phase (a random shift along the grating), brightness (x0.85-1.15) and pixel noise (std 0.06 of
    full scale) from a split-specific stream, so the two splits hold different images.
    """
    templates = torch.Generator().manual_seed(seed * 3)
    colour_a = torch.rand(SYNTHETIC_CLASSES, 3, 1, 1, generator=templates)
    colour_b = torch.rand(SYNTHETIC_CLASSES, 3, 1, 1, generator=templates)
    angle = torch.arange(SYNTHETIC_CLASSES) * (math.pi / SYNTHETIC_CLASSES)  # radians
    cycles = 2.0 + torch.arange(SYNTHETIC_CLASSES) % 4  # grating periods across the image

    g = torch.Generator().manual_seed(seed * 3 + (1 if split == "train" else 2))
    labels = (torch.arange(n) % SYNTHETIC_CLASSES)[torch.randperm(n, generator=g)]
    phase = torch.rand(n, generator=g) * 2 * math.pi
    brightness = 0.85 + 0.3 * torch.rand(n, generator=g)
    coord = torch.arange(size, dtype=torch.float32) / size
    y, x = torch.meshgrid(coord, coord, indexing="ij")  # (S, S) each, in [0, 1)
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    for i in range(0, n, chunk):  # bounds the float intermediates to chunk x 3 x S x S
        c, sl = labels[i:i + chunk], slice(i, i + chunk)
        proj = x * angle[c].cos().view(-1, 1, 1) + y * angle[c].sin().view(-1, 1, 1)  # (B, S, S)
        t = 0.5 + 0.5 * torch.sin(2 * math.pi * cycles[c].view(-1, 1, 1) * proj + phase[sl].view(-1, 1, 1))
        img = colour_a[c] + (colour_b[c] - colour_a[c]) * t.unsqueeze(1)  # (B, 3, S, S)
        img = img * brightness[sl].view(-1, 1, 1, 1) + 0.06 * torch.randn(img.shape, generator=g)
        images[sl] = (img * 255).round_().clamp_(0, 255).to(torch.uint8)
    return ImageSet(images, labels, [f"class{k}" for k in range(SYNTHETIC_CLASSES)], f"synthetic/{split}")
