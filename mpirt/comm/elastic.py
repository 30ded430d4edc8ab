"""``ElasticComm``: a communicator that survives its members (ULFM).

Wraps, does not hide, mpi4py: ``.comm`` is the live ``MPI.Comm`` (a ``Dup`` with
errors returned). Failures surface as :class:`mpirt.errors.ProcessFailure`;
``recover()`` is Revoke, Shrink, Agree, and gives the next view's communicator.
"""

import contextlib
import os
import signal
import socket
import sys
import threading
import time

from mpirt.comm import mpi
from mpirt.config import HANG_TIMEOUT, HOST_FT, env_flag, env_float
from mpirt.errors import JobError, ProcessFailure
from mpirt.log import get_logger

log = get_logger("mpirt.comm")


def _failure_classes(MPI):
    names = ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")
    return {getattr(MPI, n) for n in names if hasattr(MPI, n)}


class ElasticComm:
    """The current view's communicator plus the means to rebuild it.

    Args:
        comm: the communicator to duplicate (default ``MPI.COMM_WORLD``).
    """

    def __init__(self, comm=None, dup=True):
        self.MPI = mpi.MPI()
        base = self.MPI.COMM_WORLD if comm is None else comm
        self.comm = base.Dup() if dup else base
        self.comm.Set_errhandler(self.MPI.ERRORS_RETURN)
        self._failures = _failure_classes(self.MPI)
        self._pump = _ProgressPump.start(self.MPI)
        self.ft_problem = mpi.ft_launch_problem() if self.MPI.Comm.Get_parent() == self.MPI.COMM_NULL else None
        self.host_ft = env_flag(HOST_FT)
        # Over several hosts: the PMIx name of each rank of .comm, and a lock that keeps the lifeline's
        # thread from revoking a communicator while the main thread replaces (frees) it.
        self.procs = []
        self._swap = threading.Lock()
        if self.host_ft:
            from mpirt.comm import lifeline, pmix_guard

            pmix_guard.install()
            self.connect_all()
            lifeline.on_declared(self._declared)

    @property
    def rank(self):
        return self.comm.Get_rank()

    @property
    def size(self):
        return self.comm.Get_size()

    @contextlib.contextmanager
    def guard(self):
        """Turn MPI process-failure and revoked errors into :class:`ProcessFailure`."""
        try:
            yield
        except self.MPI.Exception as exc:
            if exc.Get_error_class() in self._failures:
                raise ProcessFailure(f"MPI: {exc.Get_error_string()}") from exc
            raise

    def revoke(self):
        """Interrupt every pending operation of every member (idempotent)."""
        with contextlib.suppress(self.MPI.Exception, NotImplementedError):
            self.comm.Revoke()

    def shrink(self):
        """Revoke, then Shrink to the survivors; return the seconds each part took.

        Shrink is itself fault tolerant but a failure during it can surface as an
        error: retry on the same (revoked) communicator until it succeeds.
        """
        t0 = time.perf_counter()
        self.revoke()
        t1 = time.perf_counter()
        while True:
            try:
                new = self.comm.Shrink()
                break
            except self.MPI.Exception as exc:
                if exc.Get_error_class() not in self._failures:
                    raise
        t2 = time.perf_counter()
        self._replace(new)
        return {"revoke_s": t1 - t0, "shrink_s": t2 - t1}

    def agree(self, flag=True):
        """Fault-tolerant consensus: True only if every live member passed True."""
        with self.guard():
            return bool(self.comm.Agree(1 if flag else 0))

    def _replace(self, new):
        with self._swap:
            old, self.comm = self.comm, new
            self.comm.Set_errhandler(self.MPI.ERRORS_RETURN)
            if self.procs:  # the survivors' names, by where they were in the old communicator
                where = self.MPI.Group.Translate_ranks(new.Get_group(), list(range(new.Get_size())), old.Get_group())
                self.procs = [self.procs[r] if 0 <= r < len(self.procs) else None for r in where]
            # A revoked communicator can still be freed locally; failing to is harmless.
            with contextlib.suppress(self.MPI.Exception):
                old.Free()

    def _declared(self, procs):
        """The launcher declared ``procs`` failed (hung, or their host frozen or cut off). Revoke, so that
        every member recovers now: the revoke of the member that noticed first travels through
        neighbours (a reliable broadcast over a graph), and when every neighbour of a member is dead
        or frozen it never arrives; that member then waited forever on a live peer (seen: a worker
        blocked on its coordinator while the coordinator waited for it in Shrink)."""
        with self._swap:
            if set(procs) & set(self.procs):  # not when .comm already excludes them (a Shrink done)
                self.revoke()

    def merge_spawned(self, argv, count, root=0):
        """Collective: spawn ``count`` processes running ``argv`` and merge them in (joiners last)."""
        if self.host_ft:  # joiners too must outlive the runtime's abort (see mpirt.comm.shim)
            argv = [sys.executable, "-m", "mpirt.comm.shim", *argv]
        with self.guard():
            inter = self.comm.Spawn(argv[0], args=list(argv[1:]), maxprocs=count, root=root)
            merged = inter.Merge(high=False)
            inter.Disconnect()
        self._replace(merged)
        if self.host_ft:
            self.connect_all()

    def connect_all(self):
        """Open the connection to every peer now, while Open MPI's runtime is there to say where
        each one listens (its PMIx server holds the addresses). After a lost host the runtime is
        gone and a first connection could not be made; Shrink and Agree may need any pair.
        A zero-byte message each way per pair: N-1 sockets per rank. Also learns every member's PMIx
        name (:meth:`_declared` revokes only a communicator that holds a declared one)."""
        MPI, comm = self.MPI, self.comm
        empty = bytearray(0)
        peers = [p for p in range(comm.Get_size()) if p != comm.Get_rank()]
        from mpirt.comm import pmix_guard

        with self.guard():
            reqs = [comm.Irecv([empty, 0, MPI.BYTE], source=p, tag=0x7FE) for p in peers]
            reqs += [comm.Isend([empty, 0, MPI.BYTE], dest=p, tag=0x7FE) for p in peers]
            MPI.Request.Waitall(reqs)
            procs = [tuple(p) for p in comm.allgather(pmix_guard.identity())]
        with self._swap:
            self.procs = procs

    @classmethod
    def from_parent(cls):
        """For a spawned joiner: merge with the parent job; None when not spawned."""
        MPI = mpi.MPI()
        parent = MPI.Comm.Get_parent()
        if parent == MPI.COMM_NULL:
            return None
        merged = parent.Merge(high=True)
        parent.Disconnect()
        # No Dup here: the parents adopt the merged communicator as it is, and
        # a Dup would be a collective they never enter.
        return cls(merged, dup=False)

    def identity(self):
        """(host, pid) of this process, exchanged at each view so hung peers can be killed."""
        return socket.gethostname(), os.getpid()

    def close(self):
        """Stop the progress pump and free the communicator (MPI is finalized at exit, bounded)."""
        _ProgressPump.stop()
        with contextlib.suppress(self.MPI.Exception):
            self.comm.Free()


