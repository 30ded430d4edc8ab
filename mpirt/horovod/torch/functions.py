"""Horovod's helpers for models, optimizers and Python objects."""

import torch

from mpirt.horovod.common import global_process_set
from mpirt.horovod.torch.mpi_ops import _comm, _run, broadcast_


def broadcast_parameters(params, root_rank, prefix=None):
    """``root_rank``'s values into ``params`` (a ``state_dict``, or ``named_parameters()``) on every rank.

    A dict is taken in sorted key order, a list in its order (the same on every rank)."""
    if isinstance(params, dict):
        params = sorted(params.items())
    elif isinstance(params, list):
        params = [p if isinstance(p, tuple) else (None, p) for p in params]
    else:
        params = list(params)
    for _, p in params:
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"broadcast_parameters: a {type(p).__name__} is not a tensor")
        with torch.no_grad():
            broadcast_(p.data if isinstance(p, torch.nn.Parameter) else p, root_rank)


def broadcast_optimizer_state(optimizer, root_rank, model=None):
    """``root_rank``'s optimizer state (hyper-parameters and buffers) on every rank."""
    # With it, the count of committed steps (fault injection's step=): a joiner counts on from there.
    state, committed = broadcast_object((optimizer.state_dict(), getattr(optimizer, "_mpirt_committed", None)),
                                        root_rank)
    optimizer.load_state_dict(state)
    if committed is not None:
        optimizer._mpirt_committed = committed


def broadcast_object(obj, root_rank=0, name=None, process_set=global_process_set):
    """``root_rank``'s Python object (pickled) on every rank of ``process_set``."""
    comm = _comm(process_set)
    return _run(lambda: comm.bcast(obj, root=root_rank))


def allgather_object(obj, name=None, process_set=global_process_set):
    """Every rank's Python object, in rank order."""
    comm = _comm(process_set)
    return _run(lambda: comm.allgather(obj))
