"""The `torchvision:NAME` backbone family: any classification model of torchvision.models, built without
weights (or with its DEFAULT weights for model.init: pretrained), its last nn.Linear made an identity; the
entry of registry.ENCODERS "torchvision"."""

from __future__ import annotations

import inspect

from simclr_cli.models.library import (LibraryEncoder, LibraryFamily, adapt_to_small_images, constructed,
                                       drop_classifier, fetch_failed, parameters_of, unknown_model)
from simclr_cli.models.spec import DescriptionError


class Torchvision(LibraryFamily):
    """`torchvision:NAME`: the classification models of torchvision.models."""

    prefix = "torchvision"
    formats = ("torchvision",)

    def load_hint(self, encoder: LibraryEncoder, fmt: str, load: str) -> str:
        name, kwargs, stem = self._hint_parts(encoder.describe())
        return (f"m = torchvision.models.get_model({name!r}{kwargs}); m.{encoder.removed} = torch.nn.Identity(); "
                f"m.{load}{stem}")

    @staticmethod
    def names() -> list[str]:
        import torchvision

        return torchvision.models.list_models(module=torchvision.models)

    def check(self, name: str) -> None:
        """An unknown name is one line with the closest names."""
        names = self.names()
        if name not in names:
            raise unknown_model(self.prefix, name, names)

    @staticmethod
    def declared(name: str) -> set[str]:
        """The keywords NAME's builder and model class name. torchvision's builders pass **kwargs on to the
        class, and some classes (MobileNetV3) take **kwargs and drop them: an undeclared keyword would be
        ignored without a word, so it is refused before building."""
        import torchvision

        builder = torchvision.models.get_model_builder(name)
        cls = inspect.signature(builder).return_annotation  # the model class (a string under postponed annotations)
        cls = builder.__globals__.get(cls) if isinstance(cls, str) else cls
        return parameters_of(builder) | (parameters_of(cls.__init__) if isinstance(cls, type) else set())

    def check_kwargs(self, name: str, kwargs: dict) -> None:
        """A keyword NAME does not declare is refused: MobileNetV3 would swallow it without a word."""
        declared = self.declared(name) - {"weights", "progress"}
        for key in kwargs:
            if key not in declared:
                raise DescriptionError(f"kwargs.{key}", f"is not a keyword {self.prefix}:{name} takes, so it would be "
                                       f"ignored (it takes {', '.join(sorted(declared))})")

    def build(self, name: str, kwargs: dict, stem: str, image_size: int, pretrained: bool = False) -> LibraryEncoder:
        """NAME built as `check` allowed it (`models.encoder_from_spec` checks first)."""
        import torchvision

        arch = f"{self.prefix}:{name}"
        weights = "DEFAULT" if pretrained else None
        try:
            net = constructed(arch, lambda: torchvision.models.get_model(name, weights=weights, **kwargs), kwargs)
        except (OSError, RuntimeError) as err:  # a download that could not happen (URLError is an OSError)
            raise fetch_failed(arch, err) from None
        notes = [adapt_to_small_images(net)] if stem == "cifar" else []
        removed = drop_classifier(net, arch)
        return LibraryEncoder(arch, net, kwargs, stem, removed, notes, image_size)


TORCHVISION = Torchvision()
