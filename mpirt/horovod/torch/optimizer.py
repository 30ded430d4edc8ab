"""``hvd.DistributedOptimizer``: Horovod's wrapper, on mpirt's step protocol.

As in Horovod, the result is an instance of a subclass of your optimizer's class whose
``step()`` first averages (or sums) the gradients over the ranks, with hooks on the parameters
sending them in buckets while backward still runs. Unlike Horovod, the buckets go out in one
fixed order (:mod:`mpirt.train.overlap`) and the step is committed by every member or by none
(:mod:`mpirt.cluster.commit`): a member that fails during the reduction makes every survivor raise
:class:`HorovodInternalError` before anything is applied, and a member sent SIGTERM leaves after
a committed step.
"""

import contextlib
import warnings

import torch

from mpirt.cluster.commit import Slots, StepCommitter
from mpirt.horovod.common import Adasum, Average, Sum, _rt, global_process_set, horovod_errors, require_group
from mpirt.horovod.torch.compression import Compression, FP16Compressor

# Each rank counts one: the sum is the number of ranks, which Average divides by.
SLOTS = Slots("ranks")


class _DistributedOptimizer(torch.optim.Optimizer):
    def __init__(self, params, named_parameters, compression, backward_passes_per_step=1, op=Average,
                 gradient_predivide_factor=1.0, groups=None, sparse_as_dense=False, process_set=global_process_set):
        super(self.__class__, self).__init__(params)
        if named_parameters is not None:
            named_parameters = list(named_parameters)
        else:
            named_parameters = [(f"allreduce.noname.{i}.{j}", v) for i, group in enumerate(self.param_groups)
                                for j, v in enumerate(group["params"])]
        if any(not isinstance(p, tuple) for p in named_parameters):
            raise ValueError("named_parameters should be a sequence of tuples (name, parameter), usually produced "
                             "by model.named_parameters().")
        names = [k for k, _ in named_parameters]
        dups = sorted({k for k in names if names.count(k) > 1})
        if dups:
            raise ValueError("Parameter names in named_parameters must be unique. Found duplicates: %s"
                             % ", ".join(dups))
        all_ids = {id(v) for group in self.param_groups for v in group["params"]}
        unnamed = all_ids - {id(v) for _, v in named_parameters}
        if unnamed:
            raise ValueError("named_parameters was specified, but one or more model parameters were not named. "
                             "Python object ids: %s" % ", ".join(str(i) for i in unnamed))
        if op == Adasum:
            raise NotImplementedError("Adasum is not supported by mpirt.horovod: use op=hvd.Average")
        if op not in (Average, Sum):
            raise ValueError("DistributedOptimizer reduces gradients with op=hvd.Average or op=hvd.Sum")
        if gradient_predivide_factor != 1.0 and op != Average:
            raise ValueError("gradient_predivide_factor not supported with op != Average")
        if compression not in (Compression.none, FP16Compressor):
            raise ValueError(f"compression must be hvd.Compression.none or hvd.Compression.fp16, not {compression!r}")
        if process_set is not global_process_set:
            raise NotImplementedError("DistributedOptimizer over a process set: mpirt.horovod reduces gradients "
                                      "over the whole job")
        if groups is not None and not (isinstance(groups, list) or groups > 0):
            raise ValueError("groups should be a non-negative integer or a list of list of torch.Tensor.")
        group = require_group()
        self.backward_passes_per_step = backward_passes_per_step
        self.op, self.gradient_predivide_factor = op, gradient_predivide_factor
        self.sparse_as_dense, self.process_set, self._compression = sparse_as_dense, process_set, compression
        self._params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        from mpirt.train.allreduce import GradAllreduce

        # Horovod's predivide (prescale 1/f, postscale f) keeps fp16 sums in range; it is the same
        # average, and the sums here run in float32: one scale of the sum.
        scale = (lambda total: 1.0) if op == Sum else (lambda total: 1.0 / max(total[SLOTS.RANKS], 1.0))
        # `groups` (Horovod's fusion of parameters) is the bucket plan here: buckets of fixed bytes.
        self._reducer = GradAllreduce(group.ec, self._params, n_stats=len(SLOTS), overlap=backward_passes_per_step == 1,
                                      compress="fp16" if compression is FP16Compressor else None, scale=scale)
        self._committer = StepCommitter(group, self._reducer, SLOTS)
        self._synchronized = False
        self._should_synchronize = True
        self._totals = None
        self._mpirt_committed = 0  # steps committed: the protocol's step number (faults' step=)
        self._passes = 0

    def set_backward_passes_per_step(self, passes):
        self.backward_passes_per_step = passes

    def zero_grad(self, set_to_none=True):
        super(self.__class__, self).zero_grad(set_to_none=set_to_none)
        self._reducer.begin()  # the next backward's buckets go out as they complete

    def synchronize(self):
        """Reduce the gradients over the ranks now (the step is agreed, not yet applied)."""
        if self._synchronized:
            return
        for p in self._params:
            if p.grad is not None and p.grad.is_sparse:
                p.grad = p.grad.to_dense()  # reduced dense: mpirt.horovod has no sparse allreduce
        step = self._mpirt_committed
        with horovod_errors():
            stats = self._committer.begin(step)
            stats[SLOTS.RANKS] = 1.0
            self._totals = self._committer.commit(step, stats)
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """``step()`` inside this context does not reduce (``synchronize()`` was called before it)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                              "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in "
                              "your code.")
            self.synchronize()
        if not self._synchronized:
            raise AssertionError("optimizer.step() inside skip_synchronize() without optimizer.synchronize() first")
        self._synchronized = False
        out = super(self.__class__, self).step(closure)
        step, totals = self._mpirt_committed, self._totals
        self._mpirt_committed += 1
        with horovod_errors():
            self._committer.release_leavers(totals)  # a member sent SIGTERM leaves here
        if totals[SLOTS.JOINERS]:
            _rt.pending_join = (self._committer, step, totals)  # state.commit() raises HostsUpdatedInterrupt
        else:
            self._committer.mark_fired(step, ("join",))
        return out


def DistributedOptimizer(optimizer, named_parameters=None, compression=Compression.none, backward_passes_per_step=1,
                         op=Average, gradient_predivide_factor=1.0, groups=None, sparse_as_dense=False,
                         process_set=global_process_set):
    """Wrap ``optimizer`` so that ``step()`` uses the gradients averaged (``op=Sum``: summed) over the ranks.

    Arguments are Horovod's. ``backward_passes_per_step`` > 1 accumulates that many backward passes
    locally before a reduction (buckets then go out at ``step()``, not during backward).
    ``compression=Compression.fp16`` sends float16 with error feedback (the rounding error of a
    rank is added to its next gradient). ``groups`` is accepted; buckets are planned by size.
    """
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, op,
               gradient_predivide_factor, groups, sparse_as_dense, process_set)
