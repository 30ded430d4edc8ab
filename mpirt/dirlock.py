"""One job per directory: an exclusive ``flock`` on a lock file that names its holder.

A shard job's parts directory and a training run's checkpoint directory are each written by one
coordinator at a time. Before, two jobs on the same ``--out`` both exited 0 with a mixture of their
inputs, and two trainings on one ``--checkpoint-dir`` interleaved their files. A flock dies with its
holder, so a killed job never leaves a stale lock.

A coordinator that takes over after a failure must take the lock again, and its holder may still
be alive: a coordinator whose host froze, or that was cut off, holds it until it thaws (then it is
fenced and exits without writing: :func:`mpirt.comm.lifeline.check_fence`). So a takeover reads
who holds the lock (``pid P on HOST``, written by the holder) and, when that process is one this
job has declared gone, puts a fresh lock file in its place and locks that: a later second job is
refused by the new one, and the old holder keeps a lock on a file nobody opens any more. A holder
the job does not know is another job, and is refused as at the start.
"""

import fcntl
import os
import re
import socket

from mpirt.errors import JobError

_HOLDER = re.compile(r"pid (\d+) on (\S+)")


class DirLock:
    """The lock ``DIR/NAME``; ``flag`` names the option a user changes to use another directory."""

    def __init__(self, directory, name, flag):
        self.path = os.path.join(os.fspath(directory), name)
        self.flag = flag
        self._fd = None

    @property
    def held(self):
        return self._fd is not None

    def take(self, gone=()):
        """Lock, or raise JobError naming who holds it.

        ``gone`` (a coordinator taking over): (host, pid) of this job's members that failed or left;
        a lock one of them still holds is replaced. Any other holder is refused.
        """
        if self._fd is not None:
            return
        fd = self._open(self.path)
        if self._try(fd):
            self._own(fd)
            return
        holder = _holder_line(fd)
        os.close(fd)
        m = _HOLDER.fullmatch(holder)
        if not m or (m.group(2), int(m.group(1))) not in {(h, int(p)) for h, p in gone}:
            raise JobError(f"{os.path.dirname(self.path)}: in use by another job ({holder}); wait for it to "
                           f"end, or give another {self.flag}")
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = self._open(tmp)
        if not self._try(fd):  # nobody else knows this name
            os.close(fd)
            raise JobError(f"{tmp}: locked by another process")
        self._own(fd)
        os.replace(tmp, self.path)

    def release(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def _open(path):
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)

    @staticmethod
    def _try(fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _own(self, fd):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd


def _holder_line(fd):
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
