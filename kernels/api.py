"""The public functions: pick a backend, convert the arguments for it, check what all backends share."""

import importlib
import os
from typing import Any, NamedTuple

BACKENDS = ("cupy", "torch", "numpy")
ENV = "MPIRT_KERNEL_BACKEND"


class XentResult(NamedTuple):
    """What ``softmax_xent`` returns (see there)."""

    loss_sum: float
    correct: int
    count: int
    grad: Any


def _module(name):
    """The backend module by name, imported on first use.

    Raises:
        ValueError: ``name`` is not one of ``BACKENDS``.
        ImportError: the backend's library (cupy, torch) is not installed.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend '{name}' (choose from {', '.join(BACKENDS)})")
    return importlib.import_module(f"{__package__}._{name}")


backend = _module  # public name; the functions' ``backend=`` argument shadows it inside them


def available(name):
    """True when backend ``name`` imports here (cupy also needs a CUDA device)."""
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


def _kind(x):
    """"numpy", "torch" or "cupy" for their arrays; anything else (lists, scalars) is ""."""
    top = type(x).__module__.split(".")[0]
    return top if top in BACKENDS else ""


def pick(x, name="auto"):
    """The backend name for input ``x``: ``name`` unless it is "auto" (then ``$MPIRT_KERNEL_BACKEND``
    if set, else the array's own library; for plain Python data cupy with a GPU, else torch, else numpy)."""
    if name == "auto":
        name = os.environ.get(ENV) or "auto"
    if name != "auto":
        _module(name)  # validates the name (and fails early when the library is missing)
        return name
    if _kind(x):
        return _kind(x)
    for candidate in ("cupy", "torch"):
        if available(candidate):
            return candidate
    return "numpy"


def convert(x, name, writable=False):
    """``x`` as an array of backend ``name``, sharing memory where the libraries can.

    Args:
        x: a numpy/cupy array, a torch tensor or array-like data.
        name: the target backend.
        writable: ``x`` is written in place, so a copy would lose the writes.

    Raises:
        TypeError: ``writable`` and ``x`` can only be copied to that backend (e.g. numpy -> cupy).
    """
    kind = _kind(x)
    if kind == name:
        return x
    if name == "numpy":
        import numpy as np

        if kind == "torch":
            import torch

            t = x.detach()
            if writable and (t.device.type != "cpu" or t.dtype == torch.bfloat16):
                raise TypeError("the numpy backend cannot write into this tensor in place")
            if t.dtype == torch.bfloat16:
                t = t.float()  # numpy has no bfloat16: the same values, exactly, in float32
            return t.cpu().numpy()
        if kind == "cupy":
            if writable:
                raise TypeError("the numpy backend cannot write into a cupy array in place")
            return x.get()
        return np.asarray(x)
    if name == "torch":
        import torch

        if kind == "cupy":
            return torch.from_dlpack(x)
        return torch.as_tensor(x)  # shares a numpy array's memory
    cp = _module("cupy").cp
    if kind == "torch" and x.is_cuda:
        return cp.from_dlpack(x.detach())
    if writable:
        raise TypeError("the cupy backend writes in place only into cupy arrays and CUDA tensors")
    return cp.asarray(x.detach().cpu().numpy() if kind == "torch" else x)


def softmax_xent(logits, labels, *, ignore_index=-100, label_smoothing=0.0, grad_scale=None, backend="auto"):
    """Fused softmax + cross-entropy over the rows of ``logits``, with the gradient when asked.

    The loss of a row with label y and smoothing eps is ``(1 - eps) * (lse - z_y) + eps * (lse -
    mean(z))`` where ``lse = log(sum(exp(z)))``, as ``torch.nn.functional.cross_entropy``. A row whose
    target logit is -inf has infinite loss (its gradient stays finite).

    Args:
        logits: (n, C) float32, float16 or bfloat16 (float64 too on torch and numpy), any strides.
        labels: (n,) integer classes.
        ignore_index: rows with this label count for nothing: no loss, no count, zero gradient.
        label_smoothing: eps in [0, 1).
        grad_scale: when given, also return d(loss_sum)/d(logits) times this (e.g. 1 / global batch).
        backend: "auto", "cupy", "torch" or "numpy" (see ``pick``).

    Returns:
        XentResult(loss_sum, correct, count, grad): the summed loss of the kept rows (a float,
        accumulated in float64), how many kept rows have their label as argmax (first maximum on
        ties), how many rows are kept, and the gradient as an (n, C) array of the backend in the
        logits' dtype (None without ``grad_scale``).

    Raises:
        ValueError: logits not 2-D, labels not (n,), eps outside [0, 1), or a label outside [0, C)
            that is not ``ignore_index``.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError("label_smoothing must be in [0, 1)")
    name = pick(logits, backend)
    z = convert(logits, name)
    if len(z.shape) != 2:
        raise ValueError(f"logits must be 2-D (n, classes), got shape {tuple(z.shape)}")
    y = convert(labels, name)
    if tuple(y.shape) != (z.shape[0],):
        raise ValueError(f"labels must have shape ({z.shape[0]},), got {tuple(y.shape)}")
    scale = None if grad_scale is None else float(grad_scale)
    return XentResult(*_module(name).softmax_xent(z, y, int(ignore_index), float(label_smoothing),
                                                                 scale))


def predict_topk(logits, k=1, *, backend="auto"):
    """The k most likely classes of each row with their softmax probabilities, most likely first.

    Args:
        logits: (n, C) scores (float32, float16 or bfloat16), any strides.
        k: 1 <= k <= min(C, 32).
        backend: as for ``softmax_xent``.

    Returns:
        (indices, probs): (n, k) int64 classes (ties: the smaller class first) and (n, k) float32
        probabilities, arrays of the backend.

    Raises:
        ValueError: logits not 2-D or k out of range.
    """
    name = pick(logits, backend)
    z = convert(logits, name)
    if len(z.shape) != 2:
        raise ValueError(f"logits must be 2-D (n, classes), got shape {tuple(z.shape)}")
    if not 1 <= k <= min(z.shape[1], 32):
        raise ValueError(f"k must be in 1..{min(z.shape[1], 32)}")
    return _module(name).predict_topk(z, int(k))


class Bucket:
    """A fixed list of float32 tensors packed into, and unpacked from, one flat buffer.

    The plan is made once (on cupy: a device table of chunks), so each ``pack``/``unpack`` is a single
    launch with next to no host work: build one per gradient bucket and reuse it every step.

    Args:
        tensors: float32 arrays of one backend (C-contiguous on cupy); they are written by ``unpack``.
        backend: as for ``softmax_xent``; "auto" follows ``tensors[0]``.

    Raises:
        ValueError: no tensors.
        TypeError: the tensors cannot be used in place by the backend (wrong dtype or layout).
    """

    def __init__(self, tensors, *, backend="auto"):
        tensors = list(tensors)
        if not tensors:
            raise ValueError("a bucket needs at least one tensor")
        self.backend = pick(tensors[0], backend)
        self._impl = _module(self.backend).Bucket([convert(t, self.backend, True) for t in tensors])

    @property
    def numel(self):
        """The number of floats in all the tensors together."""
        return self._impl.numel

    def pack(self, out=None):
        """Copy the tensors, in order, into ``out`` (1-D float32, at least ``numel`` long; new if None).

        Returns:
            The flat buffer (its first ``numel`` elements hold the tensors).
        """
        return self._impl.pack(None if out is None else convert(out, self.backend, True))

    def unpack(self, flat, scale=1.0):
        """Write ``flat[:numel] * scale`` back into the tensors, in place."""
        self._impl.unpack(convert(flat, self.backend), float(scale))


def pack(tensors, out=None, *, backend="auto"):
    """Concatenate float32 tensors into one flat buffer: ``Bucket(tensors).pack(out)``.

    On cupy the plan is cached by the tensors' addresses and sizes, so repeated calls with the same
    tensors do not rebuild it; a ``Bucket`` kept by the caller avoids even the lookup.
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("pack needs at least one tensor")
    name = pick(tensors[0], backend)
    mod = _module(name)
    return mod.pack([convert(t, name) for t in tensors], None if out is None else convert(out, name, True))


def unpack(flat, tensors, scale=1.0, *, backend="auto"):
    """Scatter ``flat`` back into ``tensors`` in place, multiplied by ``scale`` (one launch on cupy)."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("unpack needs at least one tensor")
    name = pick(tensors[0], backend)
    mod = _module(name)
    mod.unpack(convert(flat, name), [convert(t, name, True) for t in tensors], float(scale))


def compress(x, dtype="bf16", residual=None, *, backend="auto"):
    """Round fp32 values to bf16 or fp16 for the allreduce, with optional error feedback.

    Args:
        x: float32 values.
        dtype: "bf16" or "fp16".
        residual: float32 buffer shaped like ``x``, updated in place: ``v = x + residual`` is
            rounded and ``residual = v - decompress(rounded)`` is what the next call adds back.
        backend: as for ``softmax_xent``.

    Returns:
        The rounded values: float16 for "fp16"; for "bf16" the bit patterns as uint16 (numpy, cupy)
        or a torch.bfloat16 tensor (torch).

    Raises:
        ValueError: unknown dtype.
    """
    if dtype not in ("bf16", "fp16"):
        raise ValueError("dtype must be 'bf16' or 'fp16'")
    name = pick(x, backend)
    res = None if residual is None else convert(residual, name, True)
    return _module(name).compress(convert(x, name), dtype, res)


def decompress(c, dtype="bf16", out=None, *, backend="auto"):
    """The float32 values of ``compress``'s output ``c`` (written into ``out`` when given).

    Raises:
        ValueError: unknown dtype.
    """
    if dtype not in ("bf16", "fp16"):
        raise ValueError("dtype must be 'bf16' or 'fp16'")
    name = pick(c, backend)
    o = None if out is None else convert(out, name, True)
    return _module(name).decompress(convert(c, name), dtype, o)


def segment_add(dst, src, offset=0, *, backend="auto"):
    """``dst[offset:offset + len(src)] += src`` in place (a received allreduce segment), float32.

    Raises:
        ValueError: the segment does not fit in ``dst``.
    """
    name = pick(dst, backend)
    d = convert(dst, name, True)
    s = convert(src, name)
    n, total = _numel(s), _numel(d)
    if offset < 0 or offset + n > total:
        raise ValueError(f"segment [{offset}, {offset + n}) does not fit in a buffer of {total}")
    _module(name).segment_add(d, s, int(offset))


def _numel(x):
    return x.numel() if _kind(x) == "torch" else int(x.size)
