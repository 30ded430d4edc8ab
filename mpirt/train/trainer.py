"""Elastic synchronous SGD: the step protocol of DESIGN.md.

Each global step ``s``:

1. faults due at ``s`` strike (tests); a member that got SIGTERM marks itself leaving;
2. this rank's slice of step ``s``'s samples (:mod:`mpirt.train.order`) -> forward/backward
   (the loss of :mod:`mpirt.kernels`, summed, not averaged);
3. one fused allreduce of the gradients and the stats (samples, loss, correct, leaving, joiners);
4. ``Agree(no error)``: the fault-tolerant, uniform decision;
5. all apply ``grad_sum / samples_sum`` and step ``s`` is committed, or none does and the view is
   recovered (Revoke, Shrink) and ``s`` is redone on the survivors, with the same samples.

With ``--exact``, step 2 computes this rank's fixed micro-batches one by one and step 3 sums them in
int64 fixed point (:mod:`mpirt.train.exact`): the same bits on any number of ranks. Without it, a
different partition rounds the float sums differently (README: what each mode guarantees).

Parameters and optimizer state are replicated, so losing any rank (the coordinator too) loses
only the step in flight: no disk checkpoint is needed to recover. Joiners are merged in after a
committed step and get the coordinator's parameters, optimizer state and step with the view.
"""

import dataclasses
import functools
import os
import time

import numpy as np
import torch

from mpirt.checkpoint import BEST
from mpirt.cluster.commit import Slots, StepCommitter
from mpirt.cluster.group import ElasticGroup, run_job
from mpirt.comm import faults as faultlib
from mpirt.comm import lifeline, status
from mpirt.errors import JobError, MpirtError, NotFinite, Preempted, ProcessFailure, UsageError
from mpirt.kernels.torch_loss import cross_entropy
from mpirt.log import get_logger
from mpirt.train import hugepages, lrfind, models, optim, rundir
from mpirt.train.allreduce import GradAllreduce
from mpirt.train.augment import augment
from mpirt.train.audit import Audit
from mpirt.train.evaluate import evaluate
from mpirt.train.exact import ExactReducer, micro_batches
from mpirt.train.order import Orders, Schedule
from mpirt.train.schedule import clip_global_norm, lr_at, set_lr, warmup_steps
from mpirt.train.source import RowSource
from mpirt.train.sparse import SparseExchange, sparse_params

log = get_logger("mpirt.train")

# The stats reduced with the gradients, after which the protocol's own (mpirt.cluster.commit).
# NONFINITE counts ranks whose gradient has a NaN or inf: every member sees the same sums, so every
# member stops at the same step.
SLOTS = Slots("samples", "loss", "correct")
SAMPLES, LOSS, CORRECT, NONFINITE = SLOTS.SAMPLES, SLOTS.LOSS, SLOTS.CORRECT, SLOTS.NONFINITE
N_STATS = len(SLOTS)


def all_finite(tensors):
    """Whether every element of every tensor is finite, without ``isfinite(t).all()``'s bool tensor
    (75 ms on 20M floats, a third of a 20M-parameter MLP's step). Large tensors: aminmax, which
    propagates NaN and shows an inf (2 ms); small ones: their max-abs in one foreach call, as a
    model's many small tensors cost a launch each otherwise. Neither sums, so nothing overflows."""
    small = [t.detach() for t in tensors if 0 < t.numel() < 1 << 16]
    if small and not bool(torch.isfinite(torch.stack(torch._foreach_norm(small, float("inf")))).all()):
        return False
    for t in tensors:
        if t.numel() >= 1 << 16:
            lo, hi = torch.aminmax(t.detach().reshape(-1))
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                return False
    return True


