"""What travels with an encoder exported for other runtimes (ONNX, TorchScript, safetensors), and the check
every such file passes before it is written.

`metadata(loaded)` is everything someone holding only the file needs to reproduce `simclr embed`: how an
image becomes the input (centre square, bilinear resize to image_size, RGB, NCHW, pixel / 255, then
(x - mean) / std), what comes out (h and its size), what rebuilds the model, and where it came from. Each
format stores it as one JSON string under the key "simclr-cli" (ONNX metadata, safetensors metadata, a file
inside the TorchScript archive).

`verify(...)`: the file is written to a temporary name, loaded back with its own runtime, and run on the
batches of `checks(...)` (a fixed batch, one image of it, and for a convolutional encoder two images of
another height and width); the largest difference to the PyTorch encoder (fp32) is measured, and above
TOLERANCE x the largest |h|, or where the file gives the same output for every image, nothing is written
and one line says why.

`read_metadata(text, ...)`: the JSON a file carries, checked field by field before anything uses it (a file
from elsewhere may carry anything): one line naming the field.
"""

from __future__ import annotations

import json
from typing import Any, Callable, NoReturn

import torch

from simclr_cli.artifacts import PORTABLE_KEY
from simclr_cli.errors import CheckpointError
from simclr_cli.models import is_convolutional
from simclr_cli.models.encoder_file import LoadedEncoder
from simclr_cli.models.features import preprocess
from simclr_cli.models.spec import IMAGE_SIZE, Keyword

KEY = PORTABLE_KEY  # the metadata key every format stores its JSON under
FORMAT, FORMAT_VERSION = "simclr-cli/portable-encoder", 1  # what `metadata` writes; a later version is refused
# fp32: the largest |h difference| allowed, relative to the largest |h| of the PyTorch encoder on the same batch.
# Relative to the output's own scale (no floor): fp32 rounding grows with the size of what a layer sums, and
# the largest |h| stands for it; an untrained MobileNet's h is ~3e-9, so a floor of 1 let a file that gives
# zeros pass. Measured against it, in fp32: ONNX 3.5e-7 (ResNet-18 width 8), 6e-7 (MobileNet v3 small), and
# PyTorch fp32 against float64 7e-7 (untrained MobileNet): 1e-4 leaves more than 100x for another runtime's
# kernels, while a missing layer or a wrong operator is off by a whole |h|.
TOLERANCE = 1e-4
PREPROCESSING = ("decode the image (EXIF orientation applied, JPEG draft-decoded at >= image_size), make it RGB "
                 "(transparent pixels on white), take the centre square of its shorter side, resize it to image_size "
                 "x image_size (bilinear, antialiased), then x = (pixel / 255 - mean) / std, channels first")


