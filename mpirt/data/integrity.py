"""Checks of a data set that every reader makes, not only ``mpirt inspect``.

Jobs used to trust the file: a duplicated shard table doubled the rows, an empty one gave 0 rows,
edited labels trained to exit 0 and an out-of-range token id was counted as another class. So:

- at open (metadata only, microseconds): the root attributes, each split's lengths, chunking,
  shard table and real extents (a dataset must be backed by bytes in the file: a crafted header
  declaring 10^12 rows or 2^20 x 2^20 features must not make every rank allocate terabytes);
- per shard, once per process, where a job has the rows in hand anyway: labels and token ids in
  range, finite features, and the shard's SHA-256 (:func:`check_shard`).

Every failure is one :class:`DataError` line naming the file, the split and the shard.
"""

import hashlib
import json

import h5py
import numpy as np

from mpirt.data.format import DENSE, FEATURE_KINDS, FORMAT, RATINGS, SCHEMA_VERSION, SPLITS, TOKENS, ShardHasher
from mpirt.errors import DataError


def check_header(path, f):
    """Raise DataError unless ``f`` has this schema's root attributes, groups and datasets."""
    a = f.attrs
    if "mpirt_format" not in a or _str(a["mpirt_format"]) != FORMAT:
        raise DataError(f"{path}: not an mpirt data set (no mpirt_format attribute; make one with 'mpirt prepare')")
    try:
        version = int(a.get("schema_version", -1))
    except (TypeError, ValueError):
        version = a.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(f"{path}: schema version {version}, this mpirt reads version {SCHEMA_VERSION} "
                        f"(prepare the data again with this mpirt)")
    for key in ("feature_kind", "n_features", "n_classes"):
        if key not in a:
            raise DataError(f"{path}: missing root attribute '{key}'")
    if "class_names" not in a and not isinstance(f.get("class_names"), h5py.Dataset):
        raise DataError(f"{path}: missing root attribute 'class_names'")
    kind = _str(a["feature_kind"])
    if kind not in FEATURE_KINDS:
        raise DataError(f"{path}: unknown feature_kind '{kind}' (expected {' or '.join(FEATURE_KINDS)})")
    if kind == DENSE and "feature_shape" not in a:
        raise DataError(f"{path}: missing root attribute 'feature_shape'")
    per_row = ("y", "X") if kind == DENSE else ("y", "ids", "offsets") if kind == TOKENS else \
        ("user", "item", "rating", "timestamp")
    if kind == RATINGS:
        for key in ("n_users", "n_items"):
            if key not in a:
                raise DataError(f"{path}: missing root attribute '{key}'")
        for key in ("user_ids", "item_ids"):
            if not isinstance(f.get(key), h5py.Dataset):
                raise DataError(f"{path}: missing root dataset '{key}'")
    for name in SPLITS:
        if name not in f or not isinstance(f[name], h5py.Group):
            raise DataError(f"{path}: missing split group '{name}'")
        g = f[name]
        for ds in ("row_index", "shards", "shard_sha256") + per_row:
            if ds not in g or not isinstance(g[ds], h5py.Dataset):
                raise DataError(f"{path}: split '{name}' has no dataset '{ds}'")
        for key in ("n_rows", "chunk_rows"):
            if key not in g.attrs:
                raise DataError(f"{path}: split '{name}' has no attribute '{key}'")
    if kind == TOKENS and int(a["n_features"]) & (int(a["n_features"]) - 1):
        raise DataError(f"{path}: n_features {int(a['n_features'])} is not a power of two")


def check_root(path, ds):
    """Root attributes that agree with each other (class names, feature shape, hash buckets)."""
    if ds.feature_kind == RATINGS:
        f = ds.file
        if ds.n_users < 1 or ds.n_items < 1 or ds.n_features != ds.n_users + ds.n_items:
            raise DataError(f"{path}: n_users {ds.n_users}, n_items {ds.n_items} and n_features {ds.n_features} "
                            f"do not agree")
        for key, n in (("user_ids", ds.n_users), ("item_ids", ds.n_items)):
            if f[key].shape != (n,):
                raise DataError(f"{path}: '{key}' holds {f[key].shape[0]} ids, the header says {n}")
        return
    if ds.n_classes < 1 or ds.n_classes != len(ds.class_names):
        raise DataError(f"{path}: n_classes is {ds.n_classes} but there are {len(ds.class_names)} class names")
    if len(set(ds.class_names)) != len(ds.class_names):
        raise DataError(f"{path}: class names are not unique")
    if ds.feature_kind == DENSE:
        if not ds.feature_shape or any(s < 1 for s in ds.feature_shape) \
                or int(np.prod(ds.feature_shape, dtype=object)) != ds.n_features:
            raise DataError(f"{path}: n_features {ds.n_features} is not the product of feature_shape "
                            f"{ds.feature_shape}")
    elif ds.n_features < 2 or ds.n_features & (ds.n_features - 1) or ds.n_features > 1 << 32:
        raise DataError(f"{path}: n_features {ds.n_features} is not a power of two between 2 and 2^32")


