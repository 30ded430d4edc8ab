"""The task farm: a coordinator leases shards to workers, over views that change.

Rank 0 of the current view coordinates; the others pull leases (so fast ranks take more), in
batches: about ``MPIRT_LEASE_S`` (0.05 s) of the worker's measured work, at most the pending
shards over twice the workers (guided self-scheduling: the batches shrink to one shard at the tail,
which stays even), and at most twice the worker's batch before in this view (1, 2, 4...).
A worker asks for its next batch as it starts the last shard of the one in hand, so the round trip
overlaps that shard; its request reports what it committed since the last. It commits its results
in groups, in the background while it works on: written to temporary names, made durable together,
then one create-if-absent ``os.link`` each (:mod:`mpirt.cluster.farmworker`). Per-shard leases,
fsyncs and commit-log writes made the farm 1.30-1.49x a bare master/worker loop on 1,000 small
shards and 4 ranks; batched, 1.08-1.14x (same runs; bench/results/ledger-2core.md).

Exactly once, with batches in flight:

- A shard is done when its result exists under its final name. The link is create-if-absent, so a
  second commit is detected (and recorded as a duplicate), never kept; a result is durable before it
  is linked; a member that may have been dropped (fenced) links nothing.
- The coordinator counts only what workers report committed, and parks a worker (the only state in
  which a view may end: finish, resize, stop) only once it reports holding nothing.
- On any process failure every survivor revokes and shrinks (``ElasticComm.shrink``). A worker first
  lets its groups in flight reach the disk and drops the rest: its queue and its results written but
  not committed. The new rank 0 rebuilds the ledger from the committed files, so every shard not on
  disk, the dead members' leases and the survivors' dropped ones, is leased again, and nobody else
  holds it; a commit nobody reported is recorded as recovered. The ``replan`` event names what
  members now gone held.
- A leaving or stopping worker commits what it wrote and hands back the shards it has not started
  (``handback`` event); a view in which a member left changes before it ends. Joiners are spawned
  when every worker is parked, so a resize never splits a batch.
"""

import os
import time

from mpirt.cluster.farmworker import TAG_REPLY, TAG_REQ, FarmWorker, Units
from mpirt.cluster.group import ElasticGroup, Leaving, Preempt, run_job
from mpirt.cluster.ledger import BATCH_S, CommitStore, ShardLedger, batch_size
from mpirt.cluster.parts import PartsDir, check_not_link
from mpirt.comm import faults as faultlib
from mpirt.comm import lifeline, status
from mpirt.config import LEASE_S, env_float
from mpirt.errors import JobError, MpirtError, Preempted, ProcessFailure, UsageError
from mpirt.log import get_logger
from mpirt.outputs import os_error_line

log = get_logger("mpirt.farm")


class _Round:
    """The coordinator's state for one view."""

    def __init__(self, ledger, active):
        self.ledger = ledger
        self.active = active  # ranks of the workers still in the job
        self.parked = []  # ranks holding no lease, waiting for the next lease, a resize or the end
        self.unit_s = {}  # rank -> its last reported seconds per shard
        self.batch = {}  # rank -> the size of the last batch it was leased
        self.left = set()  # members that left in this view (said bye)
        self.join = []  # join faults due: grow once every worker is parked
        self.stopping = False  # a stop request (SIGUSR1): lease nothing more, let the leases commit, stop
        self.failure = None  # a worker's one-line error: the same, then every rank stops with it

    @property
    def closing(self):
        """Nothing more is leased in this view."""
        return bool(self.join) or self.stopping or self.failure is not None