def metadata(loaded: LoadedEncoder) -> dict:
    """The file's description: input, output, model, provenance (JSON-able)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "input": "images",
            "input_layout": "NCHW float32 RGB", "image_size": loaded.image_size, "mean": list(loaded.mean),
            "std": list(loaded.std), "preprocessing": PREPROCESSING, "output": output_of(loaded),
            "output_dim": loaded.encoder.feature_dim, "model": loaded.encoder.describe(),
            "provenance": dict(loaded.provenance)}


def output_of(loaded: LoadedEncoder) -> str:
    """"h" for an encoder; "logits" for a classifier (its class names in the metadata's model.classes)."""
    return getattr(loaded.encoder, "output", "h")


def dumps(loaded: LoadedEncoder) -> str:
    return json.dumps(metadata(loaded), sort_keys=True)


def parity_batch(loaded: LoadedEncoder, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(a fixed float input batch (n, 3, S, S), the PyTorch encoder's h of it in fp32): random images made
    from `seed`, preprocessed as `simclr embed` does."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, loaded.image_size, loaded.image_size), generator=g, dtype=torch.uint8)
    x = preprocess(images, loaded.mean, loaded.std, loaded.image_size)
    with torch.no_grad():
        return x, loaded.encoder.eval().float()(x)


def other_size(image_size: int) -> tuple[int, int]:
    """The second (height, width) a convolutional export is checked at: 8 and 16 pixels more than the training
    size, so neither side is the one the exporter saw and they differ (each is an axis of its own)."""
    return image_size + 8, image_size + 16


def size_batch(loaded: LoadedEncoder, n: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(n random normalised images at `other_size`, the PyTorch encoder's output of them in fp32) for a
    convolutional encoder; None for one fixed to its size (a ViT's position embeddings, a model that refuses
    the other size), whose export keeps its one size."""
    if not is_convolutional(loaded.encoder):
        return None
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, *other_size(loaded.image_size)), generator=g, dtype=torch.uint8)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (loaded.mean, loaded.std))
    x = (images.float() / 255 - mean) / std  # as `preprocess` does, without its resize to the square size
    try:
        with torch.no_grad():
            return x, loaded.encoder.eval().float()(x)
    except Exception:  # the model's own refusal of the size: its export is checked at its one size
        return None


def checks(x: torch.Tensor, reference: torch.Tensor,
           sized: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(what, input, PyTorch output) for every batch a file is run on: the parity batch, its first image (the
    batch axis is dynamic) and, for a file that takes any image size, `size_batch`'s images."""
    found = [("", x, reference), (" with a batch of one", x[:1], reference[:1])]
    if sized is not None:
        found.append((f" at {sized[0].shape[2]}x{sized[0].shape[3]} pixels", *sized))
    return found


def verify(run: Callable[[torch.Tensor], Any], batches: list[tuple[str, torch.Tensor, torch.Tensor]],
           what: str) -> float:
    """`run` (the file's runtime: input -> output) on each of `checks`' batches, each `check`ed; the largest
    |difference| of them all. A runtime that fails on a batch (a size it was not written for) is one line."""
    worst = 0.0
    for label, x, reference in batches:
        try:
            with torch.no_grad():
                got = run(x)
        except CheckpointError:
            raise
        except Exception as err:  # onnxruntime's InvalidArgument, TorchScript's RuntimeError: the first line says which
            text = " ".join(str(err).split())
            raise CheckpointError(f"{what} does not run{label} ({type(err).__name__}: {text[:200]}): nothing was "
                                  "written") from None
        worst = max(worst, check(reference, got, what + label))
    return worst


def check(reference: torch.Tensor, got, what: str) -> float:
    """The largest |difference| of `got` (array or tensor) to `reference`; above TOLERANCE x max |reference|,
    or where `got` is the same for every image of a batch of several, one CheckpointError line, and the
    caller writes nothing."""
    got = torch.as_tensor(got, dtype=torch.float32)
    if got.shape != reference.shape:
        raise CheckpointError(f"{what} gives {tuple(got.shape)}, the PyTorch encoder {tuple(reference.shape)}: "
                              "nothing was written")
    if not bool(torch.isfinite(reference).all()):
        raise CheckpointError("the PyTorch encoder gives non-finite values (NaN or Inf) on the check batch (its "
                              "weights, or an activation that overflowed): nothing was written")
    diff, scale = float((got - reference).abs().max()), float(reference.abs().max())
    limit = TOLERANCE * scale
    if not diff <= limit:  # not <=: a NaN fails too
        raise CheckpointError(f"{what} differs from the PyTorch encoder by {diff:.3g}, more than {TOLERANCE:g} x its "
                              f"largest |output| {scale:.3g}: nothing was written")
    if len(got) > 1 and bool((got == got[:1]).all()):  # random images: an encoder that sees them tells them apart
        if bool((reference == reference[:1]).all()):
            raise CheckpointError(f"the PyTorch encoder gives one and the same output for {len(got)} different "
                                  "images (collapsed, or its weights zero): it is not worth exporting; nothing was "
                                  "written")
        raise CheckpointError(f"{what} gives one and the same output for {len(got)} different images (the PyTorch "
                              "encoder does not): nothing was written")
    return diff


# the metadata's fields that simclr-cli reads back, each with its rule (models.spec's words for a bad value)
FIELDS: dict[str, Keyword] = {
    "image_size": IMAGE_SIZE,
    "output_dim": Keyword(int, 1, 1 << 20),  # h, or a classifier's logits (ImageNet-21k: 21,843)
    "mean": Keyword(float, -1e6, 1e6, length=3),  # per channel, of pixel / 255
    "std": Keyword(float, 1e-6, 1e6, length=3),  # divides: positive
    "output": Keyword(str, choices=("h", "logits")),
}
OPTIONAL = {"output": "h", "provenance": {}}  # absent: these


def read_metadata(text: str, where: str, fix: str) -> dict:
    """The JSON `metadata` wrote, read back from a file that may come from anywhere: every field this project
    uses checked before any is used, or one CheckpointError line naming the field and ending in `fix`.
    Returns the dict with OPTIONAL's defaults filled in."""
    def refuse(problem: str) -> NoReturn:
        raise CheckpointError(f"{where}: its {KEY} metadata {problem}: {fix}")

    try:
        info = json.loads(text)
    except json.JSONDecodeError as err:
        refuse(f"is not JSON ({err.msg} at character {err.pos})")
    except RecursionError:  # "[[[[..." nested deeper than the parser goes
        refuse("is not JSON this reader takes (nested too deep)")
    if not isinstance(info, dict):
        refuse(f"is a JSON {type(info).__name__}, not an object (image_size, mean, std, output_dim, model)")
    if info.get("format", FORMAT) != FORMAT:
        refuse(f"'format' is {json.dumps(info['format'])[:40]}, not \"{FORMAT}\"")
    version = info.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION or isinstance(version, bool):
        refuse(f"'format_version' is {json.dumps(version)[:40]}; this simclr-cli reads version {FORMAT_VERSION} "
               "(a newer simclr-cli may read it)")
    info = {**OPTIONAL, **info}
    for key, rule in FIELDS.items():
        if key not in info:
            refuse(f"has no '{key}'")
        problem = rule.problem(info[key])
        if problem:
            refuse(f"'{key}' {problem}")
    model = info.get("model")
    if not isinstance(model, dict):
        refuse("has no 'model' mapping (arch, stem, ...)" if model is None else
               f"'model' must be a mapping (arch, stem, ...), not a JSON {type(model).__name__}")
    for key in ("arch", "stem"):
        if not isinstance(model.get(key), str):
            refuse(f"'model.{key}' must be a string, not {json.dumps(model.get(key))[:40]}")
    if not isinstance(info["provenance"], dict):
        refuse(f"'provenance' must be a mapping, not a JSON {type(info['provenance']).__name__}")
    return info
