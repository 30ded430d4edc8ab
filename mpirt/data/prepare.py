"""``mpirt prepare text`` / ``synth-text``: JSONL (or generated documents) into a hashed-token data set.

Streaming: blocks of lines go through a pool of worker processes (parse, clean HTML,
tokenise, hash; see :mod:`mpirt.data.textpipe`), come back in input order, are
assigned to splits by the streaming stratifier and appended to the writer. Memory is
bounded by the blocks in flight and one chunk per split, whatever the input size.
The output is written under a temporary name and renamed into place when complete.
"""

import math
import os

import numpy as np

from mpirt.atomic import atomic_path
from mpirt.data.dense import prepare_dense, prepare_digits, prepare_npz  # noqa: F401 (one home for prepare_*)
from mpirt.data.format import DEFAULT_SHARD_ROWS, SPLITS, TOKENS
from mpirt.data.split import Stratifier
from mpirt.data.textpipe import (SYNTH_BLOCK_ROWS, TextParams, default_workers, file_blocks, ordered_map,
                                 process_file_block, process_synth_block)
from mpirt.errors import DataError, UsageError


class Options:
    """What every prepare command shares, validated once.

    Args:
        shards: shards per split (at most; the last may be larger), or None.
        shard_rows: rows per shard (default 4096), or None. Not both.
        val_fraction, test_fraction: stratified shares of val and test.
        seed: seeds the split (and, for synth-text, the documents).
    """

    def __init__(self, shards=None, shard_rows=None, val_fraction=0.1, test_fraction=0.1, seed=0):
        if shards is not None and shard_rows is not None:
            raise UsageError("give --shards or --shard-rows, not both")
        if (shards is not None and shards < 1) or (shard_rows is not None and shard_rows < 1):
            raise UsageError("--shards and --shard-rows must be >= 1")
        for name, f in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
            if not (math.isfinite(f) and 0 <= f < 1):
                raise UsageError(f"{name} must be in [0, 1), not {f}")
        if val_fraction + test_fraction >= 1:
            raise UsageError("--val-fraction and --test-fraction must add up to less than 1 and leave rows "
                             "for training")
        self.shards, self.shard_rows = shards, shard_rows
        self.val_fraction, self.test_fraction, self.seed = float(val_fraction), float(test_fraction), int(seed)
        self.fractions = (1.0 - self.val_fraction - self.test_fraction, self.val_fraction, self.test_fraction)

    def stratifier(self):
        return Stratifier(self.val_fraction, self.test_fraction, self.seed)

    def plan(self, split_rows, exact=False):
        """Rows per shard and most shards per split, from the (estimated) rows of each split.

        Args:
            split_rows: dict split -> rows expected.
            exact: the counts are exact; a split smaller than a shard then gets chunks of its own
                size, not a mostly empty one (a dense chunk can be megabytes).

        Returns:
            (shard_rows, max_shards): dicts split -> int, and split -> int or None.
        """
        if self.shards is None:
            rows = self.shard_rows or DEFAULT_SHARD_ROWS
            return {s: min(rows, max(int(split_rows[s]), 1)) if exact else rows for s in SPLITS}, None
        return ({s: max(1, -(-int(split_rows[s]) // self.shards)) for s in SPLITS},
                {s: self.shards for s in SPLITS})

    def estimate(self, n_rows):
        """Expected rows per split of ``n_rows`` input rows."""
        return {s: round(n_rows * f) for s, f in zip(SPLITS, self.fractions)}


class ClassTable:
    """Labels to class ids while streaming; ids are provisional until :meth:`final`.

    Rows get ids in order of first appearance (all that is known mid-stream); at the end the
    class names are sorted (numerically if every label was a JSON integer, else as strings)
    and :meth:`final` gives the renumbering, so the same label set always gets the same ids
    whatever the order of the input.
    """

    def __init__(self):
        self.ids, self.names, self.all_int, self.is_text = {}, [], True, []

    def encode(self, labels):
        ids, names = self.ids, self.names
        out = np.empty(len(labels), dtype=np.int64)
        for i, lab in enumerate(labels):
            key = lab if isinstance(lab, str) else str(lab)
            c = ids.get(key)
            if c is None:
                c = ids[key] = len(names)
                names.append(key)
                self.is_text.append(isinstance(lab, str))
                self.all_int = self.all_int and not isinstance(lab, str)
            elif self.is_text[c] != isinstance(lab, str):  # "1" and 1 must not silently become one class
                raise DataError(f"the text label \"{key}\" and the number {key} would be one class; "
                                f"give labels of one type")
            out[i] = c
        return out

    def final(self):
        """(sorted class names, remap array: provisional id -> final id)."""
        order = sorted(range(len(self.names)), key=(lambda c: int(self.names[c])) if self.all_int
                       else (lambda c: self.names[c]))
        remap = np.empty(len(order), dtype=np.int64)
        remap[order] = np.arange(len(order))
        return [self.names[c] for c in order], remap


def _count_lines(path):
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 22), b""))


