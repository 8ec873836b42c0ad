"""`simclr finetune`: the pretrained encoder fine-tuned with a linear layer on a class-balanced few of the
labels (`score.labels`), scored once on the test split (or on the validation split, for choosing
settings), and written as a classifier file (`models.classifier`) that `simclr predict` reads.

With `compare`, the same command also fine-tunes a randomly initialised network of the same architecture
on the same labels with the same protocol (supervised from scratch) and fits the linear probe on the same
labels: what pretraining bought, in one table. Every model's state is saved after each epoch beside the
output (`.NAME.partial`), so an interrupted run continues with `resume` and ends as an unbroken one would;
the partial file is removed when the run ends. It reports through `callback(event, data)` and never prints.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from simclr_cli import __version__
from simclr_cli.data import DataOptions
from simclr_cli.errors import OptionError
from simclr_cli.score.finetune_loop import Protocol, accuracy, default_epochs, scaled_lr, train_classifier
from simclr_cli.score.labels import LabelSpec, label_subset, parse_labels
from simclr_cli.score.linear import WEIGHT_DECAYS, linear_probe
from simclr_cli.score.probe import load_splits, random_encoder, split_seed
from simclr_cli.files import atomic_save, check_output_path, safe_load
from simclr_cli.models.classifier import HEAD_LAYER_OPTION, Classifier, classifier_payload
from simclr_cli.models.encoder_file import load_encoder
from simclr_cli.models.features import check_layer, extract_features, for_inference
from simclr_cli.runtime import INFERENCE_PRECISIONS, Callback, pick_device, resolve_precision

STATE_FORMAT = "simclr-cli/finetune-state"


@dataclasses.dataclass
class FinetuneOptions(DataOptions):  # the data it reads: dataset, root, download, synthetic_size, num_workers
    labels: str = "10%"  # "1%", "10%", a count per class, or "all"
    split: str = "test"  # "val": fit on the training split minus its validation split, score on that
    seed: int = 0  # of the label subset, the network's new layers and the augmentations
    epochs: int | None = None  # None: the paper's (60 for 1% of the labels or fewer, 30 for more)
    batch_size: int = 256
    lr: float | None = None  # None: the paper's 0.05 x batch / 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    crop_scale_min: float = 0.08
    head_layer: int = 0  # fine-tune from this layer of the projection head (SimCLR v2: 1)
    compare: bool = False
    device: str = "auto"
    precision: str = "auto"
    resume: bool = False

    def check(self) -> None:
        if self.epochs is not None and self.epochs < 1 or self.batch_size < 2 or (self.lr is not None and self.lr <= 0) \
                or self.weight_decay < 0 or not 0 < self.crop_scale_min <= 1 or self.head_layer < 0:
            raise OptionError("need --epochs >= 1, --batch-size >= 2, --lr > 0, --weight-decay >= 0, "
                              "0 < --crop-scale-min <= 1 and --from-head-layer >= 0")


def partial_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.partial")


def _run_key(encoder_path: Path, opts: FinetuneOptions, subset_digest: str) -> str:
    """What a resumed run must share with the one it continues."""
    what = {k: v for k, v in asdict(opts).items() if k not in ("resume", "device", "num_workers", "download")}
    text = json.dumps({"encoder": str(encoder_path.resolve()), "options": what, "subset": subset_digest}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_state(partial: Path, output: Path, opts: FinetuneOptions, key: str) -> dict | None:
    if not partial.exists():
        if opts.resume:
            raise OptionError(f"nothing to resume: no interrupted fine-tune of {output} ({partial.name} is absent)")
        return None
    if not opts.resume:
        raise OptionError(f"{partial} holds an interrupted fine-tune of {output}: continue it with --resume, or "
                          "delete it to start again")
    state = safe_load(partial)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("key") != key:
        raise OptionError(f"{partial} was started with another encoder, labels or settings: resume with the same "
                          "ones, or delete it to start again")
    return state


def asked_fraction(spec: LabelSpec, images: int, labelled: int) -> float:
    """The share of the labels `spec` asks for, which picks the default epochs (`default_epochs`): a
    percentage as written, not the share its per-class rounding gives (1% of 150 images a class takes 2 each,
    1.33%, and is still the paper's 1% protocol of 60 epochs); all as 1; a count per class as the share its
    `images` make of the `labelled` training split, validation images included (a count has no rounding, and
    --split val then trains the epochs of the test run it chooses settings for): 50 a class of CIFAR-10's
    5,000 is 1%, 60 epochs; 100 a class is 2%, 30."""
    if spec.fraction is not None:
        return spec.fraction
    return 1.0 if spec.everything else images / max(1, labelled)


class FinetuneRun:
    """One `simclr finetune`: the encoder, the label subset and the test split loaded once, the protocol, the
    resume state, and the results of the models done so far."""

    def __init__(self, encoder_path: Path, output: Path, opts: FinetuneOptions, emit: Callback) -> None:
        spec = parse_labels(opts.labels)
        opts.check()
        check_output_path(output, "classifier.pth")
        self.opts, self.output, self.emit, self.partial = opts, output, emit, partial_path(output)
        self.device = pick_device(opts.device)
        self.precision = resolve_precision(opts.precision, self.device, INFERENCE_PRECISIONS)
        self.loaded = load_encoder(encoder_path)
        check_layer(self.loaded.head, opts.head_layer, HEAD_LAYER_OPTION)  # before any data is read
        self.seed, notes = split_seed(self.loaded, opts.dataset, opts.root, None)
        train, self.test = load_splits(opts.data_config(), self.loaded.image_size, seed=self.seed, split=opts.split)
        self.subset = label_subset(train.labels, spec, opts.seed, train.classes)
        self.key = _run_key(encoder_path, opts, self.subset.digest)
        self.state = _read_state(self.partial, output, opts, self.key)
        # A folder through the cache stays mapped (a row view): batches are read as the loop takes them, so
        # memory does not grow with the subset (10% of an ImageNet-sized folder at 224 px is ~19 GB).
        chosen = train.take(self.subset.indices, f"{train.name}[{spec.text}]")
        self.images, self.labels = chosen.images, chosen.labels
        self.classes, fraction, batch = train.classes, len(self.subset.indices) / len(train), min(opts.batch_size, len(self.images))
        labelled = len(train) + (len(self.test) if opts.split == "val" else 0)  # the whole labelled training split
        asked = asked_fraction(spec, len(self.subset.indices), labelled)
        self.protocol = Protocol(opts.epochs or default_epochs(asked), batch, opts.lr or scaled_lr(batch),
                                 opts.momentum, True, opts.weight_decay, opts.crop_scale_min, opts.seed)
        self.info = {"encoder": str(encoder_path), "dataset": {
            "name": opts.dataset, "train_size": len(train), "test_size": len(self.test), "evaluated_on": opts.split,
            "classes": train.classes}, "subset": {**self.subset.describe(train.classes), "fraction": fraction,
                                                  "asked_fraction": asked},
            "protocol": self.protocol.describe(), "head_layer": opts.head_layer, "device": str(self.device),
            "precision": self.precision, "models": ["pretrained"] + (["random_init", "linear_probe"] if opts.compare else []),
            "resumed": self.state is not None, "notes": notes}
        self.results: dict = dict(self.state["results"]) if self.state else {}

    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features of the label subset and of the evaluation split: the pretrained encoder's (not a
        fine-tuned one's), fp32, at the head layer fine-tuning starts from; float32 (N, D) on the CPU each."""
        encoder, head = for_inference(self.loaded.encoder, self.loaded.head, self.device)
        return tuple(extract_features(encoder, x, self.loaded.mean, self.loaded.std, self.loaded.image_size,
                                      self.device, "fp32", head=head, layer=self.opts.head_layer)
                     for x in (self.images, self.test.images))

    def linear_probe(self, features: tuple[torch.Tensor, torch.Tensor] | None = None,
                     weight_decays: Sequence[float] = WEIGHT_DECAYS) -> dict:
        """The linear probe on the subset (`simclr probe --labels`'s: the same features, held-out tenth of the
        subset for choosing among `weight_decays`, and seed), scored on the evaluation split. `features`:
        those of `self.features()`, when the caller already has them."""
        train, test = features if features is not None else self.features()
        res = linear_probe(train, self.labels, test, self.test.labels, len(self.classes), weight_decays, seed=self.seed)
        return {"top1": res["top1"], "top5": res["top5"], "weight_decay": res["weight_decay"]}

    def save(self, model: str | None, current: dict | None) -> None:
        atomic_save({"format": STATE_FORMAT, "key": self.key, "results": self.results, "model": model,
                     "current": current}, self.partial)

    def fine_tune(self, name: str) -> dict:
        """Fine-tune the encoder ("pretrained") or its random-init twin; the first is written as the classifier."""
        loaded = self.loaded
        source = (dataclasses.replace(loaded, encoder=copy.deepcopy(loaded.encoder), head=copy.deepcopy(loaded.head))
                  if name == "pretrained" else random_encoder(loaded, int(loaded.provenance.get("seed") or 0)))
        torch.manual_seed(self.opts.seed)  # the new linear layer's initial weights
        model = Classifier(source.encoder, source.head, self.opts.head_layer, len(self.classes))
        resume = self.state["current"] if self.state and self.state.get("model") == name else None
        train_classifier(model, self.images, self.labels, source.mean, source.std, source.image_size, self.protocol,
                         self.device, self.precision, resume, lambda current: self.save(name, current),
                         lambda epoch, epochs, loss: self.emit("epoch", {"model": name, "epoch": epoch,
                                                                          "epochs": epochs, "loss": loss}))
        result = accuracy(model, self.test.images, self.test.labels, source.mean, source.std, source.image_size,
                          self.device)
        if name == "pretrained":
            atomic_save(classifier_payload(source, model.cpu(), self.classes, {
                **{k: self.info[k] for k in ("dataset", "subset", "protocol", "precision")},
                "indices": self.subset.indices.clone(), "result": result, "simclr_cli": __version__,
                "encoder_provenance": loaded.provenance}), self.output)
        return result


def run_finetune(encoder_path: str | Path, output: str | Path, opts: FinetuneOptions,
                 callback: Callback | None = None) -> dict:
    """Fine-tune, score, write the classifier file at `output` (and, with compare, the other two rows)."""
    run = FinetuneRun(Path(encoder_path), Path(output).expanduser(), opts, callback or (lambda event, data: None))
    run.emit("start", run.info)
    for name in run.info["models"]:
        if name in run.results:  # done before an interruption
            continue
        t0 = time.perf_counter()
        run.emit("model", {"model": name})
        if name == "linear_probe":
            run.results[name] = run.linear_probe()
        else:
            run.results[name] = run.fine_tune(name)
        run.results[name]["seconds"] = time.perf_counter() - t0  # this process's: a resumed model's first part not counted
        run.emit("result", {"model": name, **run.results[name]})
        run.save(None, None)
    run.partial.unlink(missing_ok=True)
    return {**run.info, "output": str(run.output), "results": run.results}
