"""Checkpoint saves in the background: one thread per save, at most one save in flight.

A save in flight is hashed, signed, written, fsynced and renamed on its own thread while training
goes on (:meth:`mpirt.checkpoint.CheckpointDir.save`). Its failure is kept and raised, as one
:class:`mpirt.errors.CheckpointError` line, by whoever waits next: the next save, or the end of
training; it is never lost with the thread.
"""

import threading
import time

from mpirt.errors import CheckpointError


class BackgroundSaver:
    """Runs saves one at a time, each on a thread of its own.

    Attributes:
        waited: saves that had to wait for the one before (it was still being written).
        wait_s: seconds those saves waited.
    """

    def __init__(self):
        self._thread = None
        self._error = None
        self.waited = 0
        self.wait_s = 0.0

    def submit(self, path, fn):
        """Run ``fn`` (the save of ``path``) on a new thread, once the save before is done."""
        self.wait(next_save=True)
        self._thread = threading.Thread(target=self._run, args=(path, fn), name="mpirt-checkpoint", daemon=True)
        self._thread.start()

    def wait(self, next_save=False):
        """Wait for the save in flight, if any; raise its failure if it failed (once).

        Args:
            next_save: the caller is a new save. At most one save is in flight, so a new one waits
                for the one before (counted in ``waited``): two would double the host memory the
                snapshots hold (a new one reuses the buffers of the one before), race on keep-K
                pruning and on which file is the newest, and a writer that cannot keep up with the
                saves would only fall further behind.

        Raises:
            CheckpointError: one line naming the checkpoint and the cause.
        """
        waited = self._join()
        if next_save and waited is not None:
            self.waited += 1
            self.wait_s += waited
        self._raise()

    def pending_error(self):
        """Wait for the save in flight; its failure (taken: it is not raised again), or None."""
        self._join()
        error, self._error = self._error, None
        return error

    def _join(self):
        """Wait for the thread of the save in flight; the seconds waited, None if it was done."""
        thread, self._thread = self._thread, None
        if thread is None or not thread.is_alive():
            return None
        t0 = time.perf_counter()
        thread.join()
        return time.perf_counter() - t0

    def _raise(self):
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self, path, fn):
        try:
            fn()
        except CheckpointError as exc:  # already one line naming the file (a full disk, ...)
            self._error = exc
        except Exception as exc:  # noqa: BLE001 - kept and raised in the training thread, never lost
            self._error = CheckpointError(f"{path}: the background save failed ({type(exc).__name__}: {exc}); "
                                          f"the checkpoints before it are intact")
