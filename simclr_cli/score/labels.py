"""Label subsets: the few labels a semi-supervised evaluation trains on (`--labels 1%`, `10%`, a count per
class, or `all`), class-balanced as in the SimCLR paper's 1% and 10% ImageNet subsets.

`label_subset(labels, spec, seed)` takes, from every class, the same share of its images (a fraction, each
class's count rounded) or the same count, chosen at random from `seed`; the indices come back sorted, with
a digest that names the subset in a classifier file and a report. The same labels, spec and seed give the
same subset on any machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from simclr_cli.errors import OptionError


@dataclass(frozen=True)
class LabelSpec:
    text: str  # as the user wrote it: "1%", "25", "all"
    fraction: float | None = None  # of each class's images
    per_class: int | None = None  # images of each class

    @property
    def everything(self) -> bool:
        return self.fraction is None and self.per_class is None


def parse_labels(text: str) -> LabelSpec:
    """'1%', '10%', '0.5%' (of each class), '25' (images per class) or 'all'; anything else is one line."""
    t = str(text).strip().lower()
    if t in ("all", "100%"):
        return LabelSpec("all")
    try:
        if t.endswith("%"):
            value = float(t[:-1])
            if 0 < value < 100:
                return LabelSpec(t, fraction=value / 100)
        elif int(t) > 0:
            return LabelSpec(t, per_class=int(t))
    except ValueError:
        pass
    raise OptionError(f"--labels {text!r} is not a label subset: use a percentage above 0 and below 100 (1%, 10%), "
                      "a number of images per class (25), or all")


@dataclass(frozen=True)
class LabelSubset:
    indices: torch.Tensor  # int64, sorted, into the labelled split
    spec: str
    seed: int
    digest: str  # sha256 of the indices, 16 hex digits

    def describe(self, classes: list[str] | None = None) -> dict:
        return {"labels": self.spec, "seed": self.seed, "images": len(self.indices), "digest": self.digest,
                **({"classes": len(classes)} if classes else {})}


def label_subset(labels: torch.Tensor, spec: LabelSpec, seed: int, classes: list[str] | None = None) -> LabelSubset:
    """The class-balanced subset of a labelled split that `spec` names; a class left with no image, or with
    fewer images than a count asks for, is one line naming it."""
    labels = labels.cpu()
    if spec.everything:
        idx = torch.arange(len(labels))
    else:
        g = torch.Generator().manual_seed(seed)
        parts = []
        for c in range(int(labels.max()) + 1 if len(labels) else 0):
            members = (labels == c).nonzero().flatten()
            if not len(members):
                continue
            n = round(spec.fraction * len(members)) if spec.fraction is not None else spec.per_class
            name = classes[c] if classes and c < len(classes) else str(c)
            if n == 0:
                raise OptionError(f"--labels {spec.text} leaves class {name!r} ({len(members)} images) with none: use "
                                  f"a larger share, or a count per class (e.g. --labels 1)")
            if n > len(members):
                raise OptionError(f"--labels {spec.text} asks for {n} images of class {name!r}, which has "
                                  f"{len(members)}: use at most {len(members)} per class, or a percentage")
            parts.append(members[torch.randperm(len(members), generator=g)[:n]])
        idx = torch.cat(parts).sort().values if parts else torch.empty(0, dtype=torch.long)
    digest = hashlib.sha256(idx.numpy().astype("<i8").tobytes()).hexdigest()[:16]
    return LabelSubset(idx, spec.text, seed, digest)
