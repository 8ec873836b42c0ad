"""Evaluation of frozen encoders: preprocessing, feature extraction, weighted kNN and the linear probe.

`run_probe` is the protocol `simclr probe` runs: load an encoder file of any accepted format, extract
features of a dataset's train and test splits once (no augmentation; the encoder's own image size and
normalisation), then report on the test split the kNN top-1 (Wu et al. 2018: cosine similarity, k=200,
votes weighted by exp(sim / 0.1)) and a linear probe (multinomial logistic regression on standardised
features, L2 strength chosen on a held-out 10% of the train split, never on the test split). Like the
training loop it reports through `callback(event, data)` and never prints.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from simclr_cli import __version__
from simclr_cli.checkpoint import CheckpointError, LoadedEncoder, load_encoder
from simclr_cli.data import DatasetError, ImageSet, default_data_root, has_split_folders, load_dataset
from simclr_cli.model import ProjectionHead, ResNetEncoder
from simclr_cli.runtime import autocast, pick_device, resolve_precision

Callback = Callable[[str, dict], None]
PROBE_DATASETS = ("cifar10", "cifar100", "folder", "synthetic")
WEIGHT_DECAYS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # L2 grid for the linear probe, strongest first
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def preprocess(images_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float], size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, size, size): resized when needed (bilinear, antialias), /255,
    normalised per channel. On the images' device; `simclr embed` uses it too, so its rows equal probe's."""
    x = images_u8.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x / 255.0 - mean_t) / std_t


def check_layer(head: ProjectionHead | None, layer: int) -> None:
    if layer and (head is None or not 0 < layer <= head.layers):
        have = "no projection head" if head is None else f"a {head.layers}-layer projection head"
        raise CheckpointError(f"layer {layer} asked for, but the encoder file has {have}: use a layer in "
                              f"0..{0 if head is None else head.layers}")


def for_inference(encoder: ResNetEncoder, head: ProjectionHead | None, device: torch.device):
    """A loaded (not live) encoder and head on `device`, in eval mode and channels_last, the fastest layout
    for convolutions here; `extract_features` then feeds it channels_last batches."""
    encoder = encoder.eval().to(device).to(memory_format=torch.channels_last)
    return encoder, head.eval().to(device) if head is not None else None


