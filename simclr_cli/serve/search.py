"""Nearest neighbours by cosine similarity: the running top-k search over an index of vectors, in memory or
memory-mapped, that `simclr neighbors`, the report's grid and the kNN classifier (`score.knn`) share."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from simclr_cli.errors import DatasetError

BLOCK_ELEMENTS = 1 << 24  # similarities held at once: 16 M floats (64 MB), whatever the index's size
QUERY_BLOCK = 4096  # queries compared per pass over the index


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
