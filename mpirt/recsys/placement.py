"""Where the shards of the embedding tables live: an owner and a buddy (its in-memory replica) per shard.

A table of ``n`` rows is cut into ``S`` fixed shards of ``ceil(n / S)`` rows (the last shorter),
whatever the number of members, so that a membership change moves whole shards and a checkpoint
reshards to any world size. A :class:`Placement` names, for every shard of every table, the member
(the stable id of :mod:`mpirt.cluster.group`, not the rank) that owns it, which serves lookups and
applies updates, and its buddy, which holds a copy kept current at every committed step.

The coordinator computes a new placement when members change (:func:`after_change`) and sends it to
everyone; then every member moves shards as :func:`moves` says. The rules, in order:

- a shard whose owner is gone is served by its buddy (promoted: it has the replica); both gone: the
  shard is lost (:class:`ShardLost`), and the job stops naming it;
- members leaving gracefully are treated as gone, but they are still there to hand their shards over;
- in each table, shards move from the most loaded members to the least loaded (joiners first)
  until the owned counts differ by at most one, moving as few shards as that takes (a shard whose buddy is the
  receiver first: no rows to copy);
- every shard gets a buddy other than its owner (none with a single member), kept where it was when
  possible, else on the least loaded member.

Everything here is a pure function of its inputs: the same on every member.
"""

from dataclasses import dataclass, field

from mpirt.errors import JobError


class ShardLost(JobError):
    """A shard's owner and its buddy failed together: no copy of its rows is left in memory."""


@dataclass
class Placement:
    """``owner[t][s]``, ``buddy[t][s]`` (member ids; buddy None without a second member) per table ``t``."""

    owner: dict = field(default_factory=dict)
    buddy: dict = field(default_factory=dict)

    def to_dict(self):
        return {"owner": {t: list(v) for t, v in self.owner.items()},
                "buddy": {t: list(v) for t, v in self.buddy.items()}}

    @classmethod
    def from_dict(cls, d):
        return cls({t: list(v) for t, v in d["owner"].items()}, {t: list(v) for t, v in d["buddy"].items()})

    def members(self):
        return {m for v in self.owner.values() for m in v} | {m for v in self.buddy.values() for m in v
                                                              if m is not None}

    def holdings(self, member):
        """[(table, shard, role)] the member holds (role "owner" or "buddy")."""
        out = []
        for t in self.owner:
            out += [(t, s, "owner") for s, m in enumerate(self.owner[t]) if m == member]
            out += [(t, s, "buddy") for s, m in enumerate(self.buddy[t]) if m == member]
        return out


def shard_rows(n_rows, n_shards):
    """Rows per shard (the last may be shorter)."""
    return max(1, -(-int(n_rows) // int(n_shards)))


def initial(tables, members):
    """Shards dealt round-robin over ``members`` (``tables``: {name: n_shards}); the buddy is the next."""
    members = list(members)
    owner, buddy = {}, {}
    k = 0
    for t, n in tables.items():
        owner[t], buddy[t] = [], []
        for _ in range(n):
            owner[t].append(members[k % len(members)])
            buddy[t].append(members[(k + 1) % len(members)] if len(members) > 1 else None)
            k += 1
    return Placement(owner, buddy)


def after_change(old, members, gone=()):
    """The placement for ``members`` (in view order) after ``gone`` failed or left.

    Raises:
        ShardLost: a shard's owner and buddy are both gone (names the first such shard).
    """
    members = list(members)
    alive = set(members) - set(gone)
    owner = {t: list(v) for t, v in old.owner.items()}
    buddy = {t: list(v) for t, v in old.buddy.items()}
    for t in owner:
        for s, m in enumerate(owner[t]):
            if m in alive:
                continue
            b = buddy[t][s]
            if b is None or b not in alive:
                raise ShardLost(f"shard {s} of the {t} table is lost: its owner (member {m}) and its replica "
                                f"(member {b}) failed together")
            owner[t][s], buddy[t][s] = b, None  # promoted; a new buddy below
    _balance(owner, buddy, [m for m in members if m in alive])
    for t in owner:
        for s, m in enumerate(owner[t]):
            if buddy[t][s] not in alive or buddy[t][s] == m:
                buddy[t][s] = None
    _buddies(owner, buddy, [m for m in members if m in alive])
    return Placement(owner, buddy)


def _balance(owner, buddy, members):
    """Per table, move owned shards from the most to the least loaded members until counts differ by
    <= 1; a shard whose buddy is the receiver moves first (it holds the rows already: nothing to copy)."""
    for k, t in enumerate(owner):
        # ties broken in an order rotated per table, so that the tables' remainders land on different members
        members = members[k % len(members):] + members[:k % len(members)] if k else members
        load = {m: owner[t].count(m) for m in members}
        while True:
            hi = max(members, key=lambda m: (load[m], -members.index(m)))
            lo = min(members, key=lambda m: (load[m], members.index(m)))
            if load[hi] - load[lo] <= 1:
                break
            s = max((s for s, m in enumerate(owner[t]) if m == hi), key=lambda s: (buddy[t][s] == lo, s))
            owner[t][s] = lo
            load[hi] -= 1
            load[lo] += 1


def _buddies(owner, buddy, members):
    if len(members) < 2:
        return
    count = {m: 0 for m in members}
    for v in buddy.values():
        for m in v:
            if m is not None:
                count[m] += 1
    for t in owner:
        for s, m in enumerate(owner[t]):
            if buddy[t][s] is None:
                b = min((x for x in members if x != m), key=lambda x: (count[x], members.index(x)))
                buddy[t][s] = b
                count[b] += 1


def moves(old, new, alive):
    """[(table, shard, from member, to member, role)]: the copies to send so that every member holds
    what ``new`` gives it. The sender is the shard's old owner when alive, else its old buddy; a member
    that already holds the shard (as owner or buddy) in ``old`` sends nothing to itself."""
    alive = set(alive)
    out = []
    for t in new.owner:
        for s in range(len(new.owner[t])):
            had = {m for m in (old.owner[t][s], old.buddy[t][s]) if m is not None and m in alive}
            src = old.owner[t][s] if old.owner[t][s] in alive else old.buddy[t][s]
            for role, m in (("owner", new.owner[t][s]), ("buddy", new.buddy[t][s])):
                if m is not None and m not in had:
                    out.append((t, s, src, m, role))
    return out
