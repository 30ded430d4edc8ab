"""The task farm: a coordinator leases shards to workers, over views that change.

Rank 0 of the current view coordinates; the others pull leases (so fast ranks
take more). A worker commits a shard's result on disk, then reports it. On any
process failure every survivor revokes and shrinks (``ElasticComm.shrink``); the
new rank 0 rebuilds the ledger from the committed results, so nothing is lost,
and commits are create-if-absent, so nothing is done twice. Joiners are spawned
at unit boundaries, when every worker is parked waiting for its next lease.
"""

import os
import signal
import sys
import time

from mpirt.cluster.ledger import CommitStore, ShardLedger
from mpirt.cluster.membership import EventsLog, View
from mpirt.comm import faults as faultlib
from mpirt.comm import status
from mpirt.comm.elastic import ElasticComm, kill_local, require_min
from mpirt.errors import JobError, ProcessFailure
from mpirt.log import get_logger, set_identity

log = get_logger("mpirt.farm")

TAG_REQ, TAG_REPLY, TAG_VIEW = 701, 702, 703


class _Leaving:
    """SIGTERM means: finish or hand back the current unit, then leave."""

    requested = False

    @classmethod
    def install(cls):
        signal.signal(signal.SIGTERM, lambda *_: setattr(cls, "requested", True))


