"""A farm worker's side: batches of leases, the next one asked for ahead, results committed in groups.

The protocol (tags in :mod:`mpirt.cluster.farm`). A worker has at most one request out. A request
reports what it committed since the last one and how many leased shards it still holds; the
coordinator answers with a lease (a batch of shards, possibly empty), or, once the worker holds
nothing, parks it until there is a lease, a resize or the end. The worker asks for its next batch
as it starts the last shard of the one in hand, so the round trip overlaps that shard's work.

A batch's results are written to temporary names, then committed as a group (made durable, then
one create-if-absent link each) just before the next request: the request reports exactly what
is committed. A failure abandons the queue and the uncommitted results; the new coordinator
rebuilds the ledger from the committed files, so those shards are simply leased again.
"""

import collections
import contextlib
import os
import time

from mpirt.cluster.group import Leaving, Preempt
from mpirt.comm import faults as faultlib
from mpirt.comm import lifeline
from mpirt.errors import JobError, MpirtError, Preempted, RecoverableError
from mpirt.log import get_logger
from mpirt.outputs import os_error_line

log = get_logger("mpirt.farm")

TAG_REQ, TAG_REPLY = 701, 702
# Groups a worker may have committing in the background before it waits for the oldest. Not one: while
# other jobs wrote to the same disk, a shard's fsyncs took 1.1-2.6 ms instead of 0.3-0.4 (bench ledger,
# 4 ranks), and a worker waiting on each group in turn lost the overlap. Bounded: each holds temporaries.
IN_FLIGHT = 4


class Units:
    """One member's shards: computed and written one by one, committed together.

    Args:
        farm: the :class:`mpirt.cluster.farm.Farm` (job, store, faults, member).
    """

    def __init__(self, farm):
        self.farm = farm
        self.written = []  # (shard, step, tmp): written under a temporary name, not committed
        self.queue = ()  # the worker's leased shards not started yet (for the faults' record)
        self._write_s = self._commit_s = None  # moving averages, seconds per shard
        self._pool = None  # the thread that commits in the background (made on first use)
        self._flights = collections.deque()  # the futures of the groups it is committing, oldest first

    @property
    def unit_s(self):
        """Seconds a shard takes here, computed, written and committed (what batches are sized by)."""
        if self._write_s is None:
            return None
        return self._write_s + (self._commit_s or 0.0)

    def write(self, shard, step):
        """Compute ``shard`` and write its result under a temporary name (committed by :meth:`commit`)."""
        farm, t0 = self.farm, time.perf_counter()
        held = lambda: self.held(shard)  # noqa: E731
        farm.fire_due(step=step, actions=faultlib.SELF, held=held)
        farm.fire_due(shard=shard, held=held)
        result = farm.job.map(shard)
        tmp = farm.store.temp_path(shard)
        try:
            farm.job.write_part(tmp, shard, result)
        except BaseException as exc:
            _remove([tmp])
            if isinstance(exc, OSError):  # a full disk: one line, not a traceback
                raise JobError(os_error_line(exc, farm.store.path(shard))) from None
            raise
        self.written.append((shard, step, tmp))
        self._write_s = _average(self._write_s, time.perf_counter() - t0)

    def commit(self, wait=True, step=None):
        """Commit the written results: durable first, then the fence, then a create-if-absent link each.

        Args:
            wait: False: commit them in the background (overlapping the next shards' work) and return
                what the groups before have committed by now; True: return once every written result
                is committed.
            step: the shards committed in the job as this member last heard (for step faults).

        Returns:
            ``[(shard, first)]``: ``first`` is False where the shard had been committed already.
        """
        done = self._collect(wait)
        group, self.written = self.written, []
        if len(group) == 1 or (group and wait):  # one shard: reported at once (the first after a change)
            done += self._commit_group(group, step)
        elif group:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpirt-commit")
            self._flights.append(self._pool.submit(self._commit_group, group, step))
        return done

    def settle(self):
        """At the end of a view: let a group in flight reach the disk (the next coordinator counts what is
        there), and remove what is written but not committed (nobody's lease in the next view)."""
        while self._flights:
            try:
                self._collect()
            except MpirtError as exc:  # a full disk: its shards are not committed, and will be leased again
                log.warning("a commit in flight failed as the view ended: %s", exc)
        self.discard()

    def _collect(self, wait=True):
        """What the background commits finished: all of them (waiting), or those done by now, waiting for
        the oldest only while IN_FLIGHT groups are out. A group's error is raised here."""
        done = []
        while self._flights and (wait or self._flights[0].done() or len(self._flights) >= IN_FLIGHT):
            done += self._flights.popleft().result()
        return done

    def _commit_group(self, group, step):
        farm, t0 = self.farm, time.perf_counter()
        try:
            farm.store.make_durable([tmp for _, _, tmp in group])
        except OSError as exc:
            _remove([tmp for _, _, tmp in group])
            raise JobError(os_error_line(exc, farm.store.dir)) from None
        for shard, taken, _ in group:  # a step fault strikes at the commit of a shard taken then, or later
            farm.fire_due(step=max(taken, step or 0), shard=shard, phase="commit",
                          held=lambda: [s for s, _, _ in group])
        lifeline.check_fence()  # a rank the others may have dropped must not commit
        done = [(shard, farm.store.link(shard, tmp)) for shard, _, tmp in group]
        self._commit_s = _average(self._commit_s, (time.perf_counter() - t0) / len(group))
        return done

    def held(self, *in_hand):
        """The shards this member holds uncommitted and not being committed: written, in hand, queued."""
        return [s for s, _, _ in self.written] + list(in_hand) + list(self.queue)

    def discard(self):
        """Remove the written results not committed (a failure, or the job stopping on an error)."""
        _remove([tmp for _, _, tmp in self.written])
        self.written = []


