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
    """What the coordinator broadcasts at each change; every member holds the same copy.

    It carries the membership facts a new coordinator needs (who left gracefully, which injected
    faults fired, which host each member is on): the events log only records them.
    """

    id: int
    members: list  # member id of each rank, in rank order
    hosts: list  # (host, pid) of each rank
    next_member: int  # the id the next joiner gets
    left: set = field(default_factory=set)  # members that announced a graceful leave (ever)
    fired: set = field(default_factory=set)  # indexes of injected faults that fired (ever)
    failed: list = field(default_factory=list)  # members this change found failed
    departed: list = field(default_factory=list)  # members this change found gone by a graceful leave
    joined: list = field(default_factory=list)  # members this change added

    @property
    def coordinator(self):
        return self.members[0]

    def host_of(self, member):
        return self.hosts[self.members.index(member)]

    def members_on(self, host):
        return [m for m, (h, _) in zip(self.members, self.hosts) if h == host]


def has_quorum(old, survivors, left=()):
    """True when ``survivors`` may go on as the job after a change from view ``old``.

    Counted in hosts, the failure domains: the survivors must span a strict majority of the hosts
    that had members in ``old`` (less members that left gracefully: they are not a side), or
    exactly half of them including the coordinator's host. Two disjoint sides of a partition can
    never both pass, which rules out a split brain; processes that fail on a host that is still
    there (however many at once) never cost the quorum, and a job on one host always has it.
    """
    host = {m: h for m, (h, _) in zip(old.members, old.hosts)} if old.hosts else {m: None for m in old.members}
    voters = {host[m] for m in old.members if m not in left}
    alive = {host[m] for m in survivors if m in host} & voters
    if 2 * len(alive) > len(voters):
        return True
    return 2 * len(alive) == len(voters) and host[old.coordinator] in alive


def hosts_lost(old, failed):
    """Hosts of ``old`` none of whose members survived: {host: [members]}, for hosts that had members."""
    lost = {}
    for host in dict.fromkeys(h for h, _ in old.hosts):
        on = old.members_on(host)
        if on and all(m in failed for m in on):
            lost[host] = on
    return lost


class EventsLog:
    """JSON lines, appended with one ``write`` per line (O_APPEND keeps lines whole).

    Every process may append (a worker records the fault it is about to strike
    itself with). It is observation for people and tests, never read back as state.
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


def _jsonable(value):
    if isinstance(value, set):
        return sorted(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
