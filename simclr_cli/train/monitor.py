"""The kNN monitor: kNN top-1 of the live encoder during pretraining, with `simclr probe`'s features and
vote (`models.features`, `score.knn`), sharded over the ranks of a distributed run; and the
representation's health on the same held-out images (`score.health`: effective ranks of h and z,
alignment of two views, uniformity, spread per dimension), where collapse shows before the loss says so."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from simclr_cli.config import Config
from simclr_cli.data import ImageSet, load_dataset, split_validation
from simclr_cli.errors import DatasetError
from simclr_cli.score.health import collapse_warning, health
from simclr_cli.score.knn import knn_accuracy
from simclr_cli.models.features import eval_mode, extract_features
from simclr_cli.runtime import DistInfo, autocast
from simclr_cli.train.interrupt import StopRequested
from simclr_cli.train.readback import NonFiniteLoss


class Monitor:
    """kNN top-1 of the live encoder during pretraining: the training images (unaugmented) are the labelled
    bank, a held-out labelled split the queries. One forward pass over both sets: about a sixth of a
    training epoch's compute plus the held-out set. The model is left as it was (see `extract_features`).

    Under several processes every rank extracts an equal share of the images (the last share padded with
    its last image) and the features are gathered in order: N GPUs extract N times faster, so the monitor
    of a large folder does not keep the others waiting in a collective for long. Rank 0 votes.
    """

    def __init__(self, bank: ImageSet, queries: ImageSet, mean: Sequence[float], std: Sequence[float],
                 image_size: int, device: torch.device, precision: str, knn_k: int, knn_temperature: float,
                 ranks: DistInfo | None = None):
        self.bank, self.queries = bank, queries
        self.extract = lambda encoder, images, check: extract_features(encoder, images, mean, std, image_size,
                                                                       device, precision, callback=check)
        self.knn_k, self.knn_temperature, self.device, self.precision = knn_k, knn_temperature, device, precision
        self.ranks = ranks or DistInfo()
        self.last_health: dict | None = None  # rank 0's health figures of the latest evaluation
        self.first_health: dict | None = None  # ... and of the first: collapse is also judged against it
        self.warning: str | None = None  # the latest evaluation's collapse warning, if any

    def features(self, encoder: torch.nn.Module, data: ImageSet, check) -> torch.Tensor:
        """(N, D) features of `data` on the device: this rank's share extracted, every share gathered."""
        world, n = self.ranks.world_size, len(data)
        if world == 1:
            return self.extract(encoder, data.images, check).to(self.device)
        share = math.ceil(n / world)
        rows = torch.arange(self.ranks.rank * share, (self.ranks.rank + 1) * share).clamp_(max=n - 1)
        mine = self.extract(encoder, data.take(rows, data.name).images, check).to(self.device)  # (share, D)
        shares = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(shares, mine)
        return torch.cat(shares)[:n]

    def __call__(self, encoder: torch.nn.Module, stop=None, projection: torch.nn.Module | None = None,
                 augment=None) -> float | None:
        """kNN top-1 (None on ranks other than 0). `stop`: asked after every batch (every rank has the same
        number); when it says stop, StopRequested is raised and the loop saves its checkpoint. With the
        method's `projection` (h -> z), rank 0 also measures the health (`last_health`), the alignment on two
        `augment` views of the first HEALTH_PAIRS held-out images."""
        def check(done: int, total: int) -> None:
            if stop is not None and stop.check():
                raise StopRequested(stop.signal_name)
        bank = self.features(encoder, self.bank, check)
        queries = self.features(encoder, self.queries, check)
        self.check_finite(bank, queries)  # every rank holds every feature: all stop together
        if not self.ranks.is_main:
            return None
        if projection is not None and len(queries) >= 2:  # a spread needs two images
            self.last_health = self.health(encoder, projection, queries, augment)
            self.warning = (collapse_warning(self.first_health, self.last_health)  # relative to this process's first
                            if self.last_health is not None else self.warning)
            self.first_health = self.first_health or self.last_health
        # The vote runs where the encoder does (a GPU does the 50,000 x 5,000 similarities in milliseconds)
        return knn_accuracy(bank, self.bank.labels, queries, self.queries.labels, len(self.queries.classes),
                            self.knn_k, self.knn_temperature)

    def check_finite(self, *features: torch.Tensor) -> None:
        """The weights were checked finite before the evaluation (the loop); features that are not come from an
        activation that overflowed in eval mode: the encoder gives Inf / NaN where it will be used, so the run
        stops here with one line, not in the health figures' SVD."""
        for f in features:
            bad = int((~torch.isfinite(f)).any(dim=1).sum())
            if bad:
                fix = ("use train.precision=bf16 (or fp32) instead of fp16, or lower optim.lr"
                       if self.precision == "fp16" else "lower optim.lr")
                raise NonFiniteLoss(f"the kNN monitor's features became non-finite ({bad} of {len(f)} images give "
                                    "NaN or Inf in h) though the weights are finite: an activation overflowed in eval "
                                    f"mode. Hint: {fix}; checkpoints already written are kept")

    @torch.no_grad()
    def health(self, encoder: torch.nn.Module, projection: torch.nn.Module, h: torch.Tensor, augment) -> dict | None:
        """`score.health` of the held-out features h (N, D) and their projections; eval mode for the pass.
        None, with `warning` saying why, where the projections are not finite (h is: `check_finite`)."""
        with eval_mode(encoder, projection):
            z = projection(h.float())
            pair = None
            if augment is not None:
                x = self.queries.images[:HEALTH_PAIRS].to(self.device)
                views = augment(x, torch.Generator(device=self.device).manual_seed(0))[:2]  # the same views each time
                with autocast(self.device, self.precision):
                    pair = [projection(encoder(v)).float().cpu() for v in views]
        if not all(bool(torch.isfinite(t).all()) for t in [z, *(pair or [])]):
            self.warning = ("health figures skipped: the projection head's z is non-finite (NaN or Inf) on the "
                            "held-out images though h is finite: an activation in the head overflowed")
            return None
        return health(h.cpu(), z.float().cpu(), *(pair or (None, None)))


