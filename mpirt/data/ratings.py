"""``mpirt prepare ratings``: MovieLens-style ratings into the data-set format's ``ratings`` kind.

Input: ``userId,movieId,rating,timestamp`` CSV (a header line is optional; with one, the columns are
found by name) or the ``::``-separated ``ratings.dat`` of MovieLens 1M/10M. User and item ids may be
any strings; they are remapped to dense indices ``0..n-1`` in order of first appearance, and the
original ids are stored (``user_ids``, ``item_ids``) so every index maps back.

Splits (``--split-by``):
- ``random``: each rating goes to val or test with ``--val-fraction``/``--test-fraction``, by a
  permutation seeded by ``--seed``;
- ``time``: the latest ``--test-fraction`` of all ratings by timestamp are the test split, the
  ``--val-fraction`` before them val, the rest train (ties keep the input order): a model is judged
  on ratings made after the ones it learned from.

Rows are stored in an order shuffled by ``--seed`` (ratings files come sorted by user, and training
draws batches from shuffled blocks of consecutive rows); ``row_index`` is the rating's place in the
input (0-based, header and bad lines not counted).

Memory: the ratings are held as arrays while splitting, 28 bytes a rating (MovieLens 25M: 700 MB),
plus the id maps.

Format (``docs/dataset-format.md``): per split ``user``, ``item`` (int64 dense indices), ``rating``
(float32), ``timestamp`` (int64, seconds), ``row_index``, the shard table and a SHA-256 per shard over
``sha256(user) || sha256(item) || sha256(rating) || sha256(timestamp) || sha256(row_index)`` as
little-endian bytes.
"""

import hashlib
import os

import h5py
import numpy as np

from mpirt.atomic import atomic_path
from mpirt.data.format import FORMAT, RATINGS, SCHEMA_VERSION, SPLITS, le, plan_chunks, plan_shards
from mpirt.data.reader import Split
from mpirt.data.writer import sign_dataset
from mpirt.errors import DataError
from mpirt.secure.h5 import create

COLUMNS = (("user", "<i8"), ("item", "<i8"), ("rating", "<f4"), ("timestamp", "<i8"), ("row_index", "<i8"))
NAMES = {"user": ("userid", "user_id", "user"), "item": ("movieid", "itemid", "item_id", "movie_id", "item"),
         "rating": ("rating",), "timestamp": ("timestamp", "time", "ts")}


def shard_digest(arrays):
    """The checksum of one shard from its arrays (dict column -> rows)."""
    outer = hashlib.sha256()
    for name, dt in COLUMNS:
        outer.update(hashlib.sha256(memoryview(le(arrays[name], dt)).cast("B")).digest())
    return outer.hexdigest()


class IdMap:
    """Original id (str) -> dense index, in order of first appearance."""

    def __init__(self):
        self.index, self.ids = {}, []

    def __call__(self, key):
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.ids)
            self.ids.append(key)
        return i


def parse(path, skip_bad=False):
    """Read every rating: (arrays dict, user IdMap, item IdMap, bad lines skipped)."""
    users, items = IdMap(), IdMap()
    cols = {n: [] for n in ("user", "item", "rating", "timestamp")}
    skipped = 0
    order = None  # field positions of user, item, rating, timestamp
    sep = None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            if sep is None:
                sep = "::" if "::" in line else ","
            fields = [x.strip() for x in line.split(sep)]
            if order is None:
                order = (0, 1, 2, 3)
                lowered = [x.lower() for x in fields]
                if any(x in NAMES["rating"] for x in lowered):  # a header line
                    try:
                        order = tuple(next(i for i, x in enumerate(lowered) if x in NAMES[c])
                                      for c in ("user", "item", "rating", "timestamp"))
                    except StopIteration:
                        raise DataError(f"{path}:{lineno}: the header names no {_missing(lowered)} column "
                                        f"(expected userId,movieId,rating,timestamp)") from None
                    continue
            why = _bad(fields, order)
            if why is None:
                try:
                    rating, ts = float(fields[order[2]]), int(float(fields[order[3]]))
                except ValueError:
                    why = "rating and timestamp must be numbers"
                else:
                    if not np.isfinite(rating):
                        why = f"rating {fields[order[2]]} is not finite"
            if why is not None:
                if not skip_bad:
                    raise DataError(f"{path}:{lineno}: {why} (--skip-bad skips such lines)")
                skipped += 1
                continue
            cols["user"].append(users(fields[order[0]]))
            cols["item"].append(items(fields[order[1]]))
            cols["rating"].append(rating)
            cols["timestamp"].append(ts)
    if not cols["user"]:
        raise DataError(f"{path}: no ratings" + (f" ({skipped} bad lines skipped)" if skipped else ""))
    arrays = {"user": np.asarray(cols["user"], np.int64), "item": np.asarray(cols["item"], np.int64),
              "rating": np.asarray(cols["rating"], np.float32), "timestamp": np.asarray(cols["timestamp"], np.int64)}
    arrays["row_index"] = np.arange(len(arrays["user"]), dtype=np.int64)
    return arrays, users, items, skipped


