"""Where and how an encoder runs outside training: the one loader probe, embed, neighbors and report share.

`Inference(device, precision)` resolves the device and the precision (`auto` inside the inference
precisions: no fp16) before anything is read, so a wrong option fails at once; `load(path)` reads any
accepted encoder file and readies it on the device (eval mode, channels_last, strict fp32 on a GPU), or
opens an .onnx file for onnxruntime (`export_onnx.OnnxEncoder`);
`features(...)` extracts through `models.features.extract_features`, the path the kNN monitor takes too, so
their rows agree.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from simclr_cli.artifacts import OnnxExport, identify
from simclr_cli.exports.onnx import OnnxEncoder
from simclr_cli.models.encoder_file import LoadedEncoder, encoder_of
from simclr_cli.models.features import check_layer, extract_features, for_inference
from simclr_cli.runtime import INFERENCE_PRECISIONS, pick_device, resolve_precision


class Inference:
    def __init__(self, device: str = "auto", precision: str = "fp32") -> None:
        self.device = pick_device(device)
        self.precision = resolve_precision(precision, self.device, INFERENCE_PRECISIONS)

    def load(self, path: str | Path) -> LoadedEncoder | OnnxEncoder:
        artifact = identify(path)  # what the file is, decided in one place
        if isinstance(artifact, OnnxExport):
            return OnnxEncoder(path)
        return self.ready(encoder_of(artifact))

    def ready(self, loaded: LoadedEncoder) -> LoadedEncoder:
        """The same encoder file's description with its encoder and head on the device, ready to extract."""
        encoder, head = for_inference(loaded.encoder, loaded.head, self.device)
        return dataclasses.replace(loaded, encoder=encoder, head=head)

    def features(self, loaded: LoadedEncoder | OnnxEncoder, images_u8: torch.Tensor, batch_size: int = 512,
                 layer: int = 0, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """float32 (N, D) on the CPU: h, or the output of the head's first `layer` blocks."""
        if isinstance(loaded, OnnxEncoder):
            check_layer(None, layer)  # an ONNX file holds the encoder alone
            parts = []
            for i in range(0, len(images_u8), batch_size):
                parts.append(loaded.features(images_u8[i:i + batch_size]))
                if callback is not None:
                    callback(min(i + batch_size, len(images_u8)), len(images_u8))
            return torch.cat(parts) if parts else torch.empty((0, loaded.feature_dim))
        return extract_features(loaded.encoder, images_u8, loaded.mean, loaded.std, loaded.image_size, self.device,
                                self.precision, batch_size, loaded.head if layer else None, layer, callback)

    def describe(self) -> str:
        return f"{self.device}, {self.precision}"
