"""Streaming stratified assignment of rows to train/val/test.

Each class keeps how many rows each split has received; a new row goes to the
split furthest below its share. Every class is then split in the requested
proportions to within one row, without knowing the input size in advance. A
seeded phase per class keeps the held-out rows from always being the 10th,
20th... of their class.
"""

import hashlib

import numpy as np

from mpirt.data.format import SPLITS


class Stratifier:
    def __init__(self, val_fraction, test_fraction, seed=0):
        self.fractions = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
        self.seed = seed
        self.counts = {}  # class -> (seen, assigned per split)

    def _state(self, c):
        state = self.counts.get(c)
        if state is None:
            h = hashlib.blake2b(f"{self.seed}:{c}".encode(), digest_size=8).digest()
            phase = int.from_bytes(h, "little") / 2.0 ** 64
            state = self.counts[c] = [phase, np.zeros(3)]
        return state

    def assign(self, labels):
        """Split index (0 train, 1 val, 2 test) for each label, in order."""
        out = np.empty(len(labels), dtype=np.int8)
        for i, c in enumerate(labels):
            state = self._state(int(c))
            state[0] += 1.0
            deficit = self.fractions * state[0] - state[1]
            s = int(np.argmax(deficit))
            state[1][s] += 1
            out[i] = s
        return out


def split_names():
    return SPLITS
