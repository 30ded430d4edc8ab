"""``ElasticGroup``: the members of a job across views (what the farm and the trainer share).

It owns the :class:`ElasticComm`, the current :class:`View`, this process's member id, the events
log and the fault plan. ``recover()`` turns a failure into the next view (Revoke, Shrink, learn who
is gone, kill what hung, agree); ``grow(count)`` spawns joiners and merges them in;
``sync_view()`` is the collective every view change ends with, and also what a joiner calls first.
"""

import os
import signal
import sys
import time

from mpirt.cluster.membership import EventsLog, View
from mpirt.comm import faults as faultlib
from mpirt.comm.elastic import ElasticComm, kill_local, require_min
from mpirt.errors import ProcessFailure
from mpirt.log import get_logger, set_identity

log = get_logger("mpirt.group")


class Leaving:
    """SIGTERM means: finish or hand back the current unit, then leave."""

    requested = False

    @classmethod
    def install(cls):
        signal.signal(signal.SIGTERM, lambda *_: setattr(cls, "requested", True))


class Preempt:
    """SIGUSR1 means: the whole job stops at the next unit boundary, its state saved.

    Slurm delivers it before a time limit or a preemption (``#SBATCH --signal=B:USR1@60`` through the
    batch script, or ``scancel --batch --signal=USR1``); ``mpirt launch`` passes it to mpiexec, which
    passes it to every rank. Any one rank's request stops the job: the trainer ORs it into the
    stats of the step, the farm's workers report it with their results.
    """

    requested = False

    @classmethod
    def install(cls):
        signal.signal(signal.SIGUSR1, lambda *_: setattr(cls, "requested", True))