class _ProgressPump:
    """A thread that enters MPI's progress engine a few times per heartbeat period.

    Open MPI's failure detector (in progress mode) sends heartbeats only while a
    process is inside MPI; a rank busy computing a long shard would otherwise be
    declared dead. A stopped or killed process stops pumping too, which is what
    the detector is for.
    """

    _thread = None
    _stop = threading.Event()

    @classmethod
    def start(cls, MPI):
        if cls._thread is not None:
            return cls._thread
        period = env_float(HANG_TIMEOUT, 6.0) / 10.0
        if period <= 0:
            return None
        comm = MPI.COMM_SELF.Dup()
        comm.Set_errhandler(MPI.ERRORS_RETURN)

        def pump():
            while not cls._stop.wait(period):
                try:
                    comm.Iprobe(source=MPI.ANY_SOURCE, tag=0x7FF)
                except MPI.Exception:
                    return

        cls._thread = threading.Thread(target=pump, name="mpirt-progress", daemon=True)
        cls._thread.start()
        mpi.before_finalize(cls.stop)
        return cls._thread

    @classmethod
    def stop(cls):
        if cls._thread is not None:
            cls._stop.set()
            cls._thread.join(timeout=5)


def kill_local(pids_by_host):
    """SIGKILL failed members that run on this host (a hung rank must not wake up and commit)."""
    host = socket.gethostname()
    for h, pid in pids_by_host:
        if h == host and pid != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def require_min(size, min_ranks):
    if size < min_ranks:
        raise JobError(f"only {size} rank(s) left, fewer than --min-ranks {min_ranks}; stopping "
                       f"(committed work is kept: rerun with --resume)")
