"""The numpy reference: float64 arithmetic, written to be obviously right."""

import numpy as np

name = "numpy"


def owns(x):
    return isinstance(x, np.ndarray)


def softmax_xent(logits, labels, ignore_index, smoothing, grad_scale):
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n, C = z.shape
    keep = y != ignore_index
    yk = np.where(keep, y, 0)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = z.max(axis=1, keepdims=True) if C else np.zeros((n, 1))
        m = np.where(np.isfinite(m), m, 0.0)
        lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
        zy = z[np.arange(n), yk] if n else np.zeros(0)
        loss = lse - zy
        if smoothing:
            loss = (1 - smoothing) * loss + smoothing * (lse - z.mean(axis=1))
    loss_sum = float(loss[keep].sum()) if keep.any() else 0.0
    correct = int((z.argmax(axis=1)[keep] == y[keep]).sum()) if n and C else 0
    grad = None
    if grad_scale is not None:
        p = np.exp(z - lse[:, None]) if n else np.zeros_like(z)
        q = np.full_like(z, smoothing / C if C else 0.0)
        q[np.arange(n), yk] += 1.0 - smoothing
        grad = ((p - q) * grad_scale * keep[:, None]).astype(logits.dtype if logits.dtype != np.float64 else np.float64)
    return loss_sum, correct, int(keep.sum()), grad


def predict_topk(logits, k):
    z = np.asarray(logits, dtype=np.float64)
    order = np.argsort(-z, axis=1, kind="stable")[:, :k]
    m = z.max(axis=1, keepdims=True)
    p = np.exp(z - m)
    p /= p.sum(axis=1, keepdims=True)
    return order.astype(np.int64), np.take_along_axis(p, order, axis=1).astype(np.float32)


def pack(tensors, out=None):
    total = sum(t.size for t in tensors)
    out = np.empty(total, dtype=np.float32) if out is None else out
    o = 0
    for t in tensors:
        out[o:o + t.size] = t.reshape(-1)
        o += t.size
    return out


def unpack(flat, tensors, scale):
    o = 0
    for t in tensors:
        t[...] = (flat[o:o + t.size] * scale).reshape(t.shape)
        o += t.size


def _round_to(x, dtype):
    if dtype == "fp16":
        return x.astype(np.float16)
    # bf16 is fp32's top 16 bits, rounded to nearest even: numpy has no bf16 type.
    bits = x.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return (rounded >> 16).astype(np.uint16)


def compress(x, dtype, residual=None):
    v = x.astype(np.float32) + (residual if residual is not None else 0)
    c = _round_to(v, dtype)
    if residual is not None:
        residual[...] = v - decompress(c, dtype)
    return c


def decompress(c, dtype, out=None):
    if dtype == "fp16":
        r = c.astype(np.float32)
    else:
        r = (c.astype(np.uint32) << 16).view(np.float32)
    if out is None:
        return r
    out[...] = r
    return out


def segment_add(dst, src, offset):
    dst[offset:offset + src.size] += src
