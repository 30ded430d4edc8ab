"""The semantics of Horovod's own torch tests (horovod/test/parallel/test_torch.py), run against
``mpirt.horovod.torch`` on every rank of a job. Each check raises on a wrong result; the job prints
``PASSED name`` per check from rank 0 and exits 0 when every check passed on every rank.

    mpirt launch -n 3 -- python tests/jobs/hvd_api.py [CHECK ...]
"""

import itertools
import sys
import warnings

import numpy as np
import torch

import mpirt.horovod.torch as hvd

DTYPES = [torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64]
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DIMS = [1, 2, 3]
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def raises(exc, fn, *words):
    try:
        fn()
    except exc as e:
        for w in words:
            assert w in str(e), (w, str(e))
        return e
    raise AssertionError(f"{fn} did not raise {exc.__name__}")


def tol(dtype, size):
    """Horovod's thresholds: exact for integers, a little slack for float sums over more ranks."""
    if not dtype.is_floating_point:
        return 0
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-1 * size if dtype == torch.bfloat16 else 1e-2 * size
    return 1e-5 * max(size, 3)


def rand(dtype, dim, seed=1234, n=17):
    torch.manual_seed(seed)
    t = torch.FloatTensor(*([n] * dim)).random_(-100, 100)
    return t.to(dtype)


@check
def basics():
    assert hvd.is_initialized()
    size, rank = hvd.size(), hvd.rank()
    assert 0 <= rank < size
    assert hvd.allgather_object(rank) == list(range(size))
    assert hvd.local_size() >= 1 and 0 <= hvd.local_rank() < hvd.local_size()
    assert hvd.cross_size() * hvd.local_size() == size  # one host, or equal hosts
    assert 0 <= hvd.cross_rank() < hvd.cross_size()
    assert hvd.mpi_threads_supported() and hvd.mpi_enabled() and hvd.mpi_built()
    assert not hvd.gloo_enabled() and not hvd.gloo_built() and not hvd.nccl_built()
    assert not hvd.cuda_built() and not hvd.rocm_built()


@check
def allreduce_sum():
    size = hvd.size()
    for dtype, dim in itertools.product(DTYPES, DIMS):
        t = rand(dtype, dim)
        out = hvd.allreduce(t, op=hvd.Sum)
        assert out.dtype == dtype and out.shape == t.shape
        want = t.to(torch.float64) * size
        assert float((out.to(torch.float64) - want).abs().max()) <= tol(dtype, size) * 100, (dtype, dim)


@check
def allreduce_average():
    for dtype, dim in itertools.product(FLOATS, DIMS):
        t = rand(dtype, dim)
        out = hvd.allreduce(t, op=hvd.Average)
        assert float((out.to(torch.float64) - t.to(torch.float64)).abs().max()) <= tol(dtype, hvd.size()) * 10, dtype
    # The default op is Average; the deprecated average= still works.
    t = rand(torch.float32, 2)
    assert torch.allclose(hvd.allreduce(t), t) and torch.allclose(hvd.allreduce(t, average=False), t * hvd.size())
    raises(ValueError, lambda: hvd.allreduce(t, average=True, op=hvd.Sum), "supersedes")


@check
def allreduce_min_max_product():
    size, rank = hvd.size(), hvd.rank()
    for dtype in (torch.int32, torch.float32, torch.float64):
        t = torch.arange(1, 7, dtype=dtype) + rank
        assert torch.equal(hvd.allreduce(t, op=hvd.Min), torch.arange(1, 7, dtype=dtype))
        assert torch.equal(hvd.allreduce(t, op=hvd.Max), torch.arange(1, 7, dtype=dtype) + size - 1)
        want = torch.ones(6, dtype=torch.float64)
        for r in range(size):
            want *= torch.arange(1, 7, dtype=torch.float64) + r
        assert torch.allclose(hvd.allreduce(t, op=hvd.Product).to(torch.float64), want), dtype


@check
def allreduce_inplace_async_and_scaling():
    size = hvd.size()
    t = rand(torch.float32, 2)
    x = t.clone()
    out = hvd.allreduce_(x, op=hvd.Sum)
    assert out is x and torch.allclose(x, t * size)
    handles = [hvd.allreduce_async(rand(torch.float32, 1, seed=s), op=hvd.Sum) for s in range(4)]
    for s, h in enumerate(handles):
        while not hvd.poll(h):
            pass
        assert torch.allclose(hvd.synchronize(h), rand(torch.float32, 1, seed=s) * size)
    y = t.clone()
    assert hvd.synchronize(hvd.allreduce_async_(y, op=hvd.Sum)) is y and torch.allclose(y, t * size)
    pre = hvd.allreduce(t, op=hvd.Sum, prescale_factor=0.5, postscale_factor=3.0)
    assert torch.allclose(pre, t * size * 1.5)
    raises(ValueError, lambda: hvd.synchronize(123456), "unknown handle")


