"""Encoders from the libraries people already use: any classification model of torchvision
(`model.arch: torchvision:NAME`) or timm (`timm:NAME`, the optional extra `timm`), with its classifier
removed, so it gives the pooled representation h, whose size is found by running it once.

torchvision's model is built without weights (`torchvision.models.get_model(NAME, weights=None, **kwargs)`)
and its last `nn.Linear`, the classifier, becomes an identity; a model with no such layer, or whose output
is then not (batch, features), is refused in one line. timm's is built with `num_classes=0`, timm's own way
to return the pooled features. `model.kwargs` are the constructor's keywords (a CIFAR-sized ViT:
`timm:vit_tiny_patch16_224` with `{img_size: 32, patch_size: 4}`).

Small images (`model.stem: cifar`, the choice under 64 px): a ResNet-like model (conv1 + maxpool) gets the
CIFAR stem of the built-in ResNets (3x3 stride-1 conv1, no max-pool); another convolutional model its first
convolution at stride 1 and its first max-pool removed; a ViT (one convolution, the patch embedding) takes
its image and patch size from `model.kwargs`. What was done, and the size of the last feature map, is
recorded in `notes`: the start panel says when a network would see a 1x1 map.

Each family declares its policy (`LibraryFamily`): the export formats its state dict is, the classifier keys
a warm start leaves out, its layout of the weights and the line that loads them in the library.

The families themselves are one file each (`family_torchvision.py`, `family_timm.py`), each one line in
registry.ENCODERS; a family from another package is the same through the `simclr_cli.encoders` entry point.
"""

from __future__ import annotations

import difflib
import inspect
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simclr_cli.errors import ConfigError
from simclr_cli.models.resnet import RESNETS
from simclr_cli.registry import ENCODERS


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _first(root: nn.Module, kind: type) -> tuple[str, nn.Module] | None:
    return next(((name, m) for name, m in root.named_modules() if isinstance(m, kind)), None)


