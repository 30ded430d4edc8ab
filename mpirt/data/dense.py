"""``mpirt prepare npz`` / ``digits``: dense features into the data-set format, streaming.

An ``.npz`` is read a block of rows at a time (:mod:`mpirt.data.npzstream`): passes
over ``y`` find the classes and the exact split sizes (the stratifier is deterministic,
so a dry run tells), then ``X`` and ``y`` stream together into the writer. Features are stored as float32; a
row with NaN or inf (also after the cast: a float64 beyond float32's range) is refused.
"""

import os

import numpy as np

from mpirt.atomic import atomic_path
from mpirt.data.format import DENSE, SPLITS
from mpirt.errors import DataError, UsageError

BLOCK_BYTES = 16 << 20


def write_dense(out_path, opts, feature_shape, class_names, blocks, split_rows, source):
    """Write dense rows from ``blocks`` of (X, y) with final class ids, rows numbered from 0.

    Args:
        out_path: the .h5 to write (atomically).
        opts: :class:`mpirt.data.prepare.Options`.
        feature_shape: shape of one row.
        class_names: list of str; ``y`` values index it.
        blocks: iterable of (X block, int64 labels) in input order.
        split_rows: exact rows per split (plans the shards).
        source: the input's name, for messages and the ``source`` attribute.

    Returns:
        dict: rows per split, skipped (0), class names.
    """
    from mpirt.data.writer import DatasetWriter

    shard_rows, max_shards = opts.plan(split_rows, exact=True)
    strat = opts.stratifier()
    with atomic_path(out_path) as tmp:
        writer = DatasetWriter(tmp, DENSE, int(np.prod(feature_shape)), shard_rows, feature_shape=feature_shape,
                               attrs={"source": os.path.basename(str(source))}, max_shards=max_shards)
        try:
            start = 0
            for X, y in blocks:
                with np.errstate(over="ignore", invalid="ignore"):  # reported below, as one line
                    Xf = np.asarray(X).astype(np.float32)
                finite = np.isfinite(Xf.reshape(len(Xf), -1)).all(axis=1)
                if not finite.all():
                    bad = int(np.flatnonzero(~finite)[0])
                    what = "NaN or inf" if not np.isfinite(X[bad]).all() else "a value beyond float32 range"
                    raise DataError(f"{source}: {what} in X at row {start + bad}")
                where = strat.assign(y, keys=class_names)
                rows = np.arange(start, start + len(y), dtype=np.int64)
                for s, name in enumerate(SPLITS):
                    sel = np.flatnonzero(where == s)
                    if sel.size:
                        writer.append(name, y[sel], rows[sel], X=Xf[sel])
                start += len(y)
            writer.finish(class_names)
        except BaseException:
            writer.abort()
            raise
    return {"rows": writer.rows(), "skipped": 0, "classes": list(class_names)}


def _split_rows(opts, labels_blocks, class_names):
    """Exact rows per split: the stratifier is deterministic, so a dry run over the labels tells."""
    strat, counts = opts.stratifier(), np.zeros(3, dtype=np.int64)
    for y in labels_blocks:
        counts += np.bincount(strat.assign(y, keys=class_names), minlength=3)
    return dict(zip(SPLITS, counts.tolist()))


def _check_X(source, shape, dtype):
    if len(shape) < 2:
        raise DataError(f"{source}: X has shape {shape}; need (rows, features...)")
    if shape[0] == 0:
        raise DataError(f"{source}: empty input (X has 0 rows)")
    if dtype.kind not in "biuf":
        raise DataError(f"{source}: X must be numeric, not {dtype}")
    if int(np.prod(shape[1:])) == 0:
        raise DataError(f"{source}: X rows have no features (shape {shape})")


def _label_kind(source, shape, dtype, n):
    if len(shape) != 1 and not (len(shape) == 2 and shape[1] == 1):
        raise DataError(f"{source}: y has shape {shape}; need ({n},)")
    if shape[0] != n:
        raise DataError(f"{source}: X has {n} rows but y has {shape[0]}")
    if dtype.kind in "biu":
        return "int"
    if dtype.kind == "f":
        return "float"
    if dtype.kind in "US":
        return "str"
    raise DataError(f"{source}: labels must be integers or strings, not {dtype}")


