"""Reading an mpirt data set: rows [i, j) of a split, dense or ragged, by contiguous slices.

Every rank opens its own read-only handle with serial h5py (MPI-IO collectives are not
fault tolerant under ULFM, and a rank that dies must not take a shared handle with it).
Files are opened with HDF5 file locking off (``locking=False``): readers only read, and
with locking on, a reader can fail to open a file that another process holds open for
writing, or trip over locks that NFS/Lustre do not support (errno 38, "unable to lock
file"). If the same process already holds the file open with h5py's default locking,
HDF5 refuses a second open with other flags; the reader then uses the defaults. Writers never write in place
(they rename a finished file over the old one), so an open reader keeps the version it
opened.

Every read is one contiguous slice per dataset (never h5py fancy indexing, which reads
element lists). One range is plain slicing, h5py's fastest path; :meth:`Split.read_ranges`
fills one output buffer per array, large pieces by a direct HDF5 read into it (no copy).
"""

import os
from dataclasses import dataclass

import h5py
import numpy as np

from mpirt.data.format import DENSE, RATINGS, SPLITS, ShardHasher
# check_header lived here before; it is re-exported for the code that imports it from this module.
from mpirt.data.integrity import (check_extents, check_header, check_layout, check_root,  # noqa: F401
                                  check_schema, check_shard)
from mpirt.errors import DataError

# HDF5's chunk cache (8 MiB per dataset by default) holds whole chunks: reading 64 rows of an
# uncompressed 4 MiB chunk then copies all 4 MiB first (about 20x slower for scattered pieces).
# Chunks are not compressed, so without the cache HDF5 reads exactly the rows asked for.
CHUNK_CACHE_BYTES = int(os.environ.get("MPIRT_CHUNK_CACHE_BYTES", 0))


@dataclass
class Batch:
    """Rows of a split. Dense: ``X``; text: ``ids`` and ``offsets`` (row r is ``ids[offsets[r]:offsets[r+1]]``)."""

    y: np.ndarray
    row_index: np.ndarray
    X: np.ndarray = None
    ids: np.ndarray = None
    offsets: np.ndarray = None  # rebased: offsets[0] == 0

    def __len__(self):
        return len(self.y)

    @property
    def lengths(self):
        """Tokens per row (text only)."""
        return np.diff(self.offsets)


class _Rows:
    """Contiguous reads of a bulk dataset (X, ids), ``[a, b)`` along axis 0."""

    # Above this many bytes a piece is read straight into the output (HDF5 low-level read, about
    # 20 us of call overhead); below it, h5py's slicing (a Cython fast path, ~5 us) plus a copy is faster.
    DIRECT_BYTES = 64 << 10

    def __init__(self, dset):
        self.dset = dset
        self.dtype = dset.dtype
        self.tail = tuple(dset.shape[1:])
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.tail))
        self._space = dset.id.get_space()
        self._mtype = h5py.h5t.py_create(self.dtype)

    def empty(self, n):
        return np.empty((n, *self.tail), dtype=self.dtype)

    def read(self, a, b):
        """Rows [a, b) as a new array (plain slicing: h5py's fastest path for one range)."""
        return self.dset[a:b] if b > a else self.empty(0)

    def into(self, out, pos, a, b):
        """Read rows [a, b) into out[pos:pos + (b - a)]."""
        n = b - a
        if n <= 0:
            return
        if n * self.row_bytes < self.DIRECT_BYTES:
            out[pos:pos + n] = self.dset[a:b]
            return
        zeros = (0,) * len(self.tail)
        self._space.select_hyperslab((a, *zeros), (n, *self.tail))
        mem = h5py.h5s.create_simple(out.shape)
        mem.select_hyperslab((pos, *zeros), (n, *self.tail))
        self.dset.id.read(mem, self._space, out, mtype=self._mtype)


