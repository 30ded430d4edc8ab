"""Embedding tables sharded row-wise over the ranks, with a buddy replica of every shard.

A step, on every member, before the step's ``Agree`` (:mod:`mpirt.cluster.commit`):

1. :meth:`ShardedTables.lookup`: each rank sends the ids its rows need to their owners and gets the
   rows back (two ``Alltoallv``: TorchRec's input and output distribution, over MPI);
2. the job runs forward and backward on those rows as leaf tensors;
3. :meth:`ShardedTables.push`: the gradient rows go back to their owners (``Alltoallv``); each owner
   sums the contributions to a row in float64 in rank order, computes the row's update, and sends
   the updated rows (and optimizer state) to the shard's buddy (``Alltoallv``). Owner and buddy hold
   the result as *pending*;
4. the step's ``Agree``: committed, every holder applies what is pending (local, cannot fail); not
   committed, every holder drops it, and the step is redone after recovery.

So owner and buddy always hold the rows of the last committed step, and a failure loses no update.
When members change, :meth:`migrate` sends whole shards as :func:`mpirt.recsys.placement.moves`
says (one ``alltoall``); a failed owner's shard is served by its buddy, no checkpoint read.

Optimizers (rows a step touches; an untouched row keeps its value and its state, as torch's
``SparseAdam``): ``sgd``: ``row -= lr * g``; ``adam``: per-row first and second moments, bias
correction with the global step count.

Initial rows are drawn from (seed, table, shard), so any number of ranks starts from the same table.
"""

import numpy as np

from mpirt.recsys.placement import shard_rows

ADAM = (0.9, 0.999, 1e-8)