def adapt_to_small_images(net: nn.Module) -> str:
    """The family's known adaptation to 32-pixel images, applied in place; what was done, in words."""
    convs = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    if len(convs) <= 1:
        return "no stem adaptation (a patch-embedding model: set its image and patch size in model.kwargs)"
    if isinstance(getattr(net, "conv1", None), nn.Conv2d) and isinstance(getattr(net, "maxpool", None), nn.MaxPool2d):
        out = net.conv1.out_channels  # ResNet-like: the built-in ResNets' CIFAR stem
        net.conv1 = nn.Conv2d(3, out, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        return "CIFAR stem: 3x3 stride-1 conv1, no max-pool"
    name, conv = convs[0]
    done = []
    if conv.stride != (1, 1):
        conv.stride = (1, 1)
        done.append(f"{name} at stride 1")
    pool = _first(net, nn.MaxPool2d)
    if pool is not None:
        _set_module(net, pool[0], nn.Identity())
        done.append(f"{pool[0]} (max-pool) removed")
    return "small-image stem: " + (", ".join(done) if done else "none needed")


def drop_classifier(net: nn.Module, arch: str) -> str:
    """Replace the last nn.Linear (torchvision's classifier) by an identity; its module path."""
    linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{arch} has no nn.Linear classifier to remove (its output would not be (batch, "
                          "features)): choose another model")
    _set_module(net, linears[-1], nn.Identity())
    return linears[-1]


class LibraryEncoder(nn.Module):
    """A torchvision or timm model without its classifier: image (B, 3, H, W) -> h (B, feature_dim)."""

    def __init__(self, arch: str, net: nn.Module, kwargs: dict, stem: str, removed: str | None, notes: list[str],
                 image_size: int) -> None:
        super().__init__()
        self.arch, self.net, self.kwargs, self.stem, self.removed = arch, net, dict(kwargs), stem, removed
        self.notes = list(notes)
        self.feature_dim, final_map = self._probe(image_size)
        if final_map is not None:
            self.notes.append(f"last feature map {final_map[0]}x{final_map[1]} at {image_size} px"
                              + (": the network sees one pixel of features; no small-image adaptation is known for "
                                 f"{arch} (try model.kwargs, or data.image_size 64 and up)" if max(final_map) <= 1 else ""))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, feature_dim)

    def describe(self) -> dict:
        """What rebuilds it (`models.encoder_from_spec`), and the size of h."""
        return {"arch": self.arch, "kwargs": self.kwargs, "stem": self.stem, "feature_dim": self.feature_dim}

    @torch.no_grad()
    def check_sizes(self, sizes: set[int], why: str) -> None:
        """A model built for one image size (a torchvision ViT) refuses others: one line before training."""
        was_training = self.net.training
        refused = []
        for size in sorted(sizes):
            try:
                self.net.eval()(torch.zeros(1, 3, size, size))
            except Exception:
                refused.append(size)
        self.net.train(was_training)
        if refused:
            raise ConfigError(f"{self.arch} does not take {', '.join(map(str, refused))}-pixel images, which {why} "
                              "asks for: train on its own image size (augment.view_size, view_size_start, small_crops), "
                              "or give it keywords that take any size (timm: dynamic_img_size=True)")

    @property
    def convolutional(self) -> bool:
        return sum(isinstance(m, nn.Conv2d) for m in self.net.modules()) > 1

    @torch.no_grad()
    def _probe(self, size: int) -> tuple[int, tuple[int, int] | None]:
        """(feature_dim, the map the last convolution gave: what the pooling sees) from one image run through
        the network; no map for a patch-embedding model, whose later layers are no convolutions."""
        maps: list[tuple[int, int]] = []
        hooks = [m.register_forward_hook(lambda m, i, o: maps.append(tuple(o.shape[-2:])) if
                                         isinstance(o, torch.Tensor) and o.ndim == 4 else None)
                 for m in self.net.modules() if isinstance(m, nn.Conv2d)] if self.convolutional else []
        x = torch.zeros(2, 3, size, size)
        try:
            outs = [self.net.eval()(x)]
        except Exception as err:  # the constructor's own check of what it accepts
            raise ConfigError(f"{self.arch} does not run on {size}-pixel images ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0][:160]}): set model.kwargs or data.image_size") from None
        finally:
            for h in hooks:
                h.remove()
        saved = state_copy(self.net)
        try:
            with torch.random.fork_rng(devices=[]):  # dropout draws: the caller's stream stays as it was
                outs.append(self.net.train()(x))  # what training gets (inception's aux logits, say)
        except Exception as err:
            raise ConfigError(f"{self.arch} fails in training mode on {size}-pixel images ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0][:160]}): choose another model or model.kwargs") from None
        finally:
            self.net.load_state_dict(saved)  # batch norm's running statistics as built
        for out in outs:
            if not isinstance(out, torch.Tensor) or out.ndim != 2:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ConfigError(f"{self.arch} without its classifier gives {shape}, not (batch, features): choose "
                                  "another model, or keywords that make it pool (e.g. aux_logits=False)")
        return int(outs[0].shape[1]), (maps[-1] if maps else None)


def unknown_model(family: str, name: str, names: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f": did you mean {', '.join(f'{family}:{c}' for c in close)}?" if close else ""
    return ConfigError(f"'model.arch' {family}:{name} is not a {family} model{hint}")


def state_copy(module: nn.Module) -> OrderedDict:
    """A copy of `module.state_dict()` that keeps its `_metadata` (each submodule's state version): MNASNet's
    `_load_from_state_dict` refuses a state without it ("version should be set to 1 or 2")."""
    state = module.state_dict()
    copy = OrderedDict((k, v.clone()) for k, v in state.items())
    copy._metadata = getattr(state, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    return copy


def constructed(arch: str, build, kwargs: dict) -> nn.Module:
    try:
        return build()
    except (TypeError, ValueError, AssertionError) as err:  # a keyword, or a combination, the constructor refuses
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{arch} refuses model.kwargs {kwargs} ({reason}): give keywords and values its constructor "
                          "takes") from None


def parameters_of(function) -> set[str]:
    """The named parameters of a function or constructor (not *args / **kwargs)."""
    return {p.name for p in inspect.signature(function).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}


def fetch_failed(arch: str, err: Exception) -> ConfigError:
    """The one line for library weights that could not be downloaded (offline)."""
    reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return ConfigError(f"could not fetch the pretrained weights of {arch} ({type(err).__name__}: {reason}): with no "
                       "network, give model.init a weights file instead")


class LibraryFamily:
    """What a family of library models declares besides building them: the export formats its state dict is
    (`formats`), the keys of the classifier it drops (`classifier_keys`), the layout of its weights in the
    library's own keys (`library_state`, `from_library_keys`, `warm_state`) and the line that loads them
    there (`load_hint`). Its model is our LibraryEncoder's `net`."""

    prefix = ""
    formats: tuple[str, ...] = ()
    # timm's classifier names (and torchvision's most common ones): weights a warm start leaves out as the
    # encoder left the classifier out
    head_keys = ("head.", "fc.", "classifier.")

    def classifier_keys(self, encoder: LibraryEncoder) -> tuple[str, ...]:
        """The key prefixes, in the library's keys, of the classifier this encoder has not."""
        return ((f"{encoder.removed}.",) if encoder.removed else ()) + self.head_keys

    def library_state(self, encoder: LibraryEncoder, fmt: str) -> dict[str, Any]:
        """The state dict of format `fmt` (one of `formats`): the library's own."""
        return library_state_dict(encoder)

    @staticmethod
    def from_library_keys(state: dict) -> dict:
        """`library_state`'s keys back to the encoder's (its model is our `net`)."""
        return {f"net.{k}": v for k, v in state.items()}

    def warm_state(self, state: dict, encoder: LibraryEncoder, path: Path) -> dict:
        """The weights of a state dict (the library's keys, or ours) for `encoder`, its classifier left out."""
        expected = set(encoder.state_dict())
        classifier = tuple(f"net.{p}" for p in self.classifier_keys(encoder))
        state = {k if k.startswith("net.") else f"net.{k}": v for k, v in state.items()}
        return {k: v for k, v in state.items() if k in expected or not k.startswith(classifier)}

    def load_hint(self, encoder: LibraryEncoder, fmt: str, load: str) -> str:
        """The Python line that loads `library_state` (`load`: `load_state_dict(...)` of the file) into the
        library's model built as the encoder was."""
        raise NotImplementedError

    @staticmethod
    def _hint_parts(spec: dict) -> tuple[str, str, str]:
        """(NAME, ", key=value" of its kwargs, the note on the small-image stem)."""
        kwargs = "".join(f", {k}={v!r}" for k, v in (spec.get("kwargs") or {}).items())
        stem = "  (trained with the small-image stem: see README Backbones)" if spec["stem"] == "cifar" else ""
        return spec["arch"].rpartition(":")[2], kwargs, stem


def library_state_dict(encoder: LibraryEncoder) -> dict[str, Any]:
    """The library's own state dict of the model (classifier removed): what its constructor, with the same
    keywords, the same stem change and the classifier set to nn.Identity(), loads with strict=True."""
    return {k: v.detach().cpu() for k, v in encoder.net.state_dict().items()}


def family_of(arch: object) -> Any:
    """The family that owns `model.arch` ARCH's policy: FAMILY:NAME's, the built-in ResNets' for a plain
    name; None for an arch that is no string or names no family (the description check refuses it)."""
    if not isinstance(arch, str):
        return None
    family, sep, _ = arch.partition(":")
    if not sep:
        return RESNETS
    return ENCODERS[family] if family in ENCODERS else None