# The format's dtypes (docs/dataset-format.md): a crafted file must not change what a row costs.
# X is float32, or uint8 for pixels (``prepare images`` / ``cifar``).
SCHEMA_DTYPES = {"y": ("<i8",), "row_index": ("<i8",), "shards": ("<i8",), "X": ("<f4", "|u1"), "ids": ("<u4",),
                 "offsets": ("<i8",), "shard_sha256": ("|S64",), "user": ("<i8",), "item": ("<i8",),
                 "rating": ("<f4",), "timestamp": ("<i8",)}


def check_schema(where, group):
    """Each dataset of a split has the format's dtype and rank (before any of it is read)."""
    for name, dts in SCHEMA_DTYPES.items():
        if name in group and group[name].dtype.str not in dts:
            raise DataError(f"{where}: '{name}' is {group[name].dtype.str}, the format says {' or '.join(dts)}")
    for name in ("y", "row_index", "ids", "offsets", "shard_sha256", "user", "item", "rating", "timestamp"):
        if name in group and group[name].ndim != 1:
            raise DataError(f"{where}: '{name}' has shape {group[name].shape}, the format says one dimension")
    if group["shards"].ndim != 2 or group["shards"].shape[1] != 2:
        raise DataError(f"{where}: 'shards' has shape {group['shards'].shape}, the format says (k, 2)")


def check_extents(where, group, names):
    """Each dataset's declared size is held by the file (mpirt never compresses, so a complete
    dataset's storage is at least its size; an unallocated one reads as zeros of any size)."""
    for name in names:
        d = group[name]
        nbytes = int(np.prod(d.shape, dtype=object)) * d.dtype.itemsize
        if nbytes and d.id.get_storage_size() < nbytes:
            raise DataError(f"{where}: '{name}' declares {d.shape} ({nbytes} bytes) but the file holds "
                            f"{d.id.get_storage_size()} bytes of it (crafted or truncated)")


def check_layout(where, ds, sp):
    """The split's arrays agree in length, chunking and extents; the shard table covers the rows
    exactly once, in order, with no empty shard."""
    g, n = sp.group, sp.n_rows
    dense = ds.feature_kind == DENSE
    row_arrays = ("y", "row_index") + (("X",) if dense else ())
    for key in row_arrays:
        if g[key].shape[0] != n:
            raise DataError(f"{where}: '{key}' has {g[key].shape[0]} rows, n_rows says {n}")
        if g[key].chunks is None or g[key].chunks[0] != sp.chunk_rows:
            raise DataError(f"{where}: '{key}' is not chunked by {sp.chunk_rows} rows")
    if dense and tuple(g["X"].shape[1:]) != tuple(ds.feature_shape):
        raise DataError(f"{where}: X rows have shape {g['X'].shape[1:]}, feature_shape is {ds.feature_shape}")
    check_extents(where, g, row_arrays + (() if dense else ("ids", "offsets")) + ("shards", "shard_sha256"))
    if ds.feature_kind == TOKENS:
        off = g["offsets"]
        if off.shape[0] != n + 1 or off[0] != 0 or off[-1] != g["ids"].shape[0]:
            raise DataError(f"{where}: token offsets are inconsistent with the token ids "
                            f"({off.shape[0]} offsets for {n} rows, {g['ids'].shape[0]} ids)")
    check_shard_table(where, sp)


def check_shard_table(where, sp):
    """The shard table of split ``sp`` covers its rows exactly once, in order, with no empty shard,
    on chunk boundaries, with one checksum a shard (every kind of data set)."""
    shards, n = sp.shards, sp.n_rows
    if len(shards):
        if shards[0, 0] != 0 or shards[-1, 1] != n or np.any(shards[1:, 0] != shards[:-1, 1]) \
                or np.any(shards[:, 1] <= shards[:, 0]):
            raise DataError(f"{where}: shard table does not cover rows 0..{n} exactly once, in order")
        if np.any(shards[:, 0] % sp.chunk_rows):
            raise DataError(f"{where}: shard table is not aligned to chunks of {sp.chunk_rows} rows")
    elif n:
        raise DataError(f"{where}: {n} rows but no shards")
    if sp.group["shard_sha256"].shape != (len(shards),):
        raise DataError(f"{where}: {len(shards)} shards but {sp.group['shard_sha256'].shape[0]} checksums")


