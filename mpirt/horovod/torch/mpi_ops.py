"""Horovod's PyTorch collectives on the job's fault-tolerant communicator.

Each operation runs when it is called (Horovod queues it for a background thread and matches
operations across ranks by name): the ``*_async`` forms return a handle whose result is already
there, so ``poll`` is True and ``synchronize`` returns it. Ranks must therefore issue their
collectives in the same order, as MPI programs do. Before the data moves, the ranks exchange each
operation's shape, type and op, so a mismatch raises ``RuntimeError`` on every rank (as Horovod's
negotiation does) instead of corrupting memory. A member that fails during an operation raises
:class:`HorovodInternalError` (``hvd.elastic.run`` recovers from it).

Data moves through host memory (the Open MPI here is not CUDA-aware); float16 and bfloat16 are
reduced in float32 and rounded once.
"""

import itertools

import numpy as np
import torch

from mpirt.horovod.common import (Adasum, Average, HorovodInternalError, Max, Min, ProcessSet, Product, Sum,
                                  add_process_set, ccl_built, cross_rank, cross_size, cuda_built, ddl_built,
                                  global_process_set, gloo_built, gloo_enabled, horovod_errors, init,
                                  is_initialized, local_rank, local_size, mpi_built, mpi_enabled,
                                  mpi_threads_supported, nccl_built, rank, remove_process_set, require_group,
                                  rocm_built, shutdown, size)
from mpirt.horovod.torch.compression import Compression

__all__ = [
    "Adasum", "Average", "Max", "Min", "Product", "Sum", "HorovodInternalError", "ProcessSet", "Compression",
    "add_process_set", "remove_process_set", "global_process_set", "init", "shutdown", "is_initialized", "size",
    "rank", "local_size", "local_rank", "cross_size", "cross_rank", "mpi_threads_supported", "mpi_enabled",
    "mpi_built", "gloo_enabled", "gloo_built", "nccl_built", "ddl_built", "ccl_built", "cuda_built", "rocm_built",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "grouped_allreduce", "grouped_allreduce_",
    "grouped_allreduce_async", "grouped_allreduce_async_", "allgather", "allgather_async", "grouped_allgather",
    "grouped_allgather_async", "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "alltoall",
    "alltoall_async", "reducescatter", "reducescatter_async", "grouped_reducescatter",
    "grouped_reducescatter_async", "poll", "synchronize", "join", "barrier", "start_timeline", "stop_timeline",
]

_HALF = (torch.float16, torch.bfloat16)
_OPS = {Sum: "SUM", Average: "SUM", Min: "MIN", Max: "MAX", Product: "PROD"}

# -- plumbing --------------------------------------------------------------------------------


def _comm(process_set):
    comm = process_set.communicator()
    if comm is None:
        raise ValueError(f"this rank ({rank()}) is not in {process_set}")
    return comm


def _run(fn):
    """Run a collective: a failed member becomes HorovodInternalError, as in Horovod."""
    with horovod_errors(), require_group().ec.guard():
        return fn()


def _agree_on(comm, what, meta):
    """RuntimeError on every rank unless every rank passed the same ``meta`` (shape, type, op)."""
    metas = comm.allgather(meta)
    if any(m != metas[0] for m in metas):
        seen = ", ".join(sorted(set(map(str, metas))))
        raise RuntimeError(f"{what}: ranks disagree on the operation ({seen})")


def _wire(t):
    """A numpy view of a contiguous CPU tensor for moving bytes (no arithmetic)."""
    if t.dtype in _HALF:
        return t.view(torch.int16).numpy()
    if t.dtype == torch.bool:
        return t.view(torch.uint8).numpy()
    return t.numpy()


def _host(t):
    return t.detach().to("cpu").contiguous()


def _scale(t, factor):
    if factor == 1.0:
        return t
    if t.is_floating_point():
        return t.mul_(factor)
    return t.copy_((t.to(torch.float64) * factor).to(t.dtype))


def _check_op(op, average):
    if average is not None:
        if op is not None:
            raise ValueError("The op parameter supersedes average. Please provide only one of them.")
        op = Average if average else Sum
    op = Average if op is None else op
    if op == Adasum:
        raise NotImplementedError("Adasum is not supported by mpirt.horovod: use op=hvd.Average")
    if op not in _OPS:
        raise ValueError(f"unknown reduction op {op!r}")
    return op