class Farm:
    """One process's part in a shard job. Use :func:`run_shard_job`."""

    def __init__(self, job, *, parts_dir, events_path=None, faults=None, min_ranks=1, resume=False,
                 remove_parts=False, group=None):
        self.job = job
        self.remove_parts = remove_parts
        check_not_link(parts_dir)  # before anything (the default events log) is created in it
        self.parts = PartsDir(parts_dir)
        self.store = CommitStore(parts_dir)
        # ``group``: one already started (a fake world's member, in unit tests).
        self.group = group or ElasticGroup(events_path=events_path or os.path.join(parts_dir, "events.jsonl"),
                                           faults=faults, min_ranks=min_ranks, spawn_argv=job.spawn_argv)
        self.events = self.group.events
        self.faults = self.group.faults
        self.resume = resume
        self.units = Units(self)
        self._round = None  # the coordinator's state in the last view it coordinated
        self.lease_s = env_float(LEASE_S, BATCH_S)  # every rank checks it alike, before the job starts
        if self.lease_s <= 0:
            raise UsageError(f"{LEASE_S}={self.lease_s:g}: give the seconds of work a lease aims at (> 0)")

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
        group = self.group.start(stoppable=True) if self.group.ec is None else self.group
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
                    outcome = FarmWorker(self).run()
                if outcome == "resized":
                    self.group.sync_view()
                    continue
                return outcome
            except ProcessFailure as exc:
                self.group.error_time = time.time()
                log.info("recovering: %s", exc)
                # A group committing in the background reaches the disk before this rank joins the
                # shrink, so the next coordinator counts it. Results written but not committed are
                # nobody's lease in the next view: committed later, a shard would be done twice.
                self.units.settle()
                self.group.recover()

    def _fire(self, due, **context):
        for fault in due:
            if fault.action != "join":
                self.store.log_fault(fault.index)
        self.group.fire(due, **context)

    def fire_due(self, *, step=None, shard=None, phase="take", actions=faultlib.ACTIONS, held=None):
        """Strike this member's faults that are due at this point (see :mod:`mpirt.comm.faults`).

        ``held``: a function giving what this member holds uncommitted, for the fault's record.
        """
        due = self.faults.due(member=self.member, is_coordinator=self.ec.rank == 0, step=step, shard=shard,
                              phase=phase, actions=actions)
        if due:
            context = {"step": step} if shard is None else {"shard": shard}
            if phase != "take":
                context["phase"] = phase
            if held is not None:
                context["held"] = held()
            self._fire(due, **context)

    def _coordinate(self):
        comm = self.ec.comm
        # A coordinator taking over: the one before may still hold the lock (frozen, cut off; fenced).
        self.parts.lock.take(self.group.gone)
        self.units.queue = ()  # a worker's queue of the view before is nobody's now
        r = self._round = _Round(self._rebuild(), active=set(range(1, comm.Get_size())))
        ledger = r.ledger
        while True:
            step = len(ledger.done)
            if self.group.can_grow():
                r.join += [f for f in self.faults.due(member=self.member, is_coordinator=True, step=step,
                                                      actions=("join",)) if f not in r.join]
            self.fire_due(step=step, actions=faultlib.SELF, held=lambda: _by_member(ledger.leased))
            if Leaving.requested:
                self.group.leave()
            r.stopping = r.stopping or Preempt.requested
            if len(r.parked) == len(r.active):  # no worker holds a lease: the view may end here
                if r.left:
                    # Ending the view with a member gone, a parked worker's receive may be interrupted by
                    # its exit before the last word arrives (it then recovered without this coordinator,
                    # which had finished): shrink past it first, as after a failure.
                    raise ProcessFailure(f"member(s) {sorted(r.left)} left: the view changes before it ends")
                if r.failure:
                    self._stop_all(r.parked, "failed")
                    raise JobError(r.failure)
                if r.stopping and not ledger.finished:
                    return self._stop_preempted(ledger, r.parked)
                if r.join:
                    return self._resize(r.join, r.parked)
                if ledger.finished:
                    return self._finish(ledger, r.parked)
            if not r.active and not r.closing:  # alone: work, one shard at a time
                self.units.write(ledger.lease(self.member), step)
                self._record(ledger, self.units.commit(), self.member)
                continue
            with self.ec.guard():
                st = self.ec.MPI.Status()
                kind, msg = comm.recv(source=self.ec.MPI.ANY_SOURCE, tag=TAG_REQ, status=st)
                self._answer(r, st.Get_source(), kind, msg)

    def _rebuild(self):
        """The ledger from the committed files (a new view, a new coordinator, --resume)."""
        t_plan, view, store = time.perf_counter(), self.view, self.store
        ledger = ShardLedger(self.job.shard_sizes, done=store.committed())
        self.faults.fired |= store.faults_fired()
        logged = {r["shard"] for r in store.logged()}
        lifeline.check_fence()
        recovered = sorted(ledger.done - logged)
        if recovered:
            store.log_commits([dict(shard=shard, member=None, view=view.id, recovered=True, time=time.time())
                               for shard in recovered])
        if view.id > 0:
            # What members now gone held leased and uncommitted (known when this coordinator leased it):
            # leased again from here, like every shard not committed.
            before = self._round.ledger.leased if self._round else {}
            released = _by_member({s: m for s, m in before.items() if m not in view.members and s not in ledger.done})
            self.events.write("replan", view=view.id, done=len(ledger.done), replan_s=time.perf_counter() - t_plan,
                              released=released if self._round else None)
        return ledger

    def _answer(self, r, src, kind, msg):
        """Take a worker's report; lease it a batch, park it, or let it go."""
        member, ledger = self.view.members[src], r.ledger
        self._record(ledger, msg["done"], member)
        if kind == "failed":
            r.failure = r.failure or msg["error"]
            r.parked.append(src)
            return
        if msg["returned"]:
            ledger.give_back(msg["returned"])
            self.events.write("handback", member=member, view=self.view.id, shards=msg["returned"])
        r.stopping = r.stopping or msg["preempt"]
        r.unit_s[src] = msg["unit_s"]
        if not msg["leaving"]:
            self._lease(r, src, holding=msg["holding"])
            return
        self.group.leaving.add(member)
        r.left.add(member)
        r.active.discard(src)
        self.ec.comm.send(("bye",), dest=src, tag=TAG_REPLY)
        while r.parked and ledger.pending and not r.closing:  # the shards it handed back, to those waiting
            self._lease(r, r.parked.pop(0), holding=0)

    def _lease(self, r, src, holding):
        """Send ``src`` its next batch; with nothing to give, park it once it holds nothing."""
        ledger = r.ledger
        # At most twice the batch before (1, 2, 4...): a view starts with small batches, so the first
        # commits after a change are reported at once and a join or a stop waits little.
        count = min(batch_size(ledger.pending, len(r.active), r.unit_s.get(src), self.lease_s),
                    2 * r.batch[src] if src in r.batch else 1)
        shards = [] if r.closing else ledger.lease_many(self.view.members[src], count)
        r.batch[src] = max(len(shards), 1)
        if not shards and not holding:
            r.parked.append(src)
            return
        self.ec.comm.send(("lease", shards, len(ledger.done)), dest=src, tag=TAG_REPLY)

    def _record(self, ledger, done, member):
        """Record committed shards, in one write to the commit log."""
        if not done:
            return
        # The ledger is the record of exactly-once: a coordinator frozen between a worker's report and
        # this line must not write it when it thaws, after the others went on without it.
        lifeline.check_fence()
        now, view = time.time(), self.view.id
        records = []
        for shard, first in done:
            fresh = ledger.commit(shard)
            records.append(dict(shard=shard, member=member, view=view, time=now, duplicate=not (fresh and first)))
        self.store.log_commits(records)

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

def _by_member(leased):
    """{member: [shards]} of a ledger's leases (what the workers hold when the coordinator fails)."""
    held = {}
    for shard, member in sorted(leased.items()):
        held.setdefault(member, []).append(shard)
    return held


def run_shard_job(job, **options):
    """Run ``job`` (a :class:`mpirt.jobs.shardjob.ShardJob`) on the current MPI job.

    Options: ``parts_dir`` (required), ``events_path``, ``faults``, ``min_ranks``, ``resume``, and
    ``remove_parts`` (delete ``parts_dir`` once the output is written).

    Returns the reduce summary on the process that finished as coordinator, None elsewhere.
    """
    farm = Farm(job, **options)

    def work():
        summary = farm.run()
        if summary is not None and farm.remove_parts:
            # Under the lock still: released first, a new job could claim the directory as we empty it.
            try:
                farm.parts.remove()
            except OSError as exc:  # the output is written: a leftover directory is not a failure
                log.warning("could not remove %s: %s", farm.parts.dir, exc)
        return summary

    return run_job(farm.group, work, farm.parts.release)
