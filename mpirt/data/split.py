"""Streaming stratified assignment of rows to train/val/test.

Each class has a counter: after ``t`` rows of the class, split ``s`` is owed
``f_s * (t + phase) - assigned_s`` rows, and the next row of the class goes to the
split owed the most (ties to the earlier split). So every class is divided in the
requested proportions at every point of the stream (each split's count stays within
two rows of its share, in practice about one), without knowing the input size and
without holding it: the state is three counts per class. The phase in [0, 1) is a seeded hash of (seed, class key), so which rows of
a class are held out changes with ``--seed`` and differs between classes.

This is systematic sampling: within a class the held-out rows are spread evenly
over the input (every 10th row of the class for a 0.1 fraction, offset by the
phase) rather than drawn at random. Over an input in random or time order that
gives a representative, exactly proportioned hold-out; an input whose rows of a
class cycle with a period equal to 1/fraction would defeat it (shuffle such input).
"""

import hashlib

import numpy as np


class Stratifier:
    """Assigns each row to a split (0 train, 1 val, 2 test) from its class alone.

    Args:
        val_fraction, test_fraction: shares of val and test (train gets the rest).
        seed: seeds the per-class phase.
    """

    def __init__(self, val_fraction, test_fraction, seed=0):
        self.fractions = (1.0 - val_fraction - test_fraction, float(val_fraction), float(test_fraction))
        self.seed = int(seed)
        self._state = {}  # class key -> [rows seen + phase, assigned to train, val, test]

    def _new(self, key):
        h = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
        return [int.from_bytes(h, "little") / 2.0 ** 64, 0, 0, 0]

    def assign(self, labels, keys=None):
        """Split index for each label, in stream order (the counters carry over between calls).

        Args:
            labels: class ids (any hashables) of consecutive rows.
            keys: optional per-class key used to seed the phase (default: the label itself),
                e.g. the class name when ids are provisional.

        Returns:
            np.int8 array of split indices.
        """
        f0, f1, f2 = self.fractions
        state = self._state
        out = np.empty(len(labels), dtype=np.int8)
        for i, c in enumerate(labels.tolist() if isinstance(labels, np.ndarray) else labels):
            st = state.get(c)
            if st is None:
                st = state[c] = self._new(c if keys is None else keys[c])
            st[0] += 1.0
            t = st[0]
            d0, d1, d2 = f0 * t - st[1], f1 * t - st[2], f2 * t - st[3]
            s = 0 if d0 >= d1 and d0 >= d2 else (1 if d1 >= d2 else 2)
            st[s + 1] += 1
            out[i] = s
        return out

    def counts(self):
        """Rows assigned so far: {class: (train, val, test)}."""
        return {c: tuple(st[1:]) for c, st in self._state.items()}

