"""Frozen features: uint8 images in, float32 representations out, the same way everywhere.

`extract_features` is what the kNN monitor, `simclr probe` and `simclr embed` run, so a row of `embed` equals
the row `probe` fits on for the same image at the same precision. It never changes the model it is given
(mode and memory format come back as they were); `for_inference` readies a freshly loaded encoder.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from simclr_cli.errors import OptionError
from simclr_cli.models.heads import ProjectionHead
from simclr_cli.runtime import autocast, configure_cuda


def _channel_stats(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[torch.Tensor, ...]:
    shape = (1, -1, 1, 1)
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(shape),
            torch.tensor(std, dtype=torch.float32, device=device).view(shape))


def _preprocess(images_u8: torch.Tensor, mean_t: torch.Tensor, std_t: torch.Tensor, size: int) -> torch.Tensor:
    x = images_u8.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x / 255.0 - mean_t) / std_t


def preprocess(images_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float], size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, size, size): resized when needed (bilinear, antialias), /255,
    normalised per channel. On the images' device; probe, the monitor and `simclr embed` all extract through
    it, so their rows agree."""
    return _preprocess(images_u8, *_channel_stats(mean, std, images_u8.device), size)


def check_layer(head: ProjectionHead | None, layer: int, option: str = "layer") -> None:
    """A head layer the encoder file has (0: h), or one line naming `option` and the layers it has."""
    if layer and (head is None or not 0 < layer <= head.layers):
        have = "no projection head" if head is None else f"a {head.layers}-layer projection head"
        raise OptionError(f"{option} {layer} asked for, but the encoder file has {have}: use a layer in "
                              f"0..{0 if head is None else head.layers}")


def for_inference(encoder: torch.nn.Module, head: ProjectionHead | None, device: torch.device):
    """A loaded (not live) encoder and head on `device`, in eval mode and, when convolutional, channels_last, the
    fastest layout for convolutions here; `extract_features` then feeds it batches in that layout. On a GPU,
    fp32 stays fp32 (no TF32; see `runtime.configure_cuda`)."""
    configure_cuda(device, "fp32", training=False)
    encoder = encoder.eval().to(device)
    if getattr(encoder, "convolutional", True):  # a ViT's one convolution is its patch embedding
        encoder = encoder.to(memory_format=torch.channels_last)
    return encoder, head.eval().to(device) if head is not None else None


def _memory_format(module: torch.nn.Module) -> torch.memory_format:
    """channels_last when the module's first convolution is stored that way, else contiguous."""
    conv = next((m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if conv is not None and conv.dim() == 4 and not conv.is_contiguous() and \
            conv.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module | None):
    """eval() for the block; each module gets its own train/eval mode back afterwards (the monitor runs on
    the live model, which must go on training exactly as before)."""
    modes = [(m, m.training) for m in modules if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in modes:
            m.train(was_training)


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, images_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     size: int, device: torch.device, precision: str = "fp32", batch_size: int = 512,
                     head: ProjectionHead | None = None, layer: int = 0,
                     callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Frozen features of uint8 images (N, 3, H, W) -> float32 (N, D) on the CPU.

    The encoder (and head) must already be on `device` (`for_inference` puts a loaded one there); nothing
    about them is changed: eval mode for the pass, their own mode after, their memory format untouched.
    layer 0 is the representation h; layer k > 0 the output of the projection head's first k blocks
    (SimCLR v2 probes from a middle head layer). callback(done, total) after each batch.
    """
    check_layer(head, layer)
    head = head if layer else None
    fmt = _memory_format(encoder)
    n, out = images_u8.shape[0], None
    stats = _channel_stats(mean, std, device)  # once, not per batch
    with eval_mode(encoder, head):
        for i in range(0, n, batch_size):
            x = _preprocess(images_u8[i:i + batch_size].to(device, non_blocking=True), *stats, size)
            x = x.contiguous(memory_format=fmt)
            with autocast(device, precision):
                h = encoder(x)  # (B, feature_dim)
                if head is not None:
                    h = head(h, layer=layer)  # (B, hidden or head_out)
            if out is None:
                out = torch.empty((n, h.shape[1]), dtype=torch.float32)
            out[i:i + len(h)] = h.float().cpu()
            if callback is not None:
                callback(min(i + batch_size, n), n)
    return out if out is not None else torch.empty((0, 0))
