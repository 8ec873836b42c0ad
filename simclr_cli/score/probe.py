"""The probe protocol `simclr probe` runs: an encoder file of any accepted format, frozen, scored on a
labelled dataset.

Features of the train and test splits are extracted once (no augmentation; the encoder's own image size and
normalisation); then the test split's kNN top-1 (Wu et al. 2018: cosine similarity, k=200, votes weighted
by exp(sim / 0.1)) and a linear probe (multinomial logistic regression on standardised features, its L2
strength chosen on a held-out 10% of the train split, never on the test split): the evaluations of
`registry.EVALUATIONS`, in turn. It reports through `callback(event, data)` and never prints.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from simclr_cli import __version__
from simclr_cli.config import DataConfig
from simclr_cli.data import SOURCES, DataOptions, ImageSet, Source, default_data_root, load_dataset, split_validation
from simclr_cli.errors import DatasetError, OptionError
from simclr_cli.score.evaluation import Features, evaluations
from simclr_cli.exports.onnx import OnnxEncoder
from simclr_cli.serve.inference import Inference
from simclr_cli.score.knn import KNN_K, KNN_TEMPERATURE
from simclr_cli.score.labels import label_subset, parse_labels
from simclr_cli.models import encoder_from_spec
from simclr_cli.models.encoder_file import LoadedEncoder
from simclr_cli.models.features import check_layer
from simclr_cli.models.heads import ProjectionHead
from simclr_cli.runtime import Callback


def probe_source(name: str) -> Source:
    """The data source a probe or a fine-tune reads; an unknown name is one line listing them."""
    if name not in SOURCES:
        raise DatasetError(f"unknown probe dataset {name!r}: use one of {', '.join(SOURCES.names())}")
    return SOURCES[name]


def load_splits(data: DataConfig, image_size: int, *, seed: int = 0, split: str = "test", progress=None,
                val_size: int = 5000) -> tuple[ImageSet, ImageSet]:
    """The labelled (fit, evaluate) splits of a probe dataset, at the encoder's image size: (train, test), or
    with split "val" (train minus its validation split, the validation split), for choosing recipes."""
    if split not in ("test", "val"):
        raise OptionError(f"unknown split {split!r}: use test or val")
    source = probe_source(data.dataset)
    if not source.has_labels:
        raise DatasetError(f"the {data.dataset} dataset has no labels: probe and finetune need a labelled dataset")
    if source.needs_root and data.root is None:
        raise DatasetError(f"the {data.dataset} dataset needs --data-dir DIR ({source.layout})")
    missing = source.missing(data) if source.missing is not None else None
    if missing is not None:
        raise DatasetError(f"{data.dataset} not found: no {missing}; pass --data-root with the folder holding "
                           f"{missing.name}/, or --download")
    splits = [load_dataset(data, split, seed=seed, image_size=image_size, progress=progress)
              for split in ("test", "train")]
    splits.reverse()  # test first: a folder without one fails before anything is decoded
    if split == "val":
        splits = list(split_validation(splits[0], val_size))
    for s in splits:
        if s.labels is None or not s.classes:
            raise DatasetError(f"{s.name} has no labels: probe and finetune need class subfolders (DIR/<class>/*)")
    if splits[0].classes != splits[1].classes:
        only = sorted(set(splits[0].classes) ^ set(splits[1].classes))[:3]
        raise DatasetError(f"the train and test splits have different classes (e.g. {', '.join(only) or 'order'}): "
                           "give both splits the same class folders")
    return splits[0], splits[1]


def random_encoder(loaded: LoadedEncoder, seed: int) -> LoadedEncoder:
    """The same encoder file with an untrained encoder (and head) of the same shape, built after
    torch.manual_seed(seed) in the order `models.build_model` uses; the caller's RNG state is left as it was."""
    h = loaded.head
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = encoder_from_spec(loaded.encoder.describe(), loaded.image_size).eval()
        head = None
        if h is not None:
            hidden = h.blocks[0][0].out_features if h.layers > 1 else None
            head = ProjectionHead(encoder.feature_dim, hidden, h.blocks[-1][0].out_features, h.layers).eval()
    return dataclasses.replace(loaded, encoder=encoder, head=head)


def _evaluate_one(name: str, loaded: LoadedEncoder, train: ImageSet, test: ImageSet, run: Inference, opts: dict,
                  emit: Callback) -> dict:
    feats, t0 = {}, time.perf_counter()
    for split, data in (("train", train), ("test", test)):
        def progress(done: int, total: int, split=split) -> None:
            emit("extract", {"model": name, "split": split, "done": done, "total": total})
        # kNN and the linear fit run where the encoder did: on a GPU, there
        feats[split] = run.features(loaded, data.images, opts["batch_size"], opts["layer"], progress).to(run.device)
    result = {"feature_dim": feats["train"].shape[1], "extract_s": time.perf_counter() - t0}
    result["images_per_s"] = (len(train) + len(test)) / result["extract_s"]
    features = Features(feats["train"], train.labels, feats["test"], test.labels, len(train.classes))
    for key, evaluation in evaluations().items():
        emit("stage", {"model": name, "message": evaluation.name})
        t1 = time.perf_counter()
        result.update(evaluation.run(features, opts))
        result[f"{key}_s"] = time.perf_counter() - t1
    emit("result", {"model": name, **result})
    return result


