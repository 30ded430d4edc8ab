"""``--exact``: the same bits on any number of ranks, through any failure, resume or join.

In the default mode a step's gradient is each rank's float sum of its slice, then MPI's float sum
of the slices. Float addition is not associative, so a different partition (another world size, a
view after a failure) rounds differently, and training amplifies it (the digits CNN: 3.5e-2 apart
after 184 steps on 1 and 2 ranks). ``--exact`` removes both sources of difference:

1. **Fixed micro-batches.** A step's samples (positions ``[0, n)`` of its global batch) are cut
   into micro-batches of ``M`` rows, ``[jM, (j+1)M)``, whatever the world size; each rank takes a
   contiguous run of whole micro-batches (:func:`micro_batches`) and computes each one's gradient
   on its own (forward and backward of those rows alone, loss summed, one intra-op thread), so a
   micro-batch's gradient is the same bits on whichever rank computes it.
2. **An associative sum.** Each micro-batch gradient is converted to fixed point: int64 with one
   binary exponent per parameter tensor, ``e = 62 - ceil(log2 K) - exponent(max |g|)``, the max
   agreed over every micro-batch of the step by a MAX allreduce first (``K`` micro-batches of
   magnitude below ``2^(62 - ceil(log2 K) - e)`` cannot overflow 2^62). Integer addition is
   associative, locally and in MPI's SUM, so the total does not depend on who added what. It is
   converted back once: ``float32(total * 2^-e / samples)``.

Row-sparse embedding gradients (fastText) take the same road: each micro-batch's touched rows are
converted with the table's exponent, merged by row id in int64 on the rank, allgathered, and merged
again by id: integer sums, so the merged rows (and the set of touched rows that the lazy optimizer
rule of :mod:`mpirt.train.sparse` updates) are the same on any world size.

The step's statistics travel in the same int64 allreduce: a slot per micro-batch holds its sample
count, loss sum (and correct count) as float64 *bit patterns*, written by the one rank that computed
it (the others add 0, and x + 0 = x in integers too); every member then sums the slots in
micro-batch order, so reports are identical as well. The protocol's flags (leaving, joiners,
preempt) are plain integer counts in the tail.

Precision: an element of magnitude ``|g|`` keeps ``62 - ceil(log2 K) - (exponent(max) -
exponent(|g|))`` bits, i.e. all 24 of float32's unless it is ``2^(38 - ceil(log2 K))`` times smaller
than the largest gradient of its tensor; what it loses is the same on every world size.

The bits are those of this CPU type and torch build: another instruction set (AVX-512 against
AVX2) can give a micro-batch's gradient other bits. Cost: one small MAX allreduce a step, int64 on
the wire (2x float32's bytes), no overlap with backward, one intra-op thread, and a float32 copy
of the gradients per local micro-batch (the exponent is known only once all are computed).
"""

import math

import numpy as np

from mpirt.train.allreduce import SEGMENT_BYTES, reduce_segments

# int64 headroom: the fixed-point sum of K micro-batches stays below 2^62.
HEADROOM_BITS = 62


