"""TorchScript and safetensors: the encoder for plain torch without this project, and the weights alone in the
Hugging Face standard, each checked before it is kept (`portable.check`).

torchscript: `torch.jit.trace` of the encoder in eval mode, saved with the metadata as `simclr-cli.json`
inside the archive; `torch.jit.load(path)` runs it with torch alone (no simclr_cli, no torchvision, no timm).
A trace keeps every size the model read as a number, so a convolutional encoder's file is also checked at
another height and width (`portable.size_batch`), as it will be fed.
safetensors: the state dict the model's library loads (torchvision's or timm's keys; a built-in ResNet's are
torchvision's), with the metadata as the file's "simclr-cli" entry; checked by loading it into the model
rebuilt from that metadata. `models.encoder_file.load_encoder` reads it back, so probe and embed take it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from simclr_cli.artifacts import (Checkpoint, ClassifierFile, EncoderFile, ExportFormat, SafetensorsExport,
                                  TorchScriptExport)
from simclr_cli.errors import CheckpointError
from simclr_cli.exports import portable
from simclr_cli.files import atomic_path
from simclr_cli.models import LibraryEncoder
from simclr_cli.models.encoder_file import LoadedEncoder, load_encoder
from simclr_cli.models.library import library_state_dict

TORCHSCRIPT_EXTRA = "simclr-cli.json"  # the metadata's name inside a TorchScript archive


def write_torchscript(loaded: LoadedEncoder, path: Path, options: dict | None = None) -> dict:
    encoder = loaded.encoder.eval().float()
    x, reference = portable.parity_batch(loaded)
    sized = portable.size_batch(loaded)  # None: a model fixed to its size, checked at that size alone
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)  # recent torch marks torch.jit deprecated (README)
        try:
            with torch.no_grad():
                traced = torch.jit.trace(encoder, x, check_trace=False)
        except Exception as err:
            raise CheckpointError(f"{encoder.describe()['arch']} could not be traced to TorchScript "
                                  f"({type(err).__name__}: {' '.join(str(err).split())[:200]}): nothing was written") from None
        with open(tmp, "wb") as f:  # a file object: the archive's folder is "archive", not the temporary name
            torch.jit.save(traced, f, _extra_files={TORCHSCRIPT_EXTRA: portable.dumps(loaded)})
        again = torch.jit.load(str(tmp), map_location="cpu")
        diff = portable.verify(again, portable.checks(x, reference, sized), "the TorchScript file")
    return {"parity": diff}


def library_keys(loaded: LoadedEncoder) -> dict[str, torch.Tensor]:
    """The state dict in the keys of the model's own library (a LibraryEncoder's `net.` dropped)."""
    encoder = loaded.encoder
    state = library_state_dict(encoder) if isinstance(encoder, LibraryEncoder) else encoder.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def write_safetensors(loaded: LoadedEncoder, path: Path, options: dict | None = None) -> dict:
    from safetensors.torch import save_file

    x, reference = portable.parity_batch(loaded)
    with atomic_path(path) as tmp:
        save_file(library_keys(loaded), str(tmp), metadata={portable.KEY: portable.dumps(loaded)})
        again = load_encoder(tmp)  # rebuilt from the file's own metadata, weights loaded strictly
        with torch.no_grad():
            diff = portable.check(reference, again.encoder.eval()(x), "the safetensors file")
    return {"parity": diff}


TORCHSCRIPT = ExportFormat(
    "torchscript", "pt", "for torch.jit.load without simclr-cli, with the preprocessing inside, checked against "
    "PyTorch before it is kept", write_torchscript,
    lambda encoder, path: (f"m = torch.jit.load('{path}'); h = m(x)  (torch alone; the metadata: "
                           f"_extra_files={{'{TORCHSCRIPT_EXTRA}': ''}})"),
    takes=(Checkpoint, EncoderFile, ClassifierFile), reads_as=TorchScriptExport)
SAFETENSORS = ExportFormat(
    "safetensors", "safetensors", "the library's own keys with the preprocessing as metadata, checked against "
    "PyTorch before it is kept", write_safetensors,
    lambda encoder, path: (f"safetensors.torch.load_file('{path}'), the model's own keys; `simclr embed --encoder "
                           f"{path}` reads it too"),
    takes=(Checkpoint, EncoderFile), reads_as=SafetensorsExport)
