"""The worker side of ``prepare text``: blocks of JSONL lines to hashed token ids, in a process pool.

The main process only cuts the input into blocks of about 4 MiB at line boundaries
(it seeks; it does not read the data) and hands out (offset, length) pairs; each
worker reads its block, parses, cleans, tokenises and hashes it, and returns compact
arrays. Results are taken in block order, so the output is the same for any number
of workers. Line numbers are counted per block by the worker and made absolute by
the main process in order, which is what lets the main process skip reading.
"""

import concurrent.futures as cf
import ctypes
import json
import multiprocessing as mp
import os
import signal
from collections import deque
from dataclasses import dataclass

import numpy as np

from mpirt.errors import MpirtError

BLOCK_BYTES = 4 << 20
SYNTH_BLOCK_ROWS = 4096
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class TextParams:
    """What every block needs to turn lines into rows (picklable, small)."""

    text_field: str = "text"
    label_field: str = "label"
    n_features: int = 1 << 20
    hash_seed: int = 0
    bigrams: bool = False


@dataclass
class BlockResult:
    """One block's rows. ``lines`` and line numbers are relative to the block (0-based)."""

    lines: int  # lines in the block (blank ones included)
    rows: np.ndarray  # int64 block-relative line number of each row
    labels: list  # each row's label (str or int, as in the JSON)
    ids: np.ndarray  # uint32 token ids of all rows, concatenated
    lengths: np.ndarray  # int64 tokens per row
    bad: list  # (block-relative line, reason) of malformed lines
    raw: bytes = None  # the block's JSONL text (synthetic input, when asked for)


def file_blocks(path, block_bytes=BLOCK_BYTES):
    """Yield (offset, length) of consecutive blocks of ``path`` that end at a newline (or EOF)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = 0
        while start < size:
            end = min(start + block_bytes, size)
            if end < size:  # extend to the end of the line the cut fell into
                f.seek(end)
                while True:
                    piece = f.read(1 << 16)
                    if not piece:
                        end = size
                        break
                    nl = piece.find(b"\n")
                    if nl >= 0:
                        end += nl + 1
                        break
                    end += len(piece)
            yield start, end - start
            start = end


# -- worker -------------------------------------------------------------------
_state = {}  # per process: the Hasher and the synthetic generator, built once


def _hasher(params):
    from mpirt.data.tokens import Hasher

    key = ("hasher", params.n_features, params.hash_seed, params.bigrams)
    if key not in _state:
        _state[key] = Hasher(params.n_features, params.hash_seed, params.bigrams)
    return _state[key]


def read_block(path, offset, length):
    """The lines of one block of a file (``offset`` 0 drops a UTF-8 byte-order mark)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if offset == 0 and data.startswith(_BOM):
        data = data[len(_BOM):]
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the text after the last newline
    return lines


def process_file_block(path, offset, length, params):
    return process_lines(read_block(path, offset, length), params)


def process_synth_block(classes, seed, start, count, params, want_raw):
    from mpirt.data.synth import SynthText

    key = ("synth", classes, seed)
    if key not in _state:
        _state[key] = SynthText(classes=classes, seed=seed)
    lines = _state[key].jsonl_lines(start, count)
    result = process_lines(lines, params)
    if want_raw:
        result.raw = b"\n".join(lines) + b"\n"
    return result


def process_lines(lines, params):
    """Parse, clean, tokenise and hash JSONL lines.

    Returns:
        BlockResult.
    """
    from mpirt.data.html import clean_html

    tf, lf = params.text_field, params.label_field
    rows, labels, texts, bad = [], [], [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue  # blank lines are not rows (their numbers still count)
        try:
            obj = json.loads(line)
        except ValueError as exc:  # UnicodeDecodeError included
            bad.append((i, "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else "not valid JSON"))
            continue
        if not isinstance(obj, dict):
            bad.append((i, "not a JSON object"))
            continue
        text, label = obj.get(tf), obj.get(lf)
        if text is None or label is None:
            bad.append((i, f"no '{tf if text is None else lf}' field"))
            continue
        if not isinstance(text, str):
            bad.append((i, f"'{tf}' is not a string"))
            continue
        if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
            bad.append((i, f"'{lf}' must be a non-empty string or an integer"))
            continue
        if not _unicode(text) or (isinstance(label, str) and not _unicode(label)):
            bad.append((i, "a lone surrogate escape (\\ud800-\\udfff) is not valid Unicode"))
            continue
        rows.append(i)
        labels.append(label)
        texts.append(clean_html(text))
    ids, lengths = _hasher(params).ids_many(texts)
    return BlockResult(len(lines), np.asarray(rows, dtype=np.int64), labels, ids, lengths, bad)


def _unicode(s):
    """False for a string JSON decoded from a lone surrogate escape such as ``"\\ud800"``: valid
    JSON, but no UTF-8 exists for it, so hashing or storing it would fail far from the line."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- pool ---------------------------------------------------------------------
def default_workers():
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _worker_init(parent):
    """Make a worker die with its parent, whatever kills the parent (SIGKILL included)."""
    # Ctrl-C reaches the whole process group: only the parent acts on it (and stops us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # fork copied the parent's SIGTERM handler, which raises to clean up the parent's files.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent kills its workers when it can
        pass
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)


def ordered_map(calls, workers):
    """Run ``fn(*args)`` for each (fn, args) of ``calls``; yield the results in order.

    At most ``2 * workers`` calls are in flight, so memory stays flat however many there
    are. ``workers <= 1`` runs them inline (no processes at all).

    Raises:
        MpirtError: a worker process died (killed, out of memory).
    """
    if workers <= 1:
        for fn, args in calls:
            yield fn(*args)
        return
    # fork: workers inherit the imported modules (no re-import per worker) and start at once.
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"),
                                  initializer=_worker_init, initargs=(os.getpid(),))
    pending = deque()
    try:
        for fn, args in calls:
            pending.append(pool.submit(fn, *args))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except cf.process.BrokenProcessPool:
        raise MpirtError("a tokenising worker process died (killed, or out of memory?)") from None
    finally:
        # An error, a signal, or the consumer stopped early: calls not started are cancelled, and
        # the at most two per worker already handed out run to their end (a second or so). Workers
        # are not killed: one killed while it writes its result leaves the executor's manager thread
        # reading the rest of that message forever (this process holds the pipe's write end too, so
        # no end-of-file comes), and shutdown() then hung (seen: prepare on a full disk, ~1 in 20).
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
