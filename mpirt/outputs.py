"""Where mpirt reads and writes, checked before any work starts.

A user's mistake with a path (an output that is one of the inputs, an unrelated file in the
way, a FIFO, a missing directory) must cost one line and nothing else, so every command runs
these checks first, on every rank alike (they read only the file system, so every rank decides
the same). Outputs carry a mark (``mpirt_output``, or for data sets their ``mpirt_format``), so
that a rerun may replace its own previous output but nothing else without ``--force``.

Also here: turning a full disk into one line (:func:`os_error_line`), and writing HDF5 so that a
full disk surfaces as an exception in the write call, never in a destructor (:func:`h5_writing`).
"""

import contextlib
import errno
import json
import os
import stat

from mpirt.errors import DataError, UsageError

MARK = "mpirt_output"
# kind -> what the user is told the file should have been
KINDS = {"dataset": "data set", "wordcount": "wordcount output", "predictions": "classify output",
         "jsonl": "JSONL file of generated documents"}
_DATASET_FORMAT = "mpirt.dataset"  # mpirt.data.format.FORMAT, without importing numpy for it


def _what(mode):
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def check_input(path, what="input"):
    """Refuse an input that is not a regular file (a FIFO would block the open forever).

    A missing file is left to the reader, whose message names it.

    Raises:
        DataError: ``path`` is a FIFO, socket, device or directory.
    """
    try:
        st = os.stat(path)  # stat never opens, so a FIFO cannot block it
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DataError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: is {_what(st.st_mode)}; give the {what} as a regular file")


def check_parent(path, flag=None):
    """Refuse an output whose directory does not exist: the one rule for every command."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{f'{flag} ' if flag else ''}{path}: directory {directory} does not exist "
                         f"(create it first)")


def check_output(path, kind, inputs=(), force=False, flag=None):
    """Check that writing ``path`` destroys nothing the user did not mean to replace.

    Args:
        path: the output file.
        kind: a key of :data:`KINDS`; an existing file is replaced only if it is an output of this kind.
        inputs: (label, path) pairs of what the command reads (or writes elsewhere): none may be
            ``path`` itself, by any name (hard links and symlinks included: same device and inode).
        force: replace an existing regular file of another kind.
        flag: how the output was given (``--out``), for messages; None for a positional one.

    Raises:
        UsageError: one line naming the path and what to do.
    """
    path = os.fspath(path)
    check_parent(path, flag)
    name = f"{flag} {path}" if flag else path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None  # nothing there (or a dangling symlink, which the rename replaces, not follows)
    for label, other in inputs:
        # by name too: two outputs not yet written (--jsonl and OUT.h5) have no inode to compare
        if other is not None and (os.path.realpath(path) == os.path.realpath(other) or _same(st, other)):
            raise UsageError(f"{name}: is the same file as {label} {other}; writing it would destroy it "
                             f"(give another output name)")
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{name}: is a directory; give a file name")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{name}: is {_what(st.st_mode)}; give a regular file name")
    if not force and not is_output(path, kind):
        raise UsageError(f"{name}: exists and is not a {KINDS[kind]} written by mpirt; "
                         f"give --force to replace it, or another name")


def _same(st, other):
    if st is None:
        return False
    try:
        o = os.stat(other)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (o.st_dev, o.st_ino)


def is_output(path, kind):
    """Whether the regular file ``path`` is a previous mpirt output of ``kind``."""
    if kind == "jsonl":
        return _is_generated_jsonl(path)
    import h5py

    from mpirt.secure.container import is_encrypted, read_trailer

    if is_encrypted(path):  # its trailer says what it is, no key needed
        try:
            content = read_trailer(path)[1].get("content")
        except (DataError, OSError):
            return False
        return content == (_DATASET_FORMAT if kind == "dataset" else kind)

    try:
        if not h5py.is_hdf5(path):
            return False
        with h5py.File(path, "r") as f:
            attrs = f.attrs
            if kind == "dataset":
                return _text(attrs.get("mpirt_format")) == _DATASET_FORMAT
            return _text(attrs.get(MARK)) == kind
    except (OSError, ValueError, KeyError):  # unreadable or not HDF5 after all: not ours
        return False


def mark(h5file, kind):
    """Mark an open HDF5 output as ``kind`` (see :func:`is_output`)."""
    h5file.attrs[MARK] = kind


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _is_generated_jsonl(path):
    # The generated documents are one {"text", "label"} object a line; a file that starts with one
    # is taken for a previous --jsonl output (JSONL has no room for a mark).
    with contextlib.suppress(OSError, ValueError), open(path, "rb") as f:
        first = f.readline(1 << 20)
        obj = json.loads(first) if first.strip() else None
        return isinstance(obj, dict) and set(obj) == {"text", "label"}
    return False


def check_output_dir(path, flag):
    """An output directory must be one, or be creatable in an existing directory, and be writable."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {path}: directory is not writable")
        return
    check_parent(path, flag)
    if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot create it (its directory is not writable)")


