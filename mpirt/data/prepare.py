"""``mpirt prepare``: text (JSONL), npz and digits into the data-set format, streaming.

Text goes through blocks of lines: parse, clean HTML, tokenise, hash (in a pool
of worker processes, results taken in input order so the output is the same
for any number of workers), then stratified into splits and appended.
"""

import json
import multiprocessing as mp
import os
from collections import deque

import numpy as np

from mpirt.atomic import atomic_path
from mpirt.data.format import DENSE, SPLITS, TOKENS
from mpirt.data.split import Stratifier
from mpirt.errors import DataError, UsageError

BLOCK = 4096


class Options:
    """What every prepare command shares (validated once)."""

    def __init__(self, shards=None, shard_rows=None, val_fraction=0.1, test_fraction=0.1, seed=0):
        if shards is not None and shard_rows is not None:
            raise UsageError("give --shards or --shard-rows, not both")
        if (shards is not None and shards < 1) or (shard_rows is not None and shard_rows < 1):
            raise UsageError("--shards and --shard-rows must be >= 1")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise UsageError("--val-fraction and --test-fraction must be in [0, 1) and leave rows for training")
        self.shards, self.shard_rows = shards, shard_rows
        self.fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed

    def shard_rows_per_split(self, n_estimate):
        if self.shards is None:
            rows = self.shard_rows or 4096
            return {s: rows for s in SPLITS}
        return {s: max(1, -(-int(round(n_estimate * f)) // self.shards)) for s, f in zip(SPLITS, self.fractions)}


# -- text -------------------------------------------------------------------
_hasher = None


def _process_block(task):
    """Parse and hash one block of JSONL lines (runs in a worker process)."""
    global _hasher
    lines, first_line, text_field, label_field, n_features, seed, bigrams = task
    from mpirt.data.html import clean_html
    from mpirt.data.tokens import Hasher

    if _hasher is None or _hasher.key != int(seed).to_bytes(8, "little") or _hasher.bigrams != bigrams \
            or int(_hasher.mask) + 1 != n_features:
        _hasher = Hasher(n_features, seed, bigrams)
    rows, labels, ids, lengths, bad = [], [], [], [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        lineno = first_line + i
        try:
            obj = json.loads(line)
        except ValueError:
            bad.append((lineno, "not valid JSON"))
            continue
        if not isinstance(obj, dict) or text_field not in obj or label_field not in obj:
            missing = text_field if not isinstance(obj, dict) or text_field not in obj else label_field
            bad.append((lineno, f"no '{missing}' field"))
            continue
        text, label = obj[text_field], obj[label_field]
        if not isinstance(text, str) or not isinstance(label, (str, int)) or isinstance(label, bool):
            bad.append((lineno, f"'{text_field}' must be a string and '{label_field}' a string or integer"))
            continue
        tok = _hasher.ids(clean_html(text))
        rows.append(lineno - 1)
        labels.append(str(label))
        ids.append(tok)
        lengths.append(len(tok))
    flat = np.concatenate(ids) if ids else np.zeros(0, np.uint32)
    return np.asarray(rows, np.int64), labels, flat, np.asarray(lengths, np.int64), bad


def _line_blocks(path):
    with open(path, "rb") as f:
        block, first = [], 1
        for lineno, line in enumerate(f, 1):
            if not block:
                first = lineno
            block.append(line)
            if len(block) == BLOCK:
                yield first, block
                block = []
        if block:
            yield first, block


def _count_lines(path):
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 22), b""))


def _ordered_map(func, tasks, workers):
    """``map`` over a pool with a bounded number of blocks in flight (memory stays flat)."""
    if workers <= 1:
        for t in tasks:
            yield func(t)
        return
    ctx = mp.get_context("fork")
    with ctx.Pool(workers) as pool:
        pending = deque()
        for t in tasks:
            pending.append(pool.apply_async(func, (t,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare_text(in_path, out_path, opts, *, text_field="text", label_field="label", n_features=1 << 20,
                 hash_seed=0, bigrams=False, skip_bad=False, workers=None, blocks=None, n_estimate=None):
    """Prepare a JSONL file (or ``blocks`` of JSONL lines) into a hashed-token data set.

    Returns:
        dict with rows per split, skipped lines and classes.
    """
    if blocks is None:
        if not os.path.isfile(in_path):
            raise DataError(f"{in_path}: no such file")
        n_estimate = _count_lines(in_path)
        if n_estimate == 0 and os.path.getsize(in_path) == 0:
            raise DataError(f"{in_path}: empty input (no rows)")
        blocks = _line_blocks(in_path)
    workers = workers or min(os.cpu_count() or 1, 4)
    tasks = ((lines, first, text_field, label_field, n_features, hash_seed, bigrams) for first, lines in blocks)
    classes, skipped = {}, 0
    strat = Stratifier(opts.val_fraction, opts.test_fraction, opts.seed)
    from mpirt.data.writer import DatasetWriter

    with atomic_path(out_path) as tmp:
        writer = DatasetWriter(tmp, TOKENS, n_features, opts.shard_rows_per_split(max(n_estimate or 1, 1)),
                               attrs={"hash_seed": hash_seed, "bigrams": bigrams, "lowercase": True,
                                      "source": os.path.basename(in_path or "")})
        try:
            for rows, labels, flat, lengths, bad in _ordered_map(_process_block, tasks, workers):
                if bad and not skip_bad:
                    lineno, why = bad[0]
                    raise DataError(f"{in_path}:{lineno}: {why} (use --skip-bad to skip such lines)")
                skipped += len(bad)
                y = np.array([classes.setdefault(lab, len(classes)) for lab in labels], dtype=np.int64)
                where = strat.assign(y)
                token_split = np.repeat(where, lengths)
                for s, name in enumerate(SPLITS):
                    sel = np.flatnonzero(where == s)
                    if sel.size:
                        writer.splits[name].append(y[sel], rows[sel], ids=flat[token_split == s],
                                                   lengths=lengths[sel])
            if not classes:
                raise DataError(f"{in_path}: no rows" + (f" ({skipped} bad lines skipped)" if skipped else ""))
            writer.finish(list(classes))
        except BaseException:
            writer.abort()
            raise
    return {"rows": {s: writer.splits[s].n for s in SPLITS}, "skipped": skipped, "classes": list(classes)}


# -- dense ------------------------------------------------------------------
def prepare_dense(X, y, out_path, opts, class_names=None, source=""):
    """Write dense features ``X`` (n, ...) and labels ``y`` (ints or strings)."""
    from mpirt.data.writer import DatasetWriter

    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim < 2 or len(X) == 0:
        raise DataError(f"{source}: empty input (X has shape {X.shape}; need (n >= 1, features...))")
    if len(y) != len(X):
        raise DataError(f"{source}: X has {len(X)} rows but y has {len(y)}")
    if not np.issubdtype(X.dtype, np.number):
        raise DataError(f"{source}: X must be numeric, not {X.dtype}")
    finite = np.isfinite(X.reshape(len(X), -1)).all(axis=1)
    if not finite.all():
        raise DataError(f"{source}: NaN or inf in X at row {int(np.flatnonzero(~finite)[0])}")
    if class_names is None:
        if np.issubdtype(y.dtype, np.integer):
            if y.min() < 0:
                raise DataError(f"{source}: negative label {int(y.min())}")
            class_names = [str(c) for c in range(int(y.max()) + 1)]
            labels = y.astype(np.int64)
        else:
            class_names, labels = np.unique(y.astype(str), return_inverse=True)
            class_names = list(class_names)
    else:
        labels = y.astype(np.int64)
    strat = Stratifier(opts.val_fraction, opts.test_fraction, opts.seed)
    where = strat.assign(labels)
    shape = X.shape[1:]
    with atomic_path(out_path) as tmp:
        writer = DatasetWriter(tmp, DENSE, int(np.prod(shape)), opts.shard_rows_per_split(len(X)),
                               feature_shape=shape, attrs={"source": source})
        try:
            rows = np.arange(len(X), dtype=np.int64)
            for start in range(0, len(X), 65536):
                sl = slice(start, start + 65536)
                for s, name in enumerate(SPLITS):
                    sel = np.flatnonzero(where[sl] == s) + start
                    if sel.size:
                        writer.splits[name].append(labels[sel], rows[sel], X=X[sel].astype(np.float32))
            writer.finish(class_names)
        except BaseException:
            writer.abort()
            raise
    return {"rows": {s: writer.splits[s].n for s in SPLITS}, "skipped": 0, "classes": list(class_names)}


def load_npz(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("X", "y") if k not in z.files]
            if missing:
                raise DataError(f"{path}: no array '{missing[0]}' (need X and y)")
            return z["X"], z["y"]
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0][:120]})") from None


def load_digits_images():
    """scikit-learn's bundled 8x8 digits (no download), scaled to [0, 1], shape (n, 8, 8)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("prepare digits needs scikit-learn: pip install 'mpirt[digits]'") from None
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64), [str(i) for i in range(10)]
