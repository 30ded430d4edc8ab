"""The fused, segmented gradient allreduce.

Each parameter's gradient is a view of a flat float32 bucket buffer, so backward accumulates
straight into what MPI sums across the view, and the sums are multiplied by ``1 / total samples``
in place. Why each part:

- *views, not copies*: packing gradients into a buffer and scattering the sums back copied every
  gradient twice a step (2 x 80 MB on a 20M-parameter MLP); DDP calls this
  ``gradient_as_bucket_view``. A gradient that was replaced (``zero_grad(set_to_none=True)``, or
  by the user) is copied in once and re-bound;
- *buckets*: one message per tensor costs one latency each (160 tensors: 160 latencies); one
  bucket per ``bucket_bytes`` costs a few;
- *segments*: on the fault-tolerant tcp path a single large ``MPI_Allreduce`` collapses (FACTS.md:
  0.52 GB/s at 64 MiB against 2.2 GB/s at 1 MiB), so a bucket is reduced as ``segment_bytes``
  pieces, ``inflight`` of them outstanding at once (``Iallreduce``) so their latencies overlap;
- *stats tail*: the step's sample count, loss sum and the protocol's flags ride in the last
  bucket's tail, so they cost no extra collective (counts stay exact below 2^24 in float32);
- *compression* (``bf16``/``fp16``): half the bytes on the wire, with error feedback (each rank
  keeps what rounding lost and adds it to its next gradient); the sum runs in a user-defined MPI
  op that adds in float32 and rounds once per pairwise add; the stats then travel in float64;
- *device tensors*: views of a device buffer, staged through host memory (the PyPI Open MPI is not
  CUDA-aware).

Every rank gets bitwise the same sums (each element is reduced once by MPI and broadcast), so
replicated parameters stay identical across ranks.
"""

import numpy as np

import mpirt.kernels as K
from mpirt.train.overlap import Overlap

# Chosen by `python -m bench allreduce` on the 2-core machine (tcp path, 4 ranks oversubscribed,
# bench/results/allreduce-2core.md): 25M floats took 546 ms with 8 MiB segments one at a time,
# 2.4x longer with 1 MiB segments (each blocking collective pays a scheduling round on 2 cores),
# and 16% longer with 4 segments in flight (libnbc).
BUCKET_BYTES = 16 << 20
# With overlap, the first bucket (the last layers, whose gradients backward gives first) is small so
# that communication starts early: DDP's choice (torch.distributed's _DEFAULT_FIRST_BUCKET_BYTES).
FIRST_BUCKET_BYTES = 1 << 20
SEGMENT_BYTES = 8 << 20
INFLIGHT = 1
COMPRESSIONS = ("bf16", "fp16")


