"""The torch backend: vectorised tensor ops, on CPU or CUDA tensors alike."""

import torch

name = "torch"


def owns(x):
    return isinstance(x, torch.Tensor)


def _as_tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _compute(x):
    """fp16/bf16 accumulate in fp32; fp64 stays fp64 (gradcheck, references)."""
    x = _as_tensor(x)
    return x if x.dtype == torch.float64 else x.float()


def softmax_xent(logits, labels, ignore_index, smoothing, grad_scale):
    z = _compute(logits)
    y = _as_tensor(labels).to(device=z.device, dtype=torch.int64)
    n, C = z.shape
    keep = y != ignore_index
    yk = torch.where(keep, y, torch.zeros_like(y))
    if n == 0 or C == 0:
        grad = torch.zeros_like(_as_tensor(logits)) if grad_scale is not None else None
        return 0.0, 0, 0, grad
    lse = torch.logsumexp(z, dim=1)
    zy = z.gather(1, yk[:, None])[:, 0]
    loss = lse - zy
    if smoothing:
        loss = (1 - smoothing) * loss + smoothing * (lse - z.mean(dim=1))
    loss_sum = float(loss[keep].sum()) if bool(keep.any()) else 0.0
    correct = int((z.argmax(dim=1)[keep] == y[keep]).sum())
    grad = None
    if grad_scale is not None:
        g = torch.exp(z - lse[:, None])
        if smoothing:
            g -= smoothing / C
        g.scatter_add_(1, yk[:, None], torch.full((n, 1), -(1.0 - smoothing), device=z.device, dtype=z.dtype))
        g *= keep[:, None] * grad_scale
        grad = g.to(_as_tensor(logits).dtype)
    return loss_sum, correct, int(keep.sum()), grad


def predict_topk(logits, k):
    z = _as_tensor(logits).float()
    p = torch.softmax(z, dim=1)
    probs, idx = torch.topk(p, k, dim=1)
    return idx.to(torch.int64), probs


def pack(tensors, out=None):
    flat = [t.reshape(-1) for t in tensors]
    if out is None:
        return torch.cat(flat)
    torch.cat(flat, out=out)
    return out


def unpack(flat, tensors, scale):
    o = 0
    for t in tensors:
        n = t.numel()
        src = flat[o:o + n].view(t.shape)
        if scale == 1.0:
            t.copy_(src)
        else:
            torch.mul(src, scale, out=t)
        o += n


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compress(x, dtype, residual=None):
    v = x.float() if residual is None else x.float() + residual
    c = v.to(_DTYPES[dtype])
    if residual is not None:
        residual.copy_(v - c.float())
    return c


def decompress(c, dtype, out=None):
    if out is None:
        return c.float()
    out.copy_(c)
    return out


def segment_add(dst, src, offset):
    dst[offset:offset + src.numel()] += src
