"""The task farm: a coordinator leases shards to workers, over views that change.

Rank 0 of the current view coordinates; the others pull leases (so fast ranks
take more). A worker commits a shard's result on disk, then reports it. On any
process failure every survivor revokes and shrinks (``ElasticComm.shrink``); the
new rank 0 rebuilds the ledger from the committed results, so nothing is lost,
and commits are create-if-absent, so nothing is done twice. Joiners are spawned
at unit boundaries, when every worker is parked waiting for its next lease.
"""

import contextlib
import os
import time

from mpirt.cluster.group import ElasticGroup, Leaving, Preempt
from mpirt.cluster.ledger import CommitStore, ShardLedger
from mpirt.cluster.parts import PartsDir, check_not_link
from mpirt.comm import faults as faultlib
from mpirt.comm import lifeline, status
from mpirt.errors import JobError, MpirtError, Preempted, ProcessFailure, RecoverableError
from mpirt.log import get_logger
from mpirt.outputs import os_error_line

log = get_logger("mpirt.farm")

TAG_REQ, TAG_REPLY, TAG_VIEW = 701, 702, 703


class Farm:
    """One process's part in a shard job. Use :func:`run_shard_job`."""

    def __init__(self, job, *, parts_dir, events_path=None, faults=None, min_ranks=1, resume=False,
                 remove_parts=False):
        self.job = job
        self.remove_parts = remove_parts
        check_not_link(parts_dir)  # before anything (the default events log) is created in it
        self.parts = PartsDir(parts_dir)
        self.store = CommitStore(parts_dir)
        self.group = ElasticGroup(events_path=events_path or os.path.join(parts_dir, "events.jsonl"),
                                  faults=faults, min_ranks=min_ranks, spawn_argv=job.spawn_argv)
        self.events = self.group.events
        self.faults = self.group.faults
        self.resume = resume

    @property
    def ec(self):
        return self.group.ec

    @property
    def view(self):
        return self.group.view

    @property
    def member(self):
        return self.group.member

    def start(self):
        group = self.group.start(stoppable=True)
        if group.joined:
            group.sync_view(joiner=True)
            return
        refusal = None
        if self.ec.rank == 0:
            try:
                self.parts.claim(self.job.identity(), self.resume)
            except MpirtError as exc:
                refusal = str(exc)
            except OSError as exc:
                refusal = os_error_line(exc, exc.filename or self.parts.dir)
            except Exception as exc:  # reported and fatal, but after the bcast: the others wait in it
                refusal = f"{self.parts.dir}: cannot claim it for this job: {type(exc).__name__}: {exc}"
        with self.ec.guard():
            refusal = self.ec.comm.bcast(refusal, root=0)
        if refusal is not None:
            raise JobError(refusal if self.ec.rank == 0 else "")  # one line, from the coordinator
        if self.ec.rank == 0:
            status.started()
        group.sync_view()

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
                    self.group.sync_view()
                    continue
                return outcome
            except ProcessFailure as exc:
                self.group.error_time = time.time()
                log.info("recovering: %s", exc)
                self.group.recover()

    def _fire(self, due, **context):
        for fault in due:
            if fault.action != "join":
                self.store.log_fault(fault.index)
        self.group.fire(due, **context)

    def _work_on(self, shard, step):
        """Compute, write and commit one shard; return whether this commit was the first."""
        coordinator = self.ec.rank == 0
        self._fire(self.faults.due(member=self.member, is_coordinator=coordinator, step=step,
                                   actions=faultlib.SELF), step=step)
        self._fire(self.faults.due(member=self.member, is_coordinator=coordinator, shard=shard), shard=shard)
        result = self.job.map(shard)
        tmp = self.store.temp_path(shard)
        try:
            self.job.write_part(tmp, shard, result)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(exc, OSError):  # a full disk: one line, not a traceback
                raise JobError(os_error_line(exc, self.store.path(shard))) from None
            raise
        self._fire(self.faults.due(member=self.member, is_coordinator=coordinator, step=step, shard=shard,
                                   phase="commit"), shard=shard, phase="commit")
        lifeline.check_fence()  # a rank the others may have dropped must not commit
        return self.store.commit(shard, tmp)

    def _work(self):
        comm = self.ec.comm
        with self.ec.guard():
            comm.send(("ready", None), dest=0, tag=TAG_REQ)
            while True:
                # Only the coordinator sends TAG_REPLY. ANY_SOURCE because ULFM interrupts such a receive
                # when any member is known failed: a receive from rank 0 alone waited forever when the
                # failures cut this rank off from the coordinator's revoke (its reliable broadcast goes
                # through neighbours, and every neighbour was dead or frozen).
                kind, *payload = comm.recv(source=self.ec.MPI.ANY_SOURCE, tag=TAG_REPLY)
                if kind == "lease":
                    shard, step = payload
                    try:
                        first = self._work_on(shard, step)
                    except RecoverableError:
                        raise
                    except MpirtError as exc:  # a full disk, a bad shard: the coordinator stops every
                        comm.send(("failed", str(exc)), dest=0, tag=TAG_REQ)  # rank with this one line
                        continue
                    comm.send(("done", (shard, first, Leaving.requested, Preempt.requested)), dest=0, tag=TAG_REQ)
                elif kind == "bye":
                    self.group.leave()
                elif kind == "resize":
                    self.group.grow(payload[0])
                    return "resized"
                elif kind == "stop":
                    if payload and payload[0] == "preempted":
                        raise Preempted("")
                    if payload and payload[0] == "failed":
                        raise JobError("")  # the coordinator prints why
                    return None

    def _coordinate(self):
        comm, store, view = self.ec.comm, self.store, self.view
        # A coordinator taking over: the one before may still hold the lock (frozen, cut off; fenced).
        self.parts.lock.take(self.group.gone)
        t_plan = time.perf_counter()
        ledger = ShardLedger(self.job.shard_sizes, done=store.committed())
        self.faults.fired |= store.faults_fired()
        logged = {r["shard"] for r in store.logged()}
        lifeline.check_fence()
        for shard in sorted(ledger.done - logged):
            store.log_commit(shard=shard, member=None, view=view.id, recovered=True, time=time.time())
        replan_s = time.perf_counter() - t_plan
        if view.id > 0:
            self.events.write("replan", view=view.id, done=len(ledger.done), replan_s=replan_s)
        active = set(range(1, comm.Get_size()))
        parked = []
        join = []
        stopping = False  # a stop request (SIGUSR1): lease nothing more, let the leases commit, stop
        failure = None  # a worker's one-line error: the same, then every rank stops with it
        while True:
            step = len(ledger.done)
            if self.group.can_grow():
                join += [f for f in self.faults.due(member=self.member, is_coordinator=True, step=step,
                                                    actions=("join",)) if f not in join]
            self._fire(self.faults.due(member=self.member, is_coordinator=True, step=step,
                                       actions=faultlib.SELF), step=step)
            if Leaving.requested:
                self.group.leave()
            stopping = stopping or Preempt.requested
            if failure and len(parked) == len(active):
                self._stop_all(parked, "failed")
                raise JobError(failure)
            if stopping and not ledger.finished and len(parked) == len(active):
                return self._stop_preempted(ledger, parked)
            if join and len(parked) == len(active):
                return self._resize(join, parked)
            if ledger.finished and len(parked) == len(active):
                return self._finish(ledger, parked)
            if not active and not (stopping or failure):
                shard = ledger.lease(self.member)
                first = self._work_on(shard, step)
                self._record(ledger, shard, self.member, first)
                continue
            with self.ec.guard():
                st = self.ec.MPI.Status()
                kind, payload = comm.recv(source=self.ec.MPI.ANY_SOURCE, tag=TAG_REQ, status=st)
            src = st.Get_source()
            member = view.members[src]
            if kind == "failed":
                failure = failure or payload
                parked.append(src)
                continue
            if kind == "done":
                shard, first, leaving, preempt = payload
                stopping = stopping or preempt
                self._record(ledger, shard, member, first)
                if leaving:
                    self.group.leaving.add(member)
                    active.discard(src)
                    with self.ec.guard():
                        comm.send(("bye",), dest=src, tag=TAG_REPLY)
                    continue
            shard = None if (join or stopping or failure) else ledger.lease(member)
            if shard is None:
                parked.append(src)
                continue
            with self.ec.guard():
                comm.send(("lease", shard, len(ledger.done)), dest=src, tag=TAG_REPLY)

    def _record(self, ledger, shard, member, first):
        # The ledger is the record of exactly-once: a coordinator frozen between a worker's "done"
        # and this line must not write it when it thaws, after the others went on without it.
        lifeline.check_fence()
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
        self.group.grow(count)
        return "resized"

    def _finish(self, ledger, parked):
        lifeline.check_fence()
        paths = [self.store.path(k) for k in range(ledger.n_shards)]
        try:
            summary = self.job.reduce(paths)
        except OSError as exc:
            self._stop_all(parked, "failed")
            raise JobError(os_error_line(exc, getattr(self.job, "out_path", None) or self.parts.dir)) from None
        self.store.remove_temps()  # left by writers killed before their commit
        self._stop_all(parked)
        summary = dict(summary or {}, views=self.view.id + 1, shards=ledger.n_shards)
        self.events.write("finish", view=self.view.id, members=self.view.members)
        return summary

    def _stop_preempted(self, ledger, parked):
        """Every lease has come back committed: tell the workers, stop with exit status 75."""
        self._stop_all(parked, "preempted")
        self.events.write("preempted", view=self.view.id, members=self.view.members, done=len(ledger.done))
        raise Preempted(f"stopped on request (SIGUSR1) with {len(ledger.done)} of {ledger.n_shards} shards "
                        f"committed; run again with --resume to go on")

    def _stop_all(self, parked, why=None):
        with self.ec.guard():
            for src in parked:
                self.ec.comm.send(("stop", why) if why else ("stop",), dest=src, tag=TAG_REPLY)

    def close(self, failed=False):
        self.parts.release()
        self.group.close(failed)


def run_shard_job(job, **options):
    """Run ``job`` (a :class:`mpirt.jobs.shardjob.ShardJob`) on the current MPI job.

    Options: ``parts_dir`` (required), ``events_path``, ``faults``, ``min_ranks``, ``resume``, and
    ``remove_parts`` (delete ``parts_dir`` once the output is written).

    Returns the reduce summary on the process that finished as coordinator, None elsewhere.
    """
    farm = Farm(job, **options)
    failed = True
    try:
        summary = farm.run()
        if summary is not None and farm.remove_parts:
            # Under the lock still: released first, a new job could claim the directory as we empty it.
            try:
                farm.parts.remove()
            except OSError as exc:  # the output is written: a leftover directory is not a failure
                log.warning("could not remove %s: %s", farm.parts.dir, exc)
        failed = False
    except (JobError, Preempted) as exc:
        failed = not isinstance(exc, Preempted)  # a requested stop ends cleanly everywhere
        if farm.ec is not None and farm.ec.rank == 0 and getattr(exc, "reports_status", True):
            status.finished(exc.exit_code)
        raise
    finally:
        farm.close(failed)
    if summary is not None:
        status.finished(0)
    return summary
