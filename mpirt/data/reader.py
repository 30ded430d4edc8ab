"""Reading an mpirt data set: rows [i, j) of a split, dense or ragged, by contiguous slices.

Every rank opens its own read-only handle with serial h5py (MPI-IO collectives are not
fault tolerant under ULFM, and a rank that dies must not take a shared handle with it).
Files are opened with HDF5 file locking off (``locking=False``): readers only read, and
with locking on, a reader can fail to open a file that another process holds open for
writing, or trip over locks that NFS/Lustre do not support. Writers never write in place
(they rename a finished file over the old one), so an open reader keeps the version it
opened.

Reads go through h5py's low-level ``DatasetID.read`` with one hyperslab per range, into
arrays allocated once per batch: no h5py fancy indexing, no selection parsing per call,
and :meth:`Split.read_ranges` fills one output buffer instead of concatenating pieces.
"""

import os
from dataclasses import dataclass

import h5py
import numpy as np

from mpirt.data.format import DENSE, FEATURE_KINDS, FORMAT, SCHEMA_VERSION, SPLITS, TOKENS, ShardHasher
from mpirt.errors import DataError


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
    """Contiguous reads of one dataset, ``[a, b)`` along axis 0, into a caller's buffer."""

    def __init__(self, dset):
        self.id = dset.id
        self.dtype = dset.dtype
        self.shape = dset.shape
        self.tail = tuple(dset.shape[1:])
        self.space = self.id.get_space()

    def empty(self, n):
        return np.empty((n, *self.tail), dtype=self.dtype)

    def into(self, out, pos, a, b):
        """Read rows [a, b) into out[pos:pos + (b - a)]."""
        n = b - a
        if n <= 0:
            return
        zeros = (0,) * len(self.tail)
        self.space.select_hyperslab((a, *zeros), (n, *self.tail))
        mem = h5py.h5s.create_simple(out.shape)
        mem.select_hyperslab((pos, *zeros), (n, *self.tail))
        self.id.read(mem, self.space, out)

    def read(self, a, b):
        out = self.empty(b - a)
        self.into(out, 0, a, b)
        return out


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
        self.n_rows = int(g.attrs["n_rows"])
        self.chunk_rows = int(g.attrs["chunk_rows"])
        self.shards = g["shards"][()].reshape(-1, 2).astype(np.int64)
        self._y, self._ri = _Rows(g["y"]), _Rows(g["row_index"])
        if self.kind == DENSE:
            self._X = _Rows(g["X"])
        else:
            self._ids, self._off = _Rows(g["ids"]), _Rows(g["offsets"])

    def __len__(self):
        return self.n_rows

    def _check(self, i, j):
        if not 0 <= i <= j <= self.n_rows:
            raise IndexError(f"rows [{i}, {j}) outside split '{self.name}' of {self.n_rows} rows")

    def read(self, i, j):
        """Rows [i, j) as a :class:`Batch`."""
        i, j = int(i), int(j)
        self._check(i, j)
        batch = Batch(y=self._y.read(i, j), row_index=self._ri.read(i, j))
        if self.kind == DENSE:
            batch.X = self._X.read(i, j)
        else:
            off = self._off.read(i, j + 1)
            batch.ids = self._ids.read(int(off[0]), int(off[-1]))
            batch.offsets = off - off[0]
        return batch

    def read_ranges(self, ranges):
        """Rows of several [i, j) ranges, concatenated in the order given, as one :class:`Batch`.

        Meant for the chunk-granular pieces of a shuffled global batch: each piece is one
        contiguous read straight into the output arrays.
        """
        ranges = [(int(a), int(b)) for a, b in ranges]
        for a, b in ranges:
            self._check(a, b)
        if len(ranges) == 1:
            return self.read(*ranges[0])
        n = sum(b - a for a, b in ranges)
        batch = Batch(y=self._y.empty(n), row_index=self._ri.empty(n))
        pos = 0
        if self.kind == DENSE:
            batch.X = self._X.empty(n)
            for a, b in ranges:
                for rows, out in ((self._y, batch.y), (self._ri, batch.row_index), (self._X, batch.X)):
                    rows.into(out, pos, a, b)
                pos += b - a
            return batch
        offs = []
        for a, b in ranges:
            self._y.into(batch.y, pos, a, b)
            self._ri.into(batch.row_index, pos, a, b)
            offs.append(self._off.read(a, b + 1))
            pos += b - a
        lengths = [int(o[-1] - o[0]) for o in offs]
        batch.ids = self._ids.empty(sum(lengths))
        batch.offsets = np.empty(n + 1, dtype=np.int64)
        batch.offsets[0] = 0
        pos = tpos = 0
        for o, k in zip(offs, lengths):
            self._ids.into(batch.ids, tpos, int(o[0]), int(o[-1]))
            batch.offsets[pos + 1:pos + len(o)] = o[1:] - o[0] + tpos
            pos += len(o) - 1
            tpos += k
        return batch

    def read_shard(self, k):
        """All rows of shard ``k``."""
        a, b = self.shards[k]
        return self.read(a, b)

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


