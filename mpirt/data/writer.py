"""Streaming writer of the data-set format: appends blocks, never holds the whole input."""

import h5py
import numpy as np

from mpirt.data.format import (DENSE, FORMAT, IDS_CHUNK, SCHEMA_VERSION, SPLITS, TOKENS, chunk_rows_for,
                               plan_shards, shard_digest)


class SplitWriter:
    def __init__(self, group, kind, feature_shape, shard_rows):
        chunk = chunk_rows_for(shard_rows)
        if chunk is None:  # no chunk size divides it: round the shard size up
            shard_rows = -(-shard_rows // 1024) * 1024
            chunk = 1024
        self.group, self.kind, self.shard_rows, self.chunk = group, kind, shard_rows, chunk
        self.n = 0
        opts = {"maxshape": (None,), "chunks": (chunk,)}
        group.create_dataset("y", shape=(0,), dtype="<i8", **opts)
        group.create_dataset("row_index", shape=(0,), dtype="<i8", **opts)
        if kind == DENSE:
            group.create_dataset("X", shape=(0, *feature_shape), dtype="<f4", maxshape=(None, *feature_shape),
                                 chunks=(chunk, *feature_shape))
        else:
            group.create_dataset("ids", shape=(0,), dtype="<u4", maxshape=(None,), chunks=(IDS_CHUNK,))
            group.create_dataset("offsets", data=np.zeros(1, "<i8"), maxshape=(None,), chunks=(chunk,))
            self.n_ids = 0

    @staticmethod
    def _append(ds, values, start):
        ds.resize(start + len(values), axis=0)
        ds[start:start + len(values)] = values

    def append(self, y, row_index, X=None, ids=None, lengths=None):
        k = len(y)
        if k == 0:
            return
        g = self.group
        self._append(g["y"], y, self.n)
        self._append(g["row_index"], row_index, self.n)
        if self.kind == DENSE:
            self._append(g["X"], X, self.n)
        else:
            self._append(g["ids"], ids, self.n_ids)
            offsets = self.n_ids + np.cumsum(lengths, dtype=np.int64)
            self._append(g["offsets"], offsets, self.n + 1)
            self.n_ids += len(ids)
        self.n += k

    def finish(self):
        """Write the shard table and each shard's SHA-256, reading the shards back once."""
        g = self.group
        shards = plan_shards(self.n, self.shard_rows)
        digests = []
        for a, b in shards:
            y, ri = g["y"][a:b], g["row_index"][a:b]
            if self.kind == DENSE:
                digests.append(shard_digest(y, ri, g["X"][a:b]))
            else:
                off = g["offsets"][a:b + 1]
                digests.append(shard_digest(y, ri, g["ids"][off[0]:off[-1]], np.diff(off)))
        g.create_dataset("shards", data=shards.astype("<i8").reshape(-1, 2))
        g.create_dataset("shard_sha256", data=np.array(digests, dtype="S64").reshape(-1))
        g.attrs["n_rows"] = self.n
        g.attrs["chunk_rows"] = self.chunk
        g.attrs["shard_rows"] = self.shard_rows


class DatasetWriter:
    """Writes one data set to ``path`` (the caller renames it into place when done).

    Args:
        path: where to write (a temporary name).
        kind: "dense" or "hashed_tokens".
        n_features: features per row (dense) or hash buckets (text).
        feature_shape: shape of one dense row.
        shard_rows: dict split -> rows per shard.
        attrs: extra root attributes (hash seed, bigrams...).
    """

    def __init__(self, path, kind, n_features, shard_rows, feature_shape=None, attrs=None):
        if kind not in (DENSE, TOKENS):
            raise ValueError(kind)
        self.file = h5py.File(path, "w")
        self.kind = kind
        root = self.file.attrs
        root["mpirt_format"] = FORMAT
        root["schema_version"] = SCHEMA_VERSION
        root["feature_kind"] = kind
        root["n_features"] = int(n_features)
        if feature_shape is not None:
            root["feature_shape"] = np.asarray(feature_shape, dtype=np.int64)
        for key, value in (attrs or {}).items():
            root[key] = value
        self.splits = {s: SplitWriter(self.file.create_group(s), kind, tuple(feature_shape or ()), shard_rows[s])
                       for s in SPLITS}

    def finish(self, class_names):
        for w in self.splits.values():
            w.finish()
        self.file.attrs["class_names"] = np.array(list(class_names), dtype=h5py.string_dtype())
        self.file.attrs["n_classes"] = len(class_names)
        self.file.close()

    def abort(self):
        self.file.close()