def split_seed(loaded: LoadedEncoder, dataset: str, root: str | Path | None, seed: int | None) -> tuple[int, list[str]]:
    """The seed of a flat folder's 80/20 split (and of the probe's held-out 10%): `seed` when given, else the
    pretraining seed the encoder file records, so the probe's test images are the ones pretraining held out.
    Returns (seed, notes) with a note where that cannot be known."""
    pretrained = loaded.provenance.get("seed")
    chosen = seed if seed is not None else int(pretrained) if isinstance(pretrained, int) else 0
    notes, seeded_split = [], probe_source(dataset).seeded_split
    if seeded_split is not None and root is not None and seeded_split(Path(root).expanduser()):
        if pretrained is None:
            notes.append(f"the encoder file records no pretraining seed: the folder is split 80/20 with seed "
                         f"{chosen}; if the encoder was pretrained on this folder, its test images may have been "
                         "pretraining images (pass --seed with the pretraining train.seed)")
        elif chosen != pretrained:
            notes.append(f"--seed {chosen} splits the folder differently from pretraining (train.seed {pretrained}): "
                         "test images may have been pretraining images")
    return chosen, notes


def _models(loaded, random_init: bool, baseline: bool) -> list[str]:
    """The rows to probe: the encoder ("trained"), its untrained twin ("random_init"), or both."""
    if isinstance(loaded, OnnxEncoder) and (random_init or baseline):
        raise OptionError("an ONNX file holds no architecture to rebuild untrained: probe it without --random-init "
                          "and --baseline, or give the encoder.pth it came from")
    return (["trained"] if not random_init or baseline else []) + (["random_init"] if random_init or baseline else [])


def run_probe(encoder_path: str | Path, dataset: str = "cifar10", root: str | Path | None = None, *,
              device: str = "auto", precision: str = "auto", batch_size: int = 512, layer: int = 0,
              random_init: bool = False, baseline: bool = False, knn_k: int = KNN_K,
              knn_temperature: float = KNN_TEMPERATURE,
              download: bool = DataOptions.download, num_workers: int = DataOptions.num_workers,
              synthetic_size: int = DataOptions.synthetic_size, seed: int | None = None,
              split: str = "test", labels: str = "all", labels_seed: int = 0, callback: Callback | None = None) -> dict:
    """The probe protocol on one encoder file. random_init: probe an untrained encoder of the same
    architecture instead (seeded by the file's pretraining seed, else 0); baseline: probe both. seed: of a
    flat folder's split and the held-out 10% (None: the encoder's pretraining seed, see `split_seed`). labels:
    fit on a class-balanced subset of the training labels ("1%", "10%", a count per class; `score.labels`,
    chosen from `labels_seed`, the subset `simclr finetune --labels` takes with the same seed)."""
    spec = parse_labels(labels)
    emit = callback or (lambda event, data: None)
    if batch_size < 1 or layer < 0 or knn_k < 1 or knn_temperature <= 0:
        raise OptionError(f"need batch size >= 1, layer >= 0, knn_k >= 1, knn_temperature > 0; got {batch_size}, "
                          f"{layer}, {knn_k}, {knn_temperature}")
    t0 = time.perf_counter()
    run = Inference(device, precision)
    loaded = run.load(encoder_path)
    check_layer(loaded.head, layer)
    models = _models(loaded, random_init, baseline)
    init_seed = int(loaded.provenance.get("seed") or 0)
    seed, notes = split_seed(loaded, dataset, root, seed)
    data = DataOptions(dataset=dataset, root=None if root is None else str(root), download=download,
                       synthetic_size=synthetic_size, num_workers=num_workers).data_config()
    train, test = load_splits(data, loaded.image_size, seed=seed, split=split,
                              progress=lambda done, total, bad: emit("cache", {"done": done, "total": total, "bad": bad}))
    subset = label_subset(train.labels, spec, labels_seed, train.classes)
    if not spec.everything:
        train = train.take(subset.indices, f"{train.name}[{spec.text}]")
    load_s = time.perf_counter() - t0
    root = str(root or default_data_root()) if SOURCES[dataset].uses_root else None
    info = {"encoder": {"path": str(encoder_path), **loaded.describe()},
            "dataset": {"name": dataset, "root": root, "train_size": len(train),
                        "test_size": len(test), "num_classes": len(train.classes), "split_seed": seed,
                        "evaluated_on": split, "labels": subset.describe()},
            "device": str(run.device), "precision": run.precision, "layer": layer, "models": models,
            "knn": {"k": knn_k, "temperature": knn_temperature}, "random_init_seed": init_seed, "notes": notes}
    emit("start", info)
    opts = {"batch_size": batch_size, "layer": layer, "knn_k": knn_k, "knn_temperature": knn_temperature,
            "seed": seed}
    results = {}
    for name in models:
        encoder = loaded if name == "trained" else run.ready(random_encoder(loaded, init_seed))
        results[name] = _evaluate_one(name, encoder, train, test, run, opts, emit)
    report = {"simclr_cli": __version__, **info, "results": results,
              "timing": {"load_s": load_s, "total_s": time.perf_counter() - t0}}
    emit("end", report)
    return report
