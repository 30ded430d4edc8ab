"""Elastic training in your own PyTorch loop: the counterpart of Horovod's ``hvd.elastic.run``,
``State`` and ``DistributedOptimizer``, on MPI with ULFM.

    import mpirt.elastic as elastic

    group = elastic.init()                       # join the job (a spawned joiner merges here)
    model = Net(); opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = elastic.DistributedOptimizer(opt, model.parameters(), group)
    state = elastic.TorchState(model, opt, step=0)

    @elastic.run(group)
    def train(state):
        while state.step < total_steps:
            x, y = my_slice(state.step, group.rank, group.size)   # from (seed, step) only
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(model(x), y, reduction="sum").backward()
            opt.step(samples=len(y))   # allreduce, Agree, apply grad_sum / samples_sum
            state.step += 1

    train(state)

``opt.step`` commits a step on every member or on none (the protocol of :mod:`mpirt.cluster.commit`,
the one ``mpirt train`` uses): when a member dies or hangs it raises
:class:`mpirt.errors.ProcessFailure` before anything is applied; ``run`` then rebuilds the
communicator in place (Revoke, Shrink), checks that the survivors are at the same committed step
and calls ``train`` again, which redoes that step on the survivors. Joins from ``MPIRT_FAULTS``
(``join:count=C:step=S``) are merged in after a committed step and get the state; a member sent
SIGTERM leaves after a committed step. Unlike Horovod's elastic mode this needs no driver process
and no restart. (For Horovod's own API on the same runtime, see :mod:`mpirt.horovod.torch`.)
"""

import functools

from mpirt.cluster.commit import Slots, StepCommitter
from mpirt.cluster.group import ElasticGroup
from mpirt.errors import Preempted, ProcessFailure

SLOTS = Slots("samples", "loss")
SAMPLES, LOSS = SLOTS.SAMPLES, SLOTS.LOSS


def init(events=None, min_ranks=1, spawn_argv=None, stoppable=False):
    """Join the MPI job (initialises MPI) and return the started :class:`ElasticGroup`.

    ``events``: the JSON-lines events log (default ``$MPIRT_EVENTS``, else none).
    ``spawn_argv`` is what a joiner runs (default: this script again, ``sys.argv``).
    ``stoppable``: SIGUSR1 to any member (Slurm's ``--signal``) makes ``opt.step`` raise
    :class:`mpirt.errors.Preempted` on every member after the same committed step."""
    import os
    import sys

    from mpirt.comm.faults import FaultPlan
    from mpirt.config import EVENTS

    argv = spawn_argv or [sys.executable, *sys.argv]
    group = ElasticGroup(events_path=events or os.environ.get(EVENTS) or None, faults=FaultPlan(), min_ranks=min_ranks,
                         spawn_argv=argv).start(stoppable=stoppable)
    if not group.joined:
        group.sync_view()
    return group


class TorchState:
    """The replicated state: a model, its optimizer and your counters (attributes you set)."""

    def __init__(self, model, optimizer, **counters):
        self.model, self.optimizer = model, optimizer
        self._counters = list(counters)
        for k, v in counters.items():
            setattr(self, k, v)

    def snapshot(self):
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return {"model": self.model.state_dict(), "optimizer": inner.state_dict(),
                "counters": {k: getattr(self, k) for k in self._counters},
                "committed": getattr(self.optimizer, "committed", 0)}

    def load(self, snap):
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        self.model.load_state_dict(snap["model"])
        inner.load_state_dict(snap["optimizer"])
        for k, v in snap["counters"].items():
            setattr(self, k, v)
        if hasattr(self.optimizer, "committed"):
            self.optimizer.committed = snap.get("committed", 0)


