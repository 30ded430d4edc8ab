"""The state behind ``hvd.init()``: the elastic group, the process sets, the error types.

Shared by every framework module (only :mod:`mpirt.horovod.torch` exists). Nothing here touches
MPI before :func:`init`.
"""

import contextlib
import os
import sys

from mpirt.errors import ProcessFailure


class HorovodInternalError(ProcessFailure, RuntimeError):
    """A collective failed because a member failed (Horovod's name; an mpirt ProcessFailure):
    ``hvd.elastic.run`` restores the last committed state and goes on with the survivors."""


class HostsUpdatedInterrupt(RuntimeError):
    """Raised by ``state.commit()``/``check_host_updates()`` when members join: ``hvd.elastic.run``
    merges them and calls the function again (``skip_sync``: the state need not be broadcast)."""

    def __init__(self, skip_sync=False):
        super().__init__("the job's members changed")
        self.skip_sync = skip_sync


@contextlib.contextmanager
def horovod_errors():
    """A failed member (mpirt's ProcessFailure) surfaces as Horovod's HorovodInternalError."""
    try:
        yield
    except HorovodInternalError:
        raise
    except ProcessFailure as exc:
        raise HorovodInternalError(str(exc)) from exc


NOT_INITIALIZED = "Horovod has not been initialized; use hvd.init()."

# Reduction ops, under Horovod's names (its values).
Average, Sum, Adasum, Min, Max, Product = 1, 0, 2, 3, 4, 5


class ProcessSet:
    """A subset of the ranks that runs collectives among itself (Horovod's ``hvd.ProcessSet``).

    Register it with :func:`add_process_set` (collective) before use; ``ranks`` are global ranks.
    A view change (a failure or a join) renumbers ranks: sets other than the global one are
    then dropped, and using one raises ``ValueError``.
    """

    def __init__(self, ranks_or_comm=None):
        self.ranks = None if ranks_or_comm is None else sorted(int(r) for r in ranks_or_comm)
        self.process_set_id = None
        self.comm = None
        self._view = None

    def _check(self):
        if _rt.group is None:
            raise ValueError(NOT_INITIALIZED)
        if self.process_set_id is None:
            raise ValueError(f"process set {self.ranks} is not registered: call hvd.add_process_set first")
        if self is not global_process_set and self._view != _rt.group.view.id:
            raise ValueError(f"process set {self.ranks} was made for view {self._view}; the job's members have "
                             f"changed since (view {_rt.group.view.id}): add it again")

    def communicator(self):
        self._check()
        return _rt.group.ec.comm if self is global_process_set else self.comm

    def size(self):
        self._check()
        return _rt.group.size if self is global_process_set else len(self.ranks)

    def rank(self):
        """This process's rank in the set, or -1 when it is not in it."""
        self._check()
        if self is global_process_set:
            return _rt.group.rank
        return self.ranks.index(_rt.group.rank) if _rt.group.rank in self.ranks else -1

    def included(self):
        return self.rank() >= 0

    def __repr__(self):
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"


global_process_set = ProcessSet()
global_process_set.process_set_id = 0


class _Runtime:
    group = None
    process_sets = {}
    next_id = 1
    pending_join = None  # (committer, step, totals) of a committed step that announced joiners
    joiner_synced = False


_rt = _Runtime()


def require_group():
    if _rt.group is None:
        raise ValueError(NOT_INITIALIZED)
    return _rt.group


def init(comm=None, process_sets=None):
    """Join the job (MPI_Init under ``mpirun``/``mpirt launch``/``srun``; a spawned joiner merges).

    ``comm`` (a list of ranks or an mpi4py communicator) is not supported: the job is the
    communicator ``mpirt launch`` started. ``process_sets``: a list of :class:`ProcessSet` to add.
    """
    if comm is not None:
        raise NotImplementedError("hvd.init(comm=...): mpirt runs on the job's whole communicator")
    if _rt.group is not None:
        return
    from mpirt.cluster.group import ElasticGroup
    from mpirt.comm.faults import FaultPlan
    from mpirt.config import EVENTS

    group = ElasticGroup(events_path=os.environ.get(EVENTS) or None, faults=FaultPlan(),
                         spawn_argv=[sys.executable, *sys.argv]).start()
    if not group.joined:
        group.sync_view()
    _rt.group = group
    _rt.joiner_synced = not group.joined
    for ps in process_sets or ():
        add_process_set(ps)


