"""GPU kernels for classification and the gradient allreduce, with CPU fallbacks.

One API over three backends, each imported only when first used (``import mpirt.kernels`` imports
neither torch nor cupy):

- ``cupy``: the CUDA sources in this directory (``*.cu``), compiled by CuPy's NVRTC once per device;
- ``torch``: vectorised tensor ops, on CPU or CUDA tensors;
- ``numpy``: the float64 reference the others are tested against.

Every function takes ``backend="auto"|"cupy"|"torch"|"numpy"``. ``auto`` uses
``$MPIRT_KERNEL_BACKEND`` when set, else follows the array (cupy array -> cupy, torch tensor ->
torch, numpy array -> numpy; plain Python data -> cupy with a GPU, else torch, else numpy). A
named backend converts its inputs (sharing memory where possible: DLPack, ``torch.as_tensor``);
results are arrays of the backend that ran.

- ``softmax_xent(logits, labels, *, ignore_index=-100, label_smoothing=0.0, grad_scale=None)``
  -> ``XentResult(loss_sum, correct, count, grad)``: fused softmax + cross-entropy, and with
  ``grad_scale`` the gradient w.r.t. the logits times ``grad_scale``, in the logits' dtype;
- ``predict_topk(logits, k=1)`` -> ``(indices (n, k) int64, probabilities (n, k) float32)``;
- ``Bucket(tensors)`` with ``.pack(out=None)`` and ``.unpack(flat, scale=1.0)``: a gradient
  bucket planned once, then one launch per pack/unpack; ``pack(tensors, out=None)`` and
  ``unpack(flat, tensors, scale=1.0)`` do the same without keeping the plan;
- ``compress(x, "bf16"|"fp16", residual=None)`` (error feedback when a residual buffer is given)
  and ``decompress(c, "bf16"|"fp16", out=None)``;
- ``segment_add(dst, src, offset)``: ``dst[offset:offset + len(src)] += src``.

The loss as a ``torch.autograd.Function``: ``mpirt.kernels.torch_loss.cross_entropy``.
"""

from .api import (
    BACKENDS,
    ENV,
    Bucket,
    XentResult,
    available,
    backend,
    compress,
    convert,
    decompress,
    pack,
    pick,
    predict_topk,
    segment_add,
    softmax_xent,
    unpack,
)

__all__ = [
    "BACKENDS", "ENV", "Bucket", "XentResult", "available", "backend", "compress", "convert", "decompress",
    "pack", "pick", "predict_topk", "segment_add", "softmax_xent", "unpack",
]
