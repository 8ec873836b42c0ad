"""The registries of what people add: methods, data sources, backbone families, export formats, evaluations,
augmentation presets and live loggers.

Each registry maps a name to an entry that carries its own policy (a method's options and views, a source's
needs and normalisation, a family's classifier keys, a format's suffix and reader, an evaluation's columns);
code outside an entry asks it instead of listing the entries or branching on their names. A built-in entry
is one line here, "module:attribute", imported the first time it is asked for, exactly as an entry point
is: so the ground floor (config among it) can ask a registry without importing the wings, and a package
outside this repository adds entries through the entry-point group of a registry (`simclr_cli.methods`,
...) in its own metadata. A plugin that fails to import is a warning naming it, never a broken command;
asking for it by name is one line saying why it cannot be used.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from simclr_cli.errors import ConfigError

BUILT_IN = "built-in"


class PluginWarning(UserWarning):
    """A plugin's entry could not be imported; the command goes on without it."""


@dataclass
class Entry:
    name: str
    target: str  # "module:attribute"
    origin: str  # "built-in", or the distribution that declares the entry point, with its version
    loaded: Any = None
    failure: str | None = None  # why it could not be imported


def _import(target: str) -> Any:
    module, _, attribute = target.partition(":")
    value = importlib.import_module(module)
    for part in filter(None, attribute.split(".")):
        value = getattr(value, part)
    return value


