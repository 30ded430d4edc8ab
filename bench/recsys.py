"""The recommender's tables sharded over the ranks, against replicated tables, and shard reassignment
after a kill against reloading a checkpoint.

    python -m bench recsys [--ranks 1 2 4] [--users 200000] [--items 50000] [--ratings 400000] [--steps 120]

Matrix factorisation (dim 32 + bias, SGD) on synthetic MovieLens-like ratings (:mod:`mpirt.data.synth_ratings`),
global batch 1024, each configuration a whole job under ``mpirt launch``:

- *sharded*: ``mpirt train --model mf`` (tables sharded with buddy replicas; mpirt.recsys);
- *replicated, dense allreduce*: every rank holds both tables; their full gradients are summed by
  mpirt's segmented allreduce (what DDP does with a dense embedding);
- *replicated, sparse exchange*: every rank holds both tables; the touched rows travel as (ids, rows)
  (:class:`mpirt.train.sparse.SparseExchange`, the data plane of fastText).

The replicated loops are bare mpi4py loops (no Agree, no fault tolerance): the baselines. Figures:
samples/s over the steps after the first 10, and the table bytes a rank holds (rows and replicas;
SGD keeps no state). Then, on the largest world size: the milliseconds the coordinator's reassignment
took after a kill (the ``shards`` event), against loading the newest checkpoint and cutting the shards.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import mpirt_launch, run_worker, table, write_results

WORKER = r'''
import json, sys, time
import numpy as np, torch
cfg = json.loads(sys.argv[1])
from mpirt.comm.elastic import ElasticComm
from mpirt.data.reader import open_dataset
from mpirt.train.allreduce import GradAllreduce
from mpirt.train.order import Orders, Schedule
from mpirt.train.sparse import SparseExchange
ec = ElasticComm()
torch.set_num_threads(1)
ds = open_dataset(cfg["data"]); tr = ds.split("train").all()
d = cfg["dim"] + 1
sparse = cfg["mode"] == "sparse"
U = torch.nn.Embedding(ds.n_users, d, sparse=sparse); V = torch.nn.Embedding(ds.n_items, d, sparse=sparse)
mu = torch.nn.Parameter(torch.tensor([3.5]))
params = [mu] if sparse else [U.weight, V.weight, mu]
red = GradAllreduce(ec, params, n_stats=1)
sx = SparseExchange(ec, [U.weight, V.weight], mode="allgather") if sparse else None
opt = torch.optim.SGD([U.weight, V.weight, mu], lr=cfg["lr"])
sch = Schedule(len(tr), cfg["batch"], 1000, 0); orders = Orders(len(tr), 0)
times = []
for step in range(cfg["steps"]):
    t0 = time.perf_counter()
    e, a, b = sch.locate(step); lo, hi = sch.slice_of(step, ec.rank, ec.size)
    bt = tr.take(np.sort(orders.rows(e, lo, hi)))
    opt.zero_grad(set_to_none=False)
    red.begin()
    u, v = U(torch.from_numpy(bt.user)), V(torch.from_numpy(bt.item))
    pred = (u[:, :-1] * v[:, :-1]).sum(1) + u[:, -1] + v[:, -1] + mu
    loss = ((pred - torch.from_numpy(bt.rating)) ** 2).sum()
    loss.backward()
    red.allreduce(np.array([float(len(bt))]))
    if sparse:
        sx.exchange(1.0 / (b - a)); sx.apply(opt)
        U.weight.grad = V.weight.grad = None
    opt.step()
    times.append(time.perf_counter() - t0)
held = (U.weight.numel() + V.weight.numel()) * 4
if ec.rank == 0:
    rate = cfg["batch"] * (len(times) - 10) / sum(times[10:])
    print("RESULT " + json.dumps({"samples_per_s": rate, "held_bytes": held}), flush=True)
'''


def sharded(data, n, args, work, faults=()):
    run = tempfile.mkdtemp(dir=work, prefix=f"s{n}-")
    cmd = mpirt_launch(n) + [sys.executable, "-m", "mpirt", "train", "--data", data, "--model", "mf",
                             "--optimizer", "sgd", "--lr", "0.05", "--embed-dim", str(args.dim),
                             "--global-batch", "1024", "--epochs", "1", "--table-shards", str(4 * max(args.ranks)),
                             "--no-progress", "--events", os.path.join(run, "events.jsonl"),
                             "--checkpoint-dir", os.path.join(run, "ckpt"), "--report", os.path.join(run, "rep")]
    for f in faults:
        cmd += ["--inject-fault", f]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"recsys bench: {' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    with open(os.path.join(run, "rep", "report.json")) as f:
        rep = json.load(f)
    return {"wall_s": wall, "loop_s": rep["loop_s"], "steps": rep["steps"], "held_bytes": rep["held_bytes"], "run": run,
            "events": [e for e in rep["events"] if e["event"] in ("shards", "view")]}


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench recsys")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--ratings", type=int, default=400_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=120, help="steps of the replicated loops")
    args = p.parse_args(argv)
    from mpirt.data.synth_ratings import write_ratings

    results = {"config": vars(args), "rows": []}
    with tempfile.TemporaryDirectory() as work:
        csv, data = os.path.join(work, "r.csv"), os.path.join(work, "r.h5")
        write_ratings(csv, args.users, args.items, args.ratings)
        subprocess.run([sys.executable, "-m", "mpirt", "prepare", "ratings", csv, data], check=True,
                       capture_output=True, timeout=1200)
        for n in args.ranks:
            s = sharded(data, n, args, work)
            row = {"ranks": n, "sharded_samples_per_s": 1024 * s["steps"] / s["loop_s"],
                   "sharded_held_bytes": s["held_bytes"]}
            for mode in ("dense", "sparse"):
                r = run_worker(mpirt_launch(n), WORKER, {"data": data, "dim": args.dim, "batch": 1024,
                                                         "steps": args.steps, "lr": 0.05, "mode": mode},
                               what=f"recsys {mode}")
                row[f"{mode}_samples_per_s"], row[f"{mode}_held_bytes"] = r["samples_per_s"], r["held_bytes"]
            results["rows"].append(row)
        n = max(args.ranks)
        killed = sharded(data, n, args, work, faults=["kill:member=1:step=10"])
        move_ms = [e["move_ms"] for e in killed["events"] if e["event"] == "shards"]
        t0 = time.perf_counter()
        from mpirt.checkpoint import CheckpointDir

        ckpt = CheckpointDir(os.path.join(killed["run"], "ckpt")).load_latest()
        _ = {k: np.array(v) for k, v in ckpt.params.items()}
        results["recovery"] = {"ranks": n, "move_ms": move_ms, "checkpoint_load_ms": 1e3 * (time.perf_counter() - t0)}
    print(tables(results))
    print("\nwrote", write_results("recsys", results))
    return 0


def tables(r):
    rows = []
    for x in r["rows"]:
        rows.append([x["ranks"], f"{x['sharded_samples_per_s']:,.0f}", f"{x['dense_samples_per_s']:,.0f}",
                     f"{x['sparse_samples_per_s']:,.0f}", f"{x['sharded_held_bytes'] / 2**20:.1f}",
                     f"{x['dense_held_bytes'] / 2**20:.1f}", f"{x['sharded_held_bytes'] / x['dense_held_bytes']:.2f}x"])
    c, rec = r["config"], r["recovery"]
    return table(rows, ["ranks", "sharded samples/s", "replicated + dense allreduce samples/s",
                        "replicated + sparse exchange samples/s", "sharded MiB a rank", "replicated MiB a rank",
                        "sharded / replicated memory"]) + (
        f"\n\nMF, {c['users']:,} users x {c['items']:,} items, dim {c['dim']} + bias, {c['ratings']:,} ratings, "
        f"global batch 1024, SGD. The sharded figure is the coordinator's time in steps over the run's steps "
        f"(evaluation and start-up left out); the replicated loops are bare (steps 10.. timed).\n"
        f"After a kill on {rec['ranks']} ranks the coordinator's reassignment took {rec['move_ms']} ms; loading "
        f"the checkpoint instead takes {rec['checkpoint_load_ms']:.0f} ms (read and verify, before any resharding).")
