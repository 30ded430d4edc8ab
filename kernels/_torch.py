"""The torch backend: vectorised tensor ops (no loops over rows), on CPU or CUDA tensors alike."""

import torch

name = "torch"
# One kernel for all tensors where torch has it (a private but long-standing op); else a loop.
_foreach_copy = getattr(torch, "_foreach_copy_", None)


def owns(x):
    return isinstance(x, torch.Tensor)


@torch.no_grad()
def softmax_xent(logits, labels, ignore_index, smoothing, grad_scale):
    # fp16/bf16 accumulate in fp32; fp64 stays fp64 (gradcheck, references).
    z = logits if logits.dtype == torch.float64 else logits.float()
    y = labels.to(device=z.device, dtype=torch.int64)
    n, C = z.shape
    keep = y != ignore_index
    bad = keep & ((y < 0) | (y >= C))
    if n == 0 or C == 0:
        if bool(bad.any()):
            raise ValueError("labels outside [0, classes) that are not ignore_index")
        grad = torch.zeros_like(logits) if grad_scale is not None else None
        return 0.0, 0, 0, grad
    yk = torch.where(keep & ~bad, y, 0)[:, None]
    # log_softmax is one fused, numerically stable kernel; its exp is the softmax for the gradient.
    logp = torch.log_softmax(z, dim=1)
    loss = -logp.gather(1, yk)[:, 0]
    if smoothing:
        loss = (1 - smoothing) * loss - smoothing * logp.mean(dim=1)
    correct = (z.argmax(dim=1) == y) & keep
    totals = torch.stack([
        torch.where(keep, loss, 0).sum(dtype=torch.float64), correct.sum().double(), keep.sum().double(),
        bad.sum().double(),
    ]).tolist()  # one device-to-host copy for all four numbers
    if totals[3]:
        raise ValueError(f"{int(totals[3])} labels outside [0, {C}) that are not ignore_index")
    grad = None
    if grad_scale is not None:
        g = logp.exp_()
        if smoothing:
            g.sub_(smoothing / C)
        g.scatter_add_(1, yk, torch.full((n, 1), smoothing - 1.0, device=z.device, dtype=z.dtype))
        g.masked_fill_(~keep[:, None], 0.0).mul_(grad_scale)
        grad = g.to(logits.dtype)
    return totals[0], int(totals[1]), int(totals[2]), grad


def predict_topk(logits, k):
    p = torch.softmax(logits.float(), dim=1)
    probs, idx = torch.topk(p, k, dim=1)
    return idx.to(torch.int64), probs


def _flat(buf, numel):
    if buf.dtype != torch.float32 or buf.dim() != 1 or buf.numel() < numel or not buf.is_contiguous():
        raise ValueError(f"the flat buffer must be a contiguous 1-D float32 tensor of at least {numel} elements")
    return buf[:numel]


class Bucket:
    """Tensors and their sizes; torch.cat packs, one foreach copy (or a loop) unpacks."""

    def __init__(self, tensors):
        for t in tensors:
            if t.dtype != torch.float32:
                raise TypeError("pack/unpack take float32 tensors")
        self.tensors = list(tensors)
        self.sizes = [t.numel() for t in self.tensors]
        self.numel = sum(self.sizes)

    def pack(self, out=None):
        flat = [t.reshape(-1) for t in self.tensors]
        if out is None:
            return torch.cat(flat)
        torch.cat(flat, out=_flat(out, self.numel))
        return out

    def unpack(self, flat, scale=1.0):
        parts = [p.view(t.shape) for p, t in zip(torch.split(_flat(flat, self.numel), self.sizes), self.tensors)]
        if scale == 1.0 and _foreach_copy is not None:
            _foreach_copy(self.tensors, parts)
            return
        for t, p in zip(self.tensors, parts):
            torch.mul(p, scale, out=t)


def pack(tensors, out=None):
    return Bucket(tensors).pack(out)


def unpack(flat, tensors, scale):
    Bucket(tensors).unpack(flat, scale)


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
    out.copy_(c.view(out.shape))
    return out


def segment_add(dst, src, offset):
    if not dst.is_contiguous():
        raise TypeError("segment_add needs a contiguous destination")
    dst.view(-1)[offset:offset + src.numel()] += src.reshape(-1).to(dst.dtype)
