"""Rows of a split by row number, from memory when the split is small, else from the file.

Any rank may be asked for any rows (views change), so each process keeps a reader on the whole
split. A split under ``cache_bytes`` is read once; larger ones are read per step as the few
contiguous runs a step's slice spans (see :mod:`mpirt.train.order`).

Every shard is verified (labels, token ids, checksum) before its rows are first used: a cached
split as it is loaded, a large one shard by shard as steps reach it (:meth:`Split.check_rows`).
"""

import numpy as np

from mpirt.data.reader import Batch
from mpirt.train.order import runs

CACHE_BYTES = 512 << 20


def split_bytes(split):
    g = split.group
    names = ("X", "y", "row_index") if split.dense else ("ids", "offsets", "y", "row_index")
    return sum(g[n].size * g[n].dtype.itemsize for n in names)


class RowSource:
    """``get(rows)`` -> :class:`Batch` of those rows (in sorted order; a step's sum ignores order)."""

    def __init__(self, split, cache_bytes=CACHE_BYTES):
        self.split = split
        self.n_rows = split.n_rows
        self.cached = split.read(0, split.n_rows) if split_bytes(split) <= cache_bytes else None
        if self.cached is not None:
            split.check_rows(0, split.n_rows, self.cached)

    def get(self, rows):
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        if self.cached is None:
            pieces = runs(rows)
            for a, b in pieces:
                self.split.check_rows(a, b)
            return self.split.read_ranges(pieces) if len(rows) else self.split.read(0, 0)
        return take(self.cached, rows)

    def all(self):
        if self.cached is not None:
            return self.cached
        batch = self.split.read(0, self.n_rows)
        self.split.check_rows(0, self.n_rows, batch)
        return batch


def take(batch, rows):
    """The rows ``rows`` of an in-memory batch."""
    if batch.X is not None:
        return Batch(batch.y[rows], batch.row_index[rows], X=batch.X[rows])
    starts, stops = batch.offsets[rows], batch.offsets[rows + 1]
    lengths = stops - starts
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # positions of every token: each row's start repeated over its length, plus 0..len-1
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
    return Batch(batch.y[rows], batch.row_index[rows], ids=batch.ids[index], offsets=offsets)


def batches(batch, size):
    """An in-memory batch in consecutive pieces of ``size`` rows (evaluation)."""
    n = len(batch)
    for a in range(0, n, size):
        yield take(batch, np.arange(a, min(n, a + size)))
