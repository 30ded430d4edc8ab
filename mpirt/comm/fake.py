"""An in-process stand-in for MPI with ULFM: members are threads of one process.

For unit tests of what runs over an :class:`ElasticComm` (the group, the step protocol, the loops)
without mpiexec. It keeps ULFM's semantics where the code depends on them:

- a collective completes when every member of the communicator has called it, and raises
  ``ERR_PROC_FAILED`` on every member still waiting once a member is dead;
- ``Revoke`` makes every pending and later operation on the communicator raise ``ERR_REVOKED``;
- ``Shrink`` gives the survivors a new communicator (even on a revoked one); ``Agree`` is the AND
  of the live members' flags and raises ``ERR_PROC_FAILED`` on all of them when one died;
- ``Merge`` of spawned joiners starts them as new threads (the world's ``joiner`` function).

Faults strike in the world: ``kill`` and ``hang`` end the member's thread (:class:`Killed`) and
mark it dead, as Open MPI's detector would; other actions raise as they would in a process.
"""

import itertools
import threading

import numpy as np

from mpirt.comm.elastic import ElasticComm, _failure_classes

WAIT_S = 60.0  # bound on any wait: a test that deadlocks fails instead of hanging


class Killed(BaseException):
    """Ends a member's thread (a BaseException: the code under test must not catch it)."""


class FakeMPIError(Exception):
    def __init__(self, error_class, what):
        super().__init__(what)
        self.error_class, self.what = error_class, what

    def Get_error_class(self):
        return self.error_class

    def Get_error_string(self):
        return self.what


class FakeMPI:
    """The part of mpi4py's ``MPI`` namespace the runtime uses."""

    Exception = FakeMPIError
    ERR_PROC_FAILED, ERR_PROC_FAILED_PENDING, ERR_REVOKED, ERR_OTHER = 101, 102, 103, 16
    IN_PLACE = object()
    SUM, MAX, MIN, PROD = "sum", "max", "min", "prod"
    ANY_SOURCE, ANY_TAG = -1, -1
    COMM_NULL = None
    ERRORS_RETURN = None
    FLOAT = DOUBLE = INT64_T = UINT16_T = None
    THREAD_MULTIPLE = 3

    class Status:
        def __init__(self):
            self.source = None

        def Get_source(self):
            return self.source

    @staticmethod
    def Query_thread():
        return FakeMPI.THREAD_MULTIPLE


_REDUCE = {"sum": np.sum, "max": np.max, "min": np.min, "prod": np.prod}
_UNSET = object()


class _State:
    """One communicator, shared by its members."""

    ids = itertools.count()

    def __init__(self, members):
        self.id = next(self.ids)
        self.members = list(members)  # world ids, in rank order
        self.revoked = False
        self.ops = {}  # sequence number -> {"in": {rank: value}, "out": result, "taken": n}
        self.mail = []  # (dest rank, tag, source rank, obj)


