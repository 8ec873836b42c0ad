"""The classifier file `simclr finetune` writes and `simclr predict` reads: a fine-tuned encoder, the first
`head_layer` blocks of its projection head (SimCLR v2 fine-tunes from a head layer), and a linear layer.

The file is a native encoder file (the fine-tuned encoder and, when used, its head: `encoder_file` reads
it) with the format CLASSIFIER_FORMAT and a "classifier" section: the head layer, the class names, the
linear layer's weights, the label subset it was trained on and how it was trained. An encoder file given
where a classifier is expected, and the reverse, is one line each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from simclr_cli.errors import CheckpointError
from simclr_cli.artifacts import Checkpoint, ClassifierFile, EncoderFile, Foreign, of_content
from simclr_cli.files import safe_load
from simclr_cli.models.encoder_file import LoadedEncoder, encoder_of
from simclr_cli.models.features import check_layer
from simclr_cli.models.heads import ProjectionHead

HEAD_LAYER_OPTION = "--from-head-layer"  # how `simclr finetune` names the head layer, in its one-line refusals


def neck_dim(encoder: nn.Module, head: ProjectionHead | None, head_layer: int) -> int:
    """The size of what the linear layer sees: h, or the output of the head's first `head_layer` blocks."""
    return encoder.feature_dim if head_layer == 0 else head.blocks[head_layer - 1][0].out_features


class Classifier(nn.Module):
    """x -> encoder -> the head's first `head_layer` blocks -> linear -> logits."""

    def __init__(self, encoder: nn.Module, head: ProjectionHead | None, head_layer: int, num_classes: int):
        super().__init__()
        check_layer(head, head_layer, HEAD_LAYER_OPTION)
        self.encoder, self.head_layer = encoder, head_layer
        self.neck = nn.Sequential(*head.blocks[:head_layer]) if head_layer else nn.Identity()
        self.fc = nn.Linear(neck_dim(encoder, head, head_layer), num_classes)

    output = "logits"  # what an export of it gives (an encoder's exports give "h")
    classes: list[str] | None = None  # set by `load_classifier`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.neck(self.encoder(x)))

    @property
    def feature_dim(self) -> int:
        return self.fc.out_features

    @property
    def convolutional(self) -> bool:
        return getattr(self.encoder, "convolutional", True)

    def describe(self) -> dict:
        return {**self.encoder.describe(), "head_layer": self.head_layer, "classes": self.classes}


@dataclass
class LoadedClassifier:
    model: Classifier  # eval mode, on the CPU
    classes: list[str]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict  # the "classifier" section without its weights: labels, training, results, provenance


def classifier_payload(loaded: LoadedEncoder, model: Classifier, classes: list[str], info: dict) -> dict:
    """The classifier file of a fine-tuned `model` built from `loaded` (whose head spec it keeps)."""
    head = loaded.head if model.head_layer else None  # its first blocks are the neck: fine-tuned in place
    enc = LoadedEncoder(model.encoder, loaded.image_size, loaded.mean, loaded.std, loaded.kind, head,
                        loaded.provenance, [], loaded.head_spec if head is not None else None)
    return ClassifierFile.with_section(enc.payload(), {
        **info, "head_layer": model.head_layer, "classes": list(classes),
        "state_dict": {k: v.detach().cpu() for k, v in model.fc.state_dict().items()}})


def as_encoder(loaded: LoadedClassifier) -> LoadedEncoder:
    """The classifier in the shape the exporters take (`exports.extract`): its output is the class logits."""
    provenance = {**(loaded.info.get("encoder_provenance") or {}), "finetune": {
        k: loaded.info.get(k) for k in ("subset", "protocol", "result")}}
    return LoadedEncoder(loaded.model, loaded.image_size, loaded.mean, loaded.std, "classifier file", None,
                         provenance)


def load_classifier(path: str | Path, obj: object = None) -> LoadedClassifier:
    """The classifier file at `path` (`obj`: what `files.safe_load(path)` returned, for a caller that read it)."""
    path = Path(path)
    artifact = of_content(safe_load(path) if obj is None else obj, path)
    if not isinstance(artifact, ClassifierFile):
        other_format = isinstance(artifact, Checkpoint) or (isinstance(artifact, Foreign) and artifact.why == "format")
        what = "an encoder file" if isinstance(artifact, EncoderFile) else "a pretraining checkpoint" if other_format \
            else "not a classifier"
        raise CheckpointError(f"{path} is {what}: simclr predict takes the classifier file `simclr finetune` wrote "
                              "(simclr finetune ENCODER -o classifier.pth)")
    section = artifact.section
    problem = ("'classifier' must be a mapping (head_layer, classes, state_dict)" if not isinstance(section, dict) else
               "'classifier.classes' must be a non-empty list of class names" if not (
                   isinstance(section.get("classes"), list) and section["classes"]
                   and all(isinstance(c, str) for c in section["classes"])) else
               "'classifier.head_layer' must be an integer in 0..3" if section.get("head_layer") not in range(4) or isinstance(
                   section.get("head_layer"), bool) else None)
    if problem:
        raise CheckpointError(f"{path}: this classifier file's description is refused ({problem}): fine-tune again "
                              "(simclr finetune ENCODER -o classifier.pth)")
    try:
        loaded = encoder_of(artifact.encoder_part(), "classifier file")
        model = Classifier(loaded.encoder, loaded.head, int(section["head_layer"]), len(section["classes"]))
        model.fc.load_state_dict(section["state_dict"], strict=True)
    except (KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{path} is a damaged classifier file ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:200]}): fine-tune again") from None
    model.classes = list(section["classes"])
    info = {k: v for k, v in section.items() if k != "state_dict"}
    return LoadedClassifier(model.eval(), list(section["classes"]), loaded.image_size, loaded.mean, loaded.std, info)