def shutdown():
    """Leave MPI alone from now on (MPI_Finalize runs at exit)."""
    if _rt.group is None:
        return
    for ps in list(_rt.process_sets.values()):
        _free(ps)
    _rt.group.close()
    _rt.group = None


def is_initialized():
    return _rt.group is not None


def size():
    return require_group().size


def rank():
    return require_group().rank


def _hosts():
    group = require_group()
    return [h for h, _ in group.view.hosts] if group.view.hosts else ["localhost"] * group.size


def local_rank():
    hosts, r = _hosts(), rank()
    return sum(1 for h in hosts[:r] if h == hosts[r])


def local_size():
    hosts = _hosts()
    return hosts.count(hosts[rank()])


def _local_ranks():
    hosts = _hosts()
    return [sum(1 for h in hosts[:i] if h == hosts[i]) for i in range(len(hosts))]


def cross_rank():
    """This rank's index among the ranks with its local rank (one per host), as Horovod's."""
    lr = _local_ranks()
    r = rank()
    return sum(1 for x in lr[:r] if x == lr[r])


def cross_size():
    lr = _local_ranks()
    return lr.count(lr[rank()])


def mpi_threads_supported():
    from mpirt.comm import mpi

    require_group()
    MPI = mpi.MPI()
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def mpi_enabled():
    return True


def mpi_built():
    return True


def gloo_enabled():
    return False


def gloo_built():
    return False


def nccl_built():
    return 0


def ddl_built():
    return False


def ccl_built():
    return False


def cuda_built():
    return False


def rocm_built():
    return False


def add_process_set(process_set):
    """Register ``process_set`` (a :class:`ProcessSet` or a list of ranks); collective over all ranks."""
    group = require_group()
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    if ps.ranks is None or not ps.ranks or ps.ranks[-1] >= group.size or ps.ranks[0] < 0:
        raise ValueError(f"process set ranks must be a non-empty subset of 0..{group.size - 1}, got {ps.ranks}")
    if ps.process_set_id is not None and ps.process_set_id in _rt.process_sets:
        raise ValueError(f"{ps} is already registered")
    for other in _rt.process_sets.values():
        if other.ranks == ps.ranks and other._view == group.view.id:
            raise ValueError(f"a process set with ranks {ps.ranks} is already registered")
    comm = group.ec.comm
    with group.ec.guard():
        sub = comm.Create_group(comm.Get_group().Incl(ps.ranks))
    ps.comm = None if sub == group.ec.MPI.COMM_NULL else sub
    ps.process_set_id, _rt.next_id = _rt.next_id, _rt.next_id + 1
    ps._view = group.view.id
    _rt.process_sets[ps.process_set_id] = ps
    return ps


def remove_process_set(process_set):
    """Unregister ``process_set``; True when it was registered. The global set cannot be removed."""
    if process_set is global_process_set:
        raise ValueError("the global process set cannot be removed")
    if _rt.process_sets.pop(process_set.process_set_id, None) is None:
        return False
    _free(process_set)
    process_set.process_set_id = None
    return True


def _free(ps):
    if ps.comm is not None:
        try:
            ps.comm.Free()
        except Exception:  # noqa: BLE001 - a communicator of a failed view may not free cleanly
            pass
        ps.comm = None


def after_view_change():
    """The members changed: sets of the old view are dropped (their ranks mean other processes now)."""
    for ps in list(_rt.process_sets.values()):
        _rt.process_sets.pop(ps.process_set_id, None)
        ps.comm = None  # not freed: a communicator with a failed member may hang in Free
        ps.process_set_id = None