def _reduce(tensor, op, prescale, postscale, process_set, what="allreduce"):
    """``tensor`` reduced over ``process_set`` (a new CPU tensor of its dtype)."""
    comm = _comm(process_set)
    x = _host(tensor)
    _agree_on(comm, what, (tuple(x.shape), str(x.dtype), op))
    work = x.to(torch.float32) if x.dtype in _HALF else x.clone()
    _scale(work, prescale)
    MPI = require_group().ec.MPI
    buf = _wire(work)
    if buf.size:
        comm.Allreduce(MPI.IN_PLACE, buf, op=getattr(MPI, _OPS[op]))
    if op == Average:
        n = comm.Get_size()
        work = work.div_(n) if work.is_floating_point() else work.div_(n, rounding_mode="trunc")
    _scale(work, postscale)
    return work.to(tensor.dtype)


# -- handles ---------------------------------------------------------------------------------

_handles = {}
_next_handle = itertools.count(1)


def _handle(result):
    h = next(_next_handle)
    _handles[h] = result
    return h


def poll(handle):
    """True when the operation is done (always: operations run when called)."""
    if handle not in _handles:
        raise ValueError(f"unknown handle {handle}")
    return True


def synchronize(handle):
    """The operation's result (and forget the handle)."""
    if handle not in _handles:
        raise ValueError(f"unknown handle {handle}")
    return _handles.pop(handle)


def _placed(result, like):
    return result.to(like.device) if like.device.type != "cpu" else result


# -- allreduce -------------------------------------------------------------------------------


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                    process_set=global_process_set):
    op = _check_op(op, average)
    return _handle(_placed(_run(lambda: _reduce(tensor, op, prescale_factor, postscale_factor, process_set)), tensor))


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                     process_set=global_process_set):
    op = _check_op(op, average)
    out = _run(lambda: _reduce(tensor, op, prescale_factor, postscale_factor, process_set))
    with torch.no_grad():
        tensor.copy_(out)
    return _handle(tensor)


class HorovodAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, average, name, op, prescale_factor, postscale_factor, process_set):
        ctx.args = (average, op, prescale_factor, postscale_factor, process_set)
        return synchronize(allreduce_async(tensor, average, name, op, prescale_factor, postscale_factor,
                                           process_set))

    @staticmethod
    def backward(ctx, grad_output):
        average, op, pre, post, ps = ctx.args
        return (allreduce(grad_output, average=average, op=op, prescale_factor=pre, postscale_factor=post,
                          process_set=ps), None, None, None, None, None, None)


def allreduce(tensor, average=None, name=None, compression=Compression.none, op=None, prescale_factor=1.0,
              postscale_factor=1.0, process_set=global_process_set):
    """``tensor`` averaged (default) or reduced with ``op`` over the ranks; differentiable."""
    compressed, ctx = compression.compress(tensor)
    out = HorovodAllreduce.apply(compressed, average, name, op, prescale_factor, postscale_factor, process_set)
    return compression.decompress(out, ctx)


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
               process_set=global_process_set):
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set))


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                            process_set=global_process_set):
    op = _check_op(op, average)
    return _handle([_placed(_run(lambda t=t: _reduce(t, op, prescale_factor, postscale_factor, process_set)), t)
                    for t in tensors])


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                             process_set=global_process_set):
    for t in tensors:
        synchronize(allreduce_async_(t, average, name, op, prescale_factor, postscale_factor, process_set))
    return _handle(list(tensors))


class HorovodGroupedAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, average, name, op, prescale_factor, postscale_factor, process_set, *tensors):
        ctx.args = (average, op, prescale_factor, postscale_factor, process_set)
        return tuple(synchronize(grouped_allreduce_async(list(tensors), average, name, op, prescale_factor,
                                                         postscale_factor, process_set)))

    @staticmethod
    def backward(ctx, *grad_output):
        average, op, pre, post, ps = ctx.args
        grads = grouped_allreduce(list(grad_output), average=average, op=op, prescale_factor=pre,
                                  postscale_factor=post, process_set=ps)
        return (None, None, None, None, None, None, *grads)


def grouped_allreduce(tensors, average=None, name=None, compression=Compression.none, op=None,
                      prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set):
    pairs = [compression.compress(t) for t in tensors]
    outs = HorovodGroupedAllreduce.apply(average, name, op, prescale_factor, postscale_factor, process_set,
                                         *[c for c, _ in pairs])
    return [compression.decompress(o, ctx) for o, (_, ctx) in zip(outs, pairs)]


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                       process_set=global_process_set):
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor,
                                                process_set))


# -- allgather -------------------------------------------------------------------------------