def micro_batches(start, stop, micro, rank, size):
    """The micro-batches ``rank`` of ``size`` computes for a step of positions ``[start, stop)``.

    Returns ``(k, [(j, a, b), ...])``: the step's micro-batch count and this rank's micro-batches
    (index ``j``, positions ``[a, b)``): a contiguous run, the same cut whatever ``size`` is.
    """
    n = stop - start
    k = -(-n // micro) if n > 0 else 0
    first, last = k * rank // size, k * (rank + 1) // size
    return k, [(j, start + j * micro, min(start + (j + 1) * micro, stop)) for j in range(first, last)]


def default_micro_batch(global_batch):
    """The largest divisor of ``global_batch`` not above 16: enough micro-batches for 4 ranks at 64."""
    return max(d for d in range(1, min(16, global_batch) + 1) if global_batch % d == 0)


def exponents(maxima, k):
    """Per-tensor binary exponents for ``k`` micro-batches whose largest magnitudes are ``maxima``."""
    spare = math.ceil(math.log2(k)) if k > 1 else 0
    out = np.zeros(len(maxima), dtype=np.int64)
    for t, m in enumerate(maxima):
        if m > 0:
            out[t] = HEADROOM_BITS - spare - math.frexp(float(m))[1]
    return out


def to_fixed(grad, scale):
    """float32 gradient -> int64 fixed point (``scale``: 2^e per element, float64; exact product)."""
    return np.rint(grad.astype(np.float64) * scale).astype(np.int64)


class ExactReducer:
    """Sum micro-batch gradients and stats over the view, order-independently (see the module doc).

    Args:
        ec: the :class:`mpirt.comm.elastic.ElasticComm`.
        params: the model's dense parameters (torch tensors; ``.grad`` after each micro-batch's backward).
        n_stats: the length of the caller's stats array. ``slots`` index the stats that come from
            the micro-batches (:meth:`add`), the sample count first (the gradients are divided by
            its sum); the others hold integers (flags, counts) and are summed as such.
        nonfinite: the stat set to 1 when a gradient of the step is NaN or inf.
        sparse: embedding weights with row-sparse gradients (:func:`mpirt.train.sparse.sparse_params`):
            their touched rows are summed in fixed point too (one exponent per table), exchanged by
            an allgather, merged by row id in integers, and applied by :meth:`apply_sparse`.
    """

    def __init__(self, ec, params, *, n_stats, slots=(0, 1), nonfinite=None, sparse=()):
        import torch

        self.ec = ec
        self.params = [p for p in params if p.requires_grad]
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.sizes = [p.numel() for p in self.params]
        self.n = sum(self.sizes)
        self.n_stats, self.slots = n_stats, tuple(slots)
        self.nonfinite = nonfinite
        self.sparse = list(sparse)
        self.merged = [None] * len(self.sparse)  # (ids, float32 rows) of each table, after allreduce
        self.sparse_bytes = 0
        self.begin(0)

    def begin(self, k):
        """A new step of ``k`` micro-batches."""
        self.k = k
        self.local = []  # (j, float32 flat gradient, [(ids, rows) per table], (its stats, one per slot))

    def add(self, j, *values):
        """Keep micro-batch ``j``'s gradient (the parameters' ``.grad`` now) and its stats (one per slot).
        A sparse table's gradient is taken (set to None), so the next micro-batch starts empty."""
        if len(values) != len(self.slots):
            raise ValueError(f"micro-batch {j}: {len(values)} stats given, {len(self.slots)} expected")
        import torch

        from mpirt.train.sparse import local_rows

        with torch.no_grad():
            flat = torch.cat([p.grad.detach().reshape(-1).to("cpu", torch.float32) for p in self.params]) \
                if self.params else torch.zeros(0)
        rows = [local_rows(p) for p in self.sparse]
        for p in self.sparse:
            p.grad = None
        self.local.append((j, flat.numpy().copy(), rows, tuple(float(v) for v in values)))

    def wire_bytes(self):
        """Bytes a step puts through the collectives (the last step's sparse rows included)."""
        return 8 * (self.n + len(self.slots) * self.k + self.n_stats) + 8 * (len(self.params) + 1) + self.sparse_bytes

    def allreduce(self, stats):
        """Sum over the view; gradients become ``sum / samples``; returns the summed stats (float64).

        ``stats``: the caller's array; its micro-batch slots are ignored (they come from
        :meth:`add`), its other slots must hold integers (flags and counts).
        """
        MPI, comm = self.ec.MPI, self.ec.comm
        # 1. The largest magnitude per tensor (and per sparse table) over every micro-batch of the
        #    step, and whether any gradient is not finite (then nothing is converted: the trainer
        #    refuses the step).
        peak = np.zeros(len(self.sizes) + len(self.sparse) + 1)
        for _, g, rows, _ in self.local:
            parts = (np.split(g, np.cumsum(self.sizes)[:-1]) if self.sizes else []) + [r for _, r in rows]
            for t, part in enumerate(parts):
                if part.size:
                    m = float(np.abs(part).max())
                    if not math.isfinite(m):
                        peak[-1] = 1.0
                    else:
                        peak[t] = max(peak[t], m)
        with self.ec.guard():
            comm.Allreduce(MPI.IN_PLACE, peak, op=MPI.MAX)
        finite = peak[-1] == 0.0
        e = exponents(peak[:-1], self.k) if finite else np.zeros(len(peak) - 1, dtype=np.int64)
        e_dense, e_sparse = e[:len(self.sizes)], e[len(self.sizes):]
        scale = np.repeat(np.ldexp(1.0, e_dense), self.sizes)
        # 2. One int64 buffer: the fixed-point gradient sum | the micro-batch slots | integer stats.
        width = len(self.slots) * self.k
        buf = np.zeros(self.n + width + self.n_stats, dtype=np.int64)
        grad = buf[:self.n]
        slots = buf[self.n:self.n + width].view(np.float64).reshape(len(self.slots), self.k)
        for j, g, _, values in self.local:
            if finite:
                grad += to_fixed(g, scale)
            slots[:, j] = values
        tail = buf[self.n + width:]
        for i, v in enumerate(np.asarray(stats, dtype=np.float64)):
            if i not in self.slots:
                tail[i] = int(v)
        with self.ec.guard():
            reduce_segments(self.ec, [buf], MPI.INT64_T, MPI.SUM, segment=SEGMENT_BYTES // 8)
            sparse = [self._sparse_sum(t, float(np.ldexp(1.0, e_sparse[t])) if finite else 0.0)
                      for t in range(len(self.sparse))]
        total = tail.astype(np.float64)
        if self.nonfinite is not None and not finite:
            total[self.nonfinite] = max(total[self.nonfinite], 1.0)
        for i, row in zip(self.slots, slots):
            total[i] = float(np.sum(row))  # the same array on every world size: the same sum
        samples = max(total[self.slots[0]], 1.0)
        self._unpack(grad, scale, samples)
        for t, (ids, q, scale_t) in enumerate(sparse):
            rows = (q.astype(np.float64) / scale_t / samples).astype(np.float32) if scale_t else q.astype(np.float32)
            self.merged[t] = (ids, rows)
        self.local = []
        return total

    def _sparse_sum(self, t, scale):
        """Table ``t``'s touched rows summed over the view in int64: (unique ids, int64 rows, scale).

        Each rank merges its micro-batches' rows by id (integer sums), the ranks allgather them, and
        every rank merges the union the same way: integers, so neither the partition nor the order
        of arrival changes a bit. ``scale`` 0: the step is not finite, nothing is converted.
        """
        from mpirt.train.sparse import gather_rows, merge_rows

        dim = self.sparse[t].shape[1]
        ids = np.concatenate([rows[t][0] for _, _, rows, _ in self.local] or [np.zeros(0, np.int64)])
        q = np.concatenate([to_fixed(rows[t][1], scale) if scale else np.zeros(rows[t][1].shape, np.int64)
                            for _, _, rows, _ in self.local] or [np.zeros((0, dim), np.int64)])
        ids, q = merge_rows(ids, q)
        counts = np.zeros(self.ec.size, np.int64)
        self.ec.comm.Allgather(np.array([len(ids)], np.int64), counts)
        self.sparse_bytes = 8 * int(counts.sum()) * (dim + 1)
        ids, q = merge_rows(*gather_rows(self.ec, ids, q, counts))
        return ids, q, scale

    def apply_sparse(self, opt):
        """After a commit: update the touched rows of every sparse table (:func:`mpirt.train.sparse.apply_rows`)."""
        from mpirt.train.sparse import apply_rows

        for p, (ids, rows) in zip(self.sparse, self.merged):
            apply_rows(opt, p, ids, rows)

    def close(self):
        pass

    def _unpack(self, grad, scale, samples):
        import torch

        flat = (grad.astype(np.float64) / scale / samples).astype(np.float32)
        a = 0
        with torch.no_grad():
            for p, n in zip(self.params, self.sizes):
                p.grad.copy_(torch.from_numpy(flat[a:a + n]).view_as(p.grad))
                a += n