def hash_batch(hasher, batch):
    """Feed a batch's rows to a :class:`~mpirt.data.format.ShardHasher` (in the checksum's byte layout)."""
    if batch.X is not None:
        hasher.update(batch.y, batch.row_index, batch.X)
    else:
        hasher.update(batch.y, batch.row_index, batch.ids, np.diff(batch.offsets), feature_dtype="<u4")


class Dataset:
    """An open data set (see :func:`open_dataset`); a context manager.

    Attributes:
        path, feature_kind ("dense" or "hashed_tokens"), n_features, feature_shape (tuple, dense
        only, else None), class_names (list of str), n_classes, attrs (all root attributes).
    """

    def __init__(self, path, file):
        self.path, self.file = path, file
        a = file.attrs
        self.attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in a.items()}
        self.feature_kind = _text(a["feature_kind"])
        self.n_features = int(a["n_features"])
        self.feature_shape = tuple(int(x) for x in np.atleast_1d(a["feature_shape"])) \
            if "feature_shape" in a else None
        self.class_names = [_text(c) for c in np.atleast_1d(a["class_names"])]
        self.n_classes = int(a["n_classes"])
        self._splits = {}

    @property
    def splits(self):
        return SPLITS

    def split(self, name):
        """The :class:`Split` called ``name``."""
        if name not in SPLITS:
            raise DataError(f"{self.path}: no split '{name}' (splits: {', '.join(SPLITS)})")
        if name not in self._splits:
            self._splits[name] = Split(self, name)
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
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({_short(exc)})") from None
    try:
        if verify_header:
            check_header(path, f)
        return Dataset(path, f)
    except DataError:
        f.close()
        raise
    except (KeyError, OSError, ValueError, TypeError) as exc:
        f.close()
        raise DataError(f"{path}: damaged data set ({_short(exc)})") from None


def check_header(path, f):
    """Raise DataError unless ``f`` has this schema's root attributes, groups and datasets."""
    a = f.attrs
    if "mpirt_format" not in a or _text(a["mpirt_format"]) != FORMAT:
        raise DataError(f"{path}: not an mpirt data set (no mpirt_format attribute; make one with 'mpirt prepare')")
    try:
        version = int(a.get("schema_version", -1))
    except (TypeError, ValueError):
        version = a.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(f"{path}: schema version {version}, this mpirt reads version {SCHEMA_VERSION} "
                        f"(prepare the data again with this mpirt)")
    for key in ("feature_kind", "n_features", "class_names", "n_classes"):
        if key not in a:
            raise DataError(f"{path}: missing root attribute '{key}'")
    kind = _text(a["feature_kind"])
    if kind not in FEATURE_KINDS:
        raise DataError(f"{path}: unknown feature_kind '{kind}' (expected {' or '.join(FEATURE_KINDS)})")
    if kind == DENSE and "feature_shape" not in a:
        raise DataError(f"{path}: missing root attribute 'feature_shape'")
    per_row = ("X",) if kind == DENSE else ("ids", "offsets")
    for name in SPLITS:
        if name not in f or not isinstance(f[name], h5py.Group):
            raise DataError(f"{path}: missing split group '{name}'")
        g = f[name]
        for ds in ("y", "row_index", "shards", "shard_sha256") + per_row:
            if ds not in g or not isinstance(g[ds], h5py.Dataset):
                raise DataError(f"{path}: split '{name}' has no dataset '{ds}'")
        for key in ("n_rows", "chunk_rows"):
            if key not in g.attrs:
                raise DataError(f"{path}: split '{name}' has no attribute '{key}'")
    if kind == TOKENS and int(a["n_features"]) & (int(a["n_features"]) - 1):
        raise DataError(f"{path}: n_features {int(a['n_features'])} is not a power of two")


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _short(exc):
    return str(exc).split("\n")[0][:160]