def _gather(tensor, process_set):
    comm = _comm(process_set)
    x = _host(tensor)
    if x.dim() == 0:
        raise ValueError("allgather: a tensor of at least one dimension is needed (the first is concatenated)")
    _agree_on(comm, "allgather", (tuple(x.shape[1:]), str(x.dtype)))
    firsts = [int(n) for n in comm.allgather(int(x.shape[0]))]
    out = torch.empty((sum(firsts), *x.shape[1:]), dtype=x.dtype)
    row = int(np.prod(x.shape[1:], dtype=np.int64))
    counts = [n * row for n in firsts]
    recv = _wire(out).reshape(-1)
    comm.Allgatherv(_wire(x).reshape(-1), [recv, counts])
    return out


def allgather_async(tensor, name=None, process_set=global_process_set):
    return _handle(_placed(_run(lambda: _gather(tensor, process_set)), tensor))


class HorovodAllgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, process_set):
        ctx.dim, ctx.process_set = tensor.shape[0], process_set
        return synchronize(allgather_async(tensor, name, process_set))

    @staticmethod
    def backward(ctx, grad_output):
        grad = allreduce(grad_output, op=Average, process_set=ctx.process_set)
        dims = allgather(torch.tensor([ctx.dim], dtype=torch.int64), process_set=ctx.process_set)
        offset = int(dims[:ctx.process_set.rank()].sum())
        return grad.narrow(0, offset, ctx.dim), None, None


def allgather(tensor, name=None, process_set=global_process_set):
    """The tensors of every rank concatenated on the first dimension (which may differ by rank)."""
    return HorovodAllgather.apply(tensor, name, process_set)


def grouped_allgather_async(tensors, name=None, process_set=global_process_set):
    return _handle([_placed(_run(lambda t=t: _gather(t, process_set)), t) for t in tensors])


def grouped_allgather(tensors, name=None, process_set=global_process_set):
    return [allgather(t, name, process_set) for t in tensors]


# -- broadcast -------------------------------------------------------------------------------


def _bcast(tensor, root_rank, process_set):
    comm = _comm(process_set)
    if not 0 <= root_rank < comm.Get_size():
        raise ValueError(f"broadcast: root_rank {root_rank} is not a rank of {comm.Get_size()}")
    x = _host(tensor).clone()
    _agree_on(comm, "broadcast", (tuple(x.shape), str(x.dtype), root_rank))
    if x.numel():
        comm.Bcast(_wire(x).reshape(-1), root=root_rank)
    return x


def broadcast_async(tensor, root_rank, name=None, process_set=global_process_set):
    return _handle(_placed(_run(lambda: _bcast(tensor, root_rank, process_set)), tensor))


def broadcast_async_(tensor, root_rank, name=None, process_set=global_process_set):
    out = _run(lambda: _bcast(tensor, root_rank, process_set))
    with torch.no_grad():
        tensor.copy_(out)
    return _handle(tensor)


class HorovodBroadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name, process_set):
        ctx.root_rank, ctx.process_set = root_rank, process_set
        return synchronize(broadcast_async(tensor, root_rank, name, process_set))

    @staticmethod
    def backward(ctx, grad_output):
        grad = allreduce(grad_output, op=Average, process_set=ctx.process_set)
        if ctx.process_set.rank() != ctx.root_rank:
            grad = grad * 0
        return grad, None, None, None


def broadcast(tensor, root_rank, name=None, process_set=global_process_set):
    """``root_rank``'s tensor on every rank (a new tensor); differentiable."""
    return HorovodBroadcast.apply(tensor, root_rank, name, process_set)


def broadcast_(tensor, root_rank, name=None, process_set=global_process_set):
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


# -- alltoall --------------------------------------------------------------------------------


def _alltoall(tensor, splits, process_set):
    comm = _comm(process_set)
    n = comm.Get_size()
    x = _host(tensor)
    if splits is None:
        if x.shape[0] % n:
            raise ValueError(f"alltoall: the first dimension ({x.shape[0]}) is not divisible by the {n} ranks; "
                             f"give splits")
        send = [x.shape[0] // n] * n
    else:
        send = [int(s) for s in (splits.tolist() if isinstance(splits, torch.Tensor) else splits)]
        if len(send) != n or any(s < 0 for s in send) or sum(send) != x.shape[0]:
            raise ValueError(f"alltoall: splits {send} must be {n} non-negative counts summing to the first "
                             f"dimension ({x.shape[0]})")
    _agree_on(comm, "alltoall", (tuple(x.shape[1:]), str(x.dtype)))
    recv = [int(r) for r in comm.alltoall(send)]
    row = int(np.prod(x.shape[1:], dtype=np.int64))
    out = torch.empty((sum(recv), *x.shape[1:]), dtype=x.dtype)
    comm.Alltoallv([_wire(x).reshape(-1), [s * row for s in send]], [_wire(out).reshape(-1), [r * row for r in recv]])
    return out, torch.tensor(recv, dtype=torch.int32)


def alltoall_async(tensor, splits=None, name=None, process_set=global_process_set):
    out, received = _run(lambda: _alltoall(tensor, splits, process_set))
    return _handle((_placed(out, tensor), received))


class HorovodAlltoall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, process_set):
        out, received = synchronize(alltoall_async(tensor, splits, name, process_set))
        ctx.process_set, ctx.received = process_set, received
        if splits is None:
            return out
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx, grad_output, *dead):
        grad, _ = alltoall(grad_output, splits=ctx.received, process_set=ctx.process_set)
        return grad, None, None, None


