"""Nearest neighbours by cosine similarity on features: the running top-k search that `simclr neighbors`, the
report's grid and the kNN classifier share, and the weighted kNN classifier (Wu et al. 2018) that `simclr
probe` and the pretraining monitor score with."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from simclr_cli.config import TrainConfig
from simclr_cli.errors import DatasetError
from simclr_cli.evaluate.evaluation import Column, Evaluation, Features

BLOCK_ELEMENTS = 1 << 24  # similarities held at once: 16 M floats (64 MB), whatever the index's size
QUERY_BLOCK = 4096  # queries compared per pass over the index
KNN_K, KNN_TEMPERATURE = TrainConfig.knn_k, TrainConfig.knn_temperature  # 200 neighbours, votes exp(sim / 0.1)


def _normalized(rows: np.ndarray | torch.Tensor) -> torch.Tensor:
    # a copy of the chunk: rows of a read-only memory map must not become a tensor that aliases them
    x = torch.from_numpy(np.array(rows, dtype=np.float32)) if not isinstance(rows, torch.Tensor) else rows.float()
    return F.normalize(x, dim=1)  # a zero row stays zero: similarity 0 to everything


def top_k_cosine(queries: torch.Tensor | np.ndarray, index: np.ndarray | torch.Tensor, k: int,
                 block_elements: int = BLOCK_ELEMENTS, query_block: int = QUERY_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The k rows of `index` (N, D) most similar to each query (Q, D) by cosine: (similarities (Q, k),
    row numbers (Q, k)), best first. k is capped at N. `index` may be a memory-mapped array: it is read
    in chunks of rows, each compared with a block of `query_block` queries, and only the running top-k is
    kept. Tensors stay on their device (the kNN monitor's on a GPU)."""
    n, k = index.shape[0], min(k, index.shape[0])
    if queries.shape[1] != index.shape[1]:
        raise DatasetError(f"the queries have {queries.shape[1]} values per row but the index {index.shape[1]}: "
                           "embed both with the same encoder")
    q_all = _normalized(queries)  # (Q, D)
    sims, rows = [], []
    for q0 in range(0, q_all.shape[0], query_block):
        q = q_all[q0:q0 + query_block]  # (Qb, D)
        chunk = max(k, block_elements // max(len(q), 1))
        best_s = torch.empty((len(q), 0), device=q.device)
        best_i = torch.empty((len(q), 0), dtype=torch.int64, device=q.device)
        for start in range(0, n, chunk):
            s = q @ _normalized(index[start:start + chunk]).T  # (Qb, C)
            top = s.topk(min(k, s.shape[1]), dim=1)
            cand_s = torch.cat([best_s, top.values], dim=1)  # (Qb, <= 2k)
            cand_i = torch.cat([best_i, top.indices + start], dim=1)
            keep = cand_s.topk(k, dim=1) if cand_s.shape[1] > k else cand_s.sort(dim=1, descending=True)
            best_s, best_i = keep.values, cand_i.gather(1, keep.indices)
        sims.append(best_s)
        rows.append(best_i)
    return torch.cat(sims), torch.cat(rows)


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