class DistributedOptimizer:
    """Wraps a torch optimizer: ``step(samples)`` sums gradients over the view, then applies.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        params: the parameters whose gradients are reduced (in the same order on every rank).
        group: from :func:`init`.
        compress: None, "bf16" or "fp16" on the wire (error feedback kept per rank).
        overlap: reduce gradient buckets while backward runs, from :meth:`zero_grad` on (one
            backward per step; a second one before :meth:`step` raises). False: after backward.
        exact: the same bits on any number of ranks (:mod:`mpirt.train.exact`): take the step's
            micro-batches from :meth:`micro_batches`, call :meth:`accumulate` after each one's
            backward, then :meth:`step`. Sets torch to one intra-op thread; no compression.
    """

    def __init__(self, optimizer, params, group, compress=None, overlap=True, exact=False):
        self.optimizer, self.group, self.exact = optimizer, group, exact
        if exact:
            import torch

            from mpirt.train.exact import ExactReducer

            if compress:
                raise ValueError("exact=True and compress: compression rounds each rank's gradient before the "
                                 "sum, so the model would depend on the number of ranks")
            torch.set_num_threads(1)  # a micro-batch's gradient must be the same bits on every rank
            self.reducer = ExactReducer(group.ec, list(params), n_stats=len(SLOTS), slots=SLOTS.job_indices(),
                                        nonfinite=SLOTS.NONFINITE)
        else:
            from mpirt.train.allreduce import GradAllreduce

            self.reducer = GradAllreduce(group.ec, list(params), n_stats=len(SLOTS), compress=compress,
                                         overlap=overlap)
        self.committer = StepCommitter(group, self.reducer, SLOTS)
        self.totals = None
        self.committed = 0  # steps committed: the protocol's step number when step() is given none
        self._joins = None  # (step, totals) of a committed step that announced joiners

    def zero_grad(self, set_to_none=False):
        self.optimizer.zero_grad(set_to_none=set_to_none)
        if not self.exact:
            self.reducer.begin()  # the next backward's buckets go out as they complete

    def micro_batches(self, start, stop, micro):
        """``exact``: this rank's micro-batches ``[(j, a, b), ...]`` of the step's rows ``[start, stop)``
        cut every ``micro`` rows (the same cut on any number of ranks); starts the step."""
        from mpirt.train.exact import micro_batches

        k, mine = micro_batches(start, stop, micro, self.group.rank, self.group.size)
        self.reducer.begin(k)
        return mine

    def accumulate(self, j, samples, loss=0.0):
        """``exact``: keep micro-batch ``j``'s gradient (after its backward, before the next zero_grad)."""
        self.reducer.add(j, samples, loss)

    def step(self, samples=0, loss=0.0, step=None):
        """Allreduce the gradients (sum / total samples) and apply them on every member, or raise.

        ``samples`` and ``loss`` are this rank's (with ``exact``, :meth:`accumulate` gave them).
        ``step``: your step counter, which ``MPIRT_FAULTS``' ``step=`` refers to (default: the
        number of steps committed so far). A member sent SIGTERM leaves here, after the commit.

        Raises:
            ProcessFailure: the step was not committed by every member (nothing was applied).
            Preempted: (``init(stoppable=True)``) a stop was requested; the step is applied, and
                every member raises it after the same step: save your state and stop.
        """
        step = self.committed if step is None else step
        stats = self.committer.begin(step)
        stats[SAMPLES], stats[LOSS] = samples, loss
        totals = self.totals = self.committer.commit(step, stats)
        self.optimizer.step()
        if self.exact:
            self.reducer.apply_sparse(self.optimizer)
        self.committed = step + 1
        self.committer.release_leavers(totals)
        if totals[SLOTS.JOINERS]:
            self._joins = (step, totals)  # merged by check_joins, once your counters moved on
        else:
            self.committer.mark_fired(step, ("join",))
        why = self.committer.stop_reason(totals)
        if why:
            raise Preempted(f"stopped {why} after step {step}")
        return totals


def run(group):
    """Decorator: call ``fn(state)``; on a failure recover in place and call it again.

    After each return of ``opt.step`` with joiners pending, the joiners are merged at the next
    call of :func:`check_joins`; a spawned joiner's ``fn`` starts with the coordinator's state.
    """
    def wrap(fn):
        @functools.wraps(fn)
        def runner(state, *args, **kwargs):
            opt = state.optimizer
            if group.joined:
                state.load(group.sync_view(joiner=True))
            while True:
                try:
                    try:
                        return fn(state, *args, **kwargs)
                    except _Grow:
                        step, totals = opt._joins
                        opt._joins = None
                        # A failure here (a member, or the spawn itself) is recovered like one in a
                        # step: the step stays committed, the joiners that did not start are dropped.
                        opt.committer.merge_joiners(step, totals, state.snapshot)
                except ProcessFailure:
                    # Agree is uniform: the survivors hold the same committed state; redo from it.
                    opt.committer.recover(opt.committed)
        return runner
    return wrap


class _Grow(Exception):
    pass


def check_joins(optimizer):
    """Call after ``state.step += 1``: merge the joiners ``optimizer.step`` announced (collective)."""
    if optimizer._joins:
        raise _Grow()
