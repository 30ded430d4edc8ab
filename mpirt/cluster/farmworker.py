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
from mpirt.outputs import os_error_line

TAG_REQ, TAG_REPLY = 701, 702


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
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(exc, OSError):  # a full disk: one line, not a traceback
                raise JobError(os_error_line(exc, farm.store.path(shard))) from None
            raise
        self.written.append((shard, step, tmp))
        self._write_s = _average(self._write_s, time.perf_counter() - t0)

    def commit(self):
        """Commit every written result: durable first, then the fence, then a create-if-absent link each.

        Returns:
            ``[(shard, first)]``: ``first`` is False where the shard had been committed already.
        """
        if not self.written:
            return []
        farm, t0, count = self.farm, time.perf_counter(), len(self.written)
        try:
            farm.store.make_durable([tmp for _, _, tmp in self.written])
        except OSError as exc:
            self.discard()
            raise JobError(os_error_line(exc, farm.store.dir)) from None
        for shard, step, _ in self.written:
            farm.fire_due(step=step, shard=shard, phase="commit", held=self.held)
        lifeline.check_fence()  # a rank the others may have dropped must not commit
        done = [(shard, farm.store.link(shard, tmp)) for shard, _, tmp in self.written]
        self.written = []
        self._commit_s = _average(self._commit_s, (time.perf_counter() - t0) / count)
        return done

    def held(self, *in_hand):
        """The shards this member holds uncommitted: written, in hand, queued."""
        return [s for s, _, _ in self.written] + list(in_hand) + [s for s, _ in self.queue]

    def discard(self):
        """Remove the written, uncommitted results (the job is stopping on an error)."""
        for _, _, tmp in self.written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.written = []



def _average(mean, seconds):
    # Moving: shards differ in size, and a rank's share of the cores changes as others come and go.
    return seconds if mean is None else 0.8 * mean + 0.2 * seconds


class FarmWorker:
    """The worker loop of one view: run it; it returns ``"resized"``, or None when the job is done."""

    def __init__(self, farm):
        self.farm, self.ec = farm, farm.ec
        self.units = farm.units
        self.queue = self.units.queue = collections.deque()  # (shard, step): leased, not started
        self.done = []  # (shard, first): committed, not reported yet
        self.asked = False  # a request is out and its reply not read
        self.failed = False  # a shard failed (a full disk...): wait for the coordinator's stop

    def run(self):
        with self.ec.guard():
            while True:
                if self.queue and not (Leaving.requested or Preempt.requested):
                    shard, step = self.queue.popleft()
                    if not self.queue and not self.asked:
                        self._ask(holding=1)  # the next batch, while this last shard is worked on
                    self._write(shard, step)
                    continue
                if not self.asked:
                    self._ask(holding=0)
                outcome = self._receive()
                if outcome != "lease":
                    return outcome

    def _write(self, shard, step):
        try:
            self.units.write(shard, step)
        except RecoverableError:
            raise
        except MpirtError as exc:  # a full disk, a bad shard: the coordinator stops every rank with it
            self._fail(str(exc))

    def _ask(self, holding):
        """Commit what is written and send a request; a leaving or stopping worker hands its queue back."""
        try:
            self.done += self.units.commit()
        except RecoverableError:
            raise
        except MpirtError as exc:
            self._fail(str(exc))
            return
        returned = []
        if Leaving.requested or Preempt.requested:
            returned = [shard for shard, _ in self.queue]
            self.queue.clear()
        request = {"done": self.done, "returned": returned, "holding": holding, "unit_s": self.units.unit_s,
                   "leaving": Leaving.requested and not holding, "preempt": Preempt.requested}
        self.ec.comm.send(("req", request), dest=0, tag=TAG_REQ)
        self.done, self.asked = [], True

    def _fail(self, error):
        self.units.discard()
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
            shards, step = payload
            if self.failed:  # the answer to a request sent before the failure: wait for the stop
                self.asked = True
            else:
                self.queue.extend((shard, step + i) for i, shard in enumerate(shards))
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
