"""The data-set format's constants and its per-shard checksum (docs/dataset-format.md)."""

import hashlib

import numpy as np

FORMAT = "mpirt.dataset"
SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
DENSE, TOKENS = "dense", "hashed_tokens"
MAX_CHUNK_ROWS = 8192
IDS_CHUNK = 1 << 16


def shard_digest(y, row_index, features, lengths=None):
    """SHA-256 of one shard: the digests of y, row_index, features (X rows or token ids)
    and, for text, the row lengths, concatenated and hashed again (little-endian bytes)."""
    outer = hashlib.sha256()
    parts = [np.ascontiguousarray(y, "<i8"), np.ascontiguousarray(row_index, "<i8"), np.ascontiguousarray(features)]
    if lengths is not None:
        parts.append(np.ascontiguousarray(lengths, "<i8"))
    for part in parts:
        outer.update(hashlib.sha256(part.tobytes()).digest())
    return outer.hexdigest()


def plan_shards(n_rows, shard_rows):
    """[start, stop) row ranges of ``shard_rows`` each (the last may be shorter)."""
    starts = np.arange(0, n_rows, shard_rows, dtype=np.int64)
    return np.stack([starts, np.minimum(starts + shard_rows, n_rows)], axis=1).reshape(-1, 2)


def chunk_rows_for(shard_rows):
    """Rows per HDF5 chunk: a divisor of the shard size, so shards are chunk-aligned."""
    if shard_rows <= MAX_CHUNK_ROWS:
        return shard_rows
    for c in range(MAX_CHUNK_ROWS, 0, -1):
        if shard_rows % c == 0 and c >= 256:
            return c
    return None  # caller rounds shard_rows up to a multiple of 1024
