"""The numpy reference: float64 arithmetic, written to be obviously right rather than fast."""

import numpy as np

name = "numpy"


def owns(x):
    return isinstance(x, np.ndarray)


def _check_labels(y, keep, C):
    bad = keep & ((y < 0) | (y >= C))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} labels outside [0, {C}) that are not ignore_index")


def softmax_xent(logits, labels, ignore_index, smoothing, grad_scale):
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    n, C = z.shape
    keep = y != ignore_index
    _check_labels(y, keep, C)
    grad_dtype = logits.dtype if np.issubdtype(logits.dtype, np.floating) else np.float64
    if n == 0 or C == 0:
        return 0.0, 0, 0, (np.zeros((n, C), grad_dtype) if grad_scale is not None else None)
    yk = np.where(keep, y, 0)
    rows = np.arange(n)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = z.max(axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)  # an all -inf row: exp(z - m) is 0, not NaN
        lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
        loss = lse - z[rows, yk]
        if smoothing:
            loss = (1 - smoothing) * loss + smoothing * (lse - z.mean(axis=1))
        grad = None
        if grad_scale is not None:
            target = np.full_like(z, smoothing / C)
            target[rows, yk] += 1.0 - smoothing
            grad = (np.exp(z - lse[:, None]) - target) * grad_scale
            grad[~keep] = 0.0
            grad = grad.astype(grad_dtype)
    loss_sum = float(loss[keep].sum())
    correct = int((z.argmax(axis=1)[keep] == y[keep]).sum())
    return loss_sum, correct, int(keep.sum()), grad


def predict_topk(logits, k):
    z = np.asarray(logits, dtype=np.float64)
    order = np.argsort(-z, axis=1, kind="stable")[:, :k]
    m = z.max(axis=1, keepdims=True)
    p = np.exp(z - m)
    p /= p.sum(axis=1, keepdims=True)
    return order.astype(np.int64), np.take_along_axis(p, order, axis=1).astype(np.float32)


def _flat(buf, numel):
    if buf.dtype != np.float32 or buf.ndim != 1 or buf.size < numel:
        raise ValueError(f"the flat buffer must be 1-D float32 with at least {numel} elements")
    return buf


class Bucket:
    """Tensors and their offsets in the flat buffer."""

    def __init__(self, tensors):
        for t in tensors:
            if t.dtype != np.float32:
                raise TypeError("pack/unpack take float32 arrays")
        self.tensors = list(tensors)
        self.numel = sum(t.size for t in self.tensors)

    def pack(self, out=None):
        out = np.empty(self.numel, dtype=np.float32) if out is None else _flat(out, self.numel)
        o = 0
        for t in self.tensors:
            out[o:o + t.size] = t.reshape(-1)
            o += t.size
        return out

    def unpack(self, flat, scale=1.0):
        flat = _flat(flat, self.numel)
        o = 0
        for t in self.tensors:
            np.multiply(flat[o:o + t.size].reshape(t.shape), np.float32(scale), out=t)
            o += t.size


def pack(tensors, out=None):
    return Bucket(tensors).pack(out)


def unpack(flat, tensors, scale):
    Bucket(tensors).unpack(flat, scale)


def _bf16_bits(x):
    # bf16 is fp32's top 16 bits, rounded to nearest even (numpy has no bf16 type). NaN stays NaN.
    bits = x.astype(np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def compress(x, dtype, residual=None):
    v = np.asarray(x, dtype=np.float32) + (residual if residual is not None else np.float32(0))
    c = v.astype(np.float16) if dtype == "fp16" else _bf16_bits(v)
    if residual is not None:
        residual[...] = v - decompress(c, dtype)
    return c


def decompress(c, dtype, out=None):
    r = c.astype(np.float32) if dtype == "fp16" else (c.astype(np.uint32) << 16).view(np.float32)
    if out is None:
        return r
    out[...] = r.reshape(out.shape)
    return out


def segment_add(dst, src, offset):
    if not dst.flags.c_contiguous:
        raise TypeError("segment_add needs a C-contiguous destination")
    flat = dst.reshape(-1)  # a view: the addition lands in dst
    flat[offset:offset + src.size] += np.asarray(src, dtype=np.float32).reshape(-1)
