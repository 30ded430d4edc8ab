"""The step protocol, once: every elastic loop (``mpirt train``, :mod:`mpirt.elastic`, the Horovod
layer :mod:`mpirt.horovod`) commits its steps here.

A step ``s`` on every member:

1. :meth:`StepCommitter.begin`: the faults due at ``s`` strike (tests); the coordinator decides
   whether joiners come after this step (``join`` faults, and only while the job can grow);
2. the job computes its part and fills its stat slots (samples, loss...);
3. :meth:`StepCommitter.commit`: the protocol's slots are filled (this member leaving, joiners,
   a stop request), one fused reduction sums them with the gradients, the ``phase=commit``
   faults strike, and ``Agree(no error)`` decides, uniformly, whether ``s`` is committed. When it
   is not, :class:`ProcessFailure` is raised on every survivor before anything is applied;
4. the job applies the step; then :meth:`StepCommitter.stop_reason` says whether every member
   stops here (a stop request or every member leaving: the same answer everywhere, since the sums
   are), and :meth:`StepCommitter.change_members` lets leavers go and merges joiners in.

After a failure, :meth:`StepCommitter.recover` rebuilds the view and checks that the survivors
agree on the committed step. The stats are named slots (:class:`Slots`): the job's own first,
the protocol's after them, so a new slot cannot be read under another's name.
"""

import numpy as np

from mpirt.cluster.group import Leaving, Preempt
from mpirt.comm import faults as faultlib
from mpirt.errors import JobError, ProcessFailure

# The protocol's slots, after the job's own: members leaving (SIGTERM), joiners the coordinator
# decided on, members asked to stop (SIGUSR1), members whose gradient is not finite.
PROTOCOL = ("leaving", "joiners", "preempt", "nonfinite")


class Slots:
    """Named positions in a step's stats vector: ``Slots("samples", "loss").LOSS == 1``.

    The job's slots come first (the first is the sample count the gradients are divided by), then
    :data:`PROTOCOL`'s.
    """

    def __init__(self, *job):
        if not job:
            raise ValueError("a step needs at least its sample-count slot")
        self.job = tuple(job)
        self.names = self.job + PROTOCOL
        self.index = {name: i for i, name in enumerate(self.names)}
        for name, i in self.index.items():
            setattr(self, name.upper(), i)

    def __len__(self):
        return len(self.names)

    def zeros(self):
        return np.zeros(len(self.names))

    def job_indices(self):
        return tuple(range(len(self.job)))

    def named(self, totals):
        """``{"samples": ..., "loss": ...}`` of a summed vector."""
        return {name: float(totals[i]) for name, i in self.index.items()}


