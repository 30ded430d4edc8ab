"""Reading an mpirt data set: rows [i, j) of a split, dense or ragged, whole chunks at a time.

Every rank opens its own read-only handle with serial h5py (MPI-IO is not fault
tolerant under ULFM), and without HDF5 file locking, so readers never block on
each other or on a writer of another file in the same directory.
"""

import os
from dataclasses import dataclass

import h5py
import numpy as np

from mpirt.data.format import DENSE, FORMAT, SCHEMA_VERSION, SPLITS, shard_digest
from mpirt.errors import DataError


@dataclass
class Batch:
    y: np.ndarray
    row_index: np.ndarray
    X: np.ndarray = None  # dense rows
    ids: np.ndarray = None  # text: flat token ids
    offsets: np.ndarray = None  # text: row r is ids[offsets[r]:offsets[r+1]], offsets[0] == 0

    def __len__(self):
        return len(self.y)


class Split:
    def __init__(self, dataset, name):
        self.dataset, self.name = dataset, name
        self.group = dataset.file[name]
        self.kind = dataset.feature_kind
        self.n_rows = int(self.group.attrs["n_rows"])
        self.chunk_rows = int(self.group.attrs["chunk_rows"])
        self.shards = self.group["shards"][()].reshape(-1, 2)
        self._y, self._ri = self.group["y"], self.group["row_index"]
        if self.kind == DENSE:
            self._X = self.group["X"]
        else:
            self._ids, self._off = self.group["ids"], self.group["offsets"]

    def read(self, i, j):
        """Rows [i, j) as a :class:`Batch`."""
        if not 0 <= i <= j <= self.n_rows:
            raise IndexError(f"rows [{i}, {j}) outside split '{self.name}' of {self.n_rows} rows")
        batch = Batch(y=self._y[i:j], row_index=self._ri[i:j])
        if self.kind == DENSE:
            batch.X = self._X[i:j]
        else:
            off = self._off[i:j + 1]
            batch.ids = self._ids[off[0]:off[-1]]
            batch.offsets = off - off[0]
        return batch

    def read_ranges(self, ranges):
        """Concatenate several row ranges (e.g. the chunk-sized pieces of a shuffled batch)."""
        parts = [self.read(int(a), int(b)) for a, b in ranges]
        if len(parts) == 1:
            return parts[0]
        out = Batch(y=np.concatenate([p.y for p in parts]), row_index=np.concatenate([p.row_index for p in parts]))
        if self.kind == DENSE:
            out.X = np.concatenate([p.X for p in parts])
        else:
            out.ids = np.concatenate([p.ids for p in parts])
            lengths = np.concatenate([np.diff(p.offsets) for p in parts])
            out.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return out

    def read_shard(self, k):
        a, b = self.shards[k]
        return self.read(int(a), int(b))

    def shard_digest(self, k):
        b = self.read_shard(k)
        if self.kind == DENSE:
            return shard_digest(b.y, b.row_index, b.X)
        return shard_digest(b.y, b.row_index, b.ids, np.diff(b.offsets))

    def verify_shard(self, k):
        return self.shard_digest(k) == self.group["shard_sha256"][k].decode()


class Dataset:
    def __init__(self, path, file):
        self.path, self.file = path, file
        a = file.attrs
        self.feature_kind = str(a["feature_kind"])
        self.n_features = int(a["n_features"])
        self.feature_shape = tuple(int(x) for x in a["feature_shape"]) if "feature_shape" in a else None
        self.class_names = [c.decode() if isinstance(c, bytes) else str(c) for c in a["class_names"]]
        self.n_classes = int(a["n_classes"])
        self._splits = {}

    def split(self, name):
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


def open_dataset(path, verify_header=True):
    """Open ``path`` read-only, checking that it is an mpirt data set of a schema this code reads.

    Raises:
        DataError: missing file, not HDF5 (or truncated), not an mpirt data set, wrong schema version.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
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
    except (KeyError, OSError, ValueError) as exc:
        f.close()
        raise DataError(f"{path}: damaged data set ({_short(exc)})") from None


def check_header(path, f):
    a = f.attrs
    if a.get("mpirt_format") != FORMAT:
        raise DataError(f"{path}: not an mpirt data set (run 'mpirt prepare' to make one)")
    version = int(a.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise DataError(f"{path}: schema version {version}, this mpirt reads version {SCHEMA_VERSION}")
    for key in ("feature_kind", "n_features", "class_names", "n_classes"):
        if key not in a:
            raise DataError(f"{path}: missing attribute '{key}'")
    for name in SPLITS:
        if name not in f:
            raise DataError(f"{path}: missing split group '{name}'")
        for ds in ("y", "row_index", "shards", "shard_sha256") + (("X",) if a["feature_kind"] == DENSE else
                                                                   ("ids", "offsets")):
            if ds not in f[name]:
                raise DataError(f"{path}: split '{name}' has no '{ds}'")


def _short(exc):
    return str(exc).split("\n")[0][:160]
