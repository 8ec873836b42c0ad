"""What an encoder description may say: the keywords, their types and the sizes a model is built from.

An encoder is rebuilt from a description (`describe()`: arch, stem, width or kwargs, and beside it the image
size and the projection head's sizes) that comes from the user's config or from a file: an encoder file, a
checkpoint, a classifier or a safetensors header that someone else may have written. Whatever a file says
reaches `torchvision.models.get_model(**kwargs)` or `timm.create_model(**kwargs)`, which also take keywords
that open paths (timm's `checkpoint_path` calls torch.load on it, unpickling on old torch) or ask for any
size (a ViT `embed_dim` of 10^6 allocates gigabytes before anything can be checked). So a description is
checked here, whole, before anything is built: a constructor keyword must be on KEYWORDS with its type and
bounds (numbers, booleans and a few named choices: no paths, URLs or callables), and every size has a bound.
The config goes through the same check, so every encoder that trains can be read back from its file.

The bounds admit the largest published models of each kind (ViT-g: width 1408, 40 blocks, 16 heads; a
SimCLR ResNet-50 x4: width 256), not more: a description within them builds a model of a few GB at most.
A keyword missing from KEYWORDS is one line; adding one is a line here with its type and bounds.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

from simclr_cli.errors import UserError


@dataclass(frozen=True)
class Keyword:
    """One constructor keyword a description may carry: its type and its range (or its choices)."""

    kind: type  # int, float, bool or str; an int is accepted where a float is asked
    low: float | None = None  # inclusive
    high: float | None = None  # inclusive
    choices: tuple = ()  # for str: the accepted values
    nullable: bool = False  # None accepted (timm's "use the model's default")
    length: int | None = None  # a list of this many values of `kind` (torchvision's replace_stride_with_dilation)

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value`, in words, or None."""
        if value is None and self.nullable:
            return None
        if self.length is not None:
            if not isinstance(value, (list, tuple)) or len(value) != self.length:
                return f"must be a list of {self.length} {self.kind.__name__} values"
            return next((p for p in map(self._one, value) if p), None)
        return self._one(value)

    def _one(self, value: Any) -> str | None:
        if self.kind is bool:
            return None if isinstance(value, bool) else f"must be true or false, not {_shown(value)}"
        if self.kind is str:
            return None if value in self.choices else f"must be one of {', '.join(map(repr, self.choices))}, not {_shown(value)}"
        number = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, number) or (isinstance(value, float) and not math.isfinite(value)):
            return f"must be {'an integer' if self.kind is int else 'a number'}, not {_shown(value)}"
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            return f"must be in [{self.low:g}, {self.high:g}], not {value!r}"
        return None


SIZE = 4096  # widths and hidden sizes: ViT-g's 1408 and ViT-G's 1664, a ResNet-50 x4's 2048-wide h
RATE = Keyword(float, 0, 1)  # dropout and stochastic-depth probabilities
# Constructor keywords of torchvision and timm classification models that a description may carry.
KEYWORDS: dict[str, Keyword] = {
    # ViTs (timm, torchvision): image and patch size, width, depth, heads
    "img_size": Keyword(int, 8, 1024), "image_size": Keyword(int, 8, 1024), "patch_size": Keyword(int, 1, 64),
    "embed_dim": Keyword(int, 8, SIZE), "hidden_dim": Keyword(int, 8, SIZE), "mlp_dim": Keyword(int, 8, 4 * SIZE),
    "depth": Keyword(int, 1, 64), "num_layers": Keyword(int, 1, 64), "num_heads": Keyword(int, 1, 64),
    "mlp_ratio": Keyword(float, 0.25, 16), "reg_tokens": Keyword(int, 0, 64),
    "qkv_bias": Keyword(bool), "qk_norm": Keyword(bool), "class_token": Keyword(bool), "no_embed_class": Keyword(bool),
    "pre_norm": Keyword(bool), "fc_norm": Keyword(bool, nullable=True), "dynamic_img_size": Keyword(bool),
    "dynamic_img_pad": Keyword(bool), "init_values": Keyword(float, 0, 1, nullable=True),
    "global_pool": Keyword(str, choices=("avg", "token", "max", "avgmax", "map")),
    # convolutional families: width and depth multipliers, groups, residual initialisation
    "width_mult": Keyword(float, 0.05, 8), "depth_mult": Keyword(float, 0.05, 8),
    "groups": Keyword(int, 1, 256), "width_per_group": Keyword(int, 1, 1024), "cardinality": Keyword(int, 1, 256),
    "base_width": Keyword(int, 1, 1024), "stem_width": Keyword(int, 8, 512),
    "zero_init_residual": Keyword(bool), "zero_init_last": Keyword(bool), "init_weights": Keyword(bool),
    "aux_logits": Keyword(bool), "transform_input": Keyword(bool),
    "replace_stride_with_dilation": Keyword(bool, length=3), "output_stride": Keyword(int, 8, 32),
    # regularisation
    "dropout": RATE, "attention_dropout": RATE, "stochastic_depth_prob": RATE, "drop_rate": RATE,
    "drop_path_rate": RATE, "attn_drop_rate": RATE, "proj_drop_rate": RATE, "pos_drop_rate": RATE,
    "patch_drop_rate": RATE, "layer_scale_init_value": Keyword(float, 0, 1),
}
STEMS = ("cifar", "imagenet")
IMAGE_SIZE = Keyword(int, 8, 1024)  # pixels: the encoder is run once at this size to find h's size
WIDTH = Keyword(int, 8, 256)  # a built-in ResNet's first-stage width: 64 as designed, 256 the paper's 4x
HEAD_SIZE = Keyword(int, 1, 2 * SIZE)  # the projection head's hidden and output sizes
HEAD_LAYERS = Keyword(int, 2, 3)  # SimCLR v1's 2 or v2's 3


