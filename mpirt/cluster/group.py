"""``ElasticGroup``: the members of a job across views (what the farm and the trainer share).

It owns the :class:`ElasticComm`, the current :class:`View`, this process's member id, the events
log and the fault plan. ``recover()`` turns a failure into the next view (Revoke, Shrink, learn who
is gone, kill what hung, agree); ``grow(count)`` spawns joiners and merges them in;
``sync_view()`` is the collective every view change ends with, and also what a joiner calls first.
"""

import os
import signal
import sys
import threading
import time

from mpirt.cluster.membership import EventsLog, View, has_quorum, hosts_lost
from mpirt.comm import faults as faultlib
from mpirt.comm import lifeline, status
from mpirt.comm.elastic import ElasticComm, kill_local, require_min
from mpirt.errors import MpirtError, ProcessFailure, QuorumLost
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
        min_ranks: stop with :class:`JobError` when fewer members remain (unless the job handles
            it: with ``stop_below_min`` set, :meth:`recover` completes and the job checks ``size``).
        spawn_argv: the command a joiner runs (the same job, absolute paths).
    """

    def __init__(self, *, events_path=None, faults=None, min_ranks=1, spawn_argv=()):
        self.events = EventsLog(events_path)
        self.faults = faults or faultlib.FaultPlan()
        self.min_ranks = min_ranks
        # Training sets this: its survivors hold the whole replicated state, so they end the view
        # change and stop with a checkpoint (exit 75, requeued under Slurm) rather than fail.
        self.stop_below_min = False
        self.spawn_argv = list(spawn_argv)
        self.ec = None
        self.view = None
        self.member = None
        self.error_time = None
        self.joined = False
        self.stoppable = False
        self.leaving = set()  # members known (here) to have announced a graceful leave
        # (host, pid) of every member this job has seen fail or leave: a coordinator taking over may
        # replace a directory lock one of them still holds (mpirt.dirlock), never anyone else's.
        self.gone = set()
        self._said_no_growth = False
        self.closed = False
        self.strike = faultlib.strike  # how a due fault strikes (a fake world strikes in its threads)

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
        lifeline.on_cut_off(lambda why: self.events.write(
            "quorum_lost", member=self.member, view=self.view and self.view.id, reason=why))
        self.stoppable = stoppable
        if stoppable:
            Preempt.install()
        joined = ElasticComm.from_parent()
        if joined is not None:
            self.ec, self.joined = joined, True
            lifeline.connect()
            return self
        self.ec = ElasticComm()
        lifeline.connect(self.ec.rank)
        self.faults.check_host_faults()
        if self.ec.rank == 0 and self.ec.ft_problem and self.ec.size > 1:
            log.warning("fault tolerance is off: %s", self.ec.ft_problem)
        members = list(range(self.ec.size))
        self.view = View(id=-1, members=members, hosts=[], next_member=len(members))
        self.member = self.ec.rank
        return self

    def sync_view(self, joiner=False, failed=(), breakdown=None, payload=None, before=None):
        """Collective: agree on the new view (ids for joiners, hosts, who left, fired faults).

        ``payload`` (given on the coordinator) is broadcast with the view and returned everywhere:
        the job's own state a joiner or a new view needs. ``before``: the view before a failure
        (with the failed members' hosts), for the record.
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
                    "next_member": old.next_member + len(joiners), "joiners": joiners,
                    "left": sorted(old.left | self.leaving), "failed": list(failed), "payload": payload,
                }
            else:
                state = None
            state = comm.bcast(state, root=0)
            if joiner or self.member is None:
                self.member = state["members"][self.ec.rank]
            # Each member's host, and the faults it knows fired: the union is the view's.
            facts = comm.allgather((self.ec.identity(), sorted(self.faults.fired)))
        hosts = [identity for identity, _ in facts]
        fired = set().union(*(set(f) for _, f in facts))
        left, failed, old = set(state["left"]), state["failed"], before or self.view
        self.gone |= {tuple(old.host_of(m)) for m in failed if old.hosts}
        self.view = View(id=state["id"], members=state["members"], hosts=hosts, next_member=state["next_member"],
                         left=left, fired=fired, failed=[m for m in failed if m not in left],
                         departed=[m for m in failed if m in left],
                         joined=state["joiners"] if state["id"] > 0 else [])
        self.faults.fired |= fired
        self.leaving |= left
        set_identity(self.ec.rank, self.ec.size, self.member)
        if self.ec.rank == 0:
            self._record_view(old, hosts, breakdown, t0)
        self.error_time = None
        return state["payload"]

    def _record_view(self, old, hosts, breakdown, t0):
        """The coordinator's record of a change: the events log, and host changes for the launcher."""
        view, breakdown = self.view, breakdown or {}
        lost = hosts_lost(old, set(view.failed)) if view.id > 0 and old.hosts else {}
        before = {h for h, _ in old.hosts}
        joined_hosts = sorted({h for h, _ in hosts if before and h not in before})
        change_ms = round(1e3 * (breakdown.get("total_s", 0) + time.perf_counter() - t0), 3)
        for host, members in lost.items():
            self.events.write("host_lost", view=view.id, host=host, members=members,
                              detected_at=self.error_time, change_ms=change_ms)
            log.warning("host %s lost: members %s (view %d, reconfigured in %.1f ms after detection)",
                        host, members, view.id, change_ms)
        if lost or joined_hosts:
            status.hosts_changed(lost=sorted(lost), joined=joined_hosts)
        self.events.write(
            "view", view=view.id, coordinator=view.coordinator, members=view.members, joined=view.joined,
            failed=view.failed, left=view.departed, hosts=[f"{h}:{p}" for h, p in hosts],
            hosts_lost=sorted(lost), hosts_joined=joined_hosts, change_ms=change_ms,
            breakdown={**breakdown, "sync_s": time.perf_counter() - t0}, error_time=self.error_time,
        )

    def announce_leaving(self, leaving):
        """Collective: learn which members are about to leave gracefully (before they go)."""
        with self.ec.guard():
            flags = self.ec.comm.allgather(bool(leaving))
        self.leaving |= {m for m, f in zip(self.view.members, flags) if f}

    def recover(self, payload=None):
        """Revoke, shrink, check the quorum, agree on the next view, then fence what hung.

        Returns what ``sync_view`` returns (the new coordinator's ``payload``). Raises
        :class:`QuorumLost` on a side that holds no majority of the last view: it commits nothing.
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
        if not has_quorum(old, survivors, old.left | self.leaving):
            self.events.write("quorum_lost", view=old.id, member=self.member, reachable=survivors,
                              unreachable=failed)
            hosts = sorted({old.host_of(m)[0] for m in survivors})
            raise QuorumLost(f"lost the quorum: members {survivors} on {len(hosts)} of the "
                             f"{len({h for h, _ in old.hosts})} hosts of view {old.id} reachable; stopping "
                             f"without committing anything (the side with the majority of hosts goes on)")
        self.view = View(id=old.id, members=survivors, hosts=[old.host_of(m) for m in survivors],
                         next_member=old.next_member, left=old.left, fired=old.fired)
        if not self.stop_below_min:
            require_min(self.ec.size, self.min_ranks)
        parts["total_s"] = time.perf_counter() - t0
        result = self.sync_view(failed=failed, breakdown=parts, payload=payload, before=old)
        # A hung (SIGSTOPped) rank is only *declared* failed; make it so, so that it can never wake up
        # and act on a unit handed to someone else (on another host its own quorum check stops it).
        # Members that left have exited already: their pids are not ours to signal.
        kill_local([old.host_of(m) for m in self.view.failed])
        return result

    def can_grow(self):
        """Whether joiners can be spawned: not after a lost host took Open MPI's runtime down.

        Asked by the coordinator when it decides on a join, so that every member follows one answer.
        """
        from mpirt.comm import pmix_guard

        if self.ec.host_ft and pmix_guard.runtime_gone():
            if not self._said_no_growth:
                log.warning("a host was lost and Open MPI's runtime with it: joins are refused until the job is "
                            "run again")
                self._said_no_growth = True
            return False
        return True

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
                self.strike(fault)

    def leave(self):
        """Exit now as a graceful leave (the others shrink past it; the log says 'left')."""
        self.events.write("leave", member=self.member, view=self.view.id)
        log.info("leaving the job (SIGTERM)")
        sys.stdout.flush()
        sys.stderr.flush()
        # Not MPI_Finalize: the others treat the exit as a departure and shrink past it.
        os._exit(0)

    def end(self, failed=False):
        """The end of a job, on every member: wait until every member is here, then :meth:`close`.

        The others wait here while the coordinator writes its last checkpoint, its report or the
        output, of any length, instead of in MPI_Finalize, which ends a process after FINALIZE_GRACE
        seconds (mpirt.comm.mpi). Members that had gone on to Finalize and exit while the coordinator
        wrote its report were seen crashing the coordinator's progress thread in Open MPI's failure
        handler (``ompi_errhandler_proc_failed_internal``; the Slurm scaling test, 3 runs in 15 with
        two jobs sharing 2 cores, 2026-12-02). A member that failed on the way (the coordinator died
        writing: what it finished stands) makes this a failed end: no Finalize.
        """
        if not failed and self.ec is not None and self.ec.size > 1:
            try:
                failed = not self.ec.agree()
            except ProcessFailure:
                failed = True
        self.close(failed)

    def close(self, failed=False):
        """Leave MPI alone from now on; ``failed``: the job is stopping on an error (no Finalize).
        Only the first call counts: a job that ended (:meth:`end`) stays ended as it was."""
        if self.closed:
            return
        self.closed = True
        if failed:
            from mpirt.comm import mpi

            mpi.skip_finalize()
        # The job is over: SIGTERM is the launcher's again (prte terminates stragglers with it
        # when a rank exits non-zero; trapped, it would leave them in MPI_Finalize). A member of a
        # fake world (a thread, mpirt.comm.fake) installed no handlers.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self.stoppable and threading.current_thread() is threading.main_thread():
            # A stop request after the end has nothing left to stop (its default would kill us).
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if self.ec is not None:
            self.ec.close()


def run_job(group, work, release=None):
    """Run a job to its end on the started ``group``: ``work()``, then ``release()`` (the job's own
    files and threads), then :meth:`ElasticGroup.end`, whatever happened. The job's status (for
    ``mpirt launch``) comes from the coordinator: 0 with a summary, else the error's exit code.

    Returns ``work()``'s summary (the final coordinator's; None elsewhere). A stop every member
    decided at the same point (``ends_together``: a request, a NaN) ends like a finished job;
    any other error ends this member without Finalize.
    """
    failed, summary = True, None
    try:
        summary = work()
        failed = False
    except MpirtError as exc:
        failed = not exc.ends_together
        if group.ec is not None and group.is_coordinator and getattr(exc, "reports_status", True):
            status.finished(exc.exit_code)
        raise
    finally:
        try:
            if release is not None:
                release()
        finally:
            group.end(failed)
    if summary is not None:
        status.finished(0)
    return summary