class FakeWorld:
    """The members of one fake job. ``joiner(ec)`` runs in the thread of each spawned member;
    ``hosts``: the host name of each launched member (default one host), for quorum and host loss."""

    def __init__(self, n, joiner=None, hosts=None):
        self.hosts = list(hosts or ["fake-host"] * n)
        self.cv = threading.Condition()
        self.dead = set()
        self.joiner = joiner
        self.threads = []
        self.errors = {}  # world id -> the exception its thread ended with (not Killed)
        self.killed = set()
        self._next = n
        state = _State(range(n))
        self.endpoints = [FakeElasticComm(self, FakeComm(self, state, i), i) for i in range(n)]

    # -- members --------------------------------------------------------------------------------
    def start(self, target, *args):
        """Run ``target(ec, *args)`` in a thread per launched member."""
        for ec in self.endpoints:
            self._thread(ec, target, *args)

    def _thread(self, ec, target, *args):
        def body():
            try:
                target(ec, *args)
            except Killed:
                pass
            except BaseException as exc:  # noqa: BLE001 - kept for the test, and the member is dead
                self.errors[ec.world_id] = exc
                self.die(ec.world_id)
        t = threading.Thread(target=body, name=f"fake-member-{ec.world_id}", daemon=True)
        self.threads.append(t)
        t.start()

    def join(self, timeout=WAIT_S):
        """Wait for every member thread; the ones still running after ``timeout`` (deadlocked)."""
        done = 0
        while done < len(self.threads):  # joiners' threads are added while members run
            self.threads[done].join(timeout)
            done += 1
        return [t.name for t in self.threads if t.is_alive()]

    def die(self, world_id):
        with self.cv:
            self.dead.add(world_id)
            self.cv.notify_all()

    def strike(self, world_id):
        """The world's ``faultlib.strike`` for member ``world_id``."""
        from mpirt.comm import faults as faultlib

        def strike(fault):
            if fault.action in ("kill", "hang", "stop"):
                self.killed.add(world_id)
                self.die(world_id)
                raise Killed()
            faultlib.strike(fault)
        return strike

    # -- the rendezvous -------------------------------------------------------------------------
    def wait(self, ready, state, ignore_revoked=False):
        """Under ``self.cv``: wait until ``ready()`` gives a value; raise ULFM's errors meanwhile."""
        while True:
            value = ready()
            if value is not _UNSET:
                return value
            if state.revoked and not ignore_revoked:
                raise FakeMPIError(FakeMPI.ERR_REVOKED, "MPI_ERR_REVOKED: communicator revoked")
            if any(m in self.dead for m in state.members) and not ignore_revoked:
                raise FakeMPIError(FakeMPI.ERR_PROC_FAILED, "MPI_ERR_PROC_FAILED: a member failed")
            if not self.cv.wait(WAIT_S):
                raise TimeoutError(f"fake MPI: no progress in {WAIT_S} s (a deadlock in the code under test)")


class FakeComm:
    """One member's handle on a communicator (the mpi4py ``Comm`` calls the runtime makes)."""

    def __init__(self, world, state, world_id):
        self.world, self.state, self.me = world, state, world_id
        self.seq = 0

    def Get_rank(self):
        return self.state.members.index(self.me)

    def Get_size(self):
        return len(self.state.members)

    def Set_errhandler(self, _):
        pass

    def Free(self):
        pass

    def _collective(self, value, combine, *, live_only=False, ignore_revoked=False):
        world, state = self.world, self.state
        seq, self.seq = self.seq, self.seq + 1
        rank = self.Get_rank()
        with world.cv:
            op = state.ops.setdefault(seq, {"in": {}, "out": _UNSET, "taken": 0})
            op["in"][rank] = value
            world.cv.notify_all()

            def ready():
                if op["out"] is _UNSET:
                    expected = [r for r, m in enumerate(state.members) if not (live_only and m in world.dead)]
                    if all(r in op["in"] for r in expected):
                        op["out"] = combine({r: op["in"][r] for r in expected})
                        world.cv.notify_all()
                return op["out"]

            out = world.wait(ready, state, ignore_revoked=ignore_revoked)
            op["taken"] += 1
            if op["taken"] >= len(op["in"]):
                state.ops.pop(seq, None)
            return out

    # -- collectives --------------------------------------------------------------------------
    def bcast(self, obj, root=0):
        return self._collective(obj, lambda vals: vals[root])

    def allgather(self, obj):
        return self._collective(obj, lambda vals: [vals[r] for r in sorted(vals)])

    def alltoall(self, objs):
        mine = self.Get_rank()
        rows = self._collective(list(objs), lambda vals: [vals[r] for r in sorted(vals)])
        return [row[mine] for row in rows]

    def Barrier(self):
        self._collective(None, lambda vals: None)

    def Allreduce(self, sendbuf, recvbuf, op=FakeMPI.SUM):
        if isinstance(recvbuf, (list, tuple)):  # [buffer, MPI datatype]
            recvbuf = recvbuf[0]
        if isinstance(sendbuf, (list, tuple)):
            sendbuf = sendbuf[0]
        src = recvbuf if sendbuf is FakeMPI.IN_PLACE else sendbuf
        total = self._collective(np.array(src, copy=True),
                                 lambda vals: _REDUCE[op](np.stack([vals[r] for r in sorted(vals)]), axis=0))
        np.copyto(recvbuf, total.astype(recvbuf.dtype, copy=False))

    def Agree(self, flag):
        world = self.world

        def combine(vals):
            return "failed" if any(m in world.dead for m in self.state.members) else int(all(vals.values()))
        out = self._collective(int(flag), combine, live_only=True, ignore_revoked=True)
        if out == "failed":
            raise FakeMPIError(FakeMPI.ERR_PROC_FAILED, "MPI_ERR_PROC_FAILED: a member failed (agree)")
        return out

    def Revoke(self):
        with self.world.cv:
            self.state.revoked = True
            self.world.cv.notify_all()

    def Shrink(self):
        world = self.world

        def combine(vals):
            return _State([m for m in self.state.members if m not in world.dead])
        return FakeComm(world, self._collective(None, combine, live_only=True, ignore_revoked=True), self.me)

    # -- point to point -----------------------------------------------------------------------
    def send(self, obj, dest, tag=0):
        with self.world.cv:
            if self.state.revoked:
                raise FakeMPIError(FakeMPI.ERR_REVOKED, "MPI_ERR_REVOKED: communicator revoked")
            if self.state.members[dest] in self.world.dead:
                raise FakeMPIError(FakeMPI.ERR_PROC_FAILED, "MPI_ERR_PROC_FAILED: the destination failed")
            self.state.mail.append((dest, tag, self.Get_rank(), obj))
            self.world.cv.notify_all()

    def recv(self, source=FakeMPI.ANY_SOURCE, tag=FakeMPI.ANY_TAG, status=None):
        world, state, me = self.world, self.state, self.Get_rank()

        def ready():
            for i, (dest, t, src, obj) in enumerate(state.mail):
                if dest == me and tag in (FakeMPI.ANY_TAG, t) and source in (FakeMPI.ANY_SOURCE, src):
                    del state.mail[i]
                    if status is not None:
                        status.source = src
                    return obj
            return _UNSET
        with world.cv:
            return world.wait(ready, state)

    # -- joins ----------------------------------------------------------------------------------
    def spawn_and_merge(self, count):
        """Collective over this communicator: ``count`` new members, started as threads."""
        world = self.world

        def combine(vals):
            with_joiners = list(self.state.members)
            new = []
            for _ in range(count):
                wid, world._next = world._next, world._next + 1
                with_joiners.append(wid)
                new.append(wid)
            state = _State(with_joiners)
            for wid in new:
                ec = FakeElasticComm(world, FakeComm(world, state, wid), wid, joined=True)
                world._thread(ec, world.joiner)
            return state
        return FakeComm(world, self._collective(None, combine), self.me)