class _ChunkRows:
    """Reads of a small per-row array (y, row_index, offsets: 8 bytes a row), a whole chunk at a time
    when reading goes forward.

    A read that starts a chunk and ends inside it loads and keeps that chunk (32 KiB for 4096
    rows), so the next batches of a sequential pass cost a numpy slice instead of an HDF5 call
    each. Any other read (a whole chunk, a scattered piece, a range across chunks) is one direct
    slice and leaves the kept chunk alone.
    """

    def __init__(self, dset, chunk_rows):
        self.dset, self.chunk, self.n = dset, chunk_rows, dset.shape[0]
        self.dtype = dset.dtype
        self._lo, self._hi, self._data = 0, 0, None

    def empty(self, n):
        return np.empty(n, dtype=self.dtype)

    def _cached(self, a, b):
        """The rows [a, b) from the kept chunk (loading it if a starts one), or None."""
        if self._lo <= a and b <= self._hi:
            return self._data[a - self._lo:b - self._lo]
        if a % self.chunk == 0 and b < min(a + self.chunk, self.n):  # starts a chunk, ends inside it
            self._lo, self._hi = a, min(a + self.chunk, self.n)
            self._data = self.dset[self._lo:self._hi]
            return self._data[:b - a]
        return None

    def read(self, a, b):
        if b <= a:
            return self.empty(0)
        got = self._cached(a, b)
        return self.dset[a:b] if got is None else got.copy()

    def into(self, out, pos, a, b):
        if b <= a:
            return
        got = self._cached(a, b)
        out[pos:pos + b - a] = self.dset[a:b] if got is None else got