def _remove(paths):
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _average(mean, seconds):
    # Moving: shards differ in size, and a rank's share of the cores changes as others come and go.
    return seconds if mean is None else 0.8 * mean + 0.2 * seconds


class FarmWorker:
    """The worker loop of one view: run it; it returns ``"resized"``, or None when the job is done."""

    def __init__(self, farm):
        self.farm, self.ec = farm, farm.ec
        self.units = farm.units
        self.queue = self.units.queue = collections.deque()  # shards leased, not started
        # The shards committed in the job, as this worker knows it: the count the coordinator sent with
        # its last reply, plus the shards taken here since (each shard's "step", for step faults).
        self.heard = self.taken = 0
        self.fresh = True  # nothing written in this view yet: ask for one shard at a time (see _ask)
        self.done = []  # (shard, first): committed, not reported yet
        self.asked = False  # a request is out and its reply not read
        self.failed = False  # a shard failed (a full disk...): wait for the coordinator's stop

    def run(self):
        with self.ec.guard():
            while True:
                if self.queue and not (Leaving.requested or Preempt.requested):
                    shard, step = self.queue.popleft(), self.step
                    self.taken += 1
                    if not self.queue and not self.asked:
                        self._ask(holding=1)  # the next batch, while this last shard is worked on
                    self._write(shard, step)
                    continue
                if not self.asked:
                    self._ask(holding=0)
                outcome = self._receive()
                if outcome != "lease":
                    return outcome

    @property
    def step(self):
        return self.heard + self.taken

    def _write(self, shard, step):
        try:
            self.units.write(shard, step)
            self.fresh = False
        except RecoverableError:
            raise
        except MpirtError as exc:  # a full disk, a bad shard: the coordinator stops every rank with it
            self._fail(str(exc))

    def _ask(self, holding):
        """Commit what is written and send a request; a leaving or stopping worker hands its queue back.

        Asking ahead (``holding``), the written results are committed in the background while the
        last shard is worked on; the request reports the group committed before. Asking with nothing
        held, every result is committed first, so the coordinator may park, resize or stop.
        """
        try:
            self.done += self.units.commit(wait=not holding, step=self.step)
        except RecoverableError:
            raise
        except MpirtError as exc:
            self._fail(str(exc))
            return
        returned = []
        if Leaving.requested or Preempt.requested:
            returned = list(self.queue)
            self.queue.clear()
        # A new view starts with single shards, each reported as soon as it is committed: the first
        # commits after a failure are what its recovery time is measured to.
        unit_s = None if self.fresh else self.units.unit_s
        request = {"done": self.done, "returned": returned, "holding": holding, "unit_s": unit_s,
                   "leaving": Leaving.requested and not holding, "preempt": Preempt.requested}
        self.ec.comm.send(("req", request), dest=0, tag=TAG_REQ)
        self.done, self.asked = [], True

    def _fail(self, error):
        self.units.settle()
        self.queue.clear()
        self.ec.comm.send(("failed", {"error": error, "done": self.done}), dest=0, tag=TAG_REQ)
        self.done, self.failed, self.asked = [], True, True

    def _receive(self):
        # Only the coordinator sends TAG_REPLY. ANY_SOURCE because ULFM interrupts such a receive when
        # any member is known failed: a receive from rank 0 alone waited forever when the failures cut
        # this rank off from the coordinator's revoke (its reliable broadcast goes through neighbours,
        # and every neighbour was dead or frozen).
        kind, *payload = self.ec.comm.recv(source=self.ec.MPI.ANY_SOURCE, tag=TAG_REPLY)
        self.asked = False
        if kind == "lease":
            shards, self.heard = payload
            self.taken = 0
            if self.failed:  # the answer to a request sent before the failure: wait for the stop
                self.asked = True
            else:
                self.queue.extend(shards)
            return "lease"
        if kind == "bye":
            self.farm.group.leave()
        if kind == "resize":
            self.farm.group.grow(payload[0])
            return "resized"
        why = payload[0] if payload else None  # "stop"
        if why == "preempted":
            raise Preempted("")
        if why == "failed":
            raise JobError("")  # the coordinator prints why
        return None