class DescriptionError(UserError):
    """A description that may not be built: `field` names the offending entry (kwargs.embed_dim, head.out)."""

    def __init__(self, field: str, problem: str) -> None:
        self.field, self.problem = field, problem
        super().__init__(f"'{field}' {problem}")


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _check(field: str, rule: Keyword, value: Any) -> None:
    problem = rule.problem(value)
    if problem:
        raise DescriptionError(field, problem)


def check_kwargs(kwargs: Any, field: str = "kwargs") -> dict:
    """The constructor keywords, each on KEYWORDS and within its bounds; one DescriptionError otherwise."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise DescriptionError(field, f"must be a mapping of keyword: value, not {_shown(kwargs)}")
    for key, value in kwargs.items():
        if key not in KEYWORDS:
            close = difflib.get_close_matches(str(key), KEYWORDS, n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise DescriptionError(f"{field}.{key}", "is not a keyword simclr-cli passes to a model (the sizes, "
                                   f"rates and switches it takes, with their bounds: simclr_cli.models.spec.KEYWORDS){hint}")
        _check(f"{field}.{key}", KEYWORDS[key], value)
    return dict(kwargs)


def check_description(spec: Any, image_size: Any = None, input_too: bool = False) -> None:
    """An encoder description (and its image size and head, where given): the shape of every entry, the
    keywords and every size, before anything is built. `input_too`: a file's, which must also give its
    image size, and its normalisation as three numbers each (a positive std) where it gives one. Raises
    DescriptionError naming the field."""
    if not isinstance(spec, dict):
        raise DescriptionError("model", f"must be a mapping (arch, stem, ...), not {_shown(spec)}")
    if input_too:
        if "image_size" not in spec:
            raise DescriptionError("image_size", "is missing")
        for key, rule in (("mean", Keyword(float, -1e3, 1e3)), ("std", Keyword(float, 1e-6, 1e3))):
            value = spec.get(key)
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != 3 or any(map(rule.problem, value))):
                raise DescriptionError(key, f"must be 3 numbers in [{rule.low:g}, {rule.high:g}], not {_shown(value)}")
    for key in ("arch", "stem"):
        if key not in spec:
            raise DescriptionError(key, "is missing")
    if not isinstance(spec["arch"], str) or not spec["arch"]:
        raise DescriptionError("arch", f"must be a model name, not {_shown(spec['arch'])}")
    if spec["stem"] not in STEMS:
        raise DescriptionError("stem", f"must be one of {', '.join(STEMS)}, not {_shown(spec['stem'])}")
    if ":" in spec["arch"]:
        check_kwargs(spec.get("kwargs"))
    else:
        if "width" not in spec:
            raise DescriptionError("width", "is missing")
        _check("width", WIDTH, spec["width"])
    if image_size is not None:
        _check("image_size", IMAGE_SIZE, image_size)
    head = spec.get("head")
    if head is not None:
        if not isinstance(head, dict):
            raise DescriptionError("head", f"must be a mapping (hidden, out, layers), not {_shown(head)}")
        for key, rule in (("hidden", Keyword(int, 1, 2 * SIZE, nullable=True)), ("out", HEAD_SIZE),
                          ("layers", HEAD_LAYERS)):
            if key not in head:
                raise DescriptionError(f"head.{key}", "is missing")
            _check(f"head.{key}", rule, head[key])