def check_train_paths(args):
    """``mpirt train``: every path checked before MPI starts, so a bad one never costs a training run."""
    check_input(args.data, "data set")
    for flag, value in (("--checkpoint-dir", args.checkpoint_dir), ("--report", args.report)):
        if value:
            check_output_dir(value, flag)
    inputs = [("--data", args.data)] + ([("--key-file", args.key_file)] if args.key_file else [])
    for flag, value in (("--audit", args.audit), ("--events", args.events)):
        if value:
            check_parent(value, flag)
            if os.path.isdir(value):
                raise UsageError(f"{flag} {value}: is a directory; give a file name")
            st = os.stat(value) if os.path.exists(value) else None
            for label, other in inputs:
                if os.path.realpath(value) == os.path.realpath(other) or _same(st, other):
                    raise UsageError(f"{flag} {value}: is the same file as {label} {other}; writing it would "
                                     f"destroy it (give another name)")


# -- a full disk ----------------------------------------------------------------
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def mount_point(path):
    """The mount point holding ``path`` (what a user recognises as the device that is full)."""
    p = os.path.realpath(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)) or ".")
    while not os.path.ismount(p):
        p = os.path.dirname(p)
    return p


def os_error_line(exc, target):
    """One line for an OSError met while writing ``target`` (the final name the user gave)."""
    if exc.errno in _NO_SPACE:
        return f"no space left on {mount_point(target)} writing {target}"
    if exc.errno == errno.EFBIG:
        return f"file too large writing {target} (the file size limit was reached)"
    reason = exc.strerror or str(exc).split(" (", 1)[0]  # h5py appends a long HDF5 trace in parentheses
    return f"{exc.filename or target}: {reason}"


@contextlib.contextmanager
def h5_writing(path, content=None, **kwargs):
    """Open a new HDF5 file at ``path`` (a temporary name) so that a failed write is an exception.

    HDF5's chunk cache defers writes to when a chunk is evicted, which happens in h5py
    destructors: a full disk then prints dozens of ignored tracebacks, the writer carries on,
    and closing the broken file at exit segfaulted (measured: exit 139). With the cache off,
    each chunk is written (whole, by mpirt's writers) in the call that writes it. On any error
    the file is emptied first, which frees the space its pending metadata needs, then closed.

    ``content`` (what the file is) names it in an encrypted file's trailer: the file is encrypted
    when the policy says so (:func:`mpirt.secure.h5.create`).
    """
    from mpirt.secure.h5 import create

    f = create(path, content or "mpirt output", rdcc_nbytes=0, **kwargs)
    try:
        yield f
        f.flush()  # a failure here still leaves the file open, so it can be discarded below
    except BaseException:
        discard_h5(f, path)
        raise
    f.close()


def discard_h5(f, path):
    """Close an HDF5 file that will be deleted, even when the disk is full."""
    with contextlib.suppress(OSError):
        os.truncate(path, 0)
    with contextlib.suppress(Exception):
        f.close()