def _missing(lowered):
    return next(c for c in ("user", "item", "rating", "timestamp") if not any(x in NAMES[c] for x in lowered))


def _bad(fields, order):
    if len(fields) < 4 or max(order) >= len(fields):
        return f"{len(fields)} fields; a rating line has user, item, rating, timestamp"
    if not fields[order[0]] or not fields[order[1]]:
        return "empty user or item id"
    return None


def assign(arrays, how, val_fraction, test_fraction, seed):
    """Split index (0 train, 1 val, 2 test) of every rating."""
    n = len(arrays["user"])
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    if how == "time":
        ranked = np.argsort(arrays["timestamp"], kind="stable")  # oldest first, ties in input order
    else:
        ranked = np.random.Generator(np.random.PCG64([seed, 0x726174])).permutation(n)
    where = np.zeros(n, np.int8)
    where[ranked[n - n_test:]] = 2
    where[ranked[n - n_test - n_val:n - n_test]] = 1
    return where


def prepare_ratings(in_path, out_path, opts, split_by="random", skip_bad=False):
    """Prepare a ratings file (see the module's doc); returns rows per split, skipped lines, counts."""
    in_path = os.fspath(in_path)
    if not os.path.exists(in_path):
        raise DataError(f"{in_path}: no such file")
    if os.path.getsize(in_path) == 0:
        raise DataError(f"{in_path}: empty input (no ratings)")
    arrays, users, items, skipped = parse(in_path, skip_bad)
    where = assign(arrays, split_by, opts.val_fraction, opts.test_fraction, opts.seed)
    shuffle = np.random.Generator(np.random.PCG64([opts.seed, 0x73687566])).permutation(len(where))
    rows = {}
    with atomic_path(out_path) as tmp:
        with create(tmp, FORMAT, track_order=False) as f:
            a = f.attrs
            a["mpirt_format"], a["schema_version"], a["feature_kind"] = FORMAT, SCHEMA_VERSION, RATINGS
            a["n_users"], a["n_items"] = len(users.ids), len(items.ids)
            a["n_features"], a["n_classes"] = len(users.ids) + len(items.ids), 0
            a["split_by"], a["source"] = split_by, os.path.basename(in_path)
            a["rating_min"], a["rating_max"] = float(arrays["rating"].min()), float(arrays["rating"].max())
            strings = h5py.string_dtype()
            f.create_dataset("class_names", data=np.array([], dtype=strings), track_times=False)
            f.create_dataset("user_ids", data=np.array(users.ids, dtype=strings), track_times=False)
            f.create_dataset("item_ids", data=np.array(items.ids, dtype=strings), track_times=False)
            for s, name in enumerate(SPLITS):
                sel = shuffle[where[shuffle] == s]
                rows[name] = len(sel)
                _write_split(f.create_group(name), {k: v[sel] for k, v in arrays.items()}, opts, len(sel))
            sign_dataset(f)
    return {"rows": rows, "skipped": skipped, "users": len(users.ids), "items": len(items.ids)}


