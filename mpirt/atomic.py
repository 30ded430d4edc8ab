"""Write-then-rename, so an output path never holds half a file.

Temporary names say who owns them: ``OUT.PID@HOST.XXXXXXXX.tmp``. A writer that was SIGKILLed
(or lost its machine) leaves its temporary behind; the next writer of the same output removes
those whose process is gone on this host, and never touches one a live process may still own.
"""

import contextlib
import os
import re
import socket
import tempfile


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp", before_rename=None):
    """Yield a temporary path beside ``path``; on success fsync and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched, so a
    killed or failed writer loses nothing that was there before. ``before_rename`` (no arguments)
    runs after the fsync, just before the rename: the last point a writer can still be stopped
    (a fence check) with nothing changed under ``path``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(path)}.{_owner()}.", suffix=suffix, dir=directory)
    os.close(fd)
    # mkstemp makes the file private; give it the mode a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        fsync(tmp)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
        fsync(directory)  # the rename itself is durable only once the directory entry is on disk
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _owner():
    return f"{os.getpid()}@{socket.gethostname()}"


def remove_stale(path, suffix=".tmp"):
    """Remove the temporaries of ``path`` left by dead writers on this host; return their names."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(re.escape(os.path.basename(path)) + r"\.(\d+)@(.+)\.[A-Za-z0-9_]{8}" + re.escape(suffix) + "$")
    host, removed = socket.gethostname(), []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m and m.group(2) == host and not pid_alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))  # unlink removes a link, never what it points to
                removed.append(name)
    return removed


def pid_alive(pid):
    """Whether process ``pid`` exists on this machine (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def fsync(path):
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