class GradAllreduce:
    """Sum the gradients of ``params`` (and a few stats) over ``ec``'s current communicator.

    Args:
        ec: the :class:`mpirt.comm.elastic.ElasticComm` (its ``.comm`` may change between calls).
        params: the model's parameters (torch tensors with ``.grad`` after backward).
        n_stats: float slots reduced with the gradients (sample count, loss sum, flags...).
        bucket_bytes, segment_bytes, inflight: see the module docstring.
        compress: None, "bf16" or "fp16".
        overlap: reduce buckets on a thread while backward runs (call :meth:`begin` before backward).
        scale: what the summed gradients are multiplied by, from the summed stats (default
            ``1 / stats[0]``, the total sample count): Horovod's ``op=Sum`` passes ``lambda t: 1.0``.
    """

    def __init__(self, ec, params, *, n_stats=4, bucket_bytes=BUCKET_BYTES, segment_bytes=SEGMENT_BYTES,
                 inflight=INFLIGHT, compress=None, overlap=False, scale=None):
        import torch

        if compress not in (None, *COMPRESSIONS):
            raise ValueError(f"compress must be one of {COMPRESSIONS} or None")
        self.ec, self.compress, self.n_stats = ec, compress, n_stats
        self.scale = scale or (lambda total: 1.0 / max(total[0], 1.0))
        self.segment = max(1, segment_bytes // 4)
        self.inflight = max(1, inflight)
        self.params = [p for p in params if p.requires_grad]
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.on_device = self.device.type != "cpu"
        if overlap:  # backward fills the last layers' gradients first: they go first, in a small bucket
            self.groups = _plan(self.params[::-1], max(1, bucket_bytes // 4), first=FIRST_BUCKET_BYTES // 4)
        else:
            self.groups = _plan(self.params, max(1, bucket_bytes // 4))
        for p in self.params:
            if p.dtype != torch.float32:
                raise TypeError(f"gradients are reduced in float32; a parameter is {p.dtype}")
        tail = 0 if compress else n_stats
        self.numel = [sum(p.numel() for p in g) for g in self.groups]
        sizes = list(self.numel)
        sizes[-1:] = [sizes[-1] + tail] if sizes else [tail]
        # Host buffers the MPI reads and writes (and, on a device, their device twins).
        self.host = [np.zeros(n, dtype=np.float32) for n in sizes]
        self.dev = [torch.zeros(n, dtype=torch.float32, device=self.device) for n in sizes] if self.on_device else None
        # Each parameter's .grad is a view of its bucket's flat buffer (DDP's gradient_as_bucket_view):
        # backward accumulates straight into what MPI sends, so a step packs nothing and its unpack is
        # one in-place scale. On a 20M-parameter MLP the pack and unpack copies were 2 x 80 MB a step.
        self.bucket_grads = [None] * len(self.groups)
        for i in range(len(self.groups)):
            self._bind(i)
        self.residual = [np.zeros(n, dtype=np.float32) for n in sizes] if compress else None
        self._op = None
        self._overlap = Overlap(self) if overlap and len(self.groups) > 1 else None

    def begin(self):
        """Before backward: buckets are reduced, in order, as their gradients are complete."""
        if self._overlap is not None:
            self._overlap.begin()

    def _flat(self, i):
        """Bucket ``i``'s flat buffer as a torch tensor: the device twin, or a view of the host one."""
        import torch

        return self.dev[i] if self.on_device else torch.from_numpy(self.host[i])

    def _bind(self, i):
        """Point bucket ``i``'s gradients at views of its flat buffer, keeping their values (a missing
        gradient, from ``zero_grad(set_to_none=True)`` or a parameter unused this step, is zero)."""
        flat, o, views = self._flat(i), 0, []
        for p in self.groups[i]:
            n = p.numel()
            v = flat[o:o + n].view(p.shape)
            if p.grad is None:
                v.zero_()
            elif p.grad is not v:
                v.copy_(p.grad)
            p.grad = v
            views.append(v)
            o += n
        self.bucket_grads[i] = views

    def pack_bucket(self, i):
        """Make bucket ``i``'s flat buffer hold its gradients, then stage it to the host.

        Nothing to copy while the gradients are still the buffer's views (``zero_grad(set_to_none=
        False)`` keeps them); a gradient that autograd or the user replaced is copied in and re-bound.
        """
        if any(t is not p.grad for t, p in zip(self.bucket_grads[i], self.groups[i])):
            self._bind(i)
        if self.on_device:
            self.host[i][:] = self.dev[i].cpu().numpy()  # staging: the MPI here is not CUDA-aware

    def reduce_bucket(self, i):
        """Sum host buffer ``i`` over the view (in place): float32, or compressed on the wire."""
        MPI = self.ec.MPI
        if not self.compress:
            reduce_segments(self.ec, [self.host[i]], MPI.FLOAT, MPI.SUM, segment=self.segment,
                            inflight=self.inflight)
            return
        if self._op is None:
            self._op = MPI.Op.Create(_half_sum(self.compress), commute=True)
        wire = K.compress(self.host[i], self.compress, residual=self.residual[i], backend="numpy").view(np.uint16)
        reduce_segments(self.ec, [wire], MPI.UINT16_T, self._op, segment=self.segment, inflight=self.inflight)
        K.decompress(wire.view(_np_half(self.compress)), self.compress, out=self.host[i], backend="numpy")

    def allreduce(self, stats):
        """Sum the gradients and ``stats`` over the view; gradients become ``sum / stats[0]``.

        Args:
            stats: ``n_stats`` numbers; ``stats[0]`` is this rank's sample count.

        Returns:
            The summed stats (float64 array).

        Raises:
            ProcessFailure: a member failed (or the communicator was revoked) during the reduction
                (here, or on the overlap thread during backward).
        """
        stats = np.asarray(stats, dtype=np.float64)
        first = self._overlap.finish() if self._overlap is not None else 0  # buckets already reduced
        last = len(self.host) - 1  # the stats ride in its tail (uncompressed) and are known only now
        with self.ec.guard():
            for i in range(first, last + 1):
                if i < len(self.groups):
                    self.pack_bucket(i)
                if i == last and not self.compress:
                    self.host[i][-self.n_stats:] = stats
                self.reduce_bucket(i)
            if self.compress:  # the stats exact, in float64, beside the rounded gradients
                total = stats.copy()
                self.ec.comm.Allreduce(self.ec.MPI.IN_PLACE, total, op=self.ec.MPI.SUM)
            else:
                total = self.host[-1][-self.n_stats:].astype(np.float64)
        self.unpack(self.scale(total))
        return total

    def wire_bytes(self):
        """Bytes one step reduces (gradients and stats; half-width when compressed)."""
        return sum(len(h) for h in self.host) * (2 if self.compress else 4)

    def unpack(self, scale):
        """The sums into the gradients, times ``scale``: in place, since they are the buffers' views."""
        import torch

        for i, n in enumerate(self.numel):
            if self.on_device:
                self.dev[i].copy_(torch.from_numpy(self.host[i]))
            if scale != 1.0:
                self._flat(i)[:n].mul_(scale)

    def _reduce(self, buffers, mpi_type, op):
        reduce_segments(self.ec, buffers, mpi_type, op, segment=self.segment, inflight=self.inflight)

    def close(self):
        if self._overlap is not None:
            self._overlap.close()
        if self._op is not None:
            self._op.Free()
            self._op = None


def reduce_segments(ec, buffers, mpi_type, op, *, segment=SEGMENT_BYTES // 4, inflight=INFLIGHT):
    """Segmented, pipelined in-place Allreduce of every buffer (same order on every rank).

    ``segment`` elements a collective, ``inflight`` of them outstanding (see the module docstring).
    """
    MPI, comm = ec.MPI, ec.comm
    if inflight == 1:  # blocking segments: coll/tuned, no libnbc schedule per segment
        for buf in buffers:
            for a in range(0, len(buf), segment):
                comm.Allreduce(MPI.IN_PLACE, [buf[a:a + segment], mpi_type], op=op)
        return
    pending = []
    try:
        for buf in buffers:
            for a in range(0, len(buf), segment):
                if len(pending) >= inflight:
                    pending.pop(0).Wait()
                seg = buf[a:a + segment]
                pending.append(comm.Iallreduce(MPI.IN_PLACE, [seg, mpi_type], op=op))
        # One Wait each, not Waitall: Waitall reports a failure as ERR_IN_STATUS, hiding its class.
        while pending:
            pending.pop(0).Wait()
    except MPI.Exception:
        # Revoked, the others' pending segments complete (in error) instead of waiting forever.
        ec.revoke()
        for req in pending:
            try:
                req.Wait()
            except MPI.Exception:
                pass
        raise


def _plan(params, bucket_floats, first=None):
    """Consecutive parameters grouped into buckets of at most ``bucket_floats`` (one big tensor alone);
    the first bucket at most ``first`` floats, when given."""
    groups, current, size = [], [], 0
    for p in params:
        n = p.numel()
        cap = first if first is not None and not groups else bucket_floats
        if current and size + n > cap:
            groups.append(current)
            current, size = [], 0
        current.append(p)
        size += n
    if current:
        groups.append(current)
    return groups


def _np_half(kind):
    if kind == "fp16":
        return np.float16
    return np.dtype("uint16")  # numpy has no bfloat16: the kernels' numpy backend stores bf16 bits as uint16


def _half_sum(kind):
    """A user MPI op: add two vectors of 16-bit floats (bf16 bits or fp16) in float32, round once."""
    def op(inbuf, inoutbuf, datatype):
        a = np.frombuffer(inbuf, dtype=np.uint16)
        b = np.frombuffer(inoutbuf, dtype=np.uint16)
        if kind == "fp16":
            s = a.view(np.float16).astype(np.float32) + b.view(np.float16).astype(np.float32)
            b[:] = s.astype(np.float16).view(np.uint16)
            return
        s = (a.astype(np.uint32) << 16).view(np.float32) + (b.astype(np.uint32) << 16).view(np.float32)
        bits = s.view(np.uint32)
        # round to nearest even, as the compress kernel does (NaN stays NaN: its payload is nonzero).
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        b[:] = (bits >> 16).astype(np.uint16)

    return op
