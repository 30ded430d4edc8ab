"""Learning-rate schedules with warmup, and clipping by global norm: functions of the committed
step and of the reduced gradient only.

The learning rate of step ``s`` depends on ``s``, the run's total steps and the flags, never on
how many ranks there are or what happened before (kills, joins, resumes): every member computes
the same number, and a resumed run continues the same curve. Clipping scales the *reduced*
gradient, which every member holds bit for bit, so every member clips alike.

Schedules (``--lr-schedule``), after ``--warmup`` steps that rise linearly to ``--lr``:

- ``constant``: ``--lr`` throughout;
- ``linear``: down to zero at the last step (what fastText does);
- ``cosine``: half a cosine, down to zero at the last step;
- ``step``: ``--lr`` x 0.1 from half of the steps after warmup, x 0.01 from three quarters.
"""

import math

import numpy as np

SCHEDULES = ("constant", "linear", "cosine", "step")


def warmup_steps(warmup, total_steps):
    """``--warmup``: a number of steps (>= 1), or a fraction of the run (< 1)."""
    if warmup <= 0:
        return 0
    if warmup < 1:
        return int(round(warmup * total_steps))
    return int(warmup)


def lr_at(step, *, base, schedule, warmup, total_steps):
    """The learning rate of (0-based) ``step`` of a run of ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}")
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    span = max(total_steps - warmup, 1)
    t = min(max(step - warmup, 0) / span, 1.0)  # 0 at the end of warmup, 1 at the end of the run
    if schedule == "constant":
        return base
    if schedule == "linear":
        return base * (1.0 - t)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * t))
    return base * (0.01 if t >= 0.75 else 0.1 if t >= 0.5 else 1.0)


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


def clip_global_norm(params, sparse_rows, max_norm):
    """Scale the gradients of ``params`` and the rows of ``sparse_rows`` ([(ids, float32 rows)])
    so that their global L2 norm is at most ``max_norm``; return the norm before clipping.

    The norm is summed in float64, tensor by tensor in a fixed order: the same bits on every
    member that holds the same reduced gradient.
    """
    import torch

    sq = 0.0
    for p in params:
        if p.grad is not None:
            sq += float(torch.sum(p.grad.detach().to(torch.float64) ** 2))
    for _, rows in sparse_rows:
        sq += float(np.sum(rows.astype(np.float64) ** 2))
    norm = math.sqrt(sq)
    if max_norm and norm > max_norm:
        factor = max_norm / (norm + 1e-6)
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(factor)
        for _, rows in sparse_rows:
            rows *= np.float32(factor)
    return norm