@check
def allreduce_errors_are_raised_on_every_rank():
    rank = hvd.rank()
    # Different shapes, then different types: Horovod's negotiation refuses both.
    raises(RuntimeError, lambda: hvd.allreduce(torch.ones(17 + rank, dtype=torch.float32)), "disagree")
    raises(RuntimeError, lambda: hvd.allreduce(torch.ones(4, dtype=torch.float32 if rank % 2 else torch.int32)))
    raises(NotImplementedError, lambda: hvd.allreduce(torch.ones(4), op=hvd.Adasum), "Adasum")
    # The job goes on after them.
    assert torch.allclose(hvd.allreduce(torch.ones(3), op=hvd.Sum), torch.full((3,), float(hvd.size())))


@check
def allreduce_grad():
    size = hvd.size()
    for dim in DIMS:
        t = rand(torch.float32, dim).requires_grad_()
        hvd.allreduce(t, op=hvd.Sum).backward(torch.ones([17] * dim))
        assert torch.allclose(t.grad, torch.full([17] * dim, float(size)))
        t2 = rand(torch.float64, dim).requires_grad_()
        hvd.allreduce(t2).backward(torch.ones([17] * dim, dtype=torch.float64))
        assert torch.allclose(t2.grad, torch.ones([17] * dim, dtype=torch.float64))


@check
def grouped_allreduce():
    size = hvd.size()
    ts = [rand(torch.float32, 2, seed=s) for s in range(5)]
    outs = hvd.grouped_allreduce(ts, op=hvd.Sum)
    assert all(torch.allclose(o, t * size) for o, t in zip(outs, ts))
    xs = [t.clone() for t in ts]
    hvd.grouped_allreduce_(xs, op=hvd.Average)
    assert all(torch.allclose(x, t) for x, t in zip(xs, ts))
    got = hvd.synchronize(hvd.grouped_allreduce_async(ts, op=hvd.Sum))
    assert all(torch.allclose(o, t * size) for o, t in zip(got, ts))
    gs = [t.clone().requires_grad_() for t in ts]
    sum(o.sum() for o in hvd.grouped_allreduce(gs, op=hvd.Sum)).backward()
    assert all(torch.allclose(g.grad, torch.full_like(g, float(size))) for g in gs)


@check
def allgather_variable_first_dimension():
    size, rank = hvd.size(), hvd.rank()
    for dtype, dim in itertools.product(DTYPES + [torch.bool], DIMS):
        rows = rank + 1
        t = torch.full((rows,) + (17,) * (dim - 1), rank, dtype=torch.float32).to(dtype)
        out = hvd.allgather(t)
        assert out.shape[0] == sum(r + 1 for r in range(size)) and out.shape[1:] == t.shape[1:]
        start = 0
        for r in range(size):
            want = torch.full((r + 1,) + (17,) * (dim - 1), r, dtype=torch.float32).to(dtype)
            assert torch.equal(out[start:start + r + 1], want), (dtype, dim, r)
            start += r + 1
    raises(RuntimeError, lambda: hvd.allgather(torch.ones(2, 3 + (rank % 2))), "disagree")
    outs = hvd.grouped_allgather([torch.full((1,), float(rank)), torch.full((2,), float(rank))])
    assert torch.equal(outs[0], torch.arange(size, dtype=torch.float32))
    assert torch.equal(outs[1], torch.arange(size, dtype=torch.float32).repeat_interleave(2))


@check
def allgather_grad():
    size, rank = hvd.size(), hvd.rank()
    t = torch.ones(rank + 1, 5, requires_grad=True)
    out = hvd.allgather(t)
    # Every rank weights the gathered rows by their source rank: grad is the average weight.
    weights = torch.cat([torch.full((r + 1, 5), float(r)) for r in range(size)])
    (out * weights).sum().backward()
    assert torch.allclose(t.grad, torch.full((rank + 1, 5), float(rank)))


@check
def broadcast_from_every_root():
    size, rank = hvd.size(), hvd.rank()
    for dtype, dim, root in itertools.product(DTYPES, DIMS, range(size)):
        t = torch.full((17,) * dim, rank, dtype=torch.float32).to(dtype)
        out = hvd.broadcast(t, root)
        assert torch.equal(out, torch.full((17,) * dim, root, dtype=torch.float32).to(dtype))
        assert torch.equal(t, torch.full((17,) * dim, rank, dtype=torch.float32).to(dtype))  # not modified
        x = t.clone()
        assert hvd.broadcast_(x, root) is x and torch.equal(x, out)
    raises(RuntimeError, lambda: hvd.broadcast(torch.ones(3), rank % size if size > 1 else 0) if size > 1
           else (_ for _ in ()).throw(RuntimeError("disagree")), "disagree")
    raises(ValueError, lambda: hvd.broadcast(torch.ones(3), size), "root_rank")