class Trainer:
    """One process's part in ``mpirt train`` (see :class:`mpirt.train.config.TrainConfig`)."""

    def __init__(self, cfg, dataset, group):
        self.cfg = cfg
        self.dataset = dataset
        self.train = RowSource(dataset.split("train"))
        self.schedule = Schedule(self.train.n_rows, cfg.global_batch, cfg.epochs, cfg.seed)
        self.orders = Orders(self.train.n_rows, cfg.seed)
        self.group = group
        group.stop_below_min = True  # see _recover: below --min-ranks, stop with a checkpoint
        self.device = torch.device(cfg.device)
        self.spec = cfg.spec
        self.step = 0
        self.reporter = None
        self.ckpt = None
        self.audit = None
        self.saved = None  # (step, path) of the last checkpoint this process wrote
        self.ident = rundir.identity(cfg, cfg.data_sha256, self.schedule.total_steps)
        self.warmup = warmup_steps(cfg.warmup, self.schedule.total_steps)
        self.epoch_stats = {"loss": 0.0, "samples": 0, "t0": time.perf_counter()}
        # Evaluations due before the next step, done by every member (see _phase): "val" after each
        # epoch; then "test" once, after the last step.
        self.pending = []
        self.tested = None
        self.epoch_done = None  # the train figures of the epoch whose "val" is pending
        self.epochs = []  # the epochs reported so far
        self.eval_sources = {}
        self.curve = []  # mpirt lr-find: (step, lr, mean loss) of every committed step, on every member
        # --early-stop / --keep-best: the best epoch by --monitor so far, and epochs since; kept by
        # every member (the val figures are the same on all), carried to joiners and checkpoints.
        self.early = {"best": None, "best_epoch": None, "best_step": None, "since": 0, "stopped": None,
                      "judged": None}

    # -- state ---------------------------------------------------------------
    def _build(self):
        torch.manual_seed(self.cfg.seed)
        self.model = models.build(self.spec).to(self.device)
        params = list(self.model.parameters())
        self.opt = optim.build(self.cfg.optimizer, params, lr=self.cfg.lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)
        self.opt.zero_grad(set_to_none=False)
        rows = []
        if self.cfg.embedding_grad == "sparse":
            for m in self.model.modules():
                if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                    m.sparse = True  # a module flag, not state: checkpoints and classify are unchanged
            rows = sparse_params(self.model)
            for p in rows:  # their scattered rows are updated every step: fewer TLB misses
                p.data = hugepages.rehome(p.data)
        exact = self.cfg.exact
        self.sparse = SparseExchange(self.group.ec, rows, mode=self.cfg.sparse_exchange) if rows and not exact else None
        dense = [p for p in params if not any(p is q for q in rows)]
        if exact:
            # One intra-op thread: a micro-batch's gradient must be the same bits on every rank.
            torch.set_num_threads(1)
            self.reducer = ExactReducer(self.group.ec, dense, n_stats=N_STATS, slots=SLOTS.job_indices(),
                                        nonfinite=NONFINITE, sparse=rows)
        else:
            self.reducer = GradAllreduce(self.group.ec, dense, n_stats=N_STATS, compress=self.cfg.compress,
                                         bucket_bytes=self.cfg.bucket_bytes, overlap=self.cfg.overlap)
        self.committer = StepCommitter(self.group, self.reducer, SLOTS, sparse=self.sparse)

    def state(self):
        """What a joiner needs (and what a checkpoint holds): the replicated training state."""
        return {"step": self.step, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "pending": list(self.pending), "epoch_done": self.epoch_done, "epochs": self.epochs,
                "early": dict(self.early), "curve": list(self.curve),
                "epoch_stats": {k: v for k, v in self.epoch_stats.items() if k != "t0"}}

    def load_state(self, state):
        self.step = int(state["step"])
        # A checkpoint has none of these: its epoch's figures were reported by the run that saved it.
        self.pending = list(state.get("pending", ()))
        self.epoch_done = state.get("epoch_done")
        self.epochs = list(state.get("epochs", ()))
        self.epoch_stats.update(state.get("epoch_stats", {}))
        self.early.update(state.get("early") or {})
        self.curve = [tuple(c) for c in state.get("curve", ())]
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])

    # -- start ---------------------------------------------------------------
    def start(self):
        group = self.group
        if not group.joined and group.size < self.cfg.min_ranks:  # the first point the world size is known
            # All refuse together: a rank still busy when the first exits would get prte's SIGTERM,
            # which the group traps for graceful leaves, and linger after the launcher returned.
            group.ec.comm.Barrier()
            raise UsageError(f"--min-ranks {self.cfg.min_ranks}: the job started with only {group.size} rank(s)"
                             if group.is_coordinator else "")
        self._build()
        if group.joined:
            self.load_state(group.sync_view(joiner=True))
        else:
            state = None
            if group.is_coordinator:
                status.started()
                try:
                    state = self._resume_state()
                except MpirtError as exc:  # every rank stops with the coordinator's reason
                    state = {"error": exc}
            state = group.sync_view(payload=state)
            if state is not None and "error" in state:  # one line, the coordinator's: the others stop quietly
                raise state["error"] if group.is_coordinator else type(state["error"])("")
            if state is not None:
                self.load_state(state)
                self._judge_resumed_epoch()
        self._open_outputs()
        self.epoch_stats["t0"] = time.perf_counter()

    def _judge_resumed_epoch(self):
        """A checkpoint saved at the end of an epoch comes before that epoch's validation: with
        --early-stop or --keep-best, validate it now, as the run that saved it went on to."""
        cfg, per = self.cfg, self.schedule.steps_per_epoch
        epoch = self.step // max(per, 1) - 1
        if (cfg.early_stop or cfg.keep_best) and self.step and self.step % per == 0 and not self.pending \
                and self.early["judged"] != epoch and self.early["stopped"] is None:
            self.pending.append("val")
            self.epoch_done = {"epoch": epoch, "resumed": True}

    def _resume_state(self):
        """The newest checkpoint's state when resuming (read by the coordinator only), else None."""
        cfg = self.cfg
        if not cfg.checkpoint_dir:
            return None
        self.ckpt = self._run_dir()
        self.ckpt.claim(cfg.resume)  # locked, and ours: before anything is read from it
        if not cfg.resume:
            return None
        ckpt = self.ckpt.load_latest()
        if ckpt is None:
            log.info("--resume: no checkpoint in %s yet; starting at step 0", cfg.checkpoint_dir)
            return None
        rundir.check_resume(ckpt, self.ident)
        if ckpt.spec != self.spec:
            raise JobError(f"{ckpt.path}: model spec {ckpt.spec} does not match this run's {self.spec}")
        log.info("resuming from %s (step %d, saved by %d ranks)", ckpt.path, ckpt.position["step"],
                 ckpt.world_size)
        model = {k: torch.from_numpy(np.asarray(v)) for k, v in ckpt.params.items()}
        return {"step": int(ckpt.position["step"]), "model": model, "optimizer": ckpt.optimizer_state_dict(),
                "early": ckpt.position.get("early")}

    def _open_outputs(self):
        """Coordinator-only outputs; opened again by whoever coordinates after a failure."""
        if not self.group.is_coordinator:
            return
        cfg = self.cfg
        if self.audit is None and cfg.audit:
            self.audit = Audit(cfg.audit, self.schedule)
            self.audit.truncate(self.step)  # steps after a resumed checkpoint were undone
        if self.ckpt is None and cfg.checkpoint_dir:  # a coordinator taking over after a failure
            self.ckpt = self._run_dir()
            # The coordinator before may still hold the lock (frozen, cut off: fenced, never writes).
            self.ckpt.take_over(self.group.gone)
        if self.reporter is None:
            from mpirt.train.report import Reporter

            self.reporter = Reporter(cfg.report, class_names=self.dataset.class_names,
                                     total_steps=self.schedule.total_steps, progress=cfg.progress)
            for rec in self.epochs:  # a coordinator taking over: the epochs reported before it
                self.reporter.epoch(**rec, echo=False)

    # -- the loop ------------------------------------------------------------
    def run(self):
        """Train to the end; return the summary on the final coordinator, None elsewhere."""
        self.start()
        while (phase := self._phase()) is not None:
            try:
                if phase == "step":
                    self._attempt()
                    self._after_commit()
                else:
                    self._evaluate_phase(phase)
            except ProcessFailure as exc:
                log.info("%s at step %d failed (%s): recovering", phase, self.step, exc)
                self._recover()
        return self._finish()

    def _phase(self):
        """What every member does next: "step", "val" or "test" (an evaluation), or None (done)."""
        sweep = self.cfg.sweep
        if sweep:  # lr-find: steps only, up to --steps or the loss's divergence (the same everywhere)
            return "step" if self.step < sweep["steps"] and not lrfind.diverged(self.curve) else None
        if self.pending:
            return self.pending[0]
        if self.step < self.schedule.total_steps and self.early["stopped"] is None:
            return "step"
        return "test" if self.tested is None else None

    def _attempt(self):
        """Try step ``self.step``: returns once every member agreed to commit it, else raises
        ProcessFailure (mpirt.cluster.commit)."""
        stats = self.committer.begin(self.step)
        stats += self._compute(self.step)
        self.totals = self.committer.commit(self.step, stats)

    def _compute(self, step):
        if self.cfg.exact:
            return self._compute_exact(step)
        epoch, _, _ = self.schedule.locate(step)
        a, b = self.schedule.slice_of(step, self.group.rank, self.group.size)
        stats = np.zeros(N_STATS)
        self.opt.zero_grad(set_to_none=False)
        for p in self.sparse.params if self.sparse else ():
            p.grad = None  # a sparse gradient is replaced, not accumulated into
        self.reducer.begin()  # buckets go out as backward completes them (mpirt.train.overlap)
        if b > a:
            self.model.train()
            stats[SAMPLES], stats[LOSS], stats[CORRECT] = self._backward(epoch, a, b)
            stats[NONFINITE] = 0.0 if all_finite([p.grad._values() if p.grad.is_sparse else p.grad
                                                  for p in self.model.parameters() if p.grad is not None]) else 1.0
        return stats

    def _compute_exact(self, step):
        """``--exact``: this rank's whole micro-batches, each backward on its own (mpirt.train.exact)."""
        epoch, start, stop = self.schedule.locate(step)
        k, mine = micro_batches(start, stop, self.cfg.micro_batch, self.group.rank, self.group.size)
        self.reducer.begin(k)
        self.model.train()
        for p in self.reducer.sparse:
            p.grad = None  # a sparse gradient is replaced, not accumulated into (add() takes it)
        for j, a, b in mine:
            self.opt.zero_grad(set_to_none=False)
            self.reducer.add(j, *self._backward(epoch, a, b))
        return np.zeros(N_STATS)

    def _backward(self, epoch, a, b):
        """Forward and backward of positions ``[a, b)`` of ``epoch``'s order, the loss summed (not
        averaged); returns (rows, loss, correct)."""
        batch = self.train.get(self.orders.rows(epoch, a, b))
        if self.cfg.augment:
            batch = dataclasses.replace(batch, X=augment(batch.X, self.cfg.seed, epoch, batch.row_index))
        logits = self.model(*models.inputs(self.spec["name"], batch, self.device))
        y = torch.from_numpy(batch.y).to(self.device)
        loss = cross_entropy(logits, y, reduction="sum")
        loss.backward()
        return len(batch), float(loss.detach()), float((logits.detach().argmax(1) == y).sum())

    def _after_commit(self):
        totals, step, group = self.totals, self.step, self.group
        if totals[NONFINITE] or not np.isfinite(totals[LOSS]):
            self._stop_non_finite(step, totals)
        if self.cfg.clip_norm:  # the reduced gradient: the same on every member, so clipped alike
            rows = self.sparse.merged if self.sparse else self.reducer.merged if self.cfg.exact else []
            clip_global_norm(self.reducer.params, rows, self.cfg.clip_norm)
        set_lr(self.opt, self.lr_at(step))
        self.opt.step()  # gradients already hold sum / total samples
        if self.sparse:
            self.sparse.apply(self.opt)  # the embedding rows this step touched (mpirt.train.sparse)
        elif self.cfg.exact:
            self.reducer.apply_sparse(self.opt)
        self.step += 1
        # Every member keeps the epoch's figures (the sums are the same everywhere), so whoever
        # coordinates when the epoch's evaluation ends can report it.
        self.epoch_stats["loss"] += totals[LOSS]
        self.epoch_stats["samples"] += int(totals[SAMPLES])
        if self.cfg.sweep:
            self.curve.append((step, self.lr_at(step), float(totals[LOSS] / max(totals[SAMPLES], 1.0))))
        if self.step % self.schedule.steps_per_epoch == 0:
            s = self.epoch_stats
            self.epoch_done = {"epoch": self.schedule.locate(step)[0], "seconds": time.perf_counter() - s["t0"],
                               "train_loss": float(s["loss"] / max(s["samples"], 1)), "samples": s["samples"]}
            self.epoch_stats = {"loss": 0.0, "samples": 0, "t0": time.perf_counter()}
            self.pending.append("val")  # before joiners are merged: they receive it with the state
        if group.is_coordinator:
            self._report_step(step, totals)
        if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
            # A save fault strikes in the coordinator's writer (save_checkpoint); every member marks
            # it, so that a coordinator taking over does not strike it again at its next save.
            self.committer.mark_fired(self.step, faultlib.SELF, "save")
        if self.step < self.schedule.total_steps:  # at the end: just finish
            why = self.committer.stop_reason(totals)
            if why:
                self._stop_preempted(why)
        if self.committer.change_members(step, totals, state=self.state,
                                         before_leave=self.ckpt.wait if self.ckpt else None):
            self._open_outputs()

    def lr_at(self, step):
        """The learning rate of ``step`` (mpirt.train.schedule): a function of the step alone."""
        cfg = self.cfg
        if cfg.sweep:
            return lrfind.sweep_lr(step, cfg.sweep["min"], cfg.sweep["max"], cfg.sweep["steps"])
        return lr_at(step, base=cfg.lr, schedule=cfg.lr_schedule, warmup=self.warmup,
                     total_steps=self.schedule.total_steps)

    def _stop_non_finite(self, step, totals):
        """Every member saw the same sums: all stop before applying step ``step``, and the last
        checkpoint written stays the newest (a NaN model is never saved)."""
        if not self.group.is_coordinator:
            raise NotFinite("")  # the same stop everywhere; the coordinator says it once
        what = "the loss" if not np.isfinite(totals[LOSS]) else "a gradient"
        if self.ckpt:
            self.ckpt.wait()  # the save in flight is the last good one
        mine = self.ckpt.paths() if self.ckpt else []
        keep = f"the last good checkpoint is {mine[-1]}" if mine else "nothing was saved"
        raise NotFinite(f"step {step}: {what} is not finite (NaN or inf), so training stopped before applying "
                        f"it; {keep} (try a smaller --lr)")

    def _stop_preempted(self, why):
        """Every member saw the request in the same step's stats: save, then all stop (exit 75)."""
        group = self.group
        if not group.is_coordinator:
            raise Preempted("")
        path = None
        if self.ckpt:  # unless _report_step just saved this very step
            path = self.saved[1] if self.saved and self.saved[0] == self.step else self.save_checkpoint()
            self.ckpt.wait()  # exit 75 (Slurm requeues) only once it is on disk under its name
        group.events.write("preempted", view=group.view.id, members=group.view.members, step=self.step,
                           checkpoint=path and os.path.abspath(path))
        if self.reporter:
            self.reporter.event(f"stopped {why} after step {self.step}")
        where = f"checkpoint {path} written; run again with --resume to go on" if path else (
            "no --checkpoint-dir, so nothing was saved")
        raise Preempted(f"stopped {why} after step {self.step} of {self.schedule.total_steps}: {where}")

    def _report_step(self, step, totals):
        epoch, a, b = self.schedule.locate(step)
        if self.audit:
            self.audit.write(step, view=self.group.view.id, members=self.group.view.members)
        n = int(totals[SAMPLES])
        self.reporter.step(epoch, step, totals[LOSS] / max(n, 1), n, self.group.size)
        if self.ckpt and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
            self.save_checkpoint()

    def _recover(self):
        group = self.group
        self.committer.recover(self.step)  # the committed step, from whoever is rank 0 after the shrink
        self._open_outputs()
        if group.size < self.cfg.min_ranks:
            # Too few to go on, but every survivor holds the committed step's whole model: stop as on
            # a stop request, checkpoint written, exit 75, so `mpirt launch --requeue` requeues the
            # Slurm job and the next run resumes where this one stopped (a node lost under Slurm).
            self._stop_preempted(f"as only {group.size} rank(s) remain, fewer than --min-ranks {self.cfg.min_ranks},")
        if self.reporter:
            v = group.view
            self.reporter.event(f"view {v.id}: {group.size} ranks "
                                f"(failed {v.failed}, left {v.departed}), redoing step {self.step}")

    # -- epochs, checkpoints, the end ----------------------------------------
    def _evaluate_phase(self, name):
        """Evaluate split ``name`` on every member; agreed like a step, redone after a failure."""
        source = self.eval_sources.get(name)
        if source is None:
            source = self.eval_sources[name] = RowSource(self.dataset.split(name))
        out = self.committer.agree_phase(self.step, "eval", lambda: evaluate(
            self.model, self.spec["name"], source, self.group.ec, self.device, with_predictions=name == "test"))
        if name == "test":
            self.tested = out or {}
            return
        self.pending.pop(0)
        done, self.epoch_done = self.epoch_done, None
        if done is None:
            return
        if done.get("resumed"):  # its figures were reported by the run that saved it: judge it only
            if out:
                self._judge_epoch(done["epoch"], out)
            return
        # Kept by every member: a coordinator taking over reports the epochs before it too.
        self.epochs.append(dict(epoch=done["epoch"], train_loss=done["train_loss"],
                                samples_per_s=done["samples"] / max(done["seconds"], 1e-9),
                                val_loss=out and out["loss"], val_accuracy=out and out["accuracy"],
                                ranks=self.group.size, seconds=done["seconds"]))
        if self.group.is_coordinator:
            self.reporter.epoch(**self.epochs[-1])
        if out and (self.cfg.early_stop or self.cfg.keep_best):
            self._judge_epoch(done["epoch"], out)

    def _judge_epoch(self, epoch, out):
        """--keep-best and --early-stop after epoch ``epoch``'s validation (the same on every member)."""
        cfg, e = self.cfg, self.early
        e["judged"] = epoch
        value = float(out["loss"] if cfg.monitor == "val_loss" else out["accuracy"])
        better = e["best"] is None or (value < e["best"] if cfg.monitor == "val_loss" else value > e["best"])
        if better:
            e.update(best=value, best_epoch=epoch, best_step=self.step, since=0)
            if cfg.keep_best and self.group.is_coordinator and self.ckpt:
                self.save_checkpoint(best=True)
            return
        e["since"] += 1
        if cfg.early_stop and e["since"] >= cfg.early_stop and self.step < self.schedule.total_steps:
            e["stopped"] = epoch
            if self.group.is_coordinator:
                self.reporter.event(f"early stop after epoch {epoch + 1}: {cfg.monitor} has not improved for "
                                    f"{e['since']} epoch(s); the best was epoch {e['best_epoch'] + 1} "
                                    f"({cfg.monitor} {e['best']:.4f})")

    def _run_dir(self):
        cfg = self.cfg
        return rundir.RunDir(cfg.checkpoint_dir, keep=cfg.keep, key=cfg.key, ident=self.ident, verify=cfg.verify,
                             background=not cfg.checkpoint_sync)

    def save_checkpoint(self, best=False):
        """Save the replicated state (coordinator only; it loads on any number of ranks). In the
        background unless --checkpoint-sync: this returns once the state is copied to host memory,
        and ``self.ckpt.wait()`` waits until it is on disk. ``best``: as ``best.h5`` (--keep-best)."""
        cfg, group = self.cfg, self.group
        lifeline.check_fence()  # a coordinator the others may have dropped must not write one
        due = group.faults.due(member=group.member, is_coordinator=True, step=self.step, phase="save")
        epoch = self.step // max(self.schedule.steps_per_epoch, 1)
        path = self.ckpt.save(
            self.step, before_rename=functools.partial(self._before_rename, [] if best else due, self.step),
            name=BEST if best else None,
            spec=self.spec, params=self.model.state_dict(), optimizer=self.opt.state_dict(),
            position={"step": self.step, "epoch": epoch, "seed": cfg.seed, "global_batch": cfg.global_batch,
                      "early": dict(self.early)},
            rng={"torch": torch.get_rng_state().numpy()}, world_size=self.group.size,
            meta={"data": os.path.abspath(self.dataset.path), "class_names": self.dataset.class_names,
                  **(cfg.provenance or {}), "data_sha256": cfg.data_sha256, "features": cfg.features,
                  "optimizer": cfg.optimizer, "lr": cfg.lr, "epochs": cfg.epochs, "time": time.time()})
        log.info("checkpoint %s", path)
        if not best:
            self.saved = (self.step, path)
        return path

    def _before_rename(self, due, step):
        # In the writer, once the file is whole: the faults of phase=save, then the fence again (a
        # coordinator frozen while its save was in flight may have been dropped since the snapshot).
        self.group.fire(due, step=step, phase="save")
        lifeline.check_fence()

    def _finish(self):
        group = self.group
        if not group.is_coordinator:
            return None
        if self.cfg.sweep:
            sw = self.cfg.sweep
            out = lrfind.write(sw["out"], self.curve, lo=sw["min"], hi=sw["max"])
            group.events.write("finish", view=group.view.id, members=group.view.members, step=self.step)
            return {"lr_find": {k: v for k, v in out.items() if k != "curve"}, "steps": self.step,
                    "views": group.view.id + 1, "ranks": group.size, "curve": out["curve"]}
        if self.ckpt and not (self.saved and self.saved[0] == self.step):  # unless just saved
            self.save_checkpoint()
        if self.ckpt:
            self.ckpt.wait()  # exit 0 says the last checkpoint is on disk
            log.info("checkpoints: %s", self.ckpt.stats())
        test = self.tested or None
        if test:
            test["y_true"] = self.eval_sources["test"].all().y
        extra = {"events": group.events.read(), "views": group.view.id + 1, "steps": self.step,
                 "early_stop": {**self.early, "monitor": self.cfg.monitor} if self.cfg.early_stop or self.cfg.keep_best
                 else None,
                 "lr": [self.lr_at(s) for s in range(self.schedule.total_steps)],
                 "ranks_at_end": group.size, "spec": self.spec, "wire": self._wire(),
                 "intra_op_threads": torch.get_num_threads(),  # torch's threads a rank (bench scaling)
                 "checkpoints": self.ckpt.stats() if self.ckpt else None, "provenance": self.cfg.provenance}
        images = None
        if test and self.cfg.report and len(self.dataset.feature_shape or ()) >= 2:
            rows = self.eval_sources["test"].all()
            images = (rows.X, self.dataset.row_sources(rows.row_index))
        report = self.reporter.final(y_true=test and test["y_true"], y_pred=test and test["y_pred"],
                                     test_loss=test and test["loss"], extra=extra, test_images=images)
        group.events.write("finish", view=group.view.id, members=group.view.members, step=self.step)
        return {"steps": self.step, "views": group.view.id + 1, "ranks": group.size,
                "test_accuracy": test and test["accuracy"], "report": report,
                "params": {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()},
                "best": dict(self.early, monitor=self.cfg.monitor) if self.early["best_epoch"] is not None else None}

    def _wire(self):
        """Bytes each step puts through the collectives (this process's steps), for the report."""
        out = {"dense_bytes_per_step": self.reducer.wire_bytes()}
        if self.sparse:
            c = self.sparse.counters
            out.update(sparse_bytes_per_step=c["bytes"] / max(c["steps"], 1),
                       sparse_rows_per_step=c["rows"] / max(c["steps"], 1),
                       sparse_exchanges={"allgather": c["allgather"], "allreduce": c["allreduce"]})
        return out

    def release(self):
        """The job's own files and threads; the group ends after (mpirt.cluster.group.run_job)."""
        if self.reporter:
            self.reporter.close()
        if self.audit:
            self.audit.close()
        if self.ckpt:
            self.ckpt.close()
        self.reducer.close() if hasattr(self, "reducer") else None


def start_group(events=None, faults=None, min_ranks=1, spawn_argv=()):
    """Join the MPI job first: a spawned joiner merges before anything else can fail, so its
    parents, waiting in Merge, see it either merged or failed, never half-started."""
    return ElasticGroup(events_path=events, faults=faults, min_ranks=min_ranks,
                        spawn_argv=spawn_argv).start(stoppable=True)


def run_training(cfg, dataset, group):
    """Run a training job on a started group; the summary on the final coordinator, else None."""
    trainer = Trainer(cfg, dataset, group)
    return run_job(group, trainer.run, trainer.release)
