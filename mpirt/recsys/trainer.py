"""``mpirt train --model mf|twotower`` on a ratings data set: model parallelism with elastic shards.

The user and item tables are sharded row-wise over the members (:mod:`mpirt.recsys.tables`); the
small dense part is replicated and data-parallel. Each global step takes the same ratings on any
number of ranks (:mod:`mpirt.train.order`), each rank its slice; the step protocol is the one of
every mpirt loop (:mod:`mpirt.cluster.commit`): the tables' exchanges, then the dense gradients'
allreduce and ``Agree``; committed, every holder applies its pending rows, else the step is redone
after recovery.

When members change the coordinator computes a new placement (:mod:`mpirt.recsys.placement`) and
sends it; shards move (a dead owner's from its buddy), and the move itself is agreed on, so every
member holds the same placement afterwards. A graceful leaver hands its shards over before it exits;
a joiner takes shards over. No checkpoint is read to recover. A shard whose owner and buddy fail
together stops the job with one line naming it and the newest checkpoint.

Summation order: a row's gradient is summed by its owner in float64 over the ranks' partial sums,
the dense gradients by the allreduce, so N ranks give 1 rank's model within float32 rounding (tested
at 1e-5 relative over short runs, as for ``mpirt train``'s default mode).
"""

import os
import time

import numpy as np
import torch

from mpirt.cluster.commit import Slots, StepCommitter
from mpirt.cluster.group import Leaving, run_job
from mpirt.errors import JobError, ProcessFailure, UsageError
from mpirt.log import get_logger
from mpirt.recsys import placement as plc
from mpirt.recsys.model import Dense, init_rows
from mpirt.recsys.tables import ShardedTables, alltoall_obj
from mpirt.train import optim
from mpirt.train.order import Orders, Schedule
from mpirt.secure.policy import makedirs as private_makedirs

log = get_logger("mpirt.recsys")
SLOTS = Slots("samples", "loss")
EVAL_ROWS = 4096


def alltoall_everyone(ec, obj):
    """``obj`` from every rank, on every rank (by rank)."""
    return alltoall_obj(ec, [obj] * ec.size)


