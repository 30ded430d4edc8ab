"""Evaluation on every rank: a split cut into fixed batches, the batches sliced over the view.

The numbers are the same bits on any number of ranks, as on one:

- the batches are fixed (:data:`EVAL_ROWS` rows each) whatever the view, and each batch's loss sum
  and correct count are computed by one rank with one intra-op thread (how a matmul splits over
  threads changes the bits of its sums, and the threads a rank gets depend on its binding);
- the per-batch figures and predictions are combined by an Allreduce of arrays in which every other
  rank's entries are zero, and ``x + 0 == x`` exactly, so the reduction order cannot matter;
- the totals are then summed over the batches in batch order, the same on every rank.

It is a collective: every member calls it at the same point. A failure surfaces as
:class:`mpirt.errors.ProcessFailure`; the caller agrees on the outcome and redoes it after recovery,
as for a step.
"""

import numpy as np
import torch

from mpirt.kernels.torch_loss import cross_entropy
from mpirt.train import models

EVAL_ROWS = 1024


@torch.no_grad()
def evaluate(model, spec_name, source, ec, device="cpu", with_predictions=False):
    """Loss and accuracy of ``model`` on the rows of ``source`` (:class:`mpirt.train.source.RowSource`).

    Returns:
        None for an empty split, else ``{"loss", "accuracy"}`` (and ``"y_pred"``, int64 per row,
        when ``with_predictions``), the same on every rank.
    """
    n = source.n_rows
    if n == 0:
        return None
    n_batches = -(-n // EVAL_ROWS)
    size, rank = (ec.size, ec.rank) if ec is not None else (1, 0)
    sums = np.zeros((n_batches, 2))  # loss sum, correct count
    preds = np.zeros(n, np.int64) if with_predictions else None
    model.eval()
    threads = torch.get_num_threads()
    if str(device).split(":")[0] == "cpu":
        torch.set_num_threads(1)
    try:
        for k in range(n_batches * rank // size, n_batches * (rank + 1) // size):
            a, b = k * EVAL_ROWS, min(n, (k + 1) * EVAL_ROWS)
            batch = source.get(np.arange(a, b))
            logits = model(*models.inputs(spec_name, batch, device))
            y = torch.from_numpy(batch.y).to(device)
            p = logits.argmax(1)
            sums[k] = float(cross_entropy(logits, y, reduction="sum")), int((p == y).sum())
            if preds is not None:
                preds[a:b] = p.cpu().numpy()
    finally:
        torch.set_num_threads(threads)
    if size > 1:
        MPI = ec.MPI
        with ec.guard():
            ec.comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
            if preds is not None:
                ec.comm.Allreduce(MPI.IN_PLACE, preds, op=MPI.SUM)
    out = {"loss": float(sums[:, 0].sum()) / n, "accuracy": float(sums[:, 1].sum()) / n}
    if preds is not None:
        out["y_pred"] = preds
    return out