@check
def broadcast_grad():
    rank = hvd.rank()
    t = torch.ones(4, requires_grad=True)
    hvd.broadcast(t, 0).sum().backward()
    assert torch.equal(t.grad, torch.ones(4) if rank == 0 else torch.zeros(4))


@check
def alltoall_equal_and_split():
    size, rank = hvd.size(), hvd.rank()
    t = torch.arange(size * 2, dtype=torch.float32) + 100 * rank
    out = hvd.alltoall(t)
    want = torch.cat([torch.tensor([2 * rank, 2 * rank + 1], dtype=torch.float32) + 100 * r for r in range(size)])
    assert torch.equal(out, want)
    # Rank r sends r+1 rows to every rank: receives (s+1) rows from each rank s.
    splits = torch.tensor([rank + 1] * size, dtype=torch.int32)
    t = torch.full(((rank + 1) * size, 3), float(rank))
    out, received = hvd.alltoall(t, splits=splits)
    assert received.tolist() == [s + 1 for s in range(size)]
    assert torch.equal(out, torch.cat([torch.full((s + 1, 3), float(s)) for s in range(size)]))
    raises(ValueError, lambda: hvd.alltoall(torch.ones(size, 2), splits=[size + 1] + [0] * (size - 1)), "splits")


@check
def alltoall_grad():
    size, rank = hvd.size(), hvd.rank()
    t = torch.ones(size * 2, 3, requires_grad=True)
    out = hvd.alltoall(t)
    (out * (rank + 1)).sum().backward()
    # Row block j went to rank j, which weighted it by j+1.
    want = torch.cat([torch.full((2, 3), float(j + 1)) for j in range(size)])
    assert torch.equal(t.grad, want)


@check
def reducescatter():
    size, rank = hvd.size(), hvd.rank()
    rows = size * 2 + 1  # uneven: the first rank gets one row more
    t = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
    counts = [rows // size + (1 if i < rows % size else 0) for i in range(size)]
    start = sum(counts[:rank])
    out = hvd.reducescatter(t, op=hvd.Sum)
    assert torch.allclose(out, t[start:start + counts[rank]] * size)
    assert torch.allclose(hvd.reducescatter(t), t[start:start + counts[rank]])  # Average by default
    outs = hvd.grouped_reducescatter([t, t * 2], op=hvd.Sum)
    assert torch.allclose(outs[1], 2 * t[start:start + counts[rank]] * size)
    g = t.clone().requires_grad_()
    hvd.reducescatter(g, op=hvd.Sum).sum().backward()
    assert torch.allclose(g.grad, torch.ones_like(g))


@check
def objects_parameters_and_optimizer_state():
    size, rank = hvd.size(), hvd.rank()
    assert hvd.broadcast_object({"rank": rank, "x": [rank]}, root_rank=size - 1) == {"rank": size - 1, "x": [size - 1]}
    assert hvd.allgather_object(("r", rank)) == [("r", r) for r in range(size)]
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1 * (rank + 1), momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()  # momentum buffers, different on every rank
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    params = hvd.allgather_object([p.detach().numpy() for p in model.parameters()])
    bufs = hvd.allgather_object([opt.state[p]["momentum_buffer"].numpy() for p in model.parameters()])
    lrs = hvd.allgather_object(opt.param_groups[0]["lr"])
    for r in range(size):
        assert all(np.array_equal(a, b) for a, b in zip(params[r], params[0]))
        assert all(np.array_equal(a, b) for a, b in zip(bufs[r], bufs[0]))
    assert lrs == [0.1] * size


@check
def process_sets():
    size, rank = hvd.size(), hvd.rank()
    if size < 2:
        return
    evens = hvd.add_process_set([r for r in range(size) if r % 2 == 0])
    odds = hvd.add_process_set(hvd.ProcessSet([r for r in range(size) if r % 2 == 1]))
    mine, other = (evens, odds) if rank % 2 == 0 else (odds, evens)
    assert mine.included() and not other.included() and other.rank() == -1
    got = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Sum, process_set=mine)
    assert float(got) == float(sum(mine.ranks))
    assert hvd.allgather_object(rank, process_set=mine) == mine.ranks
    raises(ValueError, lambda: hvd.allreduce(torch.ones(1), process_set=other), "not in")
    raises(ValueError, lambda: hvd.add_process_set(list(mine.ranks)), "already registered")
    hvd.barrier(process_set=mine)
    assert hvd.remove_process_set(evens) and hvd.remove_process_set(odds)
    assert not hvd.remove_process_set(evens)
    raises(ValueError, lambda: hvd.allreduce(torch.ones(1), process_set=evens), "not registered")
    raises(ValueError, lambda: hvd.remove_process_set(hvd.global_process_set))
    assert hvd.global_process_set.size() == size and hvd.global_process_set.rank() == rank


