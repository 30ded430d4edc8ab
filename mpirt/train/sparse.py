"""Row-sparse gradients of embedding tables: exchanged as (row ids, rows), applied to those rows only.

A fastText step over 64 documents touches ~80k of 1M embedding rows; the dense gradient is 268 MB
(FACTS.md: 2 ranks trained 0.56x as fast as 1). Here an embedding whose module has ``sparse=True``
gives torch's sparse gradient, and each step:

1. each rank coalesces its gradient (duplicate rows summed locally): ``ids`` (int64), ``rows``;
2. the ranks exchange, chosen per step from the gathered row counts (the same on every rank):
   - *allgather*: every rank's (ids, rows) in one ``Allgatherv``; bytes = all touched rows;
   - *allreduce*: rows scattered into a dense table, the segmented allreduce of the dense path,
     and an ``Allgatherv`` of the ids alone (the touched set);
   whichever moves fewer bytes, weighted by :data:`DENSE_WEIGHT` (``bench sparse`` measures it);
3. every rank merges the same bytes the same way (:func:`merge_rows`), so every rank gets bitwise
   the same (unique ids, summed rows) and replicas stay identical;
4. the optimizer updates the touched rows only (:func:`apply_rows`).

What an optimizer step means for a sparse table (the "lazy" rule of torch.optim.SparseAdam and of
fastText's own per-row updates). Only rows some rank touched in the global batch change:

- SGD without momentum or weight decay: exactly the dense update (an untouched row's gradient is 0);
- SGD with momentum: a touched row's buffer is ``momentum * buf + grad`` and the row moves by
  ``lr * buf``; an untouched row keeps its buffer and does not move (a dense optimizer would keep
  moving it, with a decaying buffer);
- weight decay (L2, added to the gradient as torch's SGD and Adam do): on touched rows only;
- Adam: the moments of touched rows are updated, with bias correction by the table's step count
  (every committed step counts), as SparseAdam does; untouched rows keep their moments and values.

The choice of exchange moves bytes, never the result's meaning: both give the same touched set.
For 2 ranks both sum each row as ``r0 + r1`` (bitwise equal); for more, the two exchanges may add
a row's parts in different orders (a difference in the last bit). One rank or N ranks run the same
rule, so what the default mode promises for dense gradients holds here too: the same samples, equal
parameters to 1e-5 on short runs, an equivalent model on long ones (README). With ``--exact`` the
rows are summed in fixed point instead (:mod:`mpirt.train.exact`): the same bits on any world size.
"""

import numpy as np

from mpirt.train.allreduce import reduce_segments

MODES = ("auto", "allgather", "allreduce")
# The dense exchange is chosen when the table's bytes x DENSE_WEIGHT are fewer than the gathered rows'
# bytes. In bytes alone the allgather would win up to 2x the table (a ring allreduce moves 2x the table
# per rank), but the sparse side also sorts and merges: `python -m bench sparse` (2 ranks) measured the
# times crossing between 0.27x and 0.54x the table (16 MiB table) and between 0.5x and 1.0x (256 MiB).
DENSE_WEIGHT = 0.6
_INT32_MAX = 2**31 - 1  # Allgatherv counts are C ints


def sparse_params(model):
    """The weights of ``model``'s embeddings that produce sparse gradients (``sparse=True``)."""
    import torch.nn as nn

    return [m.weight for m in model.modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad]


def local_rows(p):
    """This rank's coalesced gradient of ``p``: (ids int64 [k], rows float32 [k, dim]), as numpy."""
    dim = p.shape[1]
    if p.grad is None:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    g = p.grad.detach()
    if g.device.type != "cpu":  # summed on the device: fewer rows to bring to the host
        g = g.coalesce()
    ids = g._indices()[0].cpu().numpy().astype(np.int64, copy=False)
    rows = g._values().cpu().numpy().astype(np.float32, copy=False).reshape(len(ids), dim)
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
        # torch's embedding gradient has a row per token (63k on a batch of 64 man pages, 3.7k
        # distinct), summed here in token order; mpirt.train.bagrows gives them summed already
        # (autograd drops the coalesced flag on the way, hence the check of the ids themselves).
        ids, rows = merge_rows(ids, rows)
    return ids, np.ascontiguousarray(rows)


