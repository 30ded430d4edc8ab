"""GPU kernels for classification and the gradient allreduce, with CPU fallbacks.

One API over three backends, chosen by name or ``"auto"``, imported only when used:

- ``cupy``: the CUDA sources in this directory (``*.cu``), compiled by CuPy's NVRTC once per device;
- ``torch``: tensor ops, on CPU or CUDA tensors;
- ``numpy``: the float64 reference the others are tested against.

``auto`` follows the array: a cupy array goes to cupy, a torch tensor to torch (a CUDA tensor
to cupy through DLPack when cupy is installed), a numpy array to numpy. ``MPIRT_KERNEL_BACKEND``
overrides the choice. Functions:

- ``softmax_xent(logits, labels, ignore_index=-100, label_smoothing=0.0, grad_scale=None)``
  -> ``XentResult(loss_sum, correct, count, grad)``: fused softmax + cross-entropy, forward
  and (when ``grad_scale`` is given) the gradient w.r.t. the logits times ``grad_scale``;
- ``predict_topk(logits, k=1)`` -> ``(indices (n, k) int64, probabilities (n, k) float32)``;
- ``pack(tensors, out=None)`` -> one flat float32 buffer; ``unpack(flat, tensors, scale=1.0)``;
- ``compress(x, "bf16"|"fp16", residual=None)`` (error feedback when a residual buffer is
  given) and ``decompress(c, "bf16"|"fp16", out=None)``;
- ``segment_add(dst, src, offset)``: ``dst[offset:offset+len(src)] += src``.

The loss is also a ``torch.autograd.Function``: ``mpirt.kernels.torch_loss.cross_entropy``.
"""

import importlib
import os
from typing import Any, NamedTuple

BACKENDS = ("cupy", "torch", "numpy")
_ENV = "MPIRT_KERNEL_BACKEND"


class XentResult(NamedTuple):
    loss_sum: float
    correct: int
    count: int
    grad: Any


def backend(name):
    """The backend module by name (imports it)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend '{name}' (choose from {', '.join(BACKENDS)})")
    return importlib.import_module(f"{__name__}._{name}")


def available(name):
    """True when the backend imports here (cupy also needs a GPU)."""
    try:
        mod = backend(name)
    except ImportError:
        return False
    if name == "cupy":
        try:
            return mod.cp.cuda.runtime.getDeviceCount() > 0
        except Exception:  # noqa: BLE001 - no driver or no device: not available
            return False
    return True


def _type_module(x):
    return type(x).__module__.split(".")[0]


def resolve(x, name="auto"):
    """(backend module, array converted for it) for input ``x``."""
    name = os.environ.get(_ENV, name) if name == "auto" else name
    kind = _type_module(x)
    if name == "auto":
        if kind == "cupy":
            name = "cupy"
        elif kind == "torch":
            name = "torch"
        else:
            name = "numpy"
    mod = backend(name)
    if name == "cupy" and kind == "torch":
        x = mod.cp.from_dlpack(x.detach())
    elif name == "torch" and kind != "torch":
        import torch

        x = torch.as_tensor(x) if kind != "cupy" else torch.from_dlpack(x)
    elif name == "numpy" and kind != "numpy":
        x = x.detach().cpu().numpy() if kind == "torch" else x.get()
    return mod, x


def _convert_like(mod, x, ref):
    """``x`` as the same kind of array as ``ref`` (labels follow the logits' backend)."""
    if mod.name == "cupy":
        if _type_module(x) == "torch":
            return mod.cp.from_dlpack(x.detach())
        return mod.cp.asarray(x)
    if mod.name == "torch":
        import torch

        if _type_module(x) == "cupy":
            return torch.from_dlpack(x)
        return torch.as_tensor(x, device=ref.device)
    if _type_module(x) == "torch":
        return x.detach().cpu().numpy()
    return x.get() if _type_module(x) == "cupy" else x


def softmax_xent(logits, labels, *, ignore_index=-100, label_smoothing=0.0, grad_scale=None, backend="auto"):
    """Fused softmax + cross-entropy over rows of ``logits`` (n, C).

    Args:
        logits: float32/16 or bfloat16 scores, any strides.
        labels: (n,) integer classes; rows equal to ``ignore_index`` count for nothing.
        label_smoothing: epsilon of the smoothed target (1 - eps on the label, eps / C everywhere).
        grad_scale: when given, also return d(loss_sum)/d(logits) times this (e.g. 1 / global samples).
        backend: "auto", "cupy", "torch" or "numpy".

    Returns:
        XentResult(loss_sum, correct, count, grad): summed loss over kept rows, rows whose argmax
        is the label, kept rows, and the gradient (input dtype) or None.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError("label_smoothing must be in [0, 1)")
    mod, z = resolve(logits, backend)
    if len(z.shape) != 2:
        raise ValueError(f"logits must be 2-D (n, classes), got shape {tuple(z.shape)}")
    y = _convert_like(mod, labels, z)
    return XentResult(*mod.softmax_xent(z, y, ignore_index, label_smoothing, grad_scale))


def predict_topk(logits, k=1, *, backend="auto"):
    """Top-k classes of each row and their softmax probabilities (sorted, most likely first)."""
    mod, z = resolve(logits, backend)
    if not 1 <= k <= z.shape[1]:
        raise ValueError(f"k must be in 1..{z.shape[1]}")
    return mod.predict_topk(z, k)


def pack(tensors, out=None, *, backend="auto"):
    """Concatenate float32 tensors into one flat buffer (one launch on cupy)."""
    if not tensors:
        raise ValueError("pack needs at least one tensor")
    mod, _ = resolve(tensors[0], backend)
    return mod.pack(list(tensors), out)


def unpack(flat, tensors, scale=1.0, *, backend="auto"):
    """Scatter ``flat`` back into ``tensors`` (in place), multiplied by ``scale``."""
    mod, _ = resolve(flat, backend)
    mod.unpack(flat, list(tensors), scale)


def compress(x, dtype="bf16", residual=None, *, backend="auto"):
    """fp32 -> bf16 or fp16; with ``residual`` (fp32, same shape) the rounding error is fed back."""
    if dtype not in ("bf16", "fp16"):
        raise ValueError("dtype must be 'bf16' or 'fp16'")
    mod, x = resolve(x, backend)
    return mod.compress(x, dtype, residual)


def decompress(c, dtype="bf16", out=None, *, backend="auto"):
    mod, c = resolve(c, backend)
    return mod.decompress(c, dtype, out)


def segment_add(dst, src, offset=0, *, backend="auto"):
    """``dst[offset:offset+len(src)] += src`` (a received allreduce segment)."""
    mod, _ = resolve(dst, backend)
    mod.segment_add(dst, src, offset)