class ShardedTables:
    """The shards of every table this member holds, and the collectives that use them.

    Args:
        group: the :class:`mpirt.cluster.group.ElasticGroup` (its ``ec`` and ``view`` are read at each
            call, so they follow recoveries).
        tables: {name: (n_rows, dim, n_shards)}.
        placement: the current :class:`~mpirt.recsys.placement.Placement`.
        optimizer: "sgd" or "adam"; lr: the learning rate.
        init: {name: callable(rng, shape) -> float32 rows} for a shard's initial rows.
    """

    def __init__(self, group, tables, placement, optimizer="sgd", lr=0.01, seed=0, init=None):
        self.group, self.tables, self.placement = group, dict(tables), placement
        self.optimizer, self.lr, self.seed = optimizer, float(lr), int(seed)
        self.init = init or {}
        self.held = {}  # (table, shard) -> {"rows": (r, d) float32, ["m", "v"]: float32}
        self.pending = {}  # (table, shard) -> (local row positions, new rows, new state dict)
        self.step_count = 0  # committed optimizer steps (Adam's bias correction)

    # -- layout -----------------------------------------------------------------------------------
    def rows_per_shard(self, t):
        n, _, s = self.tables[t]
        return shard_rows(n, s)

    def shard_range(self, t, s):
        n = self.tables[t][0]
        r = self.rows_per_shard(t)
        return s * r, min(n, (s + 1) * r)

    def fresh(self, t, s):
        """The initial rows (and zero state) of shard ``s`` of table ``t``: from (seed, t, s) only."""
        a, b = self.shard_range(t, s)
        dim = self.tables[t][1]
        rng = np.random.Generator(np.random.PCG64([self.seed, sorted(self.tables).index(t), s, 0x656D62]))
        make = self.init.get(t) or (lambda g, shape: (0.1 * g.standard_normal(shape)).astype(np.float32))
        shard = {"rows": np.ascontiguousarray(make(rng, (b - a, dim)), dtype=np.float32)}
        if self.optimizer == "adam":
            shard["m"] = np.zeros((b - a, dim), np.float32)
            shard["v"] = np.zeros((b - a, dim), np.float32)
        return shard

    def create(self):
        """Hold this member's shards of the placement, freshly initialised (no communication)."""
        me = self.group.member
        self.held = {(t, s): self.fresh(t, s) for t, s, _ in self.placement.holdings(me)}

    def load_full(self, full):
        """Hold this member's shards cut from whole tables ``full`` ({t: {"rows", ["m", "v"]}}) (resume)."""
        me = self.group.member
        self.held = {}
        for t, s, _ in self.placement.holdings(me):
            a, b = self.shard_range(t, s)
            self.held[(t, s)] = {k: np.array(v[a:b], dtype=np.float32) for k, v in full[t].items()}

    def owned_bytes(self):
        return sum(v.nbytes for (t, s), sh in self.held.items() for v in sh.values()
                   if self.placement.owner[t][s] == self.group.member)

    def held_bytes(self):
        return sum(v.nbytes for sh in self.held.values() for v in sh.values())

    def _owner_rank(self, t, ids):
        members = self.group.view.members
        rank_of = {m: r for r, m in enumerate(members)}
        owners = np.array([rank_of[m] for m in self.placement.owner[t]], dtype=np.int64)
        return owners[ids // self.rows_per_shard(t)]

    # -- the step ---------------------------------------------------------------------------------
    def lookup(self, ids):
        """{t: (unique ids, inverse, rows)} for this rank's ``ids`` ({t: int64 array}). Collective."""
        out, self._routes = {}, {}
        for t in sorted(ids):
            uniq, inverse = np.unique(np.asarray(ids[t], dtype=np.int64), return_inverse=True)
            dest = self._owner_rank(t, uniq)
            order = np.argsort(dest, kind="stable")
            sent = uniq[order]
            counts = np.bincount(dest, minlength=self.group.size)
            asked, asked_counts = alltoallv(self.group.ec, sent, counts)
            rows = self._rows_of(t, asked)
            got, _ = alltoallv(self.group.ec, rows, asked_counts)
            back = np.empty_like(got)
            back[order] = got
            self._routes[t] = (order, counts, asked, asked_counts)
            out[t] = (uniq, inverse, back)
        return out

    def _rows_of(self, t, ids):
        dim = self.tables[t][1]
        rows = np.empty((len(ids), dim), np.float32)
        r = self.rows_per_shard(t)
        for s in np.unique(ids // r) if len(ids) else ():
            sel = np.flatnonzero(ids // r == s)
            rows[sel] = self.held[(t, int(s))]["rows"][ids[sel] - int(s) * r]
        return rows

    def push(self, grads, step):
        """Send the gradient rows of the last :meth:`lookup` ({t: (k, d) float32, in its unique-id order})
        to their owners, compute the updates and replicate them to the buddies: all pending. Collective."""
        self.pending = {}
        me = self.group.member
        for t in sorted(grads):
            order, counts, asked, asked_counts = self._routes[t]
            g_sent = np.ascontiguousarray(np.asarray(grads[t], dtype=np.float32)[order])
            got, _ = alltoallv(self.group.ec, g_sent, counts)
            # The rows asked of this owner, by source rank in rank order: sum per row in float64.
            ids, inverse = np.unique(asked, return_inverse=True)
            total = np.zeros((len(ids), self.tables[t][1]), np.float64)
            np.add.at(total, inverse, got.astype(np.float64))
            self._update(t, ids, total.astype(np.float32), step)
            # Replicate the pending rows to each shard's buddy.
            members = self.group.view.members
            rank_of = {m: k for k, m in enumerate(members)}
            out = [[] for _ in range(self.group.size)]
            for (tt, s), (pos, new) in self.pending.items():
                if tt != t or self.placement.owner[t][s] != me:
                    continue
                b = self.placement.buddy[t][s]
                if b is not None:
                    out[rank_of[b]].append((s, pos, new))
            self._replicate(t, out)

    def _update(self, t, ids, g, step):
        r = self.rows_per_shard(t)
        for s in np.unique(ids // r) if len(ids) else ():
            sel = np.flatnonzero(ids // r == s)
            pos = ids[sel] - int(s) * r
            shard = self.held[(t, int(s))]
            gs = g[sel]
            if self.optimizer == "adam":
                b1, b2, eps = ADAM
                k = step + 1
                m = b1 * shard["m"][pos] + (1 - b1) * gs
                v = b2 * shard["v"][pos] + (1 - b2) * gs * gs
                new = {"rows": shard["rows"][pos] - self.lr * (m / (1 - b1 ** k)) / (np.sqrt(v / (1 - b2 ** k)) + eps),
                       "m": m, "v": v}
            else:
                new = {"rows": shard["rows"][pos] - self.lr * gs}
            self.pending[(t, int(s))] = (pos, {k: np.asarray(v, np.float32) for k, v in new.items()})

    def _replicate(self, t, out):
        """Owner -> buddy: the pending rows of each shard (one alltoall of small objects)."""
        for part in alltoall_obj(self.group.ec, out):
            for s, pos, new in part:
                self.pending[(t, int(s))] = (pos, new)

    def commit(self):
        """The step is committed: apply what is pending here (local)."""
        for key, (pos, new) in self.pending.items():
            shard = self.held[key]
            for k, v in new.items():
                shard[k][pos] = v
        self.pending = {}
        self.step_count += 1

    def discard(self):
        self.pending = {}

    # -- membership changes ----------------------------------------------------------------------
    def migrate(self, new, moves):
        """Collective: send the shard copies ``moves`` lists (from :func:`placement.moves`), then hold
        exactly what ``new`` gives this member."""
        me, members = self.group.member, self.group.view.members
        rank_of = {m: k for k, m in enumerate(members)}
        out = [[] for _ in range(self.group.size)]
        for t, s, src, dst, _ in moves:
            if src == me and dst in rank_of:
                out[rank_of[dst]].append((t, s, self.held[(t, s)]))
        for part in alltoall_obj(self.group.ec, out):
            for t, s, shard in part:
                self.held[(t, s)] = {k: np.array(v) for k, v in shard.items()}
        keep = {(t, s) for t, s, _ in new.holdings(me)}
        self.held = {k: v for k, v in self.held.items() if k in keep}
        self.placement = new

    def gather_full(self):
        """Collective: the whole tables ({t: {"rows", ["m", "v"]}}) on rank 0 (checkpoints, the final
        model), None elsewhere. Each shard comes from its owner."""
        me = self.group.member
        mine = [(t, s, sh) for (t, s), sh in self.held.items() if self.placement.owner[t][s] == me]
        out = [mine if r == 0 else [] for r in range(self.group.size)]
        parts = alltoall_obj(self.group.ec, out)
        if self.group.rank != 0:
            return None
        full = {}
        for t, (n, d, _) in self.tables.items():
            keys = ("rows", "m", "v") if self.optimizer == "adam" else ("rows",)
            full[t] = {k: np.zeros((n, d), np.float32) for k in keys}
        for part in parts:
            for t, s, sh in part:
                a, b = self.shard_range(t, s)
                for k, v in sh.items():
                    full[t][k][a:b] = v
        return full


# ULFM's Alltoall(v) and Gather report a dead peer as MPI_ERR_OTHER on this Open MPI (Allreduce and
# point-to-point say MPI_ERR_PROC_FAILED): the exchanges below are an Allreduce of the byte counts and
# point-to-point messages, so a failure is always recognised as one.
TAG = 0x6D72


def exchange(ec, out):
    """Send ``out[r]`` (a uint8 array, maybe empty) to every rank ``r``; return what each rank sent
    here, by source rank. Collective."""
    MPI, comm, size, me = ec.MPI, ec.comm, ec.size, ec.rank
    counts = np.zeros((size, size), np.int64)
    counts[me] = [len(x) for x in out]
    with ec.guard():
        comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
        got = [np.empty(int(counts[src, me]), np.uint8) for src in range(size)]
        got[me] = np.asarray(out[me], np.uint8)
        reqs = [comm.Irecv([got[src], MPI.BYTE], source=src, tag=TAG)
                for src in range(size) if src != me and counts[src, me]]
        reqs += [comm.Isend([np.ascontiguousarray(out[dst], np.uint8), MPI.BYTE], dest=dst, tag=TAG)
                 for dst in range(size) if dst != me and counts[me, dst]]
        MPI.Request.Waitall(reqs)
    return got


def alltoallv(ec, send, counts):
    """The rows of ``send`` (grouped by destination rank, ``counts[r]`` rows for rank ``r``) exchanged:
    (received rows grouped by source rank, received counts). Any row shape, one dtype."""
    send = np.ascontiguousarray(send)
    tail, dtype = send.shape[1:], send.dtype
    row = int(np.prod(tail, dtype=np.int64)) * dtype.itemsize
    ends = np.cumsum(counts)
    flat = send.reshape(-1).view(np.uint8) if send.size else np.zeros(0, np.uint8)
    out = [flat[(e - c) * row:e * row] for c, e in zip(counts, ends)]
    got = exchange(ec, out)
    recv_counts = np.array([len(g) // row if row else 0 for g in got], np.int64)
    data = np.concatenate(got) if got else np.zeros(0, np.uint8)
    return data.view(dtype).reshape(-1, *tail), recv_counts


def alltoall_obj(ec, out):
    """Python objects ``out[r]`` to each rank ``r``; the objects received, by source rank."""
    import pickle

    got = exchange(ec, [np.frombuffer(pickle.dumps(x, protocol=5), np.uint8) for x in out])
    return [pickle.loads(g.tobytes()) for g in got]
