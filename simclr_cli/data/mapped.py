"""`MappedImages`: uint8 images (N, 3, S, S) read from a memory-mapped .npy as they are indexed, standing in
for the image tensor of an `ImageSet`, so memory does not grow with the number of images (the page cache
aside). The decoded folder cache (`data.cache`) is what it maps."""

from __future__ import annotations

import numpy as np
import torch


class MappedImages:
    """uint8 (N, 3, S, S) images read from a memory-mapped file as they are indexed.

    Supports what the tool does with an image tensor: len, shape, dtype, `x[i]`, `x[a:b]`, `x[index_tensor]`
    (each returns an ordinary tensor holding those images only), `select(rows)` (a view of a subset) and
    `to(device)` (itself: batches are moved to the device one at a time, see `data.batches.Batches`).
    """

    dtype, ndim, device = torch.uint8, 4, torch.device("cpu")

    def __init__(self, array: np.ndarray, rows: np.ndarray | None = None) -> None:
        self.array = array  # (N_all, 3, S, S) memmap
        self.rows = np.arange(len(array)) if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.array.shape[1:]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, tuple):  # x[rows, channel, ...]: the rows from the map, the rest on the tensor
            first, rest = key[0], key[1:]
            single = isinstance(first, (int, np.integer)) or (isinstance(first, torch.Tensor) and first.ndim == 0)
            return self[first][rest] if single else self[first][(slice(None), *rest)]
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        rows = self.rows[key]
        if np.ndim(rows) == 0:
            return torch.from_numpy(np.array(self.array[int(rows)]))
        # Read in file order (fewer, forward seeks: each image is one contiguous 3*S*S-byte record), then put
        # the images back in the order asked for.
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.array.shape[1:]), dtype=np.uint8)
        out[order] = self.array[rows[order]]
        return torch.from_numpy(out)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """torch.equal(x, y), torch.cat([x, y]), ...: on the images read whole (fine for a small set; the
        tool itself only ever indexes batches)."""
        def whole(a):
            return a[:] if isinstance(a, MappedImages) else a
        return func(*[whole(a) for a in args], **{k: whole(v) for k, v in (kwargs or {}).items()})

    def select(self, index) -> MappedImages:
        index = index.cpu().numpy() if isinstance(index, torch.Tensor) else index
        return MappedImages(self.array, self.rows[index])

    def to(self, device) -> MappedImages:
        return self

    def contiguous(self, *args, **kwargs) -> MappedImages:
        return self