def prepare_text(in_path, out_path, opts, *, text_field="text", label_field="label", n_features=1 << 20,
                 hash_seed=0, bigrams=False, skip_bad=False, workers=None, synth=None, jsonl_out=None):
    """Prepare a JSONL file, or generated documents, into a hashed-token data set at ``out_path``.

    Args:
        in_path: the JSONL file (one object a line), or a name for messages when ``synth`` is given.
        out_path: the .h5 to write (replaced atomically if it exists).
        opts: :class:`Options`.
        text_field, label_field: JSON keys of the document and its label (string or integer).
        n_features: hash buckets (a power of two); hash_seed, bigrams: see :class:`~mpirt.data.tokens.Hasher`.
        skip_bad: skip malformed lines and count them instead of failing on the first.
        workers: tokenising processes (default: the usable cores, at most 8; 1 = no processes).
        synth: (rows, classes, seed) to generate documents (:mod:`mpirt.data.synth`) instead of reading.
        jsonl_out: with ``synth``, also write the generated JSONL there.

    Returns:
        dict: rows per split, skipped lines, class names.

    Raises:
        DataError: missing/empty input, a malformed line (its number), no usable rows.
    """
    from mpirt.data.tokens import check_features

    try:
        check_features(n_features)
    except ValueError as exc:
        raise UsageError(f"--features: {exc}") from None
    params = TextParams(text_field, label_field, int(n_features), int(hash_seed), bool(bigrams))
    workers = workers or default_workers()
    if synth is None:
        in_path = os.fspath(in_path)
        if not os.path.exists(in_path):
            raise DataError(f"{in_path}: no such file")
        if not os.path.isfile(in_path):
            raise DataError(f"{in_path}: not a regular file")
        if os.path.getsize(in_path) == 0:
            raise DataError(f"{in_path}: empty input (no rows)")
        n_estimate = _count_lines(in_path) + 1 if opts.shards else 0  # a pass only --shards needs
        calls = ((process_file_block, (in_path, off, length, params)) for off, length in file_blocks(in_path))
    else:
        rows, classes, gen_seed = synth
        n_estimate = rows
        calls = ((process_synth_block, (classes, gen_seed, s, min(SYNTH_BLOCK_ROWS, rows - s), params,
                                        jsonl_out is not None)) for s in range(0, rows, SYNTH_BLOCK_ROWS))
    shard_rows, max_shards = opts.plan(opts.estimate(n_estimate))
    attrs = {"hash_seed": int(hash_seed), "bigrams": bool(bigrams), "lowercase": True,
             "hash": "blake2b-64 keyed, low bits", "text_field": text_field, "label_field": label_field,
             "source": os.path.basename(str(in_path))}
    if jsonl_out is not None:
        with atomic_path(jsonl_out) as raw_tmp, open(raw_tmp, "wb") as raw:
            return _run(in_path, out_path, opts, params, calls, workers, skip_bad, shard_rows, max_shards,
                        attrs, raw)
    return _run(in_path, out_path, opts, params, calls, workers, skip_bad, shard_rows, max_shards, attrs, None)


def _run(in_path, out_path, opts, params, calls, workers, skip_bad, shard_rows, max_shards, attrs, raw):
    from mpirt.data.writer import DatasetWriter

    table, strat = ClassTable(), opts.stratifier()
    skipped, line_base = 0, 0
    with atomic_path(out_path) as tmp:
        writer = DatasetWriter(tmp, TOKENS, params.n_features, shard_rows, attrs=attrs, max_shards=max_shards)
        results = ordered_map(calls, workers)
        try:
            for res in results:
                if raw is not None:
                    raw.write(res.raw)
                if res.bad:
                    if not skip_bad:
                        line, why = res.bad[0]
                        raise DataError(f"{in_path}:{line_base + line + 1}: {why} (--skip-bad skips such lines)")
                    skipped += len(res.bad)
                if len(res.rows):
                    _append(writer, strat, table, res, line_base)
                line_base += res.lines
            if not table.names:
                raise DataError(f"{in_path}: no rows" + (f" ({skipped} bad lines skipped)" if skipped else ""))
            names, remap = table.final()
            writer.finish(names, remap)
        except BaseException:
            results.close()  # stop the workers now, not whenever the traceback is freed
            writer.abort()
            raise
    return {"rows": writer.rows(), "skipped": skipped, "classes": names}


def _append(writer, strat, table, res, line_base):
    y = table.encode(res.labels)
    where = strat.assign(y, keys=table.names)
    row_index = res.rows + line_base
    token_split = np.repeat(where, res.lengths)
    for s, name in enumerate(SPLITS):
        sel = np.flatnonzero(where == s)
        if sel.size == len(y):
            writer.append(name, y, row_index, ids=res.ids, lengths=res.lengths)
        elif sel.size:
            writer.append(name, y[sel], row_index[sel], ids=res.ids[token_split == s], lengths=res.lengths[sel])
