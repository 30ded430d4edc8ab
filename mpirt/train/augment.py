"""``--augment``: random crop with zero padding and horizontal flip, drawn from (seed, epoch, row).

What a row looks like in an epoch is a function of the run's seed, the epoch and the row's number in
the input (``row_index``), never of which rank reads it or of what it read before. So N ranks train
the same model as 1 rank, and a redone step (after a kill) or a joiner sees the same images. The
draw is a SplitMix64 hash of those three numbers, vectorised over the batch: no generator state to
carry through checkpoints, and no per-row Python.

Per row: a crop offset in [0, 2*pad] on each axis of the image padded by ``pad`` zero pixels (4 for
CIFAR, as in He et al. 2016), and a left-right flip with probability 1/2. Pixels keep their type
(uint8 stays uint8), so the copy is cheap.
"""

import numpy as np

PAD = 4
_M1, _M2, _GAMMA = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(z):
    z = z.copy()
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def draws(seed, epoch, rows):
    """64 random bits per row, a function of (seed, epoch, row) only."""
    with np.errstate(over="ignore"):
        z = _mix(np.full(len(rows), np.uint64(seed & (2**64 - 1))) + _GAMMA)
        z = _mix(z ^ (np.uint64(epoch) * _GAMMA))
        return _mix(z ^ np.asarray(rows, dtype=np.int64).astype(np.uint64))


def augment(X, seed, epoch, rows, pad=PAD):
    """Crops and flips of images ``X`` (N, H, W[, C]) for rows ``rows`` in ``epoch``; a new array."""
    n, h, w = X.shape[:3]
    if n == 0:
        return X
    bits = draws(seed, epoch, rows)
    span = np.uint64(2 * pad + 1)
    dy = (bits % span).astype(np.int64)
    dx = ((bits >> np.uint64(16)) % span).astype(np.int64)
    flip = ((bits >> np.uint64(32)) & np.uint64(1)).astype(bool)
    widths = ((0, 0), (pad, pad), (pad, pad)) + ((0, 0),) * (X.ndim - 3)
    padded = np.pad(X, widths)
    ys = dy[:, None] + np.arange(h)  # (n, h) rows of the padded image each output row reads
    xs = dx[:, None] + np.arange(w)
    xs = np.where(flip[:, None], xs[:, ::-1], xs)
    return padded[np.arange(n)[:, None, None], ys[:, :, None], xs[:, None, :]]