def merge_rows(ids, rows):
    """Sum the rows of equal ids: (sorted unique ids, summed rows). Deterministic: each sum is taken
    one add at a time in input order (rank order, after :func:`gather_rows`), whatever the number of
    threads, so replicas that merge the same bytes get the same bits."""
    if len(ids) == 0:
        return ids, rows
    import torch

    uniq, out = sum_by_id(torch.from_numpy(ids), torch.from_numpy(np.ascontiguousarray(rows)))
    return uniq.numpy(), out.numpy()


def sum_by_id(ids, table, which=None):
    """For each distinct id, the sum of the rows ``table[which[t]]`` over the positions ``t`` where
    ``ids[t]`` is that id (``which`` None: row ``t`` itself), added one at a time in ``t`` order,
    starting from 0. Returns (sorted unique ids, summed rows), CPU tensors.

    The one mechanism behind every row merge: a rank's gradient (:func:`merge_rows`), the ranks'
    union, and an EmbeddingBag's gradient taken straight from its bags (:mod:`mpirt.train.bagrows`).
    How: a stable sort groups equal ids keeping their order, and EmbeddingBag's "sum" (which walks
    each bag in order) adds each group. 2.6x faster than ``unique`` + ``index_add_`` on a fastText
    batch (68k rows of 64 into 7k: 2.8 ms against 7.4 ms, one thread; bitwise the same), whose
    ``index_add_`` pays a dispatch per row. Integer rows (``--exact``'s fixed point) take
    ``index_add_``: EmbeddingBag has no integer sum, and integer sums do not depend on the order.
    """
    import torch
    import torch.nn.functional as F

    if not table.is_floating_point():
        uniq, inv = torch.unique(ids, sorted=True, return_inverse=True)
        src = table if which is None else table.index_select(0, which)
        return uniq, torch.zeros((len(uniq), *table.shape[1:]), dtype=table.dtype).index_add_(0, inv, src)
    order, perm = torch.sort(ids, stable=True)
    uniq, counts = torch.unique_consecutive(order, return_counts=True)
    starts = counts.cumsum(0).sub_(counts)
    return uniq, F.embedding_bag(perm if which is None else which.index_select(0, perm), table, starts, mode="sum")


def gather_rows(ec, ids, rows, counts):
    """Every rank's (ids, rows) in rank order: one Allgatherv of bytes (ids then rows per rank).

    ``counts``: each rank's row count (the same array on every rank); rows of any dtype, [n, dim].
    """
    MPI = ec.MPI
    dim, dtype = rows.shape[1], rows.dtype
    width = 8 + dtype.itemsize * dim
    mine = np.empty(len(ids) * width, np.uint8)
    mine[:8 * len(ids)] = ids.view(np.uint8)
    mine[8 * len(ids):] = np.ascontiguousarray(rows).reshape(-1).view(np.uint8)
    sizes = counts * width
    displs = np.r_[0, np.cumsum(sizes)[:-1]]
    out = np.empty(int(sizes.sum()), np.uint8)
    ec.comm.Allgatherv([mine, MPI.BYTE], [out, (sizes, displs), MPI.BYTE])
    all_ids, all_rows = [], []
    for n, at in zip(counts, displs):
        n, at = int(n), int(at)
        all_ids.append(out[at:at + 8 * n].view(np.int64))
        all_rows.append(out[at + 8 * n:at + n * width].view(dtype).reshape(n, dim))
    return np.concatenate(all_ids), np.concatenate(all_rows)