def _as_str(y):
    return np.char.decode(y, "utf-8") if y.dtype.kind == "S" else y.astype(str)


def prepare_npz(in_path, out_path, opts):
    """Prepare ``IN.npz`` (arrays ``X`` (n, ...) and ``y`` (n,) of ints or strings) into a dense data set.

    Integer labels name classes ``"0"`` .. ``str(max)``; string labels are sorted into class names.
    """
    from mpirt.data.npzstream import NpzArrays

    source = os.fspath(in_path)
    if os.path.isdir(source):
        raise DataError(f"{source}: is a directory, not an .npz file")
    with NpzArrays(source) as z:
        xshape, xdtype, _ = z.header("X")
        _check_X(source, xshape, xdtype)
        n = xshape[0]
        yshape, ydtype, _ = z.header("y")
        kind = _label_kind(source, yshape, ydtype, n)
        row_bytes = int(np.prod(xshape[1:])) * xdtype.itemsize
        step_bytes = max(1, BLOCK_BYTES // row_bytes) * ydtype.itemsize  # y blocks as long as X blocks

        def labels():
            for y in z.blocks("y", step_bytes):
                yield y.reshape(-1)

        if kind == "str":
            names = sorted(set().union(*(set(_as_str(y).tolist()) for y in labels())))
            table = np.array(names)

            def encode(y):
                return np.searchsorted(table, _as_str(y)).astype(np.int64)
        else:
            lo, hi = None, None
            for y in labels():
                if kind == "float" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
                    raise DataError(f"{source}: float labels must be whole numbers (class ids)")
                lo = y.min() if lo is None else min(lo, y.min())
                hi = y.max() if hi is None else max(hi, y.max())
            if lo < 0:
                raise DataError(f"{source}: negative label {int(lo)} (class ids start at 0)")
            if hi >= 1 << 20:
                raise DataError(f"{source}: label {int(hi)} is too large for a class id")
            names = [str(c) for c in range(int(hi) + 1)]

            def encode(y):
                return y.astype(np.int64)

        split_rows = _split_rows(opts, (encode(y) for y in labels()), names)
        blocks = ((X, encode(y)) for X, y in zip(z.blocks("X", BLOCK_BYTES), labels()))
        return write_dense(out_path, opts, xshape[1:], names, blocks, split_rows, source)


def prepare_dense(X, y, out_path, opts, class_names=None, source="arrays"):
    """Write in-memory dense features ``X`` (n, ...) and labels ``y`` (ints, or strings) as a data set."""
    X, y = np.asarray(X), np.asarray(y)
    _check_X(source, X.shape, X.dtype)
    kind = _label_kind(source, y.shape, y.dtype, len(X))
    y = y.reshape(-1)
    if class_names is not None:
        labels = y.astype(np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DataError(f"{source}: labels outside 0..{len(class_names) - 1}")
    elif kind == "str":
        class_names, labels = np.unique(_as_str(y), return_inverse=True)
        class_names = class_names.tolist()
    else:
        if kind == "float" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise DataError(f"{source}: float labels must be whole numbers (class ids)")
        if y.min() < 0:
            raise DataError(f"{source}: negative label {int(y.min())} (class ids start at 0)")
        labels = y.astype(np.int64)
        class_names = [str(c) for c in range(int(labels.max()) + 1)]
    labels = labels.reshape(-1).astype(np.int64)
    split_rows = _split_rows(opts, [labels], class_names)
    step = max(1, BLOCK_BYTES // max(X[0].nbytes, 1))
    blocks = ((X[a:a + step], labels[a:a + step]) for a in range(0, len(X), step))
    return write_dense(out_path, opts, X.shape[1:], list(class_names), blocks, split_rows, source)


def prepare_digits(out_path, opts):
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), scaled to [0, 1], shape (8, 8)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("prepare digits needs scikit-learn: pip install 'mpirt[digits]'") from None
    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)
    return prepare_dense(X, d.target, out_path, opts, class_names=[str(i) for i in range(10)],
                         source="sklearn load_digits")