@check
def barrier_and_join():
    hvd.barrier()
    last = hvd.join()
    assert 0 <= last < hvd.size() and hvd.allgather_object(last) == [last] * hvd.size()


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3))


def _local_grads(model, x):
    model.zero_grad()
    model(x).pow(2).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


@check
def distributed_optimizer_averages_or_sums():
    size, rank = hvd.size(), hvd.rank()
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(5, 6, generator=g) for _ in range(size)]
    for op in (hvd.Average, hvd.Sum):
        ref = _model()
        per_rank = [_local_grads(ref, x) for x in xs]
        want = [sum(gs) / (size if op == hvd.Average else 1) for gs in zip(*per_rank)]
        model = _model()
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0),
                                       named_parameters=model.named_parameters(), op=op)
        assert isinstance(opt, torch.optim.SGD)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        model(xs[rank]).pow(2).mean().backward()
        opt.step()
        for b, p, w in zip(before, model.parameters(), want):
            assert torch.allclose(b - p.detach(), w, atol=1e-6), op


@check
def distributed_optimizer_synchronize_and_accumulation():
    size, rank = hvd.size(), hvd.rank()
    g = torch.Generator().manual_seed(3)
    xs = [[torch.randn(4, 6, generator=g) for _ in range(2)] for _ in range(size)]
    ref = _model()
    want = [sum(gs) / size for gs in zip(*[[a + b for a, b in zip(_local_grads(ref, x0), _local_grads(ref, x1))]
                                           for x0, x1 in xs])]
    model = _model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.named_parameters(),
                                   backward_passes_per_step=2)
    opt.zero_grad()
    for x in xs[rank]:
        model(x).pow(2).mean().backward()
    opt.synchronize()
    assert all(torch.allclose(p.grad, w, atol=1e-6) for p, w in zip(model.parameters(), want))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    before = [p.detach().clone() for p in model.parameters()]
    with opt.skip_synchronize():
        opt.step()
    assert all(torch.allclose(b - p.detach(), w, atol=1e-6) for b, p, w in zip(before, model.parameters(), want))
    # step() after synchronize() without the context: Horovod's warning, and no second reduction.
    opt.zero_grad()
    for x in xs[rank]:
        model(x).pow(2).mean().backward()
    opt.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert any("skip_synchronize" in str(w.message) for w in caught)


@check
def distributed_optimizer_refusals_and_fp16():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    named = list(model.named_parameters())
    raises(ValueError, lambda: hvd.DistributedOptimizer(sgd, named_parameters=[named[0], (named[0][0], named[1][1])]
                                                        + named[2:]), "duplicates")
    raises(ValueError, lambda: hvd.DistributedOptimizer(sgd, named_parameters=named[1:]), "were not named")
    raises(ValueError, lambda: hvd.DistributedOptimizer(sgd, named_parameters=[p for _, p in named]), "tuples")
    raises(NotImplementedError, lambda: hvd.DistributedOptimizer(sgd, op=hvd.Adasum), "Adasum")
    raises(ValueError, lambda: hvd.DistributedOptimizer(sgd, op=hvd.Sum, gradient_predivide_factor=2.0), "predivide")
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                   compression=hvd.Compression.fp16, gradient_predivide_factor=2.0)
    opt.zero_grad()
    model(torch.ones(2, 6) * hvd.rank()).sum().backward()
    opt.step()
    params = hvd.allgather_object([p.detach().numpy() for p in model.parameters()])
    assert all(np.array_equal(a, b) for p in params for a, b in zip(p, params[0]))  # replicas identical
    t = torch.tensor([1.0, 2.5, -3.25])
    c, ctx = hvd.Compression.fp16.compress(t)
    assert c.dtype == torch.float16 and torch.equal(hvd.Compression.fp16.decompress(c, ctx), t)


def main(names):
    hvd.init()
    hvd.init()  # idempotent, as Horovod's
    chosen = [c for c in CHECKS if not names or c.__name__ in names]
    for c in chosen:
        c()
        hvd.barrier()
        if hvd.rank() == 0:
            print(f"PASSED {c.__name__}", flush=True)
    hvd.shutdown()
    assert not hvd.is_initialized()
    try:
        hvd.size()
    except ValueError as e:
        assert "has not been initialized" in str(e)
    else:
        raise AssertionError("size() after shutdown() did not raise")


if __name__ == "__main__":
    main(sys.argv[1:])