class Farm:
    """One process's part in a shard job. Use :func:`run_shard_job`."""

    def __init__(self, job, *, parts_dir, events_path=None, faults=None, min_ranks=1, resume=False):
        self.job = job
        self.store = CommitStore(parts_dir)
        self.events = EventsLog(events_path or os.path.join(parts_dir, "events.jsonl"))
        self.faults = faults or faultlib.FaultPlan()
        self.min_ranks = min_ranks
        self.resume = resume
        self.ec = None
        self.view = None
        self.member = None
        self.error_time = None

    # -- views -------------------------------------------------------------
    def start(self):
        _Leaving.install()
        joined = ElasticComm.from_parent()
        if joined is not None:
            self.ec = joined
            self._sync_view(joiner=True)
            return
        self.ec = ElasticComm()
        if self.ec.rank == 0 and self.ec.ft_problem and self.ec.size > 1:
            log.warning("fault tolerance is off: %s", self.ec.ft_problem)
        if self.ec.rank == 0 and not self.resume:
            for shard in self.store.committed():
                os.unlink(self.store.path(shard))
            if os.path.exists(self.store.log_path):
                os.unlink(self.store.log_path)
        if self.ec.rank == 0:
            status.started()
        members = list(range(self.ec.size))
        self.view = View(id=-1, members=members, hosts=[], next_member=len(members))
        self.member = self.ec.rank
        self._sync_view()

    def _sync_view(self, joiner=False, failed=(), breakdown=None):
        """Collective: agree on the new view (ids for joiners, hosts, fired faults)."""
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
                    "fired": self.events.fired_faults(), "joiners": joiners,
                }
            else:
                state = None
            state = comm.bcast(state, root=0)
            if joiner or self.member is None:
                self.member = state["members"][self.ec.rank]
            hosts = comm.allgather(self.ec.identity())
        self.faults.fired |= set(state["fired"])
        left = {e["member"] for e in self.events.read() if e.get("event") == "leave"}
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

    def recover(self):
        """Revoke, shrink, learn who is gone, kill what is hung, agree on the next view."""
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
        # A hung (SIGSTOPped) rank is only *declared* failed; make it so, so it
        # can never wake up and commit a shard that was handed to someone else.
        # Members that left have exited already: their pids are not ours to signal.
        left = {e["member"] for e in self.events.read() if e.get("event") == "leave"}
        kill_local([old.host_of(m) for m in failed if m not in left])
        self.view = View(id=old.id, members=survivors, hosts=[old.host_of(m) for m in survivors],
                         next_member=old.next_member)
        require_min(self.ec.size, self.min_ranks)
        parts["total_s"] = time.perf_counter() - t0
        self._sync_view(failed=failed, breakdown=parts)

    # -- the loop ----------------------------------------------------------
    def run(self):
        """Run until every shard is committed and reduced; returns the summary on rank 0."""
        self.start()
        while True:
            try:
                if self.ec.rank == 0:
                    outcome = self._coordinate()
                else:
                    outcome = self._work()
                if outcome == "resized":
                    self._sync_view()
                    continue
                return outcome
            except ProcessFailure as exc:
                self.error_time = time.time()
                log.info("recovering: %s", exc)
                self.recover()

    def _fire(self, due, **context):
        for fault in due:
            self.faults.fired.add(fault.index)
            self.events.write("fault", index=fault.index, fault=str(fault), member=self.member,
                              view=self.view.id, **context)
            if fault.action != "join":
                faultlib.strike(fault)

    def _leave(self):
        self.events.write("leave", member=self.member, view=self.view.id)
        log.info("leaving the job (SIGTERM)")
        sys.stdout.flush()
        sys.stderr.flush()
        # Not MPI_Finalize: the others treat the exit as a departure and shrink past it.
        os._exit(0)

    def _work_on(self, shard, step):
        """Compute, write and commit one shard; return whether this commit was the first."""
        coordinator = self.ec.rank == 0
        self._fire(self.faults.due(member=self.member, is_coordinator=coordinator, step=step,
                                   actions=("kill", "hang", "leave")), step=step)
        self._fire(self.faults.due(member=self.member, is_coordinator=coordinator, shard=shard), shard=shard)
        result = self.job.map(shard)
        tmp = self.store.temp_path(shard)
        self.job.write_part(tmp, shard, result)
        self._fire(self.faults.due(member=self.member, is_coordinator=coordinator, step=step, shard=shard,
                                   phase="commit"), shard=shard, phase="commit")
        return self.store.commit(shard, tmp)

    def _work(self):
        comm = self.ec.comm
        with self.ec.guard():
            comm.send(("ready", None), dest=0, tag=TAG_REQ)
            while True:
                kind, *payload = comm.recv(source=0, tag=TAG_REPLY)
                if kind == "lease":
                    shard, step = payload
                    first = self._work_on(shard, step)
                    comm.send(("done", (shard, first, _Leaving.requested)), dest=0, tag=TAG_REQ)
                elif kind == "bye":
                    self._leave()
                elif kind == "resize":
                    self.ec.merge_spawned(self.job.spawn_argv, payload[0])
                    return "resized"
                elif kind == "stop":
                    return None

    def _coordinate(self):
        comm, store, view = self.ec.comm, self.store, self.view
        t_plan = time.perf_counter()
        ledger = ShardLedger(self.job.shard_sizes, done=store.committed())
        logged = {r["shard"] for r in store.logged()}
        for shard in sorted(ledger.done - logged):
            store.log_commit(shard=shard, member=None, view=view.id, recovered=True, time=time.time())
        replan_s = time.perf_counter() - t_plan
        if view.id > 0:
            self.events.write("replan", view=view.id, done=len(ledger.done), replan_s=replan_s)
        active = set(range(1, comm.Get_size()))
        parked = []
        join = []
        while True:
            step = len(ledger.done)
            join += [f for f in self.faults.due(member=self.member, is_coordinator=True, step=step,
                                                actions=("join",)) if f not in join]
            self._fire(self.faults.due(member=self.member, is_coordinator=True, step=step,
                                       actions=("kill", "hang", "leave")), step=step)
            if _Leaving.requested:
                self._leave()
            if join and len(parked) == len(active):
                return self._resize(join, parked)
            if ledger.finished and len(parked) == len(active):
                return self._finish(ledger, parked)
            if not active:
                shard = ledger.lease(self.member)
                first = self._work_on(shard, step)
                self._record(ledger, shard, self.member, first)
                continue
            with self.ec.guard():
                st = self.ec.MPI.Status()
                kind, payload = comm.recv(source=self.ec.MPI.ANY_SOURCE, tag=TAG_REQ, status=st)
            src = st.Get_source()
            member = view.members[src]
            if kind == "done":
                shard, first, leaving = payload
                self._record(ledger, shard, member, first)
                if leaving:
                    active.discard(src)
                    with self.ec.guard():
                        comm.send(("bye",), dest=src, tag=TAG_REPLY)
                    continue
            shard = None if join else ledger.lease(member)
            if shard is None:
                parked.append(src)
                continue
            with self.ec.guard():
                comm.send(("lease", shard, len(ledger.done)), dest=src, tag=TAG_REPLY)

    def _record(self, ledger, shard, member, first):
        fresh = ledger.commit(shard)
        self.store.log_commit(shard=shard, member=member, view=self.view.id, time=time.time(),
                              duplicate=not (fresh and first))

    def _resize(self, join, parked):
        count = sum(f.count for f in join)
        self._fire(join, step=None)
        comm = self.ec.comm
        with self.ec.guard():
            for src in parked:
                comm.send(("resize", count), dest=src, tag=TAG_REPLY)
        self.ec.merge_spawned(self.job.spawn_argv, count)
        return "resized"

    def _finish(self, ledger, parked):
        paths = [self.store.path(k) for k in range(ledger.n_shards)]
        summary = self.job.reduce(paths)
        self.store.remove_temps()  # left by writers killed before their commit
        with self.ec.guard():
            for src in parked:
                self.ec.comm.send(("stop",), dest=src, tag=TAG_REPLY)
        summary = dict(summary or {}, views=self.view.id + 1, shards=ledger.n_shards)
        self.events.write("finish", view=self.view.id, members=self.view.members)
        return summary

    def close(self):
        if self.ec is not None:
            self.ec.close()


def run_shard_job(job, **options):
    """Run ``job`` (a :class:`mpirt.jobs.shardjob.ShardJob`) on the current MPI job.

    Returns the reduce summary on the process that finished as coordinator, None elsewhere.
    """
    farm = Farm(job, **options)
    try:
        summary = farm.run()
    except JobError as exc:
        if farm.ec is not None and farm.ec.rank == 0:
            status.finished(exc.exit_code)
        raise
    finally:
        farm.close()
    if summary is not None:
        status.finished(0)
    return summary