class ElasticGroup:
    """This process's membership in an elastic job.

    Args:
        events_path: the JSON-lines events log (None: no log).
        faults: a :class:`mpirt.comm.faults.FaultPlan` (None: no faults).
        min_ranks: stop with :class:`JobError` when fewer members remain.
        spawn_argv: the command a joiner runs (the same job, absolute paths).
    """

    def __init__(self, *, events_path=None, faults=None, min_ranks=1, spawn_argv=()):
        self.events = EventsLog(events_path)
        self.faults = faults or faultlib.FaultPlan()
        self.min_ranks = min_ranks
        self.spawn_argv = list(spawn_argv)
        self.ec = None
        self.view = None
        self.member = None
        self.error_time = None
        self.joined = False
        self.stoppable = False

    @property
    def rank(self):
        return self.ec.rank

    @property
    def size(self):
        return self.ec.size

    @property
    def is_coordinator(self):
        return self.ec.rank == 0

    def start(self, *, stoppable=False):
        """Join the job: as one of the launched ranks, or as a spawned joiner. Not collective yet:
        callers run their own set-up, then ``sync_view(joiner=self.joined)``.

        ``stoppable``: the job acts on :class:`Preempt` (SIGUSR1); others keep the signal's default.
        """
        Leaving.install()
        self.stoppable = stoppable
        if stoppable:
            Preempt.install()
        joined = ElasticComm.from_parent()
        if joined is not None:
            self.ec, self.joined = joined, True
            return self
        self.ec = ElasticComm()
        if self.ec.rank == 0 and self.ec.ft_problem and self.ec.size > 1:
            log.warning("fault tolerance is off: %s", self.ec.ft_problem)
        members = list(range(self.ec.size))
        self.view = View(id=-1, members=members, hosts=[], next_member=len(members))
        self.member = self.ec.rank
        return self

    def sync_view(self, joiner=False, failed=(), breakdown=None, payload=None):
        """Collective: agree on the new view (ids for joiners, hosts, fired faults).

        ``payload`` (given on the coordinator) is broadcast with the view and returned everywhere:
        the job's own state a joiner or a new view needs.
        """
        t0 = time.perf_counter()
        comm = self.ec.comm
        with self.ec.guard():
            if self.ec.rank == 0:
                old = self.view
                members = list(old.members)
                joiners = list(range(old.next_member, old.next_member + comm.Get_size() - len(members)))
                state = {
                    "id": old.id + 1, "members": members + joiners,
                    "next_member": old.next_member + len(joiners),
                    "fired": self.events.fired_faults() | self.faults.fired, "joiners": joiners,
                    "payload": payload,
                }
            else:
                state = None
            state = comm.bcast(state, root=0)
            if joiner or self.member is None:
                self.member = state["members"][self.ec.rank]
            hosts = comm.allgather(self.ec.identity())
        self.faults.fired |= set(state["fired"])
        left = self.left_members()
        self.view = View(id=state["id"], members=state["members"], hosts=hosts,
                         next_member=state["next_member"], left=left)
        set_identity(self.ec.rank, self.ec.size, self.member)
        if self.ec.rank == 0:
            failed = list(failed)
            self.events.write(
                "view", view=self.view.id, coordinator=self.view.coordinator, members=self.view.members,
                joined=state["joiners"] if self.view.id > 0 else [],
                failed=[m for m in failed if m not in left], left=[m for m in failed if m in left],
                hosts=[f"{h}:{p}" for h, p in hosts],
                change_ms=round(1e3 * ((breakdown or {}).get("total_s", 0) + time.perf_counter() - t0), 3),
                breakdown={**(breakdown or {}), "sync_s": time.perf_counter() - t0},
                error_time=self.error_time,
            )
        self.error_time = None
        return state["payload"]

    def left_members(self):
        return {e["member"] for e in self.events.read() if e.get("event") == "leave"}

    def recover(self, payload=None):
        """Revoke, shrink, learn who is gone, kill what is hung, agree on the next view.

        Returns what ``sync_view`` returns (the new coordinator's ``payload``).
        """
        self.error_time = self.error_time or time.time()
        t0 = time.perf_counter()
        old = self.view
        while True:
            parts = self.ec.shrink()
            try:
                t1 = time.perf_counter()
                with self.ec.guard():
                    survivors = self.ec.comm.allgather(self.member)
                parts["agree_s"] = time.perf_counter() - t1
                break
            except ProcessFailure:
                continue  # another failure while recovering: shrink again
        failed = [m for m in old.members if m not in survivors]
        # A hung (SIGSTOPped) rank is only *declared* failed; make it so, so it can never wake
        # up and act on a unit handed to someone else. Members that left have exited already:
        # their pids are not ours to signal.
        left = self.left_members()
        kill_local([old.host_of(m) for m in failed if m not in left])
        self.view = View(id=old.id, members=survivors, hosts=[old.host_of(m) for m in survivors],
                         next_member=old.next_member)
        require_min(self.ec.size, self.min_ranks)
        parts["total_s"] = time.perf_counter() - t0
        return self.sync_view(failed=failed, breakdown=parts, payload=payload)

    def grow(self, count):
        """Collective: spawn ``count`` joiners running ``spawn_argv`` and merge them in (not synced yet)."""
        self.ec.merge_spawned(self.spawn_argv, count)

    def fire(self, due, **context):
        """Log and strike faults that are due (a join is only logged: the caller grows)."""
        for fault in due:
            self.faults.fired.add(fault.index)
            self.events.write("fault", index=fault.index, fault=str(fault), member=self.member,
                              view=self.view.id, **context)
            if fault.action != "join":
                faultlib.strike(fault)

    def leave(self):
        """Exit now as a graceful leave (the others shrink past it; the log says 'left')."""
        self.events.write("leave", member=self.member, view=self.view.id)
        log.info("leaving the job (SIGTERM)")
        sys.stdout.flush()
        sys.stderr.flush()
        # Not MPI_Finalize: the others treat the exit as a departure and shrink past it.
        os._exit(0)

    def close(self, failed=False):
        """Leave MPI alone from now on; ``failed``: the job is stopping on an error (no Finalize)."""
        if failed:
            from mpirt.comm import mpi

            mpi.skip_finalize()
        # The job is over: SIGTERM is the launcher's again (prte terminates stragglers with it
        # when a rank exits non-zero; trapped, it would leave them in MPI_Finalize).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self.stoppable:
            # A stop request after the end has nothing left to stop (its default would kill us).
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if self.ec is not None:
            self.ec.close()
