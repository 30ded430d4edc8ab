"""``hvd.elastic``: Horovod's elastic training, in place under ULFM.

``hvd.elastic.run(train)`` calls ``train(state)``; when a member fails, every survivor gets
:class:`HorovodInternalError`, restores the state it last committed (``state.commit()``), the
communicator is rebuilt without the failed members (Revoke, Shrink: no process restarts and no
driver), the state is broadcast from the new rank 0, reset callbacks fire, and ``train`` is called
again. Joiners (``MPIRT_FAULTS=join:count=C:step=S``) are spawned after a committed step and
announced by the next ``state.commit()`` or ``state.check_host_updates()``, which raises
:class:`HostsUpdatedInterrupt` on every member; they then start ``train`` with the state.
"""

import copy
import functools
import math
import random

import torch

from mpirt.errors import ProcessFailure
from mpirt.horovod.common import HorovodInternalError, HostsUpdatedInterrupt, _rt, after_view_change, require_group
from mpirt.horovod.torch.functions import broadcast_object, broadcast_optimizer_state, broadcast_parameters
from mpirt.horovod.torch.mpi_ops import rank, size

__all__ = ["run", "State", "ObjectState", "TorchState", "ElasticSampler"]


class State:
    """State kept in host memory across members (Horovod's ``hvd.elastic.State``)."""

    def __init__(self, bcast_object, get_rank):
        self._bcast_object = bcast_object
        self._rank = get_rank
        self._reset_callbacks = []

    def register_reset_callbacks(self, callbacks):
        """Functions called after each reset (members failed, left or joined), e.g. to rescale the lr."""
        self._reset_callbacks.extend(callbacks)

    def on_reset(self):
        self.reset()
        for callback in self._reset_callbacks:
            callback()

    def on_hosts_updated(self, timestamp, update_res):
        """Horovod's driver notification; joins come from the step protocol here."""

    def commit(self):
        """Save the state in host memory, then check for joiners (raises HostsUpdatedInterrupt)."""
        self.save()
        self.check_host_updates()

    def check_host_updates(self):
        """Raise :class:`HostsUpdatedInterrupt` on every member when joiners were announced by a
        committed step (the same answer everywhere: it came in the step's sums)."""
        if _rt.pending_join is not None:
            raise HostsUpdatedInterrupt(skip_sync=False)

    def save(self):
        raise NotImplementedError()

    def restore(self):
        raise NotImplementedError()

    def sync(self):
        raise NotImplementedError()

    def reset(self):
        pass


class ObjectState(State):
    """Plain Python attributes, given as keyword arguments."""

    def __init__(self, bcast_object, get_rank, **kwargs):
        self._bcast_object = bcast_object
        self._saved_state = kwargs
        self._set_attrs()
        super().__init__(bcast_object=bcast_object, get_rank=get_rank)

    def save(self):
        self._saved_state = {attr: getattr(self, attr) for attr in self._saved_state}

    def restore(self):
        self._set_attrs()

    def sync(self):
        if self._saved_state:
            self._saved_state = self._bcast_object(self._saved_state)
            self._set_attrs()

    def _set_attrs(self):
        for attr, value in self._saved_state.items():
            setattr(self, attr, value)


