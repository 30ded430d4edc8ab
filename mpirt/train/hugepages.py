"""Large CPU tables in transparent huge pages, for row-sparse updates.

A sparse optimizer step reads and writes a few thousand scattered rows of the embedding table and of
each moment table (fastText: 5k rows of three 268 MB tables a step). With 4 KiB pages nearly every
row is a TLB miss; in 2 MiB pages a lazy Adam step on 5k rows of a 1M x 64 table was 1.2x to 1.9x
faster, and fastText's epochs 8% (1 rank) and 17% (2 ranks) faster after the first, which pays for
faulting the tables in (slowly on a VM that backs fresh memory lazily: ``python -m bench sparse``'s
apply table; bench/results/sparse-tables-2core.md). Linux gives huge pages to
memory that asks for them (``madvise(MADV_HUGEPAGE)``) when transparent huge pages are in "madvise"
mode, the default of most distributions. Only these long-lived tables ask: advising every allocation
(torch's ``THP_MEM_ALLOC_ENABLE``) made the per-step gradient buffers slower to fault in.

Where the system has no transparent huge pages (another OS, "never"), the tables are ordinary memory.
"""

import mmap
import weakref

import numpy as np

MIN_BYTES = 32 << 20  # smaller tables fit the TLB's reach well enough
_LIVE = set()  # the storage addresses of the live tables from zeros_like (p.data is a new object each time)


def zeros_like(t):
    """A zeroed tensor like ``t``, in huge pages where the system gives them (see the module) when
    ``t`` is a large CPU tensor; ``torch.zeros_like(t)`` otherwise.

    The memory is an anonymous mapping: the kernel zeroes each page on first touch, so no pass over
    the table is made here.
    """
    import torch

    if not _placeable(t):
        return torch.zeros_like(t)
    nbytes = t.numel() * t.element_size()
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # transparent huge pages compiled out or disabled: ordinary pages
        pass
    # The tensor keeps the array alive and the array the mapping: it is unmapped with the tensor.
    dtype = torch.empty(0, dtype=t.dtype).numpy().dtype
    array = np.frombuffer(region, dtype=dtype).reshape(tuple(t.shape))
    out = torch.from_numpy(array)
    addr = out.untyped_storage().data_ptr()
    _LIVE.add(addr)
    weakref.finalize(array, _LIVE.discard, addr)  # the address may be reused once the table is gone
    return out


def _placeable(t):
    """Whether :func:`zeros_like` puts a tensor like ``t`` in an advised mapping: a large CPU float
    tensor on a system with MADV_HUGEPAGE."""
    import torch

    return (t.device.type == "cpu" and t.numel() * t.element_size() >= MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE")
            and t.dtype in (torch.float32, torch.float64, torch.float16))


def is_huge(t):
    """Whether ``t`` needs no move: it came from :func:`zeros_like`, or zeros_like would not place it
    (so :func:`rehome`, called every step, never copies a table it cannot move)."""
    return not _placeable(t) or t.untyped_storage().data_ptr() in _LIVE


def rehome(t):
    """``t``'s values in a tensor from :func:`zeros_like` (``t`` itself when it needs no move)."""
    if is_huge(t):
        return t
    out = zeros_like(t)
    out.copy_(t.detach())
    return out
