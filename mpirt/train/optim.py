"""The dense optimizer of ``mpirt train`` and ``mpirt recsys``: torch's SGD or Adam, fused.

torch picks its fused kernels on its own only for CUDA tensors; on the CPU it takes the one-tensor
loop, which runs each formula as its own pass over memory. The fused kernel does the whole update in
one pass. On this project's 2-core machine, one step over 20M float32 parameters (1 thread / 2):
Adam 152 / 92 ms one-tensor, 98 / 64 ms foreach, 19.5 / 14.2 ms fused; SGD with momentum 19.0 /
17.1 ms against 12.1 / 10.2 ms. Fused and one-tensor results differ in the last bits (SGD without
momentum: identical); every rank runs the same kernel, so replicas stay equal.

A checkpoint carries the ``param_groups`` it was written with, ``fused`` among them, and torch's
``load_state_dict`` restores them: a run resumed from a checkpoint of an older mpirt goes on with the
kernel it started with, so it continues bit for bit as it would have.
"""

import torch


def build(kind, params, *, lr, momentum=0.0, weight_decay=0.0):
    """``torch.optim.Adam`` (``kind`` "adam") or ``torch.optim.SGD`` over ``params``, fused where
    torch has a fused kernel for them (floating point on the CPU or a GPU), else torch's default."""
    params = list(params)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)
