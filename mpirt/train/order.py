"""Which samples a step consumes: a function of (seed, epoch, step) only.

An epoch's order is a permutation of the training rows built from blocks of ``BLOCK`` consecutive
rows: the blocks are shuffled, then the rows inside each block. Global step ``s`` of epoch ``e``
takes positions ``[k * B, min(n, (k + 1) * B))`` of that order (``k`` = the step within the epoch,
``B`` = the global batch), whatever the number of ranks and whatever failed before; a view of
``W`` ranks splits those positions into ``W`` contiguous slices. So N ranks see exactly the samples
one rank would, and a redone step consumes the same samples again.

Blocks keep reads local: a rank's slice touches one or two runs of ``BLOCK`` rows in the HDF5
file, never scattered single rows.
"""

from dataclasses import dataclass

import numpy as np

BLOCK = 64


@dataclass(frozen=True)
class Schedule:
    """Steps of a run: ``n_rows`` training rows, ``batch`` rows a global step, ``epochs`` epochs."""

    n_rows: int
    batch: int
    epochs: int
    seed: int

    @property
    def steps_per_epoch(self):
        return -(-self.n_rows // self.batch) if self.n_rows else 0

    @property
    def total_steps(self):
        return self.steps_per_epoch * self.epochs

    def locate(self, step):
        """(epoch, first position, stop position) of global step ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return epoch, k * self.batch, min(self.n_rows, (k + 1) * self.batch)

    def slice_of(self, step, rank, size):
        """Positions [a, b) of the epoch order that ``rank`` of ``size`` computes at ``step``."""
        _, start, stop = self.locate(step)
        n = stop - start
        return start + n * rank // size, start + n * (rank + 1) // size


def epoch_order(n_rows, seed, epoch, block=BLOCK):
    """The epoch's permutation of ``range(n_rows)`` (int64), from (seed, epoch) only."""
    rng = np.random.Generator(np.random.PCG64([int(seed), int(epoch), 0x6D7069]))
    n_blocks = -(-n_rows // block)
    order = np.empty(n_rows, dtype=np.int64)
    pos = 0
    for b in rng.permutation(n_blocks):
        a = int(b) * block
        m = min(block, n_rows - a)
        order[pos:pos + m] = a + rng.permutation(m)
        pos += m
    return order


class Orders:
    """Epoch orders, computed once per epoch and kept (one int64 per row)."""

    def __init__(self, n_rows, seed):
        self.n_rows, self.seed = n_rows, seed
        self._epoch, self._order = None, None

    def rows(self, epoch, a, b):
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(self.n_rows, self.seed, epoch)
        return self._order[a:b]


def runs(rows):
    """The rows, sorted, as maximal [start, stop) ranges (rows are distinct)."""
    if len(rows) == 0:
        return []
    s = np.sort(rows)
    breaks = np.flatnonzero(np.diff(s) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(s)]])
    return [(int(s[a]), int(s[b - 1]) + 1) for a, b in zip(starts, stops)]