class FakeElasticComm(ElasticComm):
    """An :class:`ElasticComm` over a :class:`FakeComm`: the real guard, shrink, agree and swap."""

    def __init__(self, world, comm, world_id, joined=False):  # noqa: D107 - no MPI_Init, no pump
        self.MPI = FakeMPI
        self.comm = comm
        self.world, self.world_id, self.joined = world, world_id, joined
        self._failures = _failure_classes(FakeMPI)
        self._pump = None
        self.ft_problem = None
        self.host_ft = False
        self.procs = []
        self._swap = threading.Lock()

    def identity(self):
        # Not this machine's name: the group's kill_local never signals a real process for it.
        hosts = self.world.hosts
        return (hosts[self.world_id] if self.world_id < len(hosts) else "fake-host"), 1_000_000 + self.world_id

    def merge_spawned(self, argv, count, root=0):
        if self.world.joiner is None:
            raise RuntimeError("FakeWorld(joiner=None): this world cannot spawn joiners")
        with self.guard():
            self._replace(self.comm.spawn_and_merge(count))

    def close(self):
        pass


def group_of(ec, faults=None, **kwargs):
    """A started :class:`ElasticGroup` for a member of a fake world (what ``start()`` does in a process,
    less the signal handlers and the launcher's lifeline, which belong to a process)."""
    from mpirt.cluster.group import ElasticGroup
    from mpirt.cluster.membership import View

    group = ElasticGroup(faults=faults, **kwargs)
    group.ec, group.joined = ec, ec.joined
    group.strike = ec.world.strike(ec.world_id)
    if not ec.joined:
        members = list(range(ec.size))
        group.view = View(id=-1, members=members, hosts=[], next_member=len(members))
        group.member = ec.rank
    return group
