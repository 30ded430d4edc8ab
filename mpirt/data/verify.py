"""Full verification of a data set (``mpirt inspect``): one DataError naming the file and the first problem.

Each shard is read once and checked for labels in range, finite features (dense) or
token ids below ``n_features`` and non-decreasing offsets (text), and its SHA-256. The
content checks come before the checksum so that an edited label or feature is named
as such; a checksum mismatch with plausible content means corrupted or edited bytes.
"""

import numpy as np

from mpirt.data.format import DENSE, SPLITS, TOKENS, ShardHasher
from mpirt.data.reader import _short, hash_batch, open_dataset
from mpirt.errors import DataError


def verify(path):
    """Check everything in the data set at ``path``.

    Returns:
        dict: summary (feature kind, features, classes, rows, shards and per-class counts per split).

    Raises:
        DataError: the first problem found, as one line naming the file.
    """
    path = str(path)
    with open_dataset(path) as ds:
        try:
            return _verify(path, ds)
        except (OSError, KeyError, ValueError, IndexError, TypeError) as exc:
            raise DataError(f"{path}: damaged data set ({_short(exc)})") from None


def _root(path, ds):
    if ds.n_classes < 1 or ds.n_classes != len(ds.class_names):
        raise DataError(f"{path}: n_classes is {ds.n_classes} but there are {len(ds.class_names)} class names")
    if len(set(ds.class_names)) != len(ds.class_names):
        raise DataError(f"{path}: class names are not unique")
    if ds.feature_kind == DENSE:
        if not ds.feature_shape or int(np.prod(ds.feature_shape)) != ds.n_features:
            raise DataError(f"{path}: n_features {ds.n_features} is not the product of feature_shape "
                            f"{ds.feature_shape}")
    elif ds.n_features < 2 or ds.n_features & (ds.n_features - 1):
        raise DataError(f"{path}: n_features {ds.n_features} is not a power of two")


def _layout(where, ds, sp):
    """The split's arrays agree in length, chunking, and the shard table covers the rows exactly once."""
    g, n = sp.group, sp.n_rows
    row_arrays = ("y", "row_index") + (("X",) if ds.feature_kind == DENSE else ())
    for key in row_arrays:
        if g[key].shape[0] != n:
            raise DataError(f"{where}: '{key}' has {g[key].shape[0]} rows, n_rows says {n}")
        if g[key].chunks is None or g[key].chunks[0] != sp.chunk_rows:
            raise DataError(f"{where}: '{key}' is not chunked by {sp.chunk_rows} rows")
    if ds.feature_kind == DENSE and tuple(g["X"].shape[1:]) != tuple(ds.feature_shape):
        raise DataError(f"{where}: X rows have shape {g['X'].shape[1:]}, feature_shape is {ds.feature_shape}")
    if ds.feature_kind == TOKENS:
        off = g["offsets"]
        if off.shape[0] != n + 1 or off[0] != 0 or off[-1] != g["ids"].shape[0]:
            raise DataError(f"{where}: token offsets are inconsistent with the token ids "
                            f"({off.shape[0]} offsets for {n} rows, {g['ids'].shape[0]} ids)")
    shards = sp.shards
    if len(shards):
        if shards[0, 0] != 0 or shards[-1, 1] != n or np.any(shards[1:, 0] != shards[:-1, 1]) \
                or np.any(shards[:, 1] <= shards[:, 0]):
            raise DataError(f"{where}: shard table does not cover rows 0..{n} exactly once, in order")
        if np.any(shards[:, 0] % sp.chunk_rows):
            raise DataError(f"{where}: shard table is not aligned to chunks of {sp.chunk_rows} rows")
    elif n:
        raise DataError(f"{where}: {n} rows but no shards")
    if g["shard_sha256"].shape != (len(shards),):
        raise DataError(f"{where}: {len(shards)} shards but {g['shard_sha256'].shape[0]} checksums")


def _content(where, ds, k, b, a0):
    bad = np.flatnonzero((b.y < 0) | (b.y >= ds.n_classes))
    if bad.size:
        raise DataError(f"{where} row {a0 + bad[0]}: label {b.y[bad[0]]} out of range 0..{ds.n_classes - 1}")
    if ds.feature_kind == DENSE:
        finite = np.isfinite(b.X.reshape(len(b.X), -1)).all(axis=1)
        if not finite.all():
            raise DataError(f"{where} row {a0 + np.flatnonzero(~finite)[0]}: NaN or inf in features")
    else:
        if np.any(np.diff(b.offsets) < 0):
            raise DataError(f"{where} shard {k}: token offsets decrease")
        if b.ids.size and int(b.ids.max()) >= ds.n_features:
            raise DataError(f"{where} shard {k}: token id {int(b.ids.max())} >= n_features {ds.n_features}")


def _verify(path, ds):
    _root(path, ds)
    summary = {"path": path, "feature_kind": ds.feature_kind, "n_features": ds.n_features,
               "feature_shape": list(ds.feature_shape) if ds.feature_shape else None,
               "classes": ds.class_names, "splits": {}}
    for name in SPLITS:
        sp = ds.split(name)
        where = f"{path}: {name}"
        _layout(where, ds, sp)
        counts = np.zeros(ds.n_classes, dtype=np.int64)
        tokens = 0
        for k, (a, b) in enumerate(sp.shards):
            h = ShardHasher(ragged=ds.feature_kind == TOKENS)
            for start, piece in sp.pieces(int(a), int(b)):
                _content(where, ds, k, piece, start)
                hash_batch(h, piece)
                counts += np.bincount(piece.y, minlength=ds.n_classes)
                tokens += 0 if piece.ids is None else len(piece.ids)
            if h.hexdigest() != sp.stored_digest(k):
                raise DataError(f"{where} shard {k}: checksum mismatch (file corrupted or edited)")
        summary["splits"][name] = {"rows": sp.n_rows, "shards": int(len(sp.shards)), "chunk_rows": sp.chunk_rows,
                                   "per_class": counts.tolist()}
        if ds.feature_kind == TOKENS:
            summary["splits"][name]["tokens"] = tokens
    return summary