def alltoall(tensor, splits=None, name=None, process_set=global_process_set):
    """Slices of the first dimension sent to each rank (``splits`` rows each, default equal); returns
    what arrived, and with ``splits`` also the counts received from each rank."""
    return HorovodAlltoall.apply(tensor, splits, name, process_set)


# -- reducescatter ---------------------------------------------------------------------------


def _reducescatter(tensor, op, process_set, prescale, postscale):
    if op not in (Sum, Average):
        raise ValueError("reducescatter supports op=Sum and op=Average")
    comm = _comm(process_set)
    n, r = comm.Get_size(), comm.Get_rank()
    full = _reduce(tensor, op, prescale, postscale, process_set, what="reducescatter")
    # Horovod's split: the first dimension as evenly as possible, the first ranks one row more.
    rows = full.shape[0]
    counts = [rows // n + (1 if i < rows % n else 0) for i in range(n)]
    start = sum(counts[:r])
    return full.narrow(0, start, counts[r]).clone()


def reducescatter_async(tensor, name=None, op=Average, process_set=global_process_set, prescale_factor=1.0,
                        postscale_factor=1.0):
    return _handle(_placed(_run(lambda: _reducescatter(tensor, op, process_set, prescale_factor,
                                                       postscale_factor)), tensor))


class HorovodReducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op, process_set, prescale_factor, postscale_factor):
        ctx.args = (op, process_set, prescale_factor, postscale_factor)
        return synchronize(reducescatter_async(tensor, name, op, process_set, prescale_factor, postscale_factor))

    @staticmethod
    def backward(ctx, grad_output):
        op, ps, pre, post = ctx.args
        grad = grad_output * (pre * post)
        if op == Average:
            grad = grad / ps.size()
        return allgather(grad, process_set=ps), None, None, None, None, None


def reducescatter(tensor, name=None, compression=Compression.none, op=Average, process_set=global_process_set,
                  prescale_factor=1.0, postscale_factor=1.0):
    """Reduce over the ranks, then each rank keeps its slice of the first dimension."""
    compressed, ctx = compression.compress(tensor)
    out = HorovodReducescatter.apply(compressed, name, op, process_set, prescale_factor, postscale_factor)
    return compression.decompress(out, ctx)


def grouped_reducescatter_async(tensors, name=None, op=Average, process_set=global_process_set,
                                prescale_factor=1.0, postscale_factor=1.0):
    return _handle([_placed(_run(lambda t=t: _reducescatter(t, op, process_set, prescale_factor, postscale_factor)),
                            t) for t in tensors])


def grouped_reducescatter(tensors, name=None, compression=Compression.none, op=Average,
                          process_set=global_process_set, prescale_factor=1.0, postscale_factor=1.0):
    return [reducescatter(t, name, compression, op, process_set, prescale_factor, postscale_factor)
            for t in tensors]


# -- synchronisation ------------------------------------------------------------------------


def barrier(process_set=global_process_set):
    comm = _comm(process_set)
    _run(comm.Barrier)


def join(device=-1):
    """Every rank calls it when its data is done; returns the rank that joined last.

    Operations run when called, so a rank that joined cannot take part in the others' later
    allreduces (Horovod's join lets it): here join is where every rank meets.
    """
    import time

    comm = _comm(global_process_set)
    times = _run(lambda: comm.allgather(time.time_ns()))
    return int(np.argmax(times))


def start_timeline(file_path, mark_cycles=False):
    raise NotImplementedError("Horovod's timeline is not part of mpirt.horovod (see the job's events log)")


def stop_timeline():
    raise NotImplementedError("Horovod's timeline is not part of mpirt.horovod (see the job's events log)")
