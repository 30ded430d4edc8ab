"""Tokenising and feature hashing for text.

A word is a maximal run of Unicode letters and digits, lowercased (``[^\\W_]+`` on
``text.lower()``). Each word's bucket comes from the low bits of keyed BLAKE2b-64 over
its UTF-8 bytes: stable across processes, machines and runs (unlike ``hash()``), and
independent for different seeds. A bounded word -> hash cache makes the words of a
Zipf vocabulary, which repeat all the time, cost a dict look-up.

Speed: ASCII text (most of it) is split with ``bytes.translate`` + ``bytes.split``, both C
loops, instead of a Unicode regular expression; only the pieces holding non-ASCII bytes go
through the regular expression. Whole blocks of documents are hashed at once.
"""

import hashlib
import re

import numpy as np

_WORD = re.compile(r"[^\W_]+")
# ASCII letters and digits stay (upper case folded), every other ASCII byte becomes a space;
# bytes >= 128 (UTF-8 of non-ASCII characters) stay for the slow path.
_ASCII_FOLD = bytes(
    (c | 0x20 if 65 <= c <= 90 else c) if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c >= 128) else 32
    for c in range(256)
)
_K = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: the bigram mixing constant
CACHE_WORDS = 1 << 19  # about 60 MB of cache at most per process; cleared (not grown) when full


def words(text):
    """The words of ``text`` as lowercased UTF-8 ``bytes``, in order."""
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_FOLD).split()
    text = text.lower()  # the whole text: lowercasing is context-sensitive (Greek final sigma)
    b = text.encode("utf-8")
    if len(b) > len(text) + len(text) // 8:  # mostly non-ASCII (Cyrillic, CJK...): all by regex
        return [w.encode("utf-8") for w in _WORD.findall(text)]
    # Mostly ASCII with a few other characters (&nbsp;, ©, é...): fold and split the ASCII in C, and
    # let the Unicode regex decide only the space-delimited pieces holding non-ASCII bytes.
    b = b.translate(_ASCII_FOLD)
    out, pos = [], 0
    for h in np.flatnonzero(np.frombuffer(b, dtype=np.uint8) >= 128).tolist():  # numpy: 5x a regex scan
        if h < pos:
            continue  # in a piece already done
        a = b.rfind(b" ", 0, h) + 1
        e = b.find(b" ", h)
        e = len(b) if e < 0 else e
        out += b[pos:a].split()
        out += [w.encode("utf-8") for w in _WORD.findall(b[a:e].decode("utf-8"))]
        pos = e
    out += b[pos:].split()
    return out


def tokenize(text):
    """The words of ``text``, lowercased, as ``str`` (for tests and tools)."""
    return [w.decode("utf-8") for w in words(text)]


def check_features(n_features):
    """Raise ValueError unless ``n_features`` is a power of two >= 2 (and < 2^32: ids are uint32)."""
    if not isinstance(n_features, (int, np.integer)) or n_features < 2 or n_features & (n_features - 1) \
            or n_features > 1 << 32:
        raise ValueError(f"{n_features} is not a power of two between 2 and 2^32 (e.g. 1048576 = 2^20)")
    return int(n_features)


class Hasher:
    """Maps texts to hashed token ids in ``[0, n_features)``.

    A word's id is ``blake2b(word_utf8, digest_size=8, key=seed as 8 little-endian bytes)``
    read as a little-endian uint64, masked to its low ``log2(n_features)`` bits. With
    ``bigrams`` each row also gets, after its words, one id per adjacent pair of words (a, b):
    ``p = (h(a) * K) ^ (h(b) + K)``, ``p ^= p >> 29`` (uint64 arithmetic, K = 0x9E3779B97F4A7C15),
    masked the same way.

    Args:
        n_features: number of buckets, a power of two.
        seed: hash key (0 <= seed < 2^64); different seeds give independent hashings.
        bigrams: also emit one id per pair of adjacent words.
    """

    def __init__(self, n_features, seed=0, bigrams=False):
        self.n_features = check_features(n_features)
        self.mask = np.uint64(self.n_features - 1)
        self.seed, self.bigrams = int(seed), bool(bigrams)
        self.key = self.seed.to_bytes(8, "little", signed=False)
        self._cache = {}

    def word_hashes(self, toks):
        """64-bit hashes of a list of word ``bytes``, as a uint64 array."""
        cache = self._cache
        seen = set(toks)
        new = seen.difference(cache)
        if new:
            if len(cache) + len(new) > CACHE_WORDS:
                cache.clear()  # bounded memory; the frequent words come back at once
                new = seen
            key = self.key
            for w in new:
                cache[w] = int.from_bytes(hashlib.blake2b(w, digest_size=8, key=key).digest(), "little")
        return np.fromiter(map(cache.__getitem__, toks), dtype=np.uint64, count=len(toks))

    def ids(self, text):
        """Token ids of one (already cleaned) text, as uint32."""
        flat, _ = self.ids_many([text])
        return flat

    def ids_many(self, texts):
        """Token ids of many texts at once.

        Returns:
            (ids, lengths): the rows' ids concatenated (uint32) and each row's count (int64).
        """
        toks, counts = [], []
        for text in texts:
            w = words(text)
            toks += w
            counts.append(len(w))
        h = self.word_hashes(toks)
        counts = np.asarray(counts, dtype=np.int64)
        if not self.bigrams:
            return (h & self.mask).astype(np.uint32), counts
        return self._with_bigrams(h, counts)

    def _with_bigrams(self, h, counts):
        """Lay out each row as its word ids followed by its bigram ids (vectorised over rows)."""
        pairs = np.maximum(counts - 1, 0)
        lengths = counts + pairs
        out = np.empty(int(lengths.sum()), dtype=np.uint64)
        out_start = np.cumsum(lengths) - lengths
        word_start = np.cumsum(counts) - counts
        row = np.repeat(np.arange(len(counts)), counts)
        pos = np.arange(len(h)) - word_start[row]  # position of each word inside its row
        out[out_start[row] + pos] = h
        if len(h) > 1:
            with np.errstate(over="ignore"):
                p = (h[:-1] * _K) ^ (h[1:] + _K)
                p ^= p >> np.uint64(29)
            inside = pos[:-1] < counts[row[:-1]] - 1  # the pair does not cross into the next row
            r = row[:-1][inside]
            out[out_start[r] + counts[r] + pos[:-1][inside]] = p[inside]
        return (out & self.mask).astype(np.uint32), lengths
