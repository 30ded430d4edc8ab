"""Full verification of a data set (``mpirt inspect``): one DataError naming the first problem."""

import numpy as np

from mpirt.data.format import DENSE, SPLITS
from mpirt.data.reader import _short, open_dataset
from mpirt.errors import DataError


def verify(path):
    """Check everything; return the summary dict. Raises DataError on the first problem."""
    with open_dataset(path) as ds:
        try:
            return _verify(path, ds)
        except (OSError, KeyError, ValueError, IndexError) as exc:
            raise DataError(f"{path}: damaged data set ({_short(exc)})") from None


def _verify(path, ds):
    summary = {"path": path, "feature_kind": ds.feature_kind, "n_features": ds.n_features,
               "feature_shape": ds.feature_shape, "classes": ds.class_names, "splits": {}}
    if ds.n_classes != len(ds.class_names) or ds.n_classes < 1:
        raise DataError(f"{path}: n_classes {ds.n_classes} but {len(ds.class_names)} class names")
    for name in SPLITS:
        sp = ds.split(name)
        shards, n = sp.shards, sp.n_rows
        where = f"{path}: {name}"
        for key in ("y", "row_index") + (("X",) if ds.feature_kind == DENSE else ()):
            if sp.group[key].shape[0] != n:
                raise DataError(f"{where}: '{key}' has {sp.group[key].shape[0]} rows, expected {n}")
        if len(shards):
            if shards[0, 0] != 0 or shards[-1, 1] != n or np.any(shards[1:, 0] != shards[:-1, 1]) \
                    or np.any(shards[:, 1] <= shards[:, 0]):
                raise DataError(f"{where}: shard table does not cover rows 0..{n} exactly once")
            if np.any(shards[:, 0] % sp.chunk_rows):
                raise DataError(f"{where}: shard table is not aligned with chunks of {sp.chunk_rows} rows")
        elif n:
            raise DataError(f"{where}: {n} rows but no shards")
        if len(sp.group["shard_sha256"]) != len(shards):
            raise DataError(f"{where}: {len(shards)} shards but {len(sp.group['shard_sha256'])} checksums")
        if ds.feature_kind != DENSE:
            off = sp.group["offsets"]
            if off.shape[0] != n + 1 or off[0] != 0 or off[-1] != sp.group["ids"].shape[0]:
                raise DataError(f"{where}: token offsets do not match the token ids")
        for k in range(len(shards)):
            b = sp.read_shard(k)
            a0 = int(shards[k, 0])
            bad = np.flatnonzero((b.y < 0) | (b.y >= ds.n_classes))
            if bad.size:
                raise DataError(f"{where} row {a0 + bad[0]}: label {b.y[bad[0]]} out of range "
                                f"0..{ds.n_classes - 1}")
            if ds.feature_kind == DENSE:
                finite = np.isfinite(b.X.reshape(len(b.X), -1)).all(axis=1)
                if not finite.all():
                    raise DataError(f"{where} row {a0 + np.flatnonzero(~finite)[0]}: NaN or inf in features")
            else:
                if np.any(np.diff(b.offsets) < 0):
                    raise DataError(f"{where} shard {k}: token offsets decrease")
                if b.ids.size and int(b.ids.max()) >= ds.n_features:
                    raise DataError(f"{where} shard {k}: token id {int(b.ids.max())} >= {ds.n_features} features")
            if not sp.verify_shard(k):
                raise DataError(f"{where} shard {k}: checksum mismatch (file corrupted or edited)")
        counts = np.zeros(ds.n_classes, dtype=np.int64)
        for k in range(len(shards)):
            a, b = shards[k]
            counts += np.bincount(sp.group["y"][a:b], minlength=ds.n_classes)
        summary["splits"][name] = {"rows": n, "shards": int(len(shards)), "per_class": counts.tolist()}
    return summary
