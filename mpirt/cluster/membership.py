"""Membership views and the events log.

A view is one communicator's lifetime: views are numbered 0, 1, 2... and each
process keeps a member id for the whole job (MPI ranks change on shrink and
merge; member ids never do, and are never reused).
"""

import json
import os
import time
from dataclasses import dataclass, field


@dataclass
class View:
    id: int
    members: list  # member id of each rank, in rank order
    hosts: list  # (host, pid) of each rank
    next_member: int  # the id the next joiner gets
    left: set = field(default_factory=set)  # members that announced a graceful leave

    @property
    def coordinator(self):
        return self.members[0]

    def host_of(self, member):
        return self.hosts[self.members.index(member)]


class EventsLog:
    """JSON lines, appended with one ``write`` per line (O_APPEND keeps lines whole).

    Every process may append (a worker records the fault it is about to strike
    itself with); a new coordinator reads the log to learn which faults already fired.
    """

    def __init__(self, path):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)

    def write(self, event, **fields):
        if not self.path:
            return
        record = {"event": event, "time": round(time.time(), 6), **fields}
        line = (json.dumps(record, sort_keys=True, default=_jsonable) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self):
        if not self.path or not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def fired_faults(self):
        return {e["index"] for e in self.read() if e.get("event") == "fault"}


def _jsonable(value):
    if isinstance(value, set):
        return sorted(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