class Registry(Mapping[str, Any]):
    """Names -> entries, built-ins first, then the plugins of entry-point group `group`. `key` is what
    names an entry where users write it (a config key or an option), for the messages."""

    def __init__(self, kind: str, key: str, group: str, built_in: dict[str, str]) -> None:
        self.kind, self.key, self.group = kind, key, group
        self._entries = {name: Entry(name, target, BUILT_IN) for name, target in built_in.items()}
        self._plugins_read = False

    def _read_plugins(self) -> None:
        if self._plugins_read:
            return
        self._plugins_read = True
        for point in importlib.metadata.entry_points(group=self.group):
            dist = getattr(point, "dist", None)
            origin = f"{dist.name} {dist.version}" if dist is not None else "a plugin"
            if point.name in self._entries:
                if self._entries[point.name].origin != origin:  # a distribution seen twice on sys.path is not a clash
                    warnings.warn(f"{self.kind} {point.name!r} from {origin} is ignored: the name is taken by "
                                  f"{self._entries[point.name].origin}", PluginWarning, stacklevel=2)
                continue
            self._entries[point.name] = Entry(point.name, point.value, origin)

    def reload(self) -> None:
        """Read the entry points again (a package installed since, or a test's plugin on sys.path); entries
        added in code stay."""
        self._entries = {n: e for n, e in self._entries.items() if e.origin == BUILT_IN or e.origin.startswith("code:")}
        self._plugins_read = False

    def add(self, name: str, target: str | Any, origin: str) -> None:
        """Register an entry in code: a "module:attribute" text, or the entry itself; `origin` says who added it."""
        self._read_plugins()
        entry = Entry(name, target if isinstance(target, str) else repr(target), f"code: {origin}")
        if not isinstance(target, str):
            entry.loaded = target
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def entries(self) -> list[Entry]:
        self._read_plugins()
        return list(self._entries.values())

    def names(self) -> list[str]:
        """Every name, plugins included, without importing any entry."""
        return [e.name for e in self.entries()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def unknown(self, name: str) -> ConfigError:
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(f"'{self.key}' must be one of {', '.join(self.names())}; got {name!r}{hint}")

    def check(self, name: str) -> None:
        """An unknown name is one line naming the closest; a plugin that cannot be imported, one line saying why."""
        self[name]

    def load(self, entry: Entry) -> Any:
        """The entry's object, imported once; a plugin that fails warns and gives None."""
        if entry.loaded is None and entry.failure is None:
            try:
                entry.loaded = _import(entry.target)
            except Exception as err:  # a plugin's own bug must not break the command line
                if entry.origin == BUILT_IN:
                    raise
                entry.failure = f"{type(err).__name__}: {err}".splitlines()[0]
                warnings.warn(f"the {self.kind} plugin {entry.name!r} ({entry.target}, from {entry.origin}) failed "
                              f"to import and is left out: {entry.failure}", PluginWarning, stacklevel=2)
        return entry.loaded

    def __getitem__(self, name: str) -> Any:
        self._read_plugins()
        if name not in self._entries:
            raise self.unknown(name)
        entry = self._entries[name]
        loaded = self.load(entry)
        if loaded is None:
            raise ConfigError(f"'{self.key}' {name!r} comes from {entry.origin}, which failed to import "
                              f"({entry.failure}): reinstall or remove that package")
        return loaded

    def origin(self, name: str) -> str:
        self._read_plugins()
        return self._entries[name].origin


# The registries, each with its built-in lines. A new built-in entry is one line here; a plugin's, one entry
# point in its own package's metadata, in the registry's group.
METHODS = Registry("method", "method.name", "simclr_cli.methods", {
    "simclr": "simclr_cli.methods.simclr:SimCLRMethod",
    "moco": "simclr_cli.methods.moco:MoCoMethod",
    "byol": "simclr_cli.methods.byol:BYOLMethod",
    "dino": "simclr_cli.methods.dino:DINOMethod",
    "mae": "simclr_cli.methods.mae:MAEMethod",
})

# data.dataset NAME -> a `data.Source` (its loader and policy: root, labels, map or stream, downloads, ...)
SOURCES = Registry("data source", "data.dataset", "simclr_cli.sources", {
    "cifar10": "simclr_cli.data.cifar:CIFAR10",
    "cifar100": "simclr_cli.data.cifar:CIFAR100",
    "folder": "simclr_cli.data.folder:FOLDER",
    "synthetic": "simclr_cli.data.synthetic:SYNTHETIC",
    "webdataset": "simclr_cli.data.streamed:WEBDATASET",
})

# model.arch FAMILY:NAME -> the family that builds NAME and owns its policy (`models.library`: classifier keys,
# state-dict layout, load hint); the built-in ResNets (model.arch resnet18, ...) are `models.resnet.RESNETS`.
ENCODERS = Registry("backbone family", "model.arch", "simclr_cli.encoders", {
    "torchvision": "simclr_cli.models.family_torchvision:TORCHVISION",
    "timm": "simclr_cli.models.family_timm:TIMM",
})

# simclr extract --format NAME -> an `artifacts.ExportFormat` (suffix, what it takes, writer, reader, load hint)
EXPORTS = Registry("export format", "--format", "simclr_cli.exports", {
    "native": "simclr_cli.exports.extract:NATIVE",
    "torchvision": "simclr_cli.exports.extract:TORCHVISION",
    "timm": "simclr_cli.exports.extract:TIMM",
    "onnx": "simclr_cli.exports.onnx:ONNX",
    "torchscript": "simclr_cli.exports.portable_files:TORCHSCRIPT",
    "safetensors": "simclr_cli.exports.portable_files:SAFETENSORS",
})

# what `simclr probe` runs on frozen features -> an `score.Evaluation` (its function and table columns)
EVALUATIONS = Registry("evaluation", "evaluation", "simclr_cli.evaluations", {
    "knn": "simclr_cli.score.knn:KNN",
    "linear": "simclr_cli.score.linear:LINEAR",
})

# augment.preset NAME -> a function (augmenter, uint8 batch, generator, size) -> the batch's two views
PRESETS = Registry("augmentation preset", "augment.preset", "simclr_cli.presets", {
    "simclr": "simclr_cli.augment.views:simclr_views",
    "baseline": "simclr_cli.augment.views:baseline_views",
})

# train.loggers NAME -> a tracker class (`train.trackers.Tracker`: its package, extra, fix, and records)
LOGGERS = Registry("live logger", "train.loggers", "simclr_cli.loggers", {
    "tensorboard": "simclr_cli.train.trackers:TensorBoard",
    "wandb": "simclr_cli.train.trackers:WandB",
    "mlflow": "simclr_cli.train.trackers:MLflow",
})

REGISTRIES = {"methods": METHODS, "sources": SOURCES, "encoders": ENCODERS, "exports": EXPORTS,
              "evaluations": EVALUATIONS, "presets": PRESETS, "loggers": LOGGERS}
