"""The `timm:NAME` backbone family: any timm model, built with num_classes=0 (timm's pooled features; the
optional extra `timm`); the entry of registry.ENCODERS "timm"."""

from __future__ import annotations

import importlib.util

from simclr_cli.errors import MissingExtraError
from simclr_cli.models.library import (LibraryEncoder, LibraryFamily, adapt_to_small_images, constructed, fetch_failed,
                                       unknown_model)


class Timm(LibraryFamily):
    """`timm:NAME`: any timm model, built with num_classes=0 (the extra `timm`)."""

    prefix = "timm"
    formats = ("timm",)

    def load_hint(self, encoder: LibraryEncoder, fmt: str, load: str) -> str:
        name, kwargs, stem = self._hint_parts(encoder.describe())
        return f"m = timm.create_model({name!r}, num_classes=0{kwargs}); m.{load}{stem}"

    @staticmethod
    def _timm():
        if importlib.util.find_spec("timm") is None:
            raise MissingExtraError("timm models need the timm package: pip install 'simclr-cli[timm]'")
        import timm

        return timm

    def names(self) -> list[str]:
        return self._timm().list_models()

    def check(self, name: str) -> None:
        """An unknown name is one line with the closest names; without timm, the line names the extra."""
        if not self._timm().is_model(name):
            raise unknown_model(self.prefix, name, self.names())

    @staticmethod
    def check_kwargs(name: str, kwargs: dict) -> None:
        """Nothing to add: timm's model classes take no **kwargs they would drop (an unknown keyword is their
        TypeError, one line at build time)."""

    def build(self, name: str, kwargs: dict, stem: str, image_size: int, pretrained: bool = False) -> LibraryEncoder:
        """NAME built as `check` allowed it (`models.encoder_from_spec` checks first)."""
        timm = self._timm()
        arch = f"{self.prefix}:{name}"
        try:
            net = constructed(arch, lambda: timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs),
                               kwargs)
        except (OSError, RuntimeError) as err:
            raise fetch_failed(arch, err) from None
        notes = [adapt_to_small_images(net)] if stem == "cifar" else []
        return LibraryEncoder(arch, net, kwargs, stem, None, notes, image_size)


TIMM = Timm()
