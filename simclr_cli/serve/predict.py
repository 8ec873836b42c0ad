"""Prediction: image files -> the classes a fine-tuned classifier gives them, one CSV row per image.

Owns what `simclr predict` does beneath the CLI. It takes IMAGES exactly as `simclr embed` does
(`embed.resolve_paths`: a folder, one image or a list file), decodes them in workers at the classifier's image
size, and reports bad files the same way (every one by path and nothing committed, or left out with
`skip_bad`). The encoder sees what `embed`'s encoder sees (`models.features.extract_features`); the neck and
the linear layer then run in fp32 and the probabilities are the softmax of fp32 logits. Rows stream to stdout or
atomically to a file, so memory stays flat however many images there are.

CSV: `path,class,probability` for k = 1; `path,class_1,probability_1,...,class_k,probability_k` for k > 1,
the k most probable classes in descending order, probabilities with 6 decimals.
"""

from __future__ import annotations

import contextlib
import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Sequence

import torch

from simclr_cli.errors import OptionError, OutputError
from simclr_cli.serve.embed import each_decoded, resolve_paths, stdout_target
from simclr_cli.serve.inference import Inference
from simclr_cli.files import atomic_file, check_output_path
from simclr_cli.models.classifier import LoadedClassifier, load_classifier
from simclr_cli.models.features import extract_features, for_inference
from simclr_cli.runtime import Callback


@dataclass
class PredictResult:
    rows: int  # images classified, rows of the CSV
    classes: int  # how many classes the classifier knows
    top_k: int  # classes per row
    seconds: float  # decode + forward + write, after the classifier was loaded
    output: str  # where the CSV went
    paths: list[Path] = field(repr=False)  # path of each row, in order
    failures: list[tuple[Path, str]] = field(default_factory=list)  # skipped (path, reason)

    @property
    def images_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def csv_header(top_k: int) -> list[str]:
    """`path,class,probability`, or with k > 1 `path,class_1,probability_1,...,class_k,probability_k`."""
    if top_k == 1:
        return ["path", "class", "probability"]
    return ["path", *(f"{name}_{j}" for j in range(1, top_k + 1) for name in ("class", "probability"))]


class PredictionWriter:
    """The header line, then one row per image; text encoded as `embed`'s CSV is (UTF-8, a path's undecodable
    bytes kept through surrogateescape), quoted where a path or class name holds a comma or a quote."""

    def __init__(self, fp: BinaryIO, classes: Sequence[str], top_k: int) -> None:
        self.fp, self.classes, self.rows = fp, list(classes), 0
        self._write_rows([csv_header(top_k)])

    def _write_rows(self, rows: list[list[str]]) -> None:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        self.fp.write(text.getvalue().encode("utf-8", "surrogateescape"))

    def write(self, paths: Sequence[Path], probs: torch.Tensor, indices: torch.Tensor) -> None:
        """probs, indices: (B, k) from `topk`, most probable first."""
        rows = [[str(p), *(cell for i, q in zip(ix, pr) for cell in (self.classes[i], f"{q:.6f}"))]
                for p, ix, pr in zip(paths, indices.tolist(), probs.tolist())]
        self._write_rows(rows)
        self.rows += len(rows)

    def finish(self) -> None:
        self.fp.flush()


def ready_classifier(loaded: LoadedClassifier, run: Inference) -> LoadedClassifier:
    """The classifier on the inference device: the encoder as `embed` readies one (eval, channels_last when
    convolutional, strict fp32 on a GPU), its neck and linear layer beside it."""
    model = loaded.model
    model.encoder, _ = for_inference(model.encoder, None, run.device)
    model.neck.eval().to(run.device)
    model.fc.eval().to(run.device)
    return loaded


@torch.no_grad()
def class_probabilities(loaded: LoadedClassifier, images_u8: torch.Tensor, run: Inference) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, C) class probabilities on the CPU: h through `extract_features` (what
    `embed` computes), then the neck and the linear layer in fp32, softmax in fp32."""
    model = loaded.model
    h = extract_features(model.encoder, images_u8, loaded.mean, loaded.std, loaded.image_size, run.device,
                         run.precision, batch_size=max(1, len(images_u8)))  # (B, D) float32
    logits = model.fc(model.neck(h.to(run.device)))  # (B, C)
    return torch.softmax(logits.float(), dim=1).cpu()


def predict_paths(loaded: LoadedClassifier, paths: Sequence[Path], fp: BinaryIO, *, run: Inference,
                  top_k: int = 1, batch_size: int = 256, num_workers: int = 2, skip_bad: bool = False,
                  callback: Callback | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Decode `paths` in workers, classify each batch, stream CSV rows to `fp`. Returns (kept paths, failures);
    bad files as `embed.each_decoded` says (embed's own policy)."""
    writer = PredictionWriter(fp, loaded.classes, top_k)

    def classify(batch_paths: list[Path], images: torch.Tensor) -> None:
        probs, indices = class_probabilities(loaded, images, run).topk(top_k, dim=1)  # (B, k) each
        writer.write(batch_paths, probs, indices)

    kept, failures = each_decoded(paths, loaded.image_size, classify, batch_size=batch_size,
                                  num_workers=num_workers, skip_bad=skip_bad, callback=callback)
    writer.finish()
    return kept, failures


def check_top_k(top_k: int, classes: Sequence[str]) -> None:
    """One line, before any image is decoded, when k asks for more classes than the classifier has."""
    if not 1 <= top_k <= len(classes):
        raise OptionError(f"-k {top_k} asked for, but the classifier knows {len(classes)} classes "
                          f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}): use -k 1 to {len(classes)}")


def predict_images(classifier: str | Path, images: str | Path, output: str | Path | None = None,
                   stdout: BinaryIO | None = None, *, top_k: int = 1, batch_size: int = 256, num_workers: int = 2,
                   skip_bad: bool = False, device: str = "auto", precision: str = "fp32",
                   callback: Callback | None = None) -> PredictResult:
    """Classify IMAGES with a classifier file (`simclr finetune`), writing one CSV row per image to `output`
    (atomically) or to `stdout` when None.

    precision defaults to fp32, not auto, as for `embed`: the same classifier and images then give the same
    probabilities on any machine (within ~1e-5)."""
    if output is None and stdout is None:
        raise OutputError("no output: pass -o predictions.csv, or a stream for the rows")
    output = None if output is None else Path(output).expanduser()
    if output is not None:
        check_output_path(output, "predictions.csv")
    run = Inference(device, precision)
    if top_k < 1:
        raise OptionError(f"-k {top_k}: give at least 1 class per image")
    paths = resolve_paths(images)
    loaded = load_classifier(Path(classifier).expanduser())
    check_top_k(top_k, loaded.classes)
    loaded = ready_classifier(loaded, run)
    callback = callback or (lambda event, data: None)
    callback("start", {"images": len(paths), "classes": len(loaded.classes), "top_k": top_k,
                       "image_size": loaded.image_size, "head_layer": loaded.model.head_layer,
                       "device": str(run.device), "precision": run.precision})
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if output is not None:
            fp = stack.enter_context(atomic_file(output))
        else:  # a CSV's rows need no count up front: stream (a regular file is truncated back on failure)
            fp, _ = stack.enter_context(stdout_target(stdout, rows_may_shrink=False))
        kept, failures = predict_paths(loaded, paths, fp, run=run, top_k=top_k, batch_size=batch_size,
                                       num_workers=num_workers, skip_bad=skip_bad, callback=callback)
    return PredictResult(len(kept), len(loaded.classes), top_k, time.perf_counter() - t0,
                         str(output) if output is not None else "stdout", kept, failures)