def _write_split(g, arrays, opts, n):
    shard_rows = opts.shard_rows or (max(1, -(-n // opts.shards)) if opts.shards else 65536)
    shard_rows, chunk = plan_chunks(min(max(shard_rows, 1), max(n, 1)), 28)
    shards = plan_shards(n, shard_rows)
    for name, dt in COLUMNS:
        g.create_dataset(name, data=le(arrays[name], dt), maxshape=(None,), chunks=(chunk,), track_times=False)
    g.create_dataset("shards", data=shards.astype("<i8").reshape(-1, 2), track_times=False)
    g.create_dataset("shard_sha256", data=np.array(
        [shard_digest({k: v[a:b] for k, v in arrays.items()}) for a, b in shards], dtype="S64").reshape(-1),
        track_times=False)
    g.attrs["n_rows"], g.attrs["chunk_rows"], g.attrs["shard_rows"] = n, chunk, shard_rows


class RatingsBatch:
    """Rows of a ratings split: ``user``, ``item``, ``rating``, ``timestamp``, ``row_index``."""

    def __init__(self, **arrays):
        self.arrays = arrays
        for k, v in arrays.items():
            setattr(self, k, v)

    def __len__(self):
        return len(self.row_index)

    def take(self, rows):
        return RatingsBatch(**{k: v[rows] for k, v in self.arrays.items()})


class RatingsSplit:
    """One split of a ratings data set (the reader's :class:`~mpirt.data.reader.Split` for this kind)."""

    def __init__(self, dataset, name):
        from mpirt.data.integrity import check_extents, check_schema, check_shard_table

        self.dataset, self.name = dataset, name
        self.group = g = dataset.file[name]
        where = f"{dataset.path}: {name}"
        check_schema(where, g)
        self.n_rows = int(g.attrs["n_rows"])
        self.chunk_rows = max(int(g.attrs["chunk_rows"]), 1)
        self.shards = g["shards"][()].reshape(-1, 2).astype(np.int64)
        for col, _ in COLUMNS:
            if g[col].shape != (self.n_rows,):
                raise DataError(f"{where}: '{col}' has {g[col].shape[0]} rows, n_rows says {self.n_rows}")
        check_extents(where, g, [c for c, _ in COLUMNS] + ["shards", "shard_sha256"])
        check_shard_table(where, self)
        self.checked = set()

    stored_digest = Split.stored_digest  # the same table of checksums as every kind's

    def read(self, i, j):
        return RatingsBatch(**{c: self.group[c][int(i):int(j)] for c, _ in COLUMNS})

    def read_shard(self, k):
        a, b = (int(x) for x in self.shards[k])
        batch = self.read(a, b)
        if k not in self.checked:
            self.check(k, batch)
            self.checked.add(k)
        return batch

    def check(self, k, batch):
        """Indices in range, finite ratings, and the stored checksum: one line naming what failed."""
        ds, where = self.dataset, f"{self.dataset.path}: {self.name} shard {k}"
        for col, n in (("user", ds.n_users), ("item", ds.n_items)):
            v = batch.arrays[col]
            if len(v) and (v.min() < 0 or v.max() >= n):
                raise DataError(f"{where}: {col} index {int(v.max() if v.max() >= n else v.min())} outside 0..{n - 1}")
        if not np.isfinite(batch.rating).all():
            raise DataError(f"{where}: a rating is NaN or inf")
        if shard_digest(batch.arrays) != self.stored_digest(k):
            raise DataError(f"{where}: checksum mismatch (file corrupted or edited; 'mpirt inspect' tells more)")

    def all(self):
        """Every row, each shard checked."""
        parts = [self.read_shard(k) for k in range(len(self.shards))]
        if not parts:
            return self.read(0, 0)
        return RatingsBatch(**{c: np.concatenate([p.arrays[c] for p in parts]) for c, _ in COLUMNS})


def verify_ratings(path, ds):
    """``mpirt inspect`` of a ratings data set: every shard checked; the summary."""
    summary = {"path": path, "feature_kind": RATINGS, "n_features": ds.n_features, "feature_shape": None,
               "classes": [], "users": ds.n_users, "items": ds.n_items,
               "split_by": str(ds.attrs.get("split_by", "")), "splits": {}}
    for name in SPLITS:
        sp = ds.split(name)
        ratings = []
        for k in range(len(sp.shards)):
            ratings.append(sp.read_shard(k).rating)
        r = np.concatenate(ratings) if ratings else np.zeros(0, np.float32)
        summary["splits"][name] = {"rows": sp.n_rows, "shards": int(len(sp.shards)), "chunk_rows": sp.chunk_rows,
                                   "per_class": [], "mean_rating": float(r.mean()) if len(r) else None}
    return summary
