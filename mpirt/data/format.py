"""The data-set format's constants, chunk planning and per-shard checksum (docs/dataset-format.md)."""

import hashlib

import numpy as np

FORMAT = "mpirt.dataset"
SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
DENSE, TOKENS, RATINGS = "dense", "hashed_tokens", "ratings"
FEATURE_KINDS = (DENSE, TOKENS, RATINGS)
DEFAULT_SHARD_ROWS = 4096
# Row chunks stay under 8192 rows and about 4 MiB of X, so a chunk is one large read and
# HDF5's 4 GiB chunk limit can never be reached, whatever the width of a row.
MAX_CHUNK_ROWS = 8192
CHUNK_BYTES = 4 << 20
# The flat token ids are not row-aligned; 64 Ki ids (256 KiB) per chunk.
IDS_CHUNK = 1 << 16
ROW_ARRAYS = ("y", "row_index")  # int64 (n,) in every split


def plan_chunks(shard_rows, row_bytes):
    """Choose (shard_rows, chunk_rows) so that chunk_rows divides shard_rows.

    Args:
        shard_rows: rows per shard asked for (>= 1).
        row_bytes: bytes of the widest row-chunked array (X for dense, 8 for text).

    Returns:
        (shard_rows, chunk_rows): shard_rows is the request, or the request rounded up to a
        multiple of the chunk when no divisor of it makes a chunk of a sensible size.
    """
    cap = max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // max(int(row_bytes), 1)))
    if shard_rows <= cap:
        return shard_rows, shard_rows
    for c in range(cap, max(cap // 2, 1) - 1, -1):  # a divisor no smaller than half the cap
        if shard_rows % c == 0:
            return shard_rows, c
    return -(-shard_rows // cap) * cap, cap


def plan_shards(n_rows, shard_rows):
    """[start, stop) row ranges of ``shard_rows`` each (the last may be shorter), shape (k, 2)."""
    starts = np.arange(0, n_rows, shard_rows, dtype=np.int64)
    return np.stack([starts, np.minimum(starts + shard_rows, n_rows)], axis=1).reshape(-1, 2)


def le(array, dtype):
    """``array`` as contiguous little-endian ``dtype`` (the bytes the checksum is defined on)."""
    return np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))


class ShardHasher:
    """SHA-256 of one shard, fed row block by row block (so a writer never holds a shard).

    The digest is ``sha256(sha256(y) || sha256(row_index) || sha256(features) [|| sha256(lengths)])``
    over the shard's rows: y and row_index as little-endian int64, features the X rows as
    little-endian float32 (dense; bytes for pixels stored as uint8) or the shard's token ids as little-endian uint32 (text), and
    for text the row lengths (``diff(offsets)``) as little-endian int64. Hashing each part on its
    own lets y be re-hashed alone when the writer renumbers classes at the end.
    """

    def __init__(self, ragged):
        self.parts = [hashlib.sha256() for _ in range(4 if ragged else 3)]

    def update(self, y=None, row_index=None, features=None, lengths=None, feature_dtype="<f4"):
        for part, arr, dt in zip(self.parts, (y, row_index, features, lengths), ("<i8", "<i8", feature_dtype, "<i8")):
            if arr is not None:
                part.update(memoryview(le(arr, dt)).cast("B"))

    def replace_y(self, part):
        """Use ``part`` (a sha256 object over the final labels) as the y part."""
        self.parts[0] = part

    def hexdigest(self):
        outer = hashlib.sha256()
        for part in self.parts:
            outer.update(part.digest())
        return outer.hexdigest()


def shard_digest(y, row_index, features, lengths=None):
    """The checksum of one shard held in memory (see :class:`ShardHasher`)."""
    h = ShardHasher(lengths is not None)
    dense = "|u1" if features.dtype == np.uint8 else "<f4"
    h.update(y, row_index, features, lengths, feature_dtype="<u4" if lengths is not None else dense)
    return h.hexdigest()
