"""Streaming writer of the data-set format: appends blocks of rows, never holds the whole input.

Rows wait in a small buffer until they fill whole HDF5 chunks, so every chunk is
written once, in one piece (no read-modify-write of half-filled chunks), and the
writer holds at most one chunk plus the block being appended. Shard checksums are
computed from the rows as they go out, so nothing is read back except the labels,
which are renumbered at the end (classes are known only when the input is done).
"""

import h5py
import numpy as np

from mpirt.data.format import (DENSE, FORMAT, IDS_CHUNK, SCHEMA_VERSION, SPLITS, TOKENS, ShardHasher, le,
                               plan_chunks, plan_shards)


class SplitWriter:
    """Appends rows to one split group (``train``, ``val`` or ``test``).

    Args:
        group: the open h5py group.
        kind: DENSE or TOKENS.
        feature_shape: shape of one dense row (ignored for tokens).
        shard_rows: rows per shard asked for (rounded up to a multiple of the chunk if need be).
        max_shards: if given, rows beyond ``max_shards`` shards join the last shard.
        x_dtype: dense rows' stored type: ``"<f4"``, or ``"|u1"`` for pixels (images stay bytes on disk).
    """

    def __init__(self, group, kind, feature_shape, shard_rows, max_shards=None, x_dtype="<f4"):
        self.group, self.kind = group, kind
        self.dense = kind == DENSE
        self.x_dtype = x_dtype
        row_bytes = np.dtype(x_dtype).itemsize * int(np.prod(feature_shape)) if self.dense else 8
        self.shard_rows, self.chunk = plan_chunks(max(int(shard_rows), 1), max(row_bytes, 8))
        self.max_shards = max_shards
        self.n = 0  # rows on disk
        self.n_ids = 0
        self._pending, self._pending_rows = [], 0
        self.peak_pending_rows = 0  # the most rows ever held in memory (tests check it stays bounded)
        self._hashers = []  # one per shard started so far
        opts = {"maxshape": (None,), "chunks": (self.chunk,), "track_times": False}
        group.create_dataset("y", shape=(0,), dtype="<i8", **opts)
        group.create_dataset("row_index", shape=(0,), dtype="<i8", **opts)
        if self.dense:
            group.create_dataset("X", shape=(0, *feature_shape), dtype=x_dtype, maxshape=(None, *feature_shape),
                                 chunks=(self.chunk, *feature_shape), track_times=False)
        else:
            group.create_dataset("ids", shape=(0,), dtype="<u4", maxshape=(None,), chunks=(IDS_CHUNK,),
                                 track_times=False)
            group.create_dataset("offsets", data=np.zeros(1, "<i8"), **opts)

    def append(self, y, row_index, X=None, ids=None, lengths=None):
        """Append rows: labels, input row numbers, and X rows or (flat ids, per-row lengths)."""
        if len(y) == 0:
            return
        feats = (le(X, self.x_dtype),) if self.dense else (le(ids, "<u4"), le(lengths, "<i8"))
        self._pending.append((le(y, "<i8"), le(row_index, "<i8")) + feats)
        self._pending_rows += len(y)
        self.peak_pending_rows = max(self.peak_pending_rows, self._pending_rows)
        if self._pending_rows >= self.chunk:
            self._flush(final=False)

    def _flush(self, final):
        parts = list(zip(*self._pending))
        y, ri = np.concatenate(parts[0]), np.concatenate(parts[1])
        feats = [np.concatenate(p) for p in parts[2:]]
        m = len(y) if final else len(y) // self.chunk * self.chunk
        if self.dense:
            X = feats[0]
            self._write(y[:m], ri[:m], X[:m])
            rest = (y[m:], ri[m:], X[m:])
        else:
            ids, lengths = feats
            k = int(lengths[:m].sum())
            self._write(y[:m], ri[:m], ids[:k], lengths[:m])
            rest = (y[m:], ri[m:], ids[k:], lengths[m:])
        self._pending = [rest] if len(rest[0]) else []
        self._pending_rows = len(rest[0])

    def _write(self, y, ri, features, lengths=None):
        g, a, m = self.group, self.n, len(y)
        for name, values in (("y", y), ("row_index", ri)) + ((("X", features),) if self.dense else ()):
            g[name].resize(a + m, axis=0)
            g[name][a:a + m] = values
        if not self.dense:
            ends = np.cumsum(lengths)
            g["ids"].resize(self.n_ids + len(features), axis=0)
            g["ids"][self.n_ids:] = features
            g["offsets"].resize(a + m + 1, axis=0)
            g["offsets"][a + 1:] = self.n_ids + ends
            self.n_ids += len(features)
        # Feed the shard checksums, cutting the rows at shard boundaries (y is hashed at the end).
        i = 0
        while i < m:
            s = (a + i) // self.shard_rows
            if s == len(self._hashers):
                self._hashers.append(ShardHasher(ragged=not self.dense))
            j = min(m, (s + 1) * self.shard_rows - a)
            if self.dense:
                self._hashers[s].update(row_index=ri[i:j], features=features[i:j], feature_dtype=self.x_dtype)
            else:
                lo = int(ends[i - 1]) if i else 0
                self._hashers[s].update(row_index=ri[i:j], features=features[lo:int(ends[j - 1])],
                                        lengths=lengths[i:j], feature_dtype="<u4")
            i = j
        self.n += m

    def finish(self, remap=None):
        """Flush, renumber labels through ``remap`` (old id -> new id), write the shard table and checksums."""
        if self._pending_rows:
            self._flush(final=True)
        g = self.group
        shards = plan_shards(self.n, self.shard_rows)
        hashers = self._hashers
        if self.max_shards and len(shards) > self.max_shards:
            # More rows than the estimate: the extra rows join the last shard, whose parts are re-hashed.
            k = self.max_shards - 1
            shards = np.concatenate([shards[:k], [[shards[k, 0], self.n]]]).astype(np.int64)
            hashers = hashers[:k] + [self._rehash(int(shards[k, 0]), self.n)]
        digests = []
        for (a, b), h in zip(shards, hashers):
            h.replace_y(self._final_y(int(a), int(b), remap))
            digests.append(h.hexdigest())
        g.create_dataset("shards", data=shards.astype("<i8").reshape(-1, 2), track_times=False)
        g.create_dataset("shard_sha256", data=np.array(digests, dtype="S64").reshape(-1), track_times=False)
        g.attrs["n_rows"] = self.n
        g.attrs["chunk_rows"] = self.chunk
        g.attrs["shard_rows"] = self.shard_rows

    def _final_y(self, a, b, remap):
        """Renumber y[a:b] in place (a chunk at a time) and return the sha256 of the final labels."""
        import hashlib

        h, y = hashlib.sha256(), self.group["y"]
        for c in range(a, b, self.chunk):
            d = min(b, c + self.chunk)
            block = y[c:d]
            if remap is not None:
                block = remap[block].astype("<i8")
                y[c:d] = block
            h.update(le(block, "<i8").tobytes())
        return h

    def _rehash(self, a, b):
        g, h = self.group, ShardHasher(ragged=not self.dense)
        for c in range(a, b, self.chunk):
            d = min(b, c + self.chunk)
            if self.dense:
                h.update(row_index=g["row_index"][c:d], features=g["X"][c:d], feature_dtype=self.x_dtype)
            else:
                off = g["offsets"][c:d + 1]
                h.update(row_index=g["row_index"][c:d], features=g["ids"][off[0]:off[-1]],
                         lengths=np.diff(off), feature_dtype="<u4")
        return h


