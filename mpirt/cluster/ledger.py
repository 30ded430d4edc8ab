"""The shard ledger: pending, leased, done; and the on-disk commits behind "done".

A shard is done when its result file exists under its final name: results are
written to a temporary name and committed with ``os.link``, which fails if the
name exists, so a second commit of a shard is detected, never silently kept.
The coordinator's in-memory ledger is re-derivable from that directory, which is
how a new coordinator, or ``--resume``, picks up without redoing anything.
"""

import heapq
import json
import os
import re
import tempfile

from mpirt.atomic import fsync
from mpirt.config import FSYNC, env_flag

_PART = re.compile(r"^shard-(\d{6})\.h5$")


class CommitStore:
    """A directory of committed per-shard results plus the coordinator's commit log."""

    def __init__(self, directory, durable=None):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.log_path = os.path.join(directory, "ledger.jsonl")
        self._log_fd = None
        # fsync before publishing guards against losing a committed shard when a
        # whole node crashes; a killed process loses nothing written without it.
        self.durable = env_flag(FSYNC, default=True) if durable is None else durable

    def path(self, shard):
        return os.path.join(self.dir, f"shard-{shard:06d}.h5")

    def temp_path(self, shard):
        fd, tmp = tempfile.mkstemp(prefix=f"shard-{shard:06d}.", suffix=".tmp", dir=self.dir)
        os.close(fd)
        return tmp

    def commit(self, shard, tmp):
        """Atomically publish ``tmp`` as the shard's result; False if it was committed already."""
        if self.durable:
            fsync(tmp)
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
        if self._log_fd is None:
            self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self._log_fd, (json.dumps(record, sort_keys=True) + "\n").encode())

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

    def lease(self, member):
        while self._heap:
            _, _, shard = heapq.heappop(self._heap)
            if shard not in self.done and shard not in self.leased:
                self.leased[shard] = member
                return shard
        return None

    def commit(self, shard):
        """Mark done; False when it already was (a duplicate commit)."""
        self.leased.pop(shard, None)
        if shard in self.done:
            return False
        self.done.add(shard)
        return True

    def release(self, members):
        """Give the leases of these members back, ahead of untouched shards."""
        for shard, m in list(self.leased.items()):
            if m in members:
                del self.leased[shard]
                heapq.heappush(self._heap, (0, -self.sizes[shard], shard))

    def release_all(self):
        self.release(set(self.leased.values()))
