"""Full verification of a data set (``mpirt inspect``): one DataError naming the file and the first problem.

Each shard is read once and checked for labels in range, finite features (dense) or
token ids below ``n_features`` and non-decreasing offsets (text), and its SHA-256. The
content checks come before the checksum so that an edited label or feature is named
as such; a checksum mismatch with plausible content means corrupted or edited bytes.
"""

import numpy as np

from mpirt.data.format import RATINGS, SPLITS, TOKENS, ShardHasher
from mpirt.data.integrity import check_content as _content
from mpirt.data.integrity import check_layout as _layout
from mpirt.data.integrity import check_root as _root
from mpirt.data.reader import _short, hash_batch, open_dataset
from mpirt.errors import DataError


def verify(path):
    """Check everything in the data set at ``path``.

    Returns:
        dict: summary (feature kind, features, classes, rows, shards and per-class counts per split;
        ``protection``: encrypted, signed, verified by, as :func:`mpirt.secure.inspect.summary`).

    Raises:
        DataError: the first problem found, as one line naming the file.
    """
    from mpirt.secure.inspect import summary as protection

    path = str(path)
    with open_dataset(path) as ds:
        try:
            out = _verify(path, ds)
        except (OSError, KeyError, ValueError, IndexError, TypeError) as exc:
            raise DataError(f"{path}: damaged data set ({_short(exc)})") from None
        out["protection"] = protection(path, ds.file, ds.vouched)
        return out


def _verify(path, ds):
    _root(path, ds)
    if ds.feature_kind == RATINGS:
        from mpirt.data.ratings import verify_ratings

        return verify_ratings(path, ds)
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