def _memory_format(module: torch.nn.Module) -> torch.memory_format:
    """channels_last when the module's first convolution is stored that way, else contiguous."""
    conv = next((m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if conv is not None and conv.dim() == 4 and not conv.is_contiguous() and \
            conv.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@contextlib.contextmanager
def _eval_mode(*modules: torch.nn.Module | None):
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
def extract_features(encoder: ResNetEncoder, images_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float],
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
    with _eval_mode(encoder, head):
        for i in range(0, n, batch_size):
            x = preprocess(images_u8[i:i + batch_size].to(device, non_blocking=True), mean, std, size)
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


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
                 k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): each test point's k most cosine-similar train points vote for their
    class with weight exp(sim / temperature); the class with the largest sum wins. Returns int64 (M,)."""
    train = F.normalize(train_feats.float(), dim=1)  # (N, D)
    labels = train_labels.to(train.device).long()
    k = min(k, train.shape[0])
    preds = []
    for i in range(0, test_feats.shape[0], chunk):  # bounds the similarity matrix to chunk x N floats
        query = F.normalize(test_feats[i:i + chunk].float().to(train.device), dim=1)  # (c, D)
        sim, idx = (query @ train.T).topk(k, dim=1)  # (c, k) each
        weights = (sim / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, labels[idx], weights)  # (c, num_classes)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, k: int = 200, temperature: float = 0.1,
                 chunk: int = 1024) -> float:
    preds = knn_classify(train_feats, train_labels, test_feats, num_classes, k, temperature, chunk)
    return (preds.cpu() == test_labels.cpu()).float().mean().item()


def holdout_split(labels: torch.Tensor, fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, held out): a seeded `fraction` of each class (at least one of any class with two or more)."""
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = max(1, round(fraction * len(idx))) if len(idx) >= 2 else 0
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def _standardiser(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-dimension (x - mean) / std from `x`; dimensions that never vary are only centred."""
    mu, sd = x.mean(0), x.std(0)
    sd = torch.where(sd > 1e-6, sd, torch.ones_like(sd))
    return lambda t: (t - mu) / sd


def logits(x: torch.Tensor, classifier: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    W, b = classifier
    return torch.addmm(b, x, W.T)  # (N, C)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 100,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, full-batch L-BFGS: minimise mean cross-entropy + wd/2 ||W||^2.
    Convex, so the result depends on the data and wd only; `init` warm-starts from a nearby solution.

    The gradient is written out, (softmax - onehot) / N, rather than left to autograd: on 45,000 x 512
    features it costs 80 ms of CPU per evaluation against autograd's 390 ms (x.T @ g is a slow GEMM shape).
    """
    n, rows = x.shape[0], torch.arange(x.shape[0])
    W = init[0].clone() if init else torch.zeros(num_classes, x.shape[1])  # (C, D), like nn.Linear
    b = init[1].clone() if init else torch.zeros(num_classes)  # (C,)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=10, tolerance_grad=1e-6,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        logp = logits(x, (W, b)).log_softmax(dim=1)  # (N, C)
        loss = -logp[rows, y].mean() + 0.5 * weight_decay * W.square().sum()
        g = logp.exp_()  # softmax, (N, C)
        g[rows, y] -= 1
        g /= n
        W.grad = torch.mm(g.T, x) + weight_decay * W  # (C, D)
        b.grad = g.sum(0)
        return loss

    with torch.no_grad():
        opt.step(closure)
    return W, b


def _topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    return (logits.topk(min(k, logits.shape[1]), dim=1).indices == y[:, None]).any(1).float().mean().item()


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's intra-op thread count set to `n` for the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, weight_decays: Sequence[float] = WEIGHT_DECAYS,
                 val_fraction: float = 0.1, seed: int = 0, max_iter: int = 100, select_iter: int = 50) -> dict:
    """Linear evaluation on frozen features. The L2 strength is chosen by accuracy on a held-out
    `val_fraction` of the train split (ties go to the stronger one; `select_iter` L-BFGS iterations per
    strength, warm-started along the grid), then the classifier is refit on the whole train split
    (`max_iter` iterations) and scored once on the test split."""
    x, y = train_feats.float().cpu(), train_labels.long().cpu()
    # One thread: the probe's ops are memory-bound passes over the features, where a second thread gains
    # little and, on a busy machine, loses much to synchronisation. On CIFAR-10 random-init features
    # (45,000 x 512) one L-BFGS evaluation took 65 ms with 1 thread and 160 ms with 2, on this 2-core CPU
    # with other jobs running; a 270 x 64 fit took 0.23 s against 8.6 s.
    with _threads(1):
        return _linear_probe(x, y, test_feats.float().cpu(), test_labels.long().cpu(), num_classes,
                             weight_decays, val_fraction, seed, max_iter, select_iter)


def _linear_probe(x, y, x_test, y_test, num_classes, weight_decays, val_fraction, seed, max_iter,
                  select_iter) -> dict:
    fit_idx, val_idx = holdout_split(y, val_fraction, seed)
    if len(val_idx) == 0 or len(fit_idx) == 0:
        raise DatasetError(f"the linear probe needs at least two training images of some class; got {len(y)}")
    scale = _standardiser(x[fit_idx])
    xf, xv = scale(x[fit_idx]), scale(x[val_idx])
    grid, solutions, best, init = {}, {}, None, None
    for wd in sorted(weight_decays, reverse=True):  # strongest first: each fit warm-starts the next
        init = solutions[wd] = fit_logistic(xf, y[fit_idx], num_classes, wd, select_iter, init)
        grid[wd] = _topk_accuracy(logits(xv, init), y[val_idx], 1)
        if best is None or grid[wd] > grid[best]:
            best = wd
    scale = _standardiser(x)
    classifier = fit_logistic(scale(x), y, num_classes, best, max_iter, solutions[best])  # warm: stats barely move
    test = logits(scale(x_test), classifier)  # (M, C)
    return {"top1": _topk_accuracy(test, y_test, 1),
            "top5": _topk_accuracy(test, y_test, 5) if num_classes > 5 else None,
            "weight_decay": best, "val_top1": grid[best],
            "train_top1": _topk_accuracy(logits(scale(x), classifier), y, 1),
            "grid": {f"{wd:g}": acc for wd, acc in grid.items()}, "val_size": len(val_idx)}


# --- the protocol ----------------------------------------------------------------------------------------

def load_splits(dataset: str, data_dir: str | Path | None, image_size: int, *, download: bool = False,
                num_workers: int = 2, synthetic_size: int = 2000, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """The labelled train and test splits of a probe dataset, at the encoder's image size."""
    if dataset not in PROBE_DATASETS:
        raise DatasetError(f"unknown probe dataset {dataset!r}: use one of {', '.join(PROBE_DATASETS)}")
    root = None if dataset == "synthetic" else Path(data_dir).expanduser() if data_dir else None
    if dataset == "folder" and root is None:
        raise DatasetError("the folder dataset needs --data-dir DIR (DIR/train/<class>/, DIR/test/<class>/ or "
                           "DIR/<class>/)")
    if dataset in CIFAR_FOLDERS:
        root = root or default_data_root()
        if not download and not (root / CIFAR_FOLDERS[dataset]).is_dir():
            raise DatasetError(f"{dataset} not found: no {root / CIFAR_FOLDERS[dataset]}; pass --data-dir with the "
                               f"folder holding {CIFAR_FOLDERS[dataset]}/, or --download")
    splits = [load_dataset(dataset, split, root, download=download, image_size=image_size, num_workers=num_workers,
                           synthetic_size=synthetic_size, seed=seed) for split in ("train", "test")]
    for s in splits:
        if s.labels is None or not s.classes:
            raise DatasetError(f"{s.name} has no labels: the probe needs class subfolders (DIR/<class>/*)")
    if splits[0].classes != splits[1].classes:
        only = sorted(set(splits[0].classes) ^ set(splits[1].classes))[:3]
        raise DatasetError(f"the train and test splits have different classes (e.g. {', '.join(only) or 'order'}): "
                           "give both splits the same class folders")
    return splits[0], splits[1]


def random_encoder(loaded: LoadedEncoder, seed: int) -> tuple[ResNetEncoder, ProjectionHead | None]:
    """An untrained encoder (and head) of the same shape, built after torch.manual_seed(seed) in the order
    `model.build_model` uses; the caller's RNG state is left as it was."""
    e, h = loaded.encoder, loaded.head
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = ResNetEncoder(e.arch, e.stem, e.width).eval()
        head = None
        if h is not None:
            hidden = h.blocks[0][0].out_features if h.layers > 1 else None
            head = ProjectionHead(e.feature_dim, hidden, h.blocks[-1][0].out_features, h.layers).eval()
    return encoder, head


def _evaluate_one(name: str, encoder, head, loaded: LoadedEncoder, train: ImageSet, test: ImageSet, opts: dict,
                  emit: Callback) -> dict:
    feats, t0 = {}, time.perf_counter()
    encoder, head = for_inference(encoder, head, opts["device"])
    for split, data in (("train", train), ("test", test)):
        def progress(done: int, total: int, split=split) -> None:
            emit("extract", {"model": name, "split": split, "done": done, "total": total})
        feats[split] = extract_features(encoder, data.images, loaded.mean, loaded.std, loaded.image_size,
                                        opts["device"], opts["precision"], opts["batch_size"], head, opts["layer"],
                                        progress)
    extract_s = time.perf_counter() - t0
    num_classes = len(train.classes)
    emit("stage", {"model": name, "message": "kNN"})
    t1 = time.perf_counter()
    knn = knn_accuracy(feats["train"], train.labels, feats["test"], test.labels, num_classes, opts["k"],
                       opts["temperature"])
    emit("stage", {"model": name, "message": "linear probe"})
    t2 = time.perf_counter()
    linear = linear_probe(feats["train"], train.labels, feats["test"], test.labels, num_classes, seed=opts["seed"])
    t3 = time.perf_counter()
    result = {"linear_top1": linear["top1"], "linear_top5": linear["top5"], "knn_top1": knn,
              "weight_decay": linear["weight_decay"], "linear": linear, "feature_dim": feats["train"].shape[1],
              "extract_s": extract_s, "images_per_s": (len(train) + len(test)) / extract_s,
              "knn_s": t2 - t1, "linear_s": t3 - t2}
    emit("result", {"model": name, **result})
    return result


PROBE_PRECISIONS = ("auto", "fp32", "bf16")


def split_seed(loaded: LoadedEncoder, dataset: str, data_dir: str | Path | None, seed: int | None) -> tuple[int, list[str]]:
    """The seed of a flat folder's 80/20 split (and of the probe's held-out 10%): `seed` when given, else the
    pretraining seed the encoder file records, so the probe's test images are the ones pretraining held out.
    Returns (seed, notes) with a note where that cannot be known."""
    pretrained = loaded.provenance.get("seed")
    chosen = seed if seed is not None else int(pretrained) if isinstance(pretrained, int) else 0
    notes = []
    if dataset == "folder" and data_dir is not None and not has_split_folders(Path(data_dir).expanduser()):
        if pretrained is None:
            notes.append(f"the encoder file records no pretraining seed: the folder is split 80/20 with seed "
                         f"{chosen}; if the encoder was pretrained on this folder, its test images may have been "
                         "pretraining images (pass --seed with the pretraining train.seed)")
        elif chosen != pretrained:
            notes.append(f"--seed {chosen} splits the folder differently from pretraining (train.seed {pretrained}): "
                         "test images may have been pretraining images")
    return chosen, notes


def run_probe(encoder_path: str | Path, dataset: str = "cifar10", data_dir: str | Path | None = None, *,
              device: str = "auto", precision: str = "auto", batch_size: int = 512, layer: int = 0,
              random_init: bool = False, baseline: bool = False, k: int = 200, temperature: float = 0.1,
              download: bool = False, num_workers: int = 2, synthetic_size: int = 2000, seed: int | None = None,
              callback: Callback | None = None) -> dict:
    """The probe protocol on one encoder file. random_init: probe an untrained encoder of the same
    architecture instead (seeded by the file's pretraining seed, else 0); baseline: probe both. seed: of a
    flat folder's split and the held-out 10% (None: the encoder's pretraining seed, see `split_seed`)."""
    emit = callback or (lambda event, data: None)
    if batch_size < 1 or layer < 0 or k < 1 or temperature <= 0:
        raise DatasetError(f"need batch size >= 1, layer >= 0, k >= 1, temperature > 0; got {batch_size}, {layer}, "
                           f"{k}, {temperature}")
    t0 = time.perf_counter()
    dev = pick_device(device)
    prec = resolve_precision(precision, dev, PROBE_PRECISIONS)
    loaded = load_encoder(encoder_path)
    check_layer(loaded.head, layer)
    models = (["trained"] if not random_init or baseline else []) + (["random_init"] if random_init or baseline else [])
    init_seed = int(loaded.provenance.get("seed") or 0)
    seed, notes = split_seed(loaded, dataset, data_dir, seed)
    train, test = load_splits(dataset, data_dir, loaded.image_size, download=download, num_workers=num_workers,
                              synthetic_size=synthetic_size, seed=seed)
    load_s = time.perf_counter() - t0
    root = str(data_dir or default_data_root()) if dataset != "synthetic" else None
    info = {"encoder": {"path": str(encoder_path), **loaded.describe()},
            "dataset": {"name": dataset, "root": root, "train_size": len(train),
                        "test_size": len(test), "num_classes": len(train.classes), "split_seed": seed},
            "device": str(dev), "precision": prec, "layer": layer, "models": models,
            "knn": {"k": k, "temperature": temperature}, "random_init_seed": init_seed, "notes": notes}
    emit("start", info)
    opts = {"device": dev, "precision": prec, "batch_size": batch_size, "layer": layer, "k": k,
            "temperature": temperature, "seed": seed}
    results = {}
    for name in models:
        encoder, head = (loaded.encoder, loaded.head) if name == "trained" else random_encoder(loaded, init_seed)
        results[name] = _evaluate_one(name, encoder, head, loaded, train, test, opts, emit)
    report = {"simclr_cli": __version__, **info, "results": results,
              "timing": {"load_s": load_s, "total_s": time.perf_counter() - t0}}
    emit("end", report)
    return report
