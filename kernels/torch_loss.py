"""The fused softmax-cross-entropy as a ``torch.autograd.Function``, for models to use directly.

The forward pass computes the gradient too (one fused kernel on the GPU) and keeps it; the backward
pass only scales it, so the logits are read once per training step.
"""

import torch

from .api import available, softmax_xent


class SoftmaxCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (n, C) logits; ``apply(logits, labels, ignore_index, smoothing, backend)``."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, backend):
        want = ctx.needs_input_grad[0]
        res = softmax_xent(logits.detach(), labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           grad_scale=1.0 if want else None, backend=backend)
        if want:
            grad = res.grad if isinstance(res.grad, torch.Tensor) else torch.from_dlpack(res.grad)
            ctx.save_for_backward(grad)
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return torch.tensor(res.loss_sum, dtype=out_dtype, device=logits.device)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


def cross_entropy(logits, labels, reduction="mean", ignore_index=-100, label_smoothing=0.0, backend="auto"):
    """Drop-in for ``torch.nn.functional.cross_entropy`` on (n, C) logits, by mpirt's fused kernel.

    Args:
        logits: (n, C) float tensor (float32/16, bfloat16; float64 on the torch backend).
        labels: (n,) int64 classes.
        reduction: "sum" or "mean" (over rows not ignored; 0 when every row is ignored, where
            torch returns NaN).
        ignore_index: rows with this label add nothing to the loss or the gradient.
        label_smoothing: eps in [0, 1), as torch's.
        backend: "auto" runs CUDA tensors on the cupy kernels when cupy is installed and the rest
            on torch; or name one.

    Returns:
        A 0-d tensor (float32, float64 for float64 logits) with the gradient attached.

    Raises:
        ValueError: an unknown reduction, or what ``softmax_xent`` raises.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError("reduction must be 'sum' or 'mean'")
    if backend == "auto":
        backend = "cupy" if logits.is_cuda and available("cupy") else "torch"
    total = SoftmaxCrossEntropy.apply(logits, labels, ignore_index, label_smoothing, backend)
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1).to(total.dtype)