class ElasticSampler(torch.utils.data.Sampler):
    """Shards a data set over the ranks and re-shards what is left of the epoch after a reset
    (Horovod's): call ``record_batch`` after each batch and ``set_epoch`` at the end of an epoch."""

    def __init__(self, dataset, shuffle=True, seed=0):
        self.dataset, self.shuffle, self.seed = dataset, shuffle, seed
        self.epoch = 0
        self.processed_num = 0
        self.num_replicas = self.rank = self.num_samples = self.total_size = 0
        self.remaining_indices = []
        self.reset()

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.processed_num = 0
        self.reset()

    def record_batch(self, batch_idx, batch_size):
        self.processed_num += batch_size * self.num_replicas

    def load_state_dict(self, state_dict):
        self.epoch = state_dict["epoch"]
        self.processed_num = state_dict["processed_num"]
        self.reset()

    def state_dict(self):
        return dict(epoch=self.epoch, processed_num=self.processed_num)

    def reset(self):
        self.num_replicas, self.rank = size(), rank()
        indices = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(indices)
        self.remaining_indices = indices[self.processed_num:]
        self.num_samples = int(math.ceil(len(self.remaining_indices) / self.num_replicas))
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        indices = self.remaining_indices[:]
        indices += indices[:(self.total_size - len(indices))]  # evenly divisible
        self.indices = indices[self.rank:self.total_size:self.num_replicas]
        return iter(self.indices)

    def __len__(self):
        return self.num_samples


class _Handler:
    """Keeps an object with ``state_dict``/``load_state_dict`` across resets; ``sync(value)`` is how
    rank 0's copy reaches every rank (Horovod's model, optimizer and sampler handlers)."""

    def __init__(self, value, sync):
        self.value, self._sync = value, sync
        self.save()

    def set_value(self, value):
        self.value = value
        self.save()

    def save(self):
        self.saved = copy.deepcopy(self.value.state_dict())

    def restore(self):
        self.value.load_state_dict(self.saved)

    def sync(self):
        self._sync(self.value)


_HANDLERS = [
    (torch.nn.Module, lambda model: broadcast_parameters(model.state_dict(), root_rank=0)),
    (torch.optim.Optimizer, lambda opt: broadcast_optimizer_state(opt, root_rank=0)),
    (ElasticSampler, lambda sampler: sampler.load_state_dict(broadcast_object(sampler.state_dict()))),
]


class TorchState(ObjectState):
    """A model, an optimizer (and samplers, and other attributes) kept across resets."""

    def __init__(self, model=None, optimizer=None, **kwargs):
        kwargs.update(dict(model=model, optimizer=optimizer))
        handlers, rest = {}, {}
        for k, v in kwargs.items():
            sync = next((h for t, h in _HANDLERS if isinstance(v, t)), None)
            if sync:
                handlers[k] = _Handler(v, sync)
            else:
                rest[k] = v
        self._handlers = handlers
        for name, handler in handlers.items():
            setattr(self, name, handler.value)
        super().__init__(bcast_object=broadcast_object, get_rank=rank, **rest)

    def save(self):
        for handler in self._handlers.values():
            handler.save()
        super().save()

    def restore(self):
        for handler in self._handlers.values():
            handler.restore()
        super().restore()

    def sync(self):
        for handler in self._handlers.values():
            handler.sync()
        super().sync()

    def __setattr__(self, name, value):
        if hasattr(self, name) and name in getattr(self, "_handlers", {}):
            self._handlers[name].set_value(value)
        super().__setattr__(name, value)


def _recover():
    """After a failure: the next view without the failed members, on every survivor."""
    _rt.pending_join = None  # announced by a step the survivors now redo
    require_group().recover()
    after_view_change()


def _merge():
    committer, step, totals = _rt.pending_join
    _rt.pending_join = None
    committer.merge_joiners(step, totals)
    after_view_change()


def run(func):
    """Decorator: run ``func(state, ...)`` to its end through failures and joins (Horovod's ``hvd.elastic.run``)."""
    @functools.wraps(func)
    def wrapper(state, *args, **kwargs):
        group = require_group()
        if group.joined and not _rt.joiner_synced:
            group.sync_view(joiner=True)  # a spawned joiner: into the view, then the state below
            _rt.joiner_synced = True
        skip_sync = False
        while True:
            try:
                if not skip_sync:
                    state.sync()
                return func(state, *args, **kwargs)
            except (HorovodInternalError, ProcessFailure):
                state.restore()
                skip_sync = False
                _recover()
            except HostsUpdatedInterrupt as e:
                skip_sync = e.skip_sync
                _merge()
            state.on_reset()
    return wrapper