def check_content(where, ds, k, b, a0):
    """Labels in range; finite features (dense) or token ids below n_features and sane offsets."""
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


def check_shard(split, k, batch):
    """Check shard ``k`` of ``split`` from its rows in memory (``batch``: the whole shard)."""
    from mpirt.data.reader import hash_batch

    where = f"{split.dataset.path}: {split.name}"
    a = int(split.shards[k][0])
    check_content(where, split.dataset, k, batch, a)
    h = ShardHasher(ragged=not split.dense)
    hash_batch(h, batch)
    if h.hexdigest() != split.stored_digest(k):
        raise DataError(f"{where} shard {k}: checksum mismatch (file corrupted or edited; "
                        f"'mpirt inspect' tells more)")


def dataset_digest(ds):
    """SHA-256 (hex) naming a data set's content, from metadata only: the root attributes that
    give rows their meaning (classes, features, hashing) and every split's shard table and
    checksums, which the shard checks tie to the rows themselves."""
    h = hashlib.sha256()
    root = {k: ds.attrs.get(k) for k in ("feature_kind", "n_features", "hash_seed", "bigrams", "lowercase",
                                         "hash", "n_users", "n_items")}
    root["feature_shape"] = list(ds.feature_shape) if ds.feature_shape else None
    root["class_names"] = list(ds.class_names)
    h.update(json.dumps(root, sort_keys=True, default=str).encode())
    for name in SPLITS:
        sp = ds.split(name)
        h.update(name.encode() + b"\0" + np.ascontiguousarray(sp.shards, dtype="<i8").tobytes())
        h.update(b"".join(bytes(x) for x in sp.group["shard_sha256"][()]))
    return h.hexdigest()


def hashing_params(ds):
    """How a text data set's token ids were made; a model is only valid for the same hashing."""
    if ds.feature_kind != TOKENS:
        return None
    a = ds.attrs
    return {"n_features": int(ds.n_features), "hash_seed": int(a.get("hash_seed", 0)),
            "bigrams": bool(a.get("bigrams", False)), "hash": str(a.get("hash", "")),
            "lowercase": bool(a.get("lowercase", True))}


def _str(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def manifest_digest(f):
    """SHA-256 (hex) of everything an open data-set file ``f`` (h5py) holds but its rows' bytes,
    which the per-shard checksums it covers stand for: every root attribute, every root dataset
    (class names, original ids, image paths), and each split's attributes, datasets' types and
    shapes, shard table and checksums. This is what a data set's signature signs
    (:mod:`mpirt.secure.sign`): labels changed and checksums recomputed change it."""
    from mpirt.secure.sign import SIGNATURE_ATTRS

    h = hashlib.sha256(b"mpirt.dataset manifest v1\0")
    h.update(_canonical_attrs(f.attrs, skip=SIGNATURE_ATTRS))
    for name in sorted(f):
        obj = f[name]
        if isinstance(obj, h5py.Dataset):
            h.update(b"D" + name.encode() + b"\0" + _dataset_bytes(obj))
    for name in SPLITS:
        g = f[name]
        h.update(b"S" + name.encode() + b"\0" + _canonical_attrs(g.attrs))
        for ds in sorted(g):
            d = g[ds]
            h.update(f"{ds}:{d.dtype.str}:{list(d.shape)}\0".encode())
        h.update(np.ascontiguousarray(g["shards"][()], dtype="<i8").tobytes())
        h.update(b"".join(bytes(x) for x in g["shard_sha256"][()]))
    return h.hexdigest()


def _canonical_attrs(attrs, skip=()):
    items = {k: _plain(attrs[k]) for k in sorted(attrs) if k not in skip}
    return json.dumps(items, sort_keys=True, default=str).encode()


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _dataset_bytes(d):
    a = d[()]
    if a.dtype.kind == "O":  # variable-length strings: each one, length-prefixed
        parts = [x if isinstance(x, bytes) else str(x).encode() for x in a.reshape(-1)]
        return b"".join(len(p).to_bytes(8, "little") + p for p in parts)
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).digest()