class RecTrainer:
    """One process's part (``cfg``: :class:`mpirt.train.commands.TrainConfig`; ``spec`` has the sizes)."""

    def __init__(self, cfg, dataset, group):
        self.cfg, self.dataset, self.group = cfg, dataset, group
        self._rows = {}  # split name -> its rows, read (and checked) once
        self.train = self.rows("train")
        self.n = len(self.train)
        # mu starts at the training ratings' mean (the same on every member: the same rows)
        mean = float(np.mean(self.train.rating, dtype=np.float64)) if self.n else 0.0
        self.spec = dict(cfg.spec, mean_rating=mean)
        self.schedule = Schedule(self.n, cfg.global_batch, cfg.epochs, cfg.seed)
        self.orders = Orders(self.n, cfg.seed)
        self.step = 0
        torch.manual_seed(cfg.seed)
        self.dense = Dense(self.spec)
        params = list(self.dense.parameters())
        self.opt = optim.build(cfg.optimizer, params, lr=cfg.lr)
        from mpirt.train.allreduce import GradAllreduce

        # No overlap: the tables' exchanges use the communicator on this thread during the step.
        self.reducer = GradAllreduce(group.ec, params, n_stats=len(SLOTS), overlap=False)
        self.committer = StepCommitter(group, self.reducer, SLOTS)
        d, shards = int(self.spec["embed_dim"]) + 1, int(self.spec["table_shards"])
        self.table_spec = {"user": (dataset.n_users, d, shards), "item": (dataset.n_items, d, shards)}
        self.tables = ShardedTables(group, self.table_spec, None, optimizer=cfg.optimizer, lr=cfg.lr,
                                    seed=cfg.seed, init={t: init_rows(d - 1) for t in self.table_spec})
        self.evals = []
        self.last_loss = float("nan")
        self.loop_s = 0.0  # seconds in steps (committed or not), for samples/s

    # -- state a joiner gets ----------------------------------------------------------------------
    def snapshot(self):
        return {"step": self.step, "dense": self.dense.state_dict(), "opt": self.opt.state_dict(),
                "placement": self.tables.placement.to_dict(), "step_count": self.tables.step_count,
                "evals": self.evals}

    def load(self, snap):
        self.step = snap["step"]
        self.dense.load_state_dict(snap["dense"])
        self.opt.load_state_dict(snap["opt"])
        self.tables.placement = plc.Placement.from_dict(snap["placement"])
        self.tables.step_count = snap["step_count"]
        self.evals = snap["evals"]
        self.tables.held = {}

    # -- the run ----------------------------------------------------------------------------------
    def run(self):
        g = self.group
        if g.joined:
            self.load(g.sync_view(joiner=True))
            self._rebalance(gone=())
        else:
            g.sync_view()
            resumed = self._resume()
            if not resumed:
                self.tables.placement = plc.initial({t: s for t, (_, _, s) in self.table_spec.items()},
                                                    g.view.members)
                self.tables.create()
        total = self.schedule.total_steps
        while self.step < total or self.pending_eval():
            try:
                if self.pending_eval():
                    self._evaluate_due()
                    continue
                self._step()
            except ProcessFailure:
                self._recover()
        return self._finish()

    def pending_eval(self):
        epochs_done = self.step // max(self.schedule.steps_per_epoch, 1)
        return len(self.evals) < epochs_done

    def _step(self):
        t0 = time.perf_counter()
        self._step_inner()
        self.loop_s += time.perf_counter() - t0

    def _step_inner(self):
        g, step = self.group, self.step
        stats = self.committer.begin(step)
        epoch, a, b = self.schedule.locate(step)
        lo, hi = self.schedule.slice_of(step, g.rank, g.size)
        failed = False
        try:
            rows = np.sort(self.orders.rows(epoch, lo, hi))
            batch = self.train.take(rows)
            self.opt.zero_grad(set_to_none=False)
            self.reducer.begin()
            loss, grads = self._forward_backward(batch, scale=1.0 / (b - a))
            stats[SLOTS.SAMPLES], stats[SLOTS.LOSS] = len(batch), loss
            self.tables.push(grads, self.tables.step_count)
        except ProcessFailure:
            failed = True
        totals = self.committer.commit(step, stats, failed=failed)
        self.tables.commit()
        self.opt.step()
        self.step = step + 1
        self.last_loss = totals[SLOTS.LOSS] / max(totals[SLOTS.SAMPLES], 1.0)
        self._after_commit(step, totals)
        every = self.cfg.checkpoint_every
        if self.cfg.checkpoint_dir and every and self.step % every == 0 and self.step < self.schedule.total_steps:
            self._checkpoint()

    def _checkpoint(self):
        """Collective, agreed like an evaluation: the whole tables gathered on the coordinator, which
        writes them (a failure here is recovered and the gather redone; the step stays committed)."""
        while True:
            try:
                full = self.committer.agree_phase(self.step, "save", self.tables.gather_full)
                break
            except ProcessFailure:
                self._recover()
        if self.group.is_coordinator:
            self._save(full)

    def _forward_backward(self, batch, scale):
        looked = self.tables.lookup({"user": batch.user, "item": batch.item})
        (_, inv_u, ru), (_, inv_i, ri) = looked["user"], looked["item"]
        U = torch.from_numpy(ru).requires_grad_(True)
        V = torch.from_numpy(ri).requires_grad_(True)
        pred = self.dense(U[torch.from_numpy(inv_u)], V[torch.from_numpy(inv_i)])
        err = pred - torch.from_numpy(batch.rating)
        loss = (err * err).sum()
        loss.backward()
        grads = {t: (np.zeros_like(x.detach().numpy()) if x.grad is None else (x.grad * scale).numpy())
                 for t, x in (("user", U), ("item", V))}
        return float(loss.detach()), grads

    def _after_commit(self, step, totals):
        g = self.group
        if totals[SLOTS.LEAVING]:
            g.announce_leaving(Leaving.requested)
            leavers = [m for m in g.view.members if m in g.leaving]
            self._rebalance(gone=leavers)
            if Leaving.requested:
                g.leave()
        if totals[SLOTS.JOINERS]:
            self.committer.merge_joiners(step, totals, self.snapshot)
            self._rebalance(gone=())
        else:
            self.committer.mark_fired(step, ("join",))

    def _rebalance(self, gone):
        """Collective: the coordinator's new placement for the current members (minus ``gone``), the
        shards moved, and the move agreed on; on failure, nothing changes here (raised)."""
        g = self.group
        t0 = time.perf_counter()
        old = self.tables.placement
        decision = None
        if g.is_coordinator:
            try:
                decision = {"placement": plc.after_change(old, g.view.members, gone).to_dict()}
            except plc.ShardLost as exc:
                decision = {"lost": str(exc)}
        with g.ec.guard():
            decision = g.ec.comm.bcast(decision, root=0)
        if "lost" in decision:
            raise JobError(f"{decision['lost']}; resume from the newest checkpoint: {self._newest()}")
        new = plc.Placement.from_dict(decision["placement"])
        moved = plc.moves(old, new, g.view.members)
        ok = True
        try:
            self.tables.migrate(new, moved)
        except ProcessFailure:
            ok = False
        if not g.ec.agree(ok):
            self.tables.placement = old
            raise ProcessFailure("shard move not completed by every member")
        if g.is_coordinator:
            n_moved = len(moved)
            g.events.write("shards", view=g.view.id, moved=n_moved, gone=list(gone),
                           owners={t: v for t, v in new.owner.items()},
                           move_ms=round(1e3 * (time.perf_counter() - t0), 3))

    def _newest(self):
        from mpirt.checkpoint import CheckpointDir

        if not self.cfg.checkpoint_dir:
            return "none (no --checkpoint-dir)"
        latest = CheckpointDir(self.cfg.checkpoint_dir).latest()
        return latest or f"none in {self.cfg.checkpoint_dir}"

    def _recover(self):
        self.tables.discard()
        before = list(self.group.view.members)
        while True:
            try:
                self.committer.recover(self.step)
                gone = [m for m in before if m not in self.group.view.members]
                self._rebalance(gone)
                return
            except ProcessFailure:
                continue

    # -- evaluation -------------------------------------------------------------------------------
    def _evaluate_due(self):
        out = self.committer.agree_phase(self.step, "eval", lambda: self.rmse("val"))
        self.evals.append(out)
        if self.group.is_coordinator:
            epoch = len(self.evals)
            print(f"epoch {epoch}  train loss {self.last_loss:.4f}  val rmse "
                  f"{out if out is None else round(out, 4)}  {self.group.size} ranks", flush=True)

    def rows(self, split):
        if split not in self._rows:
            self._rows[split] = self.dataset.split(split).all()
        return self._rows[split]

    def rmse(self, split):
        """RMSE on ``split``: fixed batches shared over the ranks, per-batch sums combined so that the
        figure is the same bits on any number of ranks. Collective."""
        rows = self.rows(split)
        n = len(rows)
        if n == 0:
            return None
        g = self.group
        nb = -(-n // EVAL_ROWS)
        k0, k1 = nb * g.rank // g.size, nb * (g.rank + 1) // g.size
        a, b = k0 * EVAL_ROWS, min(n, k1 * EVAL_ROWS)
        mine = rows.take(np.arange(a, b))
        looked = self.tables.lookup({"user": mine.user, "item": mine.item})
        sums = np.zeros(nb)
        with torch.no_grad():
            u = torch.from_numpy(looked["user"][2])[torch.from_numpy(looked["user"][1])]
            v = torch.from_numpy(looked["item"][2])[torch.from_numpy(looked["item"][1])]
            err = (self.dense(u, v) - torch.from_numpy(mine.rating)).double() ** 2
        for k in range(k0, k1):
            sums[k] = float(err[(k - k0) * EVAL_ROWS:min(b - a, (k - k0 + 1) * EVAL_ROWS)].sum())
        if g.size > 1:
            with g.ec.guard():
                g.ec.comm.Allreduce(g.ec.MPI.IN_PLACE, sums, op=g.ec.MPI.SUM)
        return float(np.sqrt(sums.sum() / n))

    def ranking(self, split="test", k=10, chunk=512):
        """recall@k and NDCG@k on ``split``: for each user with a relevant rating there (>= 4 stars, or
        every rating when the data set's top rating is below 4: implicit feedback), all items scored,
        those the user rated in training left out, the top ``k`` against the relevant ones. The item
        table stays sharded: each rank scores the items it owns and the ranks' top-k lists are merged
        (by score, then item id). Collective; the same figures on every rank."""
        rows = self.rows(split)
        g, tables = self.group, self.tables
        cut = min(4.0, float(self.dataset.attrs.get("rating_max", 5.0)))
        rel = rows.rating >= cut
        users = np.unique(rows.user[rel])
        if len(users) == 0:
            return None
        relevant = {}
        for u, i in zip(rows.user[rel], rows.item[rel]):
            relevant.setdefault(int(u), set()).add(int(i))
        me = g.member
        mine = sorted(s for (t, s) in tables.held if t == "item" and tables.placement.owner[t][s] == me)
        item_ids = np.concatenate([np.arange(*tables.shard_range("item", s)) for s in mine]) if mine else \
            np.zeros(0, np.int64)
        item_rows = np.concatenate([tables.held[("item", s)]["rows"] for s in mine]) if mine else \
            np.zeros((0, tables.tables["item"][1]), np.float32)
        local = np.full(tables.tables["item"][0], -1, np.int64)
        local[item_ids] = np.arange(len(item_ids))
        recall = ndcg = 0.0
        discount = 1.0 / np.log2(np.arange(2, k + 2))
        for a in range(0, len(users), chunk):
            us = users[a:a + chunk]
            looked = tables.lookup({"user": us})["user"][2]
            with torch.no_grad():
                scores = self.dense.score(torch.from_numpy(looked), torch.from_numpy(item_rows)).numpy()
            seen = np.isin(self.train.user, us)
            tu, ti = self.train.user[seen], self.train.item[seen]
            pos = np.searchsorted(us, tu)
            keep = local[ti] >= 0
            scores[pos[keep], local[ti[keep]]] = -np.inf
            kk = min(k, scores.shape[1])
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk else np.zeros((len(us), 0), np.int64)
            part = [(np.take_along_axis(scores, top, 1), item_ids[top])]
            merged = [x for p in alltoall_everyone(g.ec, part) for x in p]
            sc = np.concatenate([m[0] for m in merged], axis=1)
            it = np.concatenate([m[1] for m in merged], axis=1)
            order = np.lexsort((it, -sc), axis=1)[:, :k] if sc.size else np.zeros((len(us), 0), np.int64)
            best = np.take_along_axis(it, order, 1)
            for r, u in enumerate(us):
                want = relevant[int(u)]
                hits = np.array([int(i) in want for i in best[r]], dtype=float)
                recall += hits.sum() / len(want)
                ndcg += float((hits * discount[:len(hits)]).sum()) / float(discount[:min(k, len(want))].sum())
        return {"k": k, "users": int(len(users)), f"recall@{k}": recall / len(users), f"ndcg@{k}": ndcg / len(users)}

    # -- the end ----------------------------------------------------------------------------------
    def _finish(self):
        while True:
            try:
                test, ranks, full = self.committer.agree_phase(
                    self.step, "eval", lambda: (self.rmse("test"), self.ranking("test"), self.tables.gather_full()))
                break
            except ProcessFailure:
                self._recover()
        g = self.group
        if not g.is_coordinator:
            return None
        if self.cfg.checkpoint_dir:
            self._save(full)
        if test is not None:
            print(f"test rmse {test:.4f} on {self.dataset.split('test').n_rows} ratings", flush=True)
        if ranks is not None:
            k = ranks["k"]
            print(f"test recall@{k} {ranks[f'recall@{k}']:.4f}  ndcg@{k} {ranks[f'ndcg@{k}']:.4f} over "
                  f"{ranks['users']} users (their training items left out)", flush=True)
        out = {"steps": self.step, "views": g.view.id + 1, "ranks": g.size, "test_rmse": test, "test_ranking": ranks,
               "val_rmse": self.evals, "held_bytes": self.tables.held_bytes(), "spec": self.spec,
               "loop_s": self.loop_s,
               "events": g.events.read()}
        if self.cfg.report:
            self._report(out)
        return out

    def _report(self, out):
        import json

        from mpirt.atomic import atomic_path

        private_makedirs(self.cfg.report)
        with atomic_path(os.path.join(self.cfg.report, "report.json")) as tmp, open(tmp, "w") as f:
            json.dump(out, f, indent=1, default=str)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(range(1, len(self.evals) + 1), self.evals, "o-")
        ax.set(xlabel="epoch", ylabel="val RMSE", title=f"{self.spec['name']}: validation RMSE")
        with atomic_path(os.path.join(self.cfg.report, "rmse.png")) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)

    def _save(self, full):
        from mpirt.checkpoint import CheckpointDir

        params = {f"{t}": full[t]["rows"] for t in full}
        params.update({f"dense.{k}": v for k, v in self.dense.state_dict().items()})
        tables_state = {f"{t}.{k}": v for t in full for k, v in full[t].items() if k != "rows"}
        params.update({f"state.{k}": v for k, v in tables_state.items()})
        for i, st in self.opt.state_dict()["state"].items():  # the dense optimizer's (Adam's moments)
            params.update({f"denseopt.{i}.{k}": v.detach().numpy() if hasattr(v, "detach") else np.asarray(v)
                           for k, v in st.items()})
        CheckpointDir(self.cfg.checkpoint_dir, keep=self.cfg.keep, key=self.cfg.key).save(
            self.step, spec=self.spec, params=params, position={"step": self.step},
            world_size=self.group.size, meta={"table_step_count": self.tables.step_count,
                                              "optimizer": self.cfg.optimizer, "lr": self.cfg.lr,
                                              "global_batch": self.cfg.global_batch, "seed": self.cfg.seed,
                                              **(self.cfg.provenance or {}), "data_sha256": self.cfg.data_sha256,
                                              "evals": self.evals})

    def _resume(self):
        """``--resume``: every member cuts its shards from the newest checkpoint (any world size)."""
        if not (self.cfg.resume and self.cfg.checkpoint_dir):
            return False
        from mpirt.checkpoint import CheckpointDir

        ckpt = CheckpointDir(self.cfg.checkpoint_dir, key=self.cfg.key).load_latest()
        if ckpt is None:
            return False
        mine = {"spec": self.spec, "data_sha256": self.cfg.data_sha256, "optimizer": self.cfg.optimizer,
                "lr": self.cfg.lr, "global_batch": self.cfg.global_batch, "seed": self.cfg.seed}
        theirs = {"spec": ckpt.spec, **{k: ckpt.meta.get(k) for k in mine if k != "spec"}}
        differ = [k for k in mine if theirs[k] != mine[k]]
        if differ:
            raise UsageError(f"--resume: {ckpt.path} was made with another {', '.join(differ)} (the data set, "
                             f"model, optimizer, --lr, --global-batch and --seed must be those of the run)")
        p = ckpt.params
        full = {t: {"rows": p[t], **{k.split(".")[-1]: v for k, v in p.items() if k.startswith(f"state.{t}.")}}
                for t in self.table_spec}
        self.dense.load_state_dict({k[len("dense."):]: torch.from_numpy(np.array(v)) for k, v in p.items()
                                    if k.startswith("dense.")})
        state = {}
        for k, v in p.items():
            if k.startswith("denseopt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = torch.from_numpy(np.array(v))
        if state:
            self.opt.load_state_dict({"state": state, "param_groups": self.opt.state_dict()["param_groups"]})
        self.step = int(ckpt.position["step"])
        self.tables.step_count = int(ckpt.meta.get("table_step_count", self.step))
        self.tables.placement = plc.initial({t: s for t, (_, _, s) in self.table_spec.items()},
                                            self.group.view.members)
        self.tables.load_full(full)
        self.evals = list(ckpt.meta.get("evals") or [])[:self.step // max(self.schedule.steps_per_epoch, 1)]
        return True


def run_recsys(cfg, dataset, group):
    """Run on a started group; the summary on the final coordinator, else None (as run_training)."""
    trainer = RecTrainer(cfg, dataset, group)
    t0 = time.perf_counter()
    out = run_job(group, trainer.run, trainer.reducer.close)
    if out is not None:
        out["seconds"] = time.perf_counter() - t0
    return out


def spec_for(name, dataset, embed_dim=None, hidden=None, table_shards=None):
    """The spec of recommender model ``name`` for a ratings data set (the trainer adds ``mean_rating``)."""
    from mpirt.errors import UsageError
    from mpirt.recsys.model import DEFAULTS, MODELS

    if name not in MODELS:
        raise UsageError(f"{dataset.path} holds ratings: train it with --model {' or '.join(MODELS)}")
    spec = {"name": name, "n_users": dataset.n_users, "n_items": dataset.n_items, **DEFAULTS[name]}
    if embed_dim:
        spec["embed_dim"] = int(embed_dim)
    if hidden and name == "twotower":
        spec["hidden"] = int(hidden)
    spec["table_shards"] = int(table_shards or 16)
    return spec

