"""Write-then-rename, so an output path never holds half a file.

Temporary names say who owns them: ``OUT.PID@HOST.XXXXXXXXXXXXXXXX.tmp``. A writer that was
SIGKILLed (or lost its machine) leaves its temporary behind; the next writer of the same output
removes those whose process is gone on this host, and never touches one a live process may still own.

On a shared file system another user must not plant or race a temporary: the 16 hex characters
come from the OS's random source (``secrets``), and the file is created with O_EXCL and O_NOFOLLOW,
so a name someone guessed and created first, or a symlink they left there, is never written through.
The output gets the mode a plain ``open()`` would give it (the umask), or 0600 for a private run
(:mod:`mpirt.secure.policy`); writing into a world-writable directory without the sticky bit, where
anyone may replace the file after it is written, gets a warning.
"""

import contextlib
import os
import re
import secrets
import socket
import stat


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp", before_rename=None):
    """Yield a temporary path beside ``path``; on success fsync and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched, so a
    killed or failed writer loses nothing that was there before. ``before_rename`` (no arguments)
    runs after the fsync, just before the rename: the last point a writer can still be stopped
    (a fence check) with nothing changed under ``path``.
    """
    from mpirt.secure.policy import current, makedirs

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    makedirs(directory)
    warn_if_unsafe(directory)
    remove_stale(path, suffix)
    tmp = create_exclusive(directory, f"{os.path.basename(path)}.{_owner()}.", suffix)
    if not current().private:  # created 0600; give it the mode a plain open() would have
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


def create_exclusive(directory, prefix, suffix):
    """Create a new empty file ``directory/prefix<16 random hex>suffix``, 0600; return its path."""
    for _ in range(100):
        tmp = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # taken (by chance, or planted): draw another
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{directory}: no free temporary name for {prefix}*{suffix} after 100 draws")


_warned = set()


def warn_if_unsafe(directory):
    """Warn once per directory that is world-writable without the sticky bit."""
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        return
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX and directory not in _warned:
        _warned.add(directory)
        from mpirt.log import get_logger

        get_logger("mpirt.secure").warning(
            "%s is world-writable without the sticky bit: any user can replace or delete what is written "
            "there (chmod +t, or write elsewhere)", directory)


def _owner():
    return f"{os.getpid()}@{socket.gethostname()}"


def remove_stale(path, suffix=".tmp"):
    """Remove the temporaries of ``path`` left by dead writers on this host; return their names."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(re.escape(os.path.basename(path)) + r"\.(\d+)@(.+)\.(?:[A-Za-z0-9_]{8}|[0-9a-f]{16})" + re.escape(suffix) + "$")
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