def first_health(records: Sequence[dict]) -> dict | None:
    """The first evaluation's health figures among a run's metrics records (a resumed run's), or None."""
    return next((r for r in records if r.get("kind") == "eval" and "rank_z" in r), None)


HEALTH_PAIRS = 512  # images whose two views measure alignment: a fixed few, a second of compute on a CPU


def load_monitor(cfg: Config, train: ImageSet, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 precision: str, ranks: DistInfo | None = None, records: Sequence[dict] = ()
                 ) -> tuple[Monitor | None, str | None]:
    """The monitor for a run on `train`, or (None, why not): it needs labels, and with eval_split test a
    labelled test split. eval_split val: the queries are the validation split held out of `train`, the bank
    the rest (the test split stays unseen until the final report). `records`: the run's metrics so far; a
    resumed run judges collapse against its first evaluation there, not against its first after the resume."""
    monitor, why = _load_monitor(cfg, train, mean, std, device, precision, ranks)
    if monitor is not None:
        monitor.first_health = first_health(records)
    return monitor, why


def _load_monitor(cfg: Config, train: ImageSet, mean: Sequence[float], std: Sequence[float], device: torch.device,
                  precision: str, ranks: DistInfo | None) -> tuple[Monitor | None, str | None]:
    d, t = cfg.data, cfg.train
    if train.labels is None:
        return None, None  # an unlabelled dataset: nothing to monitor, nothing to say
    if t.eval_split == "val":
        bank, queries = split_validation(train, d.val_size)
        return Monitor(bank, queries, mean, std, d.image_size, device, precision, t.knn_k, t.knn_temperature,
                       ranks), None
    try:
        queries = load_dataset(d, "test", seed=t.seed)  # a folder's: the same cache as the training split
    except DatasetError as err:
        return None, f"kNN monitor off: no labelled test split ({err})"
    return Monitor(train, queries, mean, std, d.image_size, device, precision, t.knn_k, t.knn_temperature,
                   ranks), None