def sign_dataset(f):
    """Sign the finished data set open in ``f`` as the policy says, over its manifest digest."""
    from mpirt.data.integrity import manifest_digest
    from mpirt.secure.sign import sign_file

    sign_file(f, "dataset", manifest_digest)


class DatasetWriter:
    """Writes one data set to ``path`` (a temporary name; the caller renames it into place).

    Args:
        path: where to write.
        kind: DENSE or TOKENS.
        n_features: features per row (dense) or hash buckets (text).
        shard_rows: dict split -> rows per shard.
        feature_shape: shape of one dense row.
        attrs: extra root attributes (hash seed, bigrams, source...).
        max_shards: dict split -> most shards (for ``--shards N``), or None.
        x_dtype: dense rows' stored type (``"<f4"``, or ``"|u1"`` for pixels).
    """

    def __init__(self, path, kind, n_features, shard_rows, feature_shape=None, attrs=None, max_shards=None,
                 x_dtype="<f4"):
        if kind not in (DENSE, TOKENS):
            raise ValueError(f"unknown feature kind {kind!r}")
        # No chunk cache: every chunk is written whole, once, so the cache saves nothing, and
        # without it a full disk fails the write call itself (see mpirt.outputs.h5_writing).
        from mpirt.secure.h5 import create

        self.file = create(path, FORMAT, track_order=False, rdcc_nbytes=0)
        self.path, self.kind = path, kind
        root = self.file.attrs
        root["mpirt_format"] = FORMAT
        root["schema_version"] = SCHEMA_VERSION
        root["feature_kind"] = kind
        root["n_features"] = int(n_features)
        shape = tuple(int(s) for s in feature_shape or ())
        if kind == DENSE:
            root["feature_shape"] = np.asarray(shape, dtype=np.int64)
        for key, value in (attrs or {}).items():
            root[key] = value
        self.splits = {s: SplitWriter(self.file.create_group(s), kind, shape, shard_rows[s],
                                      (max_shards or {}).get(s), x_dtype) for s in SPLITS}

    def append(self, split, *args, **kwargs):
        self.splits[split].append(*args, **kwargs)

    def rows(self):
        """Rows written (or buffered) per split."""
        return {s: w.n + w._pending_rows for s, w in self.splits.items()}

    def finish(self, class_names, remap=None):
        """Complete every split and the root attributes, and close the file."""
        if remap is not None:
            remap = np.asarray(remap, dtype=np.int64)
        for w in self.splits.values():
            w.finish(remap)
        # A dataset, not an attribute: attributes are capped at 64 KiB (about 5,000 class names).
        self.file.create_dataset("class_names", data=np.array([str(c) for c in class_names],
                                                              dtype=h5py.string_dtype()), track_times=False)
        self.file.attrs["n_classes"] = len(class_names)
        sign_dataset(self.file)
        self.file.flush()  # fails while the file is still open, so abort() can still discard it
        self.file.close()

    def abort(self):
        """Close without completing, even on a full disk (the caller removes the temporary file)."""
        from mpirt.outputs import discard_h5

        discard_h5(self.file, self.path)
