"""The fused softmax-cross-entropy as a ``torch.autograd.Function``, for models to use directly.

The forward pass computes the gradient too (one fused kernel on the GPU), and
the backward pass only scales it: the logits are read once per step.
"""

import torch

from . import softmax_xent


class SoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, backend):
        res = softmax_xent(logits.detach(), labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           grad_scale=1.0, backend=backend)
        grad = res.grad if isinstance(res.grad, torch.Tensor) else torch.from_dlpack(res.grad)
        ctx.save_for_backward(grad.to(logits.dtype))
        return logits.new_tensor(res.loss_sum, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


def cross_entropy(logits, labels, reduction="mean", ignore_index=-100, label_smoothing=0.0, backend="auto"):
    """Drop-in for ``F.cross_entropy`` on (n, C) logits, computed by mpirt's kernels.

    ``backend="auto"`` uses the cupy kernels for CUDA tensors when cupy is installed, torch otherwise.
    """
    if backend == "auto":
        from . import available

        backend = "cupy" if logits.is_cuda and available("cupy") else "torch"
    total = SoftmaxCrossEntropy.apply(logits, labels, ignore_index, label_smoothing, backend)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (labels != ignore_index).sum().clamp(min=1)
    raise ValueError("reduction must be 'sum' or 'mean'")