class SparseExchange:
    """Sum the row-sparse gradients of ``params`` over ``ec``'s view; see the module docstring.

    Args:
        ec: the :class:`mpirt.comm.elastic.ElasticComm` (its ``.comm`` may change between calls).
        params: embedding weights with sparse gradients (:func:`sparse_params`).
        mode: "auto" (per step, by bytes), "allgather" or "allreduce" (forced, for tests and benches).
    """

    def __init__(self, ec, params, mode="auto"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.ec, self.params, self.mode = ec, list(params), mode
        self.merged = [None] * len(self.params)
        self._dense = {}  # a zeroed float32 table per param, for the allreduce exchange
        self.counters = {"steps": 0, "allgather": 0, "allreduce": 0, "bytes": 0, "rows": 0}

    def exchange(self, scale):
        """Exchange and merge; ``self.merged[i]`` = (ids, rows x ``scale``) of ``params[i]``.

        Raises:
            ProcessFailure: a member failed (or the view was revoked) during the exchange.
        """
        local = [local_rows(p) for p in self.params]
        for p in self.params:
            p.grad = None  # taken: the dense optimizer must not see it
        if self.ec.size > 1 and self.params:
            with self.ec.guard():
                counts = np.zeros((self.ec.size, len(self.params)), np.int64)
                self.ec.comm.Allgather(np.array([len(i) for i, _ in local], np.int64), counts)
                local = [self._exchange_one(i, ids, rows, counts[:, i]) for i, (ids, rows) in enumerate(local)]
        self.counters["steps"] += 1
        for i, (ids, rows) in enumerate(local):
            rows *= np.float32(scale)
            self.merged[i] = (ids, rows)
            self.counters["rows"] += len(ids)

    def choose(self, p, counts):
        """"allgather" or "allreduce" for a step whose ranks touched ``counts`` rows of ``p``."""
        total = int(counts.sum())
        vocab, dim = p.shape
        sparse_bytes = total * (8 + 4 * dim)
        if self.mode != "auto":
            return self.mode
        if sparse_bytes > _INT32_MAX:
            return "allreduce"
        return "allreduce" if 4 * vocab * dim * DENSE_WEIGHT < sparse_bytes else "allgather"

    def _exchange_one(self, i, ids, rows, counts):
        p = self.params[i]
        how = self.choose(p, counts)
        self.counters[how] += 1
        dim = p.shape[1]
        if how == "allgather":
            self.counters["bytes"] += int(counts.sum()) * (8 + 4 * dim)
            return merge_rows(*gather_rows(self.ec, ids, rows, counts))
        self.counters["bytes"] += 4 * p.numel() + 8 * int(counts.sum())
        return self._reduce_dense(p, ids, rows, counts)

    def _reduce_dense(self, p, ids, rows, counts):
        """Scatter into a dense table, allreduce it, keep the touched rows (the gathered ids)."""
        MPI = self.ec.MPI
        table = self._dense.get(id(p))
        if table is None:
            table = self._dense[id(p)] = np.zeros(tuple(p.shape), np.float32)
        displs = np.r_[0, np.cumsum(counts)[:-1]]
        all_ids = np.empty(int(counts.sum()), np.int64)
        self.ec.comm.Allgatherv([ids, MPI.INT64_T], [all_ids, (counts, displs), MPI.INT64_T])
        touched = np.unique(all_ids)
        table[ids] = rows
        try:
            reduce_segments(self.ec, [table.reshape(-1)], MPI.FLOAT, MPI.SUM)
        except MPI.Exception:
            table.fill(0.0)  # a failed allreduce leaves partial sums anywhere
            raise
        out = table[touched]
        table[touched] = 0.0  # every nonzero row of the sum is a touched row
        return touched, out

    def apply(self, opt):
        """Update the touched rows of every param with ``opt``'s hyper-parameters (after a commit)."""
        for p, (ids, rows) in zip(self.params, self.merged):
            apply_rows(opt, p, ids, rows)


def apply_rows(opt, p, ids, rows):
    """One lazy optimizer step on rows ``ids`` of ``p`` (see the module docstring for the rule).

    The state lives in ``opt.state[p]`` under torch's own names (``momentum_buffer``; ``step``,
    ``exp_avg``, ``exp_avg_sq``), so ``opt.state_dict()`` (checkpoints, joiners) carries it.
    """
    import torch

    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    state = opt.state[p]
    idx = torch.from_numpy(ids).to(p.device)
    g = torch.from_numpy(rows).to(p.device)
    with torch.no_grad():
        w = p.data
        if isinstance(opt, torch.optim.Adam):
            _adam_rows(group, state, w, idx, g)
            return
        if not isinstance(opt, torch.optim.SGD):
            raise TypeError(f"sparse embedding gradients need SGD or Adam, not {type(opt).__name__}")
        if group["weight_decay"]:
            g = g.add(w.index_select(0, idx), alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum:
            buf = _table(state, "momentum_buffer", w)
            b = buf.index_select(0, idx).mul_(momentum).add_(g, alpha=1 - group["dampening"])
            buf.index_copy_(0, idx, b)
            g = g.add(b, alpha=momentum) if group["nesterov"] else b
        w.index_add_(0, idx, g, alpha=-group["lr"])


def _table(state, name, w):
    """The optimizer's per-row table ``name`` for ``w``, in huge pages (:mod:`mpirt.train.hugepages`):
    made zero on first use, moved there once when it came from elsewhere (a checkpoint, a joiner)."""
    from mpirt.train import hugepages

    t = state.get(name)
    t = hugepages.zeros_like(w) if t is None else hugepages.rehome(t)
    state[name] = t
    return t


def _adam_rows(group, state, w, idx, g):
    """torch.optim.Adam's update on rows ``idx``, by the optimizer's own kernel: the fused one when the
    optimizer is fused (as :mod:`mpirt.train.optim` builds it: one pass over the gathered rows, 1.5x
    faster than the formulas one at a time on a fastText step's 7k rows), else its single-tensor
    formulas in the same order. Either way a row touched every step moves as the dense optimizer
    would move it, bit for bit (tests/test_sparse.py)."""
    import torch

    if group.get("amsgrad"):
        raise TypeError("sparse embedding gradients do not support Adam's amsgrad")
    if "step" not in state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32, device=w.device if group.get("fused") else None)
    exp_avg, exp_avg_sq = _table(state, "exp_avg", w), _table(state, "exp_avg_sq", w)
    beta1, beta2 = group["betas"]
    state["step"] += 1
    if group.get("fused"):
        rows, m, v = (t.index_select(0, idx) for t in (w, exp_avg, exp_avg_sq))
        kernel = torch._fused_adamw_ if group.get("decoupled_weight_decay") else torch._fused_adam_
        kernel([rows], [g], [m], [v], [], [state["step"]], amsgrad=False, lr=group["lr"], beta1=beta1,
               beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
               maximize=group.get("maximize", False), grad_scale=None, found_inf=None)
        for table, new in ((exp_avg, m), (exp_avg_sq, v), (w, rows)):
            table.index_copy_(0, idx, new)
        return
    if group["weight_decay"]:
        g = g.add(w.index_select(0, idx), alpha=group["weight_decay"])
    step = float(state["step"])
    m = exp_avg.index_select(0, idx).lerp_(g, 1 - beta1)
    v = exp_avg_sq.index_select(0, idx).mul_(beta2).addcmul_(g, g, value=1 - beta2)
    exp_avg.index_copy_(0, idx, m)
    exp_avg_sq.index_copy_(0, idx, v)
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = (v.sqrt() / bias2 ** 0.5).add_(group["eps"])
    w.index_copy_(0, idx, w.index_select(0, idx).addcdiv_(m, denom, value=-group["lr"] / bias1))