class Split:
    """One split (``train``, ``val`` or ``test``) of an open :class:`Dataset`.

    Attributes:
        name: the split's name.
        n_rows: rows in the split.
        shards: (k, 2) int64 array of [start, stop) row ranges.
        chunk_rows: rows per HDF5 chunk (every shard starts on a chunk boundary).
    """

    def __init__(self, dataset, name):
        self.dataset, self.name = dataset, name
        self.group = g = dataset.file[name]
        self.kind = dataset.feature_kind
        self.dense = self.kind == DENSE
        check_schema(f"{dataset.path}: {name}", g)
        self.n_rows = int(g.attrs["n_rows"])
        self.chunk_rows = max(int(g.attrs["chunk_rows"]), 1)
        self.shards = g["shards"][()].reshape(-1, 2).astype(np.int64)
        check_layout(f"{dataset.path}: {name}", dataset, self)
        self.checked = set()  # shards whose rows passed check_shard in this process
        self._y, self._ri = _ChunkRows(g["y"], self.chunk_rows), _ChunkRows(g["row_index"], self.chunk_rows)
        if self.dense:
            self._X = _Rows(g["X"])
        else:
            self._ids, self._off = _Rows(g["ids"]), _ChunkRows(g["offsets"], self.chunk_rows)

    def __len__(self):
        return self.n_rows

    def _check(self, i, j):
        if not 0 <= i <= j <= self.n_rows:
            raise IndexError(f"rows [{i}, {j}) outside split '{self.name}' of {self.n_rows} rows")

    def read(self, i, j):
        """Rows [i, j) as a :class:`Batch`."""
        i, j = int(i), int(j)
        if not 0 <= i <= j <= self.n_rows:
            self._check(i, j)
        if self.dense:
            return Batch(self._y.read(i, j), self._ri.read(i, j), X=self._X.read(i, j))
        off = self._off.read(i, j + 1)
        base = off[0]
        ids = self._ids.read(int(base), int(off[-1]))
        off -= base
        return Batch(self._y.read(i, j), self._ri.read(i, j), ids=ids, offsets=off)

    def read_ranges(self, ranges):
        """Rows of several [i, j) ranges, concatenated in the order given, as one :class:`Batch`.

        Meant for the chunk-granular pieces of a shuffled global batch: one contiguous read per
        piece and array; large dense pieces go straight into the output array (no extra copy).
        """
        ranges = [(int(a), int(b)) for a, b in ranges]
        for a, b in ranges:
            if not 0 <= a <= b <= self.n_rows:
                self._check(a, b)
        if len(ranges) == 1:
            return self.read(*ranges[0])
        y = _concat([self._y.read(a, b) for a, b in ranges], self._y)
        ri = _concat([self._ri.read(a, b) for a, b in ranges], self._ri)
        if self.dense:
            X, pos = self._X.empty(len(y)), 0
            for a, b in ranges:
                self._X.into(X, pos, a, b)
                pos += b - a
            return Batch(y, ri, X=X)
        offs = [self._off.read(a, b + 1) for a, b in ranges]
        ids = _concat([self._ids.read(int(o[0]), int(o[-1])) for o in offs], self._ids)
        offsets = np.zeros(len(y) + 1, dtype=np.int64)
        if len(y):
            np.cumsum(np.concatenate([np.diff(o) for o in offs]), out=offsets[1:])
        return Batch(y, ri, ids=ids, offsets=offsets)

    def read_shard(self, k, check=True):
        """All rows of shard ``k``; ``check``: verify them (once per process, see :meth:`check_shard`)."""
        a, b = self.shards[k]
        batch = self.read(a, b)
        if check and k not in self.checked:
            check_shard(self, k, batch)
            self.checked.add(k)
        return batch

    def check_rows(self, i, j, batch=None):
        """Verify every shard that rows [i, j) touch and no earlier read has verified.

        ``batch``: rows [i, j) already in memory (then no shard inside them is read again).
        """
        ks = np.flatnonzero((self.shards[:, 1] > i) & (self.shards[:, 0] < j))
        for k in ks.tolist():
            if k in self.checked:
                continue
            a, b = (int(x) for x in self.shards[k])
            if batch is not None and i <= a and b <= j:
                check_shard(self, k, _rows(batch, a - i, b - i))
                self.checked.add(k)
            else:
                self.read_shard(k)

    def chunk_ranges(self):
        """(c, 2) int64 [start, stop) ranges of the HDF5 row chunks: the unit to shuffle at."""
        starts = np.arange(0, self.n_rows, self.chunk_rows, dtype=np.int64)
        return np.stack([starts, np.minimum(starts + self.chunk_rows, self.n_rows)], axis=1).reshape(-1, 2)

    def pieces(self, i, j, max_bytes=32 << 20):
        """Yield (start, Batch) over rows [i, j) in whole-chunk pieces of about ``max_bytes``."""
        g = self.group
        row_bytes = g["X"].dtype.itemsize * int(np.prod(g["X"].shape[1:])) if self.kind == DENSE else 64
        step = max(1, max_bytes // max(row_bytes, 1) // self.chunk_rows) * self.chunk_rows
        a = i
        while a < j:
            b = min(j, (a // self.chunk_rows) * self.chunk_rows + step)
            yield a, self.read(a, b)
            a = b

    def shard_digest(self, k):
        """SHA-256 (hex) of shard ``k`` as stored, read a piece at a time."""
        a, b = self.shards[k]
        h = ShardHasher(ragged=self.kind != DENSE)
        for _, piece in self.pieces(int(a), int(b)):
            hash_batch(h, piece)
        return h.hexdigest()

    def stored_digest(self, k):
        """The checksum stored for shard ``k`` (hex str)."""
        stored = self.group["shard_sha256"][k]
        return stored.decode("ascii") if isinstance(stored, bytes) else str(stored)

    def verify_shard(self, k):
        """True if shard ``k`` matches its stored checksum."""
        return self.shard_digest(k) == self.stored_digest(k)


def _rows(batch, a, b):
    """Rows [a, b) of an in-memory batch, as a Batch (views, no copy)."""
    if batch.X is not None:
        return Batch(batch.y[a:b], batch.row_index[a:b], X=batch.X[a:b])
    off = batch.offsets[a:b + 1]
    return Batch(batch.y[a:b], batch.row_index[a:b], ids=batch.ids[off[0]:off[-1]], offsets=off - off[0])


def _concat(parts, rows):
    return np.concatenate(parts) if parts else rows.empty(0)


def hash_batch(hasher, batch):
    """Feed a batch's rows to a :class:`~mpirt.data.format.ShardHasher` (in the checksum's byte layout)."""
    if batch.X is not None:
        hasher.update(batch.y, batch.row_index, batch.X, feature_dtype=batch.X.dtype.str)
    else:
        hasher.update(batch.y, batch.row_index, batch.ids, np.diff(batch.offsets), feature_dtype="<u4")


class Dataset:
    """An open data set (see :func:`open_dataset`); a context manager.

    Attributes:
        path, feature_kind ("dense" or "hashed_tokens"), n_features, feature_shape (tuple, dense
        only, else None), class_names (list of str), n_classes, attrs (all root attributes),
        encrypted (bool), vouched (what verified its signatures).
    """

    def __init__(self, path, file):
        self.path, self.file = path, file
        self.encrypted = bool(getattr(file, "encrypted", False))
        a = file.attrs
        self.attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in a.items()}
        self.feature_kind = _text(a["feature_kind"])
        self.n_features = int(a["n_features"])
        self.feature_shape = tuple(int(x) for x in np.atleast_1d(a["feature_shape"])) \
            if "feature_shape" in a else None
        # A dataset since many classes overflowed the 64 KiB attribute limit; older files have the attribute.
        if "class_names" in file:
            check_extents(path, file, ["class_names"])
        names = file["class_names"][()] if "class_names" in file else a["class_names"]
        self.class_names = [_text(c) for c in np.atleast_1d(names)]
        self.n_classes = int(a["n_classes"])
        self.n_users, self.n_items = int(a.get("n_users", 0)), int(a.get("n_items", 0))  # ratings only
        self._splits = {}
        self.vouched = []  # what verified its signatures at open ("hmac", "ed25519 SHA256:...")

    @property
    def splits(self):
        return SPLITS

    def pixel_stats(self):
        """([mean], [std]) per channel of the training pixels in [0, 1] (``prepare images``/``cifar``),
        or None for other data sets."""
        a = self.file.attrs
        if "pixel_mean" not in a or "pixel_std" not in a:
            return None
        mean, std = (np.atleast_1d(np.asarray(a[k], np.float64)) for k in ("pixel_mean", "pixel_std"))
        if mean.shape != std.shape or mean.size not in (1, 3) or not (np.isfinite(mean).all() and (std > 0).all()):
            raise DataError(f"{self.path}: damaged pixel statistics (pixel_mean {mean}, pixel_std {std})")
        return [float(v) for v in mean], [float(v) for v in std]

    def row_sources(self, row_index):
        """The source file of each row number (``prepare images``), or None."""
        if "row_source" not in self.file:
            return None
        d = self.file["row_source"]
        return [_text(d[int(i)]) if 0 <= int(i) < len(d) else "?" for i in row_index]

    def split(self, name):
        """The :class:`Split` called ``name``."""
        if name not in SPLITS:
            raise DataError(f"{self.path}: no split '{name}' (splits: {', '.join(SPLITS)})")
        if name not in self._splits:
            try:
                if self.feature_kind == RATINGS:
                    from mpirt.data.ratings import RatingsSplit

                    self._splits[name] = RatingsSplit(self, name)
                else:
                    self._splits[name] = Split(self, name)
            except (KeyError, OSError, ValueError, TypeError) as exc:
                raise DataError(f"{self.path}: damaged split '{name}' ({_short(exc)})") from None
        return self._splits[name]

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<mpirt Dataset {self.path!r}: {self.feature_kind}, {self.n_features} features, {self.n_classes} classes>"


def open_dataset(path, verify_header=True):
    """Open ``path`` read-only, checking that it is an mpirt data set of a schema this code reads.

    Args:
        path: the .h5 file.
        verify_header: check the root attributes, schema version and every split's datasets
            (cheap: metadata only; ``mpirt inspect`` / :func:`mpirt.data.verify.verify` check the data).

    Returns:
        Dataset.

    Raises:
        DataError: missing file, not HDF5 (or truncated), not an mpirt data set, wrong schema
            version, missing attributes, groups or datasets (one line naming the file).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a data set")
    if not os.path.isfile(path):  # a FIFO would block the open forever
        raise DataError(f"{path}: not a regular file")
    try:
        f = _open_h5(path)
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({_short(exc)})") from None
    try:
        if verify_header:
            check_header(path, f)
        ds = Dataset(path, f)
        if verify_header:
            check_root(path, ds)
            ds.vouched = verify_signatures(path, f)
        return ds
    except DataError:
        f.close()
        raise
    except (KeyError, OSError, ValueError, TypeError) as exc:
        f.close()
        raise DataError(f"{path}: damaged data set ({_short(exc)})") from None


def verify_signatures(path, f):
    """Check the data set's signatures as this process's policy says (:func:`mpirt.secure.sign.verify`);
    return what vouched for it."""
    from mpirt.data.integrity import manifest_digest
    from mpirt.secure.policy import current
    from mpirt.secure.sign import SIGNATURE_ATTRS, verify

    policy = current()
    if not policy.require_signature and not any(k in f.attrs for k in SIGNATURE_ATTRS):
        return []
    return verify(path, "dataset", manifest_digest(f), f.attrs, policy, DataError)


def _open_h5(path):
    from mpirt.secure.h5 import File

    try:
        return File(path, "r", locking=False, rdcc_nbytes=CHUNK_CACHE_BYTES)
    except OSError as exc:
        # HDF5 shares one handle per file within a process, and refuses a second open with other
        # locking flags: if this process already has the file open with h5py's defaults, use those.
        if "locking flag values don't match" not in str(exc):
            raise
        return File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _short(exc):
    return str(exc).split("\n")[0][:160]
