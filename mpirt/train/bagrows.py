"""An EmbeddingBag mean whose sparse gradient comes out with one summed row per distinct id.

torch's sparse backward of ``embedding_bag`` gives a row per token: ``grad[bag] * (1 / len(bag))``,
65k rows of 64 floats for a batch of 64 man pages over 7k distinct ids, which :func:`mpirt.train.
sparse.local_rows` then sums by id. Here backward sums them straight from the bags' gradients
(:func:`mpirt.train.sparse.sum_by_id`: each token's row is looked up in the 64-row table of scaled
bag gradients, in token order), so the per-token rows are never made. The result is bitwise what
torch's gradient merged by ``local_rows`` is (the same products, added in the same order), as a
coalesced sparse tensor, which ``local_rows`` takes as it is.

Used on CPU, for the mean mode without per-sample weights or padding (fastText's bag); elsewhere the
module's own forward runs. The forward is torch's.
"""

import torch
import torch.nn.functional as F


def bag_mean(module, ids, offsets):
    """``module(ids, offsets)`` for an ``nn.EmbeddingBag``; with summed sparse rows where it applies."""
    w = module.weight
    plain = (module.mode != "mean" or module.padding_idx is not None or module.max_norm is not None
             or module.include_last_offset)
    if plain or not module.sparse or w.device.type != "cpu" or not (torch.is_grad_enabled() and w.requires_grad):
        return module(ids, offsets)
    return _BagMean.apply(w, ids, offsets)


class _BagMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, ids, offsets):
        ctx.save_for_backward(ids, offsets)
        ctx.rows = weight.shape[0]
        return F.embedding_bag(ids, weight, offsets, mode="mean")

    @staticmethod
    def backward(ctx, grad):
        from mpirt.train.sparse import sum_by_id

        ids, offsets = ctx.saved_tensors
        lens = torch.diff(offsets, append=offsets.new_tensor([len(ids)]))
        # As torch's backward scales a token's row: times 1 / len in the gradient's dtype. An empty
        # bag has no token, so its (infinite) scale is never used.
        scaled = grad.contiguous() * (1 / lens.to(grad.dtype)).unsqueeze(1)
        bag_of = torch.repeat_interleave(torch.arange(len(offsets)), lens)
        uniq, rows = sum_by_id(ids, scaled, bag_of)
        shape = (ctx.rows, grad.shape[1])
        return torch.sparse_coo_tensor(uniq.to(torch.int64).unsqueeze(0), rows, shape, is_coalesced=True,
                                       check_invariants=False), None, None
