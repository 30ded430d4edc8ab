"""The shard ledger: pending, leased, done; and the on-disk commits behind "done".

A shard is done when its result file exists under its final name: results are
written to a temporary name and committed with ``os.link``, which fails if the
name exists, so a second commit of a shard is detected, never silently kept.
The coordinator's in-memory ledger is re-derivable from that directory, which is
how a new coordinator, or ``--resume``, picks up without redoing anything.

Leases go out in batches (:func:`batch_size`) and a worker commits a batch's
results together (:meth:`CommitStore.make_durable`, then one link each): per-unit
leases and fsyncs were most of what the farm cost over a bare loop (bench ledger).
"""

import ctypes
import heapq
import json
import math
import os
import re
import socket

from mpirt.atomic import fsync
from mpirt.config import FSYNC, env_flag
from mpirt.secure.policy import makedirs as private_makedirs

_PART = re.compile(r"^shard-(\d{6})\.h5$")


class CommitStore:
    """A directory of committed per-shard results plus the coordinator's commit log."""

    def __init__(self, directory, durable=None):
        self.dir = directory
        private_makedirs(directory)
        self.log_path = os.path.join(directory, "ledger.jsonl")
        self._log_fd = None
        # fsync before publishing guards against losing a committed shard when a
        # whole node crashes; a killed process loses nothing written without it.
        self.durable = env_flag(FSYNC, default=True) if durable is None else durable

    def path(self, shard):
        return os.path.join(self.dir, f"shard-{shard:06d}.h5")

    def temp_path(self, shard):
        """Where this process writes ``shard``'s result before committing it (the job creates the file).

        Named for the shard and its writer (``shard-K.PID@HOST.tmp``) rather than made unique by
        ``mkstemp``: creating the file first cost a second journalled create per shard, 0.1-0.66 ms a
        shard on this machine with three workers committing (bench ledger). A live process has one
        temporary per shard; one left by a dead process with the same pid is replaced.
        """
        tmp = os.path.join(self.dir, f"shard-{shard:06d}.{os.getpid()}@{socket.gethostname()}.tmp")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        return tmp

    def commit(self, shard, tmp):
        """Atomically publish ``tmp`` as the shard's result; False if it was committed already."""
        self.make_durable([tmp])
        return self.link(shard, tmp)

    def make_durable(self, paths):
        """Put these files' contents on disk (a no-op without ``durable``); before any is linked.

        Writeback of all of them is started first, then each is fsynced: the fsyncs then wait on
        writes already under way and share journal commits (8 small HDF5 parts on this machine's
        ext4: 680 us a part against 820 us for one fsync after another; 410 us with none).
        """
        if not self.durable:
            return
        for path in paths:
            _start_writeback(path)
        for path in paths:
            fsync(path)

    def link(self, shard, tmp):
        """Publish durable ``tmp`` under the shard's name, create-if-absent; False if it was there."""
        try:
            os.link(tmp, self.path(shard))
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def committed(self):
        """Shard numbers with a committed result on disk."""
        return {int(m.group(1)) for name in os.listdir(self.dir) if (m := _PART.match(name))}

    def log_commit(self, **record):
        self.log_commits([record])

    def log_commits(self, records):
        """Append records to the commit log, in one write (a batch's worth at a time)."""
        if self._log_fd is None:
            self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self._log_fd, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())

    def logged(self):
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def log_fault(self, index):
        """Record, before it strikes, that injected fault ``index`` fired: a coordinator that strikes
        itself cannot tell the view, and its successor must not strike again at the same step."""
        fd = os.open(os.path.join(self.dir, "faults.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps({"fault": index}) + "\n").encode())
        finally:
            os.close(fd)

    def faults_fired(self):
        path = os.path.join(self.dir, "faults.jsonl")
        if not os.path.exists(path):
            return set()
        with open(path) as f:
            return {json.loads(line)["fault"] for line in f if line.strip()}

    def remove_temps(self):
        for name in os.listdir(self.dir):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self.dir, name))


class ShardLedger:
    """Leases shards by priority: returned shards first, then larger shards first.

    Larger-first (longest processing time first) keeps the tail of a job short;
    pull-based leasing means fast ranks simply come back more often.
    """

    def __init__(self, sizes, done=()):
        self.sizes = list(sizes)
        self.done = set(done)
        self.leased = {}  # shard -> member
        self._heap = [(1, -s, k) for k, s in enumerate(self.sizes) if k not in self.done]
        heapq.heapify(self._heap)

    @property
    def n_shards(self):
        return len(self.sizes)

    @property
    def finished(self):
        return len(self.done) == self.n_shards

    @property
    def pending(self):
        """Shards neither done nor leased."""
        return self.n_shards - len(self.done) - len(self.leased)

    def lease(self, member):
        while self._heap:
            _, _, shard = heapq.heappop(self._heap)
            if shard not in self.done and shard not in self.leased:
                self.leased[shard] = member
                return shard
        return None

    def lease_many(self, member, count):
        """Up to ``count`` shards for ``member``, in lease order."""
        shards = []
        while len(shards) < count and (shard := self.lease(member)) is not None:
            shards.append(shard)
        return shards

    def commit(self, shard):
        """Mark done; False when it already was (a duplicate commit)."""
        self.leased.pop(shard, None)
        if shard in self.done:
            return False
        self.done.add(shard)
        return True

    def release(self, members):
        """Give the leases of these members back, ahead of untouched shards."""
        self.give_back([shard for shard, m in self.leased.items() if m in members])

    def give_back(self, shards):
        """Return these leased shards (a worker handed them back unstarted), ahead of untouched ones."""
        for shard in shards:
            if self.leased.pop(shard, None) is not None:
                heapq.heappush(self._heap, (0, -self.sizes[shard], shard))

    def release_all(self):
        self.release(set(self.leased.values()))


# How long one batch of leases should keep a worker busy. A batch is what a stop request or a join
# waits for, and what a killed worker's successor redoes: 50 ms is small beside the 2 s a hang takes to
# be detected. On bench ledger's 0.7 ms units it cut a worker's requests from one per unit to one per
# ~11 (the tail's shrinking batches included) and its wait for leases from 2.5 to 0.2-0.5 ms a unit;
# other values were not tried.
BATCH_S = 0.05


def batch_size(pending, workers, unit_s, target_s=BATCH_S):
    """How many shards to lease at once: about ``target_s`` of work, and guided self-scheduling's
    ``pending / (2 workers)`` so that the last batches shrink to one shard and the tail stays even.

    Args:
        pending: shards not yet leased.
        workers: members taking leases.
        unit_s: the worker's measured seconds per shard (None before its first: one shard).
    """
    if unit_s is None or pending <= 0:
        return 1
    by_time = int(target_s / max(unit_s, 1e-6))
    by_tail = math.ceil(pending / (2 * max(workers, 1)))
    return max(1, min(by_time, by_tail))


_libc = []


def _start_writeback(path):
    """Ask the kernel to start writing ``path`` out now, without waiting (Linux sync_file_range)."""
    if not _libc:
        try:
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _libc.append(fn)
        except (OSError, AttributeError):  # not Linux: the fsync that follows does it all
            _libc.append(None)
    if _libc[0] is None:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        _libc[0](fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a failure here only means the fsync does it all
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of dirty pages, do not wait
