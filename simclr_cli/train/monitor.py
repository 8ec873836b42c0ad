"""The kNN monitor: kNN top-1 of the live encoder during pretraining, with `simclr probe`'s features and
vote (`models.features`, `evaluate.knn`), sharded over the ranks of a distributed run."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from simclr_cli.config import Config
from simclr_cli.data import ImageSet, load_dataset, split_validation
from simclr_cli.errors import DatasetError
from simclr_cli.evaluate.knn import knn_accuracy
from simclr_cli.models.features import extract_features
from simclr_cli.runtime import DistInfo
from simclr_cli.train.interrupt import StopRequested


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
        self.knn_k, self.knn_temperature, self.device = knn_k, knn_temperature, device
        self.ranks = ranks or DistInfo()

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

    def __call__(self, encoder: torch.nn.Module, stop=None) -> float | None:
        """kNN top-1 (None on ranks other than 0). `stop`: asked after every batch (every rank has the same
        number); when it says stop, StopRequested is raised and the loop saves its checkpoint."""
        def check(done: int, total: int) -> None:
            if stop is not None and stop.check():
                raise StopRequested(stop.signal_name)
        bank = self.features(encoder, self.bank, check)
        queries = self.features(encoder, self.queries, check)
        if not self.ranks.is_main:
            return None
        # The vote runs where the encoder does (a GPU does the 50,000 x 5,000 similarities in milliseconds)
        return knn_accuracy(bank, self.bank.labels, queries, self.queries.labels, len(self.queries.classes),
                            self.knn_k, self.knn_temperature)


def load_monitor(cfg: Config, train: ImageSet, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 precision: str, ranks: DistInfo | None = None) -> tuple[Monitor | None, str | None]:
    """The monitor for a run on `train`, or (None, why not): it needs labels, and with eval_split test a
    labelled test split. eval_split val: the queries are the validation split held out of `train`, the bank
    the rest (the test split stays unseen until the final report)."""
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
