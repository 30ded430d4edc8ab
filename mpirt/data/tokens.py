"""Tokenising and feature hashing for text.

Words are runs of Unicode letters and digits, lowercased. Each word hashes to a
bucket with keyed BLAKE2b (stable across processes and runs, unlike ``hash()``);
a per-process cache makes the Zipf-distributed common words free. Bigrams hash
from their words' 64-bit hashes with numpy arithmetic, so they need no cache.
"""

import hashlib
import re

import numpy as np

_WORD = re.compile(r"[^\W_]+")
_MIX = np.uint64(0x9E3779B97F4A7C15)


class Hasher:
    """Maps texts to hashed token ids in ``[0, n_features)``.

    Args:
        n_features: number of buckets, a power of two.
        seed: hash key; different seeds give independent hashings.
        bigrams: also emit one id per pair of adjacent words.
    """

    def __init__(self, n_features, seed=0, bigrams=False):
        if n_features < 2 or n_features & (n_features - 1):
            raise ValueError(f"n_features must be a power of two >= 2, got {n_features}")
        self.mask = np.uint64(n_features - 1)
        self.key = int(seed).to_bytes(8, "little", signed=False)
        self.bigrams = bigrams
        self._cache = {}

    def word_hashes(self, words):
        cache = self._cache
        out = np.empty(len(words), dtype=np.uint64)
        for i, w in enumerate(words):
            h = cache.get(w)
            if h is None:
                h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8, key=self.key).digest(), "little")
                if len(cache) < 2_000_000:  # bounded: memory stays flat on any input
                    cache[w] = h
            out[i] = h
        return out

    def ids(self, text):
        """Token ids of one (already cleaned) text, as uint32."""
        words = _WORD.findall(text.lower())
        h = self.word_hashes(words)
        if self.bigrams and len(h) > 1:
            with np.errstate(over="ignore"):
                pair = (h[:-1] * _MIX) ^ (h[1:] + _MIX)
                pair ^= pair >> np.uint64(29)
            h = np.concatenate([h, pair])
        return (h & self.mask).astype(np.uint32)


def tokenize(text):
    """The words of a text, lowercased (for tests and tools)."""
    return _WORD.findall(text.lower())
