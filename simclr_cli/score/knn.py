"""The weighted kNN classifier (Wu et al. 2018) that `simclr probe` and the pretraining monitor score with, on
the running top-k search by cosine that `simclr neighbors` and the report's grid share (`serve.search`)."""

from __future__ import annotations

import torch

from simclr_cli.config import TrainConfig
from simclr_cli.score.evaluation import Column, Evaluation, Features
from simclr_cli.serve.search import top_k_cosine

KNN_K, KNN_TEMPERATURE = TrainConfig.knn_k, TrainConfig.knn_temperature  # 200 neighbours, votes exp(sim / 0.1)


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
                 k: int = KNN_K, temperature: float = KNN_TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): each test point's k most cosine-similar train points vote for their
    class with weight exp(sim / temperature); the class with the largest sum wins. Returns int64 (M,).
    The search is `top_k_cosine`'s, `chunk` queries against the whole bank at a time."""
    if test_feats.shape[0] == 0:
        return torch.empty(0, dtype=torch.long)
    labels = train_labels.to(train_feats.device).long()
    queries = test_feats.to(train_feats.device)
    sim, idx = top_k_cosine(queries, train_feats, k, block_elements=chunk * max(1, train_feats.shape[0]),
                            query_block=chunk)  # (M, k) each
    votes = torch.zeros(queries.shape[0], num_classes, device=train_feats.device)
    votes.scatter_add_(1, labels[idx], (sim / temperature).exp())  # (M, num_classes)
    return votes.argmax(dim=1)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
                 chunk: int = 1024) -> float:
    preds = knn_classify(train_feats, train_labels, test_feats, num_classes, k, temperature, chunk)
    return (preds.cpu() == test_labels.cpu()).float().mean().item()


def knn(f: Features, opts: dict) -> dict:
    """Weighted kNN top-1 on the test split, the bank the train split (Wu et al. 2018)."""
    return {"knn_top1": knn_accuracy(f.train, f.train_labels, f.test, f.test_labels, f.num_classes, opts["knn_k"],
                                     opts["knn_temperature"])}


KNN = Evaluation("kNN", knn, (Column("kNN top-1", "knn_top1", position=30),))  # the entry of registry.EVALUATIONS
