"""What travels with an encoder exported for other runtimes (ONNX, TorchScript, safetensors), and the check
every such file passes before it is written.

`metadata(loaded)` is everything someone holding only the file needs to reproduce `simclr embed`: how an
image becomes the input (centre square, bilinear resize to image_size, RGB, NCHW, pixel / 255, then
(x - mean) / std), what comes out (h and its size), what rebuilds the model, and where it came from. Each
format stores it as one JSON string under the key "simclr-cli" (ONNX metadata, safetensors metadata, a file
inside the TorchScript archive).

`checked(...)`: the file is written to a temporary name, loaded back with its own runtime, and run on a fixed
batch of images; the largest difference to the PyTorch encoder (fp32) is measured, and above TOLERANCE
nothing is written and one line says why.
"""

from __future__ import annotations

import json

import torch

from simclr_cli.errors import CheckpointError
from simclr_cli.models.encoder_file import PORTABLE_KEY, LoadedEncoder
from simclr_cli.models.features import preprocess

KEY = PORTABLE_KEY  # the metadata key every format stores its JSON under
TOLERANCE = 1e-4  # fp32: the largest |h difference| allowed, relative to max(1, max |h|)
PREPROCESSING = ("decode the image (EXIF orientation applied, JPEG draft-decoded at >= image_size), make it RGB "
                 "(transparent pixels on white), take the centre square of its shorter side, resize it to image_size "
                 "x image_size (bilinear, antialiased), then x = (pixel / 255 - mean) / std, channels first")


def metadata(loaded: LoadedEncoder) -> dict:
    """The file's description: input, output, model, provenance (JSON-able)."""
    return {"format": "simclr-cli/portable-encoder", "format_version": 1, "input": "images",
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


def check(reference: torch.Tensor, got, what: str) -> float:
    """The largest |difference| of `got` (array or tensor) to `reference`; above TOLERANCE (x max(1, max |h|))
    one CheckpointError line, and the caller writes nothing."""
    got = torch.as_tensor(got, dtype=torch.float32)
    if got.shape != reference.shape:
        raise CheckpointError(f"{what} gives {tuple(got.shape)}, the PyTorch encoder {tuple(reference.shape)}: "
                              "nothing was written")
    diff = float((got - reference).abs().max())
    limit = TOLERANCE * max(1.0, float(reference.abs().max()))
    if not diff <= limit:  # not <=: a NaN fails too
        raise CheckpointError(f"{what} differs from the PyTorch encoder by {diff:.3g} (more than {limit:.3g}): "
                              "nothing was written")
    return diff
