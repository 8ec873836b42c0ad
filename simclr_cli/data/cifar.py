"""CIFAR-10/100 from their python pickle batches, read with a restricted unpickler (numpy arrays and plain
containers only: a pickle that names anything else is refused, never run), and downloaded with torchvision
only when asked."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from simclr_cli.config import DataConfig
from simclr_cli.data.imageset import ImageSet
from simclr_cli.data.source import NORMALIZATION, Source
from simclr_cli.errors import DatasetError


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


def load_cifar(name: str, split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
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


def default_data_root() -> Path:
    """$SIMCLR_DATA_DIR if set, else ~/.cache/simclr-cli/data."""
    env = os.environ.get("SIMCLR_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "simclr-cli" / "data"


def data_root(d: DataConfig) -> Path:
    """Where CIFAR's archive folders are: data.root, else `default_data_root()`."""
    return default_data_root() if d.root is None else Path(d.root).expanduser()


def loader(name: str):
    """The load function of CIFAR-10 or CIFAR-100 (`registry.SOURCES`): one split, resized from 32 px only when
    data.image_size differs."""
    def load(d: DataConfig, split: str, size: int, seed: int, progress=None, notice=None) -> ImageSet:
        images, labels, classes = load_cifar(name, split, data_root(d), d.download)
        if size != images.shape[-1]:
            images = _resize_uint8(images, size)
        return ImageSet(images, labels, classes, f"{name}/{split}")
    return load


def _missing(name: str):
    def missing(d: DataConfig) -> Path | None:
        folder = data_root(d) / CIFAR_FOLDERS[name]
        return None if d.download or folder.is_dir() else folder
    return missing


def _source(name: str, classes: int) -> Source:
    spec = _CIFAR[name]
    return Source(loader(name), NORMALIZATION[name], f"{spec.title}, {classes} classes, 32 px: {spec.folder}/ in "
                  "the data root", downloads=True, missing=_missing(name))


CIFAR10, CIFAR100 = _source("cifar10", 10), _source("cifar100", 100)  # the entries of registry.SOURCES


def _resize_uint8(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> (N, 3, size, size), bilinear with antialias, in chunks to bound float memory."""
    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        out[i:i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out