class StepCommitter:
    """Commits steps of a job on a :class:`mpirt.cluster.group.ElasticGroup`.

    Args:
        group: the started group.
        reducer: sums the gradients and a stats vector: ``reducer.allreduce(stats) -> totals``
            (:class:`mpirt.train.allreduce.GradAllreduce`, :class:`mpirt.train.exact.ExactReducer`).
        slots: the :class:`Slots` of ``reducer``'s stats vector.
        sparse: a :class:`mpirt.train.sparse.SparseExchange`, exchanged after the dense sums.
    """

    def __init__(self, group, reducer, slots, *, sparse=None):
        self.group, self.reducer, self.slots, self.sparse = group, reducer, slots, sparse
        self.joining = []
        self.totals = None

    # -- faults ---------------------------------------------------------------
    def mark_fired(self, step, actions=faultlib.SELF, phase="take"):
        """Every member marks what was due at ``step`` in ``phase``, not only the one it struck: a
        new coordinator must not strike a ``member=coordinator`` fault again after its victim died."""
        for f in self.group.faults.faults:
            if f.action in actions and f.phase == phase and f.step is not None and f.step <= step:
                self.group.faults.fired.add(f.index)

    def strike(self, step, phase):
        """The faults of ``phase`` due at ``step`` on this member, then marked everywhere."""
        g = self.group
        g.fire(g.faults.due(member=g.member, is_coordinator=g.is_coordinator, step=step, phase=phase,
                            actions=faultlib.SELF), step=step, **({} if phase == "take" else {"phase": phase}))
        self.mark_fired(step, faultlib.SELF, phase)

    # -- a step -----------------------------------------------------------------
    def begin(self, step):
        """Step ``step`` starts: its faults strike, the coordinator decides on joiners. Returns an
        empty stats vector for the job to fill."""
        g = self.group
        self.strike(step, "take")
        self.joining = []
        if g.is_coordinator and g.can_grow():
            self.joining = g.faults.due(member=g.member, is_coordinator=True, step=step, actions=("join",))
        return self.slots.zeros()

    def commit(self, step, stats, failed=False):
        """Reduce ``stats`` (and the gradients) and agree: the summed stats once every member
        committed ``step``. ``failed``: this member's own part of the step already failed (a
        collective of the job's, e.g. the sharded tables' exchanges): skip the reduction, vote no.

        Raises:
            ProcessFailure: some member did not commit (it failed, or a reduction failed here):
                nothing may be applied; recover and redo the step.
        """
        s = self.slots
        stats[s.LEAVING] = 1.0 if Leaving.requested else 0.0
        stats[s.JOINERS] = sum(f.count for f in self.joining)
        stats[s.PREEMPT] = 1.0 if Preempt.requested else 0.0
        totals = None
        try:
            if not failed:
                totals = self.reducer.allreduce(stats)
                if self.sparse:
                    self.sparse.exchange(1.0 / max(totals[s.SAMPLES], 1.0))
        except ProcessFailure:
            failed, totals = True, None
        self.strike(step, "commit")
        self._agree(failed, f"step {step} not committed by every member")
        self.totals = totals
        return totals

    def agree_phase(self, step, phase, work):
        """Run ``work()`` (a collective that is not a step: an evaluation) under ``phase``'s faults and
        agree on it like a step; its result, or :class:`ProcessFailure` on every survivor."""
        self.strike(step, phase)
        out, failed = None, False
        try:
            out = work()
        except ProcessFailure:
            failed = True
        self._agree(failed, f"{phase} at step {step} not completed by every member")
        return out

    def _agree(self, failed, why):
        """``Agree(not failed)``: return when every member succeeded, else raise ``ProcessFailure(why)``
        on every survivor (a failure inside Agree itself counts as a no)."""
        try:
            ok = self.group.ec.agree(not failed)
        except ProcessFailure:
            ok = False
        if not ok:
            raise ProcessFailure(why)

    # -- after a committed step -----------------------------------------------------------
    def stop_reason(self, totals):
        """Why every member stops after this committed step, or None: the same on every member."""
        s = self.slots
        if totals[s.PREEMPT]:
            return "on request (SIGUSR1)"
        if totals[s.LEAVING] >= self.group.size:  # Slurm's preemption and scancel: SIGTERM to all
            return "as every member was asked to leave (SIGTERM)"
        return None

    def change_members(self, step, totals, state=None, before_leave=None):
        """Collective after the job applied ``step``: leavers announce and go, joiners are merged.

        Args:
            state: called on the coordinator for what joiners receive (the replicated state).
            before_leave: called on a leaving member before it exits.

        Returns:
            True when joiners were merged (the view changed).
        """
        self.release_leavers(totals, before_leave)
        return self.merge_joiners(step, totals, state)

    def release_leavers(self, totals, before_leave=None):
        """Collective when ``totals`` counts leavers: they announce themselves (the view records them
        as left, not failed), then exit; the others go on with nothing to redo."""
        g = self.group
        if totals[self.slots.LEAVING]:
            g.announce_leaving(Leaving.requested)
            if Leaving.requested:
                if before_leave:
                    before_leave()
                g.leave()

    def merge_joiners(self, step, totals, state=None):
        """Collective: spawn and merge the joiners ``totals`` counts; True when the view changed.
        ``state()`` (called on the coordinator) is what they start from."""
        g = self.group
        self.mark_fired(step, ("join",))
        if not totals[self.slots.JOINERS]:
            return False
        g.fire(self.joining, step=step)
        g.grow(int(totals[self.slots.JOINERS]))
        g.sync_view(payload=state() if g.is_coordinator and state else None)
        return True

    def recover(self, step):
        """After :class:`ProcessFailure`: the next view (Revoke, Shrink, agree), checked to be at the
        same committed ``step`` on every survivor."""
        agreed = self.group.recover(payload={"step": step})["step"]
        if agreed != step:
            # Agree is uniform, so this cannot happen; if it ever does, stop rather than diverge.
            raise JobError(f"members disagree on the committed step ({step} here, {agreed} on the "
                           f"coordinator) after a failure")
