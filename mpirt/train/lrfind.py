"""``mpirt lr-find``: a short training run whose learning rate grows exponentially from ``--min-lr``
to ``--max-lr``; the loss of each step against its learning rate says where training is fastest.

The run is an ordinary elastic run (kills, joins and leaves recover as in ``mpirt train``); the
curve is kept by every member (each step's loss is the same sum everywhere), so whoever coordinates
at the end writes it. It stops early, on every member alike, once the loss has diverged (above four
times its lowest). The suggestion is the usual rule: the learning rate of the lowest smoothed loss,
divided by ten (past it the loss rises; a tenth of it still descends steeply).
"""

import json
import math
import os

from mpirt.atomic import atomic_path
from mpirt.secure.policy import makedirs as private_makedirs

DIVERGED = 4.0  # the sweep stops once the loss exceeds this multiple of its lowest
SMOOTH = 0.9  # the exponential moving average the suggestion reads (debiased)


def sweep_lr(step, lo, hi, steps):
    """The learning rate of ``step`` of a sweep of ``steps`` from ``lo`` to ``hi`` (geometric)."""
    return lo * (hi / lo) ** (step / max(steps - 1, 1))


def diverged(curve):
    """True once the last loss is non-finite or above DIVERGED x the lowest so far (after 10 steps)."""
    losses = [loss for _, _, loss in curve]
    if not losses:
        return False
    if not math.isfinite(losses[-1]):
        return True
    return len(losses) > 10 and losses[-1] > DIVERGED * min(losses)


def smoothed(curve):
    out, avg = [], 0.0
    for i, (_, _, loss) in enumerate(curve, start=1):
        avg = SMOOTH * avg + (1 - SMOOTH) * (loss if math.isfinite(loss) else 1e30)
        out.append(avg / (1 - SMOOTH ** i))
    return out


def suggest(curve):
    """(suggested lr, lr of the lowest smoothed loss)."""
    s = smoothed(curve)
    best = min(range(len(s)), key=s.__getitem__)
    return curve[best][1] / 10.0, curve[best][1]


def write(out_dir, curve, *, lo, hi):
    """``lr_find.json`` and ``lr_find.png`` in ``out_dir``; return the summary."""
    private_makedirs(out_dir)
    lr, at_min = suggest(curve)
    summary = {"suggested_lr": lr, "lr_at_min_loss": at_min, "min_lr": lo, "max_lr": hi, "steps": len(curve),
               "stopped_on_divergence": diverged(curve),
               "curve": [{"step": s, "lr": r, "loss": loss} for s, r, loss in curve]}
    with atomic_path(os.path.join(out_dir, "lr_find.json")) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([r for _, r, _ in curve], [loss for _, _, loss in curve], color="0.7", label="loss")
    ax.plot([r for _, r, _ in curve], smoothed(curve), label="smoothed")
    ax.axvline(lr, color="C3", linestyle="--", label=f"suggested {lr:.3g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="mpirt lr-find")
    finite = [loss for _, _, loss in curve if math.isfinite(loss)]
    if finite:
        top = max(finite[0], min(max(finite), DIVERGED * min(finite)))  # the start in view, the blow-up cut
        ax.set_ylim(min(finite) * 0.9, top * 1.05)
    ax.legend()
    with atomic_path(os.path.join(out_dir, "lr_find.png")) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return summary
