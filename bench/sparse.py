"""The sparse-row exchange against the dense allreduce of the same table: where they cross.

    python -m bench sparse [--ranks 2] [--rows 262144] [--dim 64] [--repeat 5]

One MPI job (``mpirt launch``, the fault-tolerant path) times :class:`mpirt.train.sparse.SparseExchange`
forced to each exchange, for a table of ``rows x dim`` float32 and a growing number of touched rows
per rank (random ids, drawn per rank, so ranks overlap as real batches do). Figures: milliseconds a
step (median), the bytes the auto rule weighs, the exchange it picks, and whether that was the faster
one. ``DENSE_WEIGHT`` in mpirt/train/sparse.py is set from where the measured times cross.

Before the exchange, in this process: the lazy Adam update of ``--apply-touched`` random rows of a
``--apply-rows x dim`` table (fastText's: 1M x 64, ~5k rows a batch of 64 man pages), its tables in
huge pages (:mod:`mpirt.train.hugepages`, what training uses) against the same code on ordinary pages,
interleaved, every page touched first (a long run's steady state).
"""

import argparse
import statistics
import time

import numpy as np

from bench.common import mpirt_launch, run_worker, table, write_results

WORKER = r'''
import json, sys, time
import numpy as np
import torch
import mpirt.elastic as elastic
from mpirt.train.sparse import SparseExchange
cfg = json.loads(sys.argv[1])
group = elastic.init()
ec, rank = group.ec, group.rank
V, D = cfg["rows"], cfg["dim"]
p = torch.nn.Parameter(torch.zeros(V, D))
out = []
for k in cfg["touched"]:
    rng = np.random.default_rng(rank * 1000 + k)
    ids = torch.from_numpy(np.unique(rng.integers(0, V, k)))
    vals = torch.from_numpy(rng.standard_normal((len(ids), D), dtype=np.float32))
    row = {"touched": k}
    for mode in ("allgather", "allreduce", "auto"):
        ex = SparseExchange(ec, [p], mode=mode)
        times = []
        for r in range(cfg["repeat"] + 1):
            p.grad = torch.sparse_coo_tensor(ids[None], vals, (V, D))
            ec.comm.Barrier()
            t = time.perf_counter()
            ex.exchange(1.0)
            times.append(time.perf_counter() - t)
        row[mode] = sorted(times[1:])[len(times[1:]) // 2]
        if mode == "auto":
            row["picked"] = "allgather" if ex.counters["allgather"] else "allreduce"
            row["gathered_rows"] = ex.counters["rows"] // ex.counters["steps"]
    out.append(row)
if rank == 0:
    print("RESULT " + json.dumps(out), flush=True)
group.close()
'''


BLOCK = 40


def apply_times(rows, dim, touched, repeat):
    """Median ms of one lazy Adam step on ``touched`` rows: {"huge": ms, "ordinary": ms}."""
    import torch

    from mpirt.train import hugepages
    from mpirt.train.sparse import apply_rows

    limit = {"huge": hugepages.MIN_BYTES, "ordinary": 1 << 62}  # the baseline: the same code, no table moved

    def step(name, opt, p, ids, g):
        saved, hugepages.MIN_BYTES = hugepages.MIN_BYTES, limit[name]
        try:
            apply_rows(opt, p, ids, g)
        finally:
            hugepages.MIN_BYTES = saved

    variants = {}
    for name in limit:
        p = torch.nn.Parameter(torch.zeros(rows, dim))
        opt = torch.optim.Adam([p], lr=0.01)
        if name == "huge":
            p.data = hugepages.rehome(p.data)
        step(name, opt, p, np.arange(rows), np.full((rows, dim), 1e-3, np.float32))  # touch every page
        variants[name] = (opt, p)
    # Blocks of steps, the variants alternating block by block (this machine's speed drifts): step by
    # step, each variant's walks through the other's page tables would evict its own from the caches.
    rng = np.random.default_rng(0)
    times = {name: [] for name in variants}
    for _ in range(max(repeat // BLOCK, 1)):
        for name, (opt, p) in variants.items():
            for k in range(BLOCK + 5):
                ids = np.unique(rng.integers(0, rows, touched))
                g = rng.standard_normal((len(ids), dim)).astype(np.float32)
                t = time.perf_counter()
                step(name, opt, p, ids, g)
                if k >= 5:  # the block's first steps refill the caches the other variant used
                    times[name].append(time.perf_counter() - t)
    huge = [hugepages.is_huge(t) for t in (variants["huge"][1].data, *variants["huge"][0].state[
        variants["huge"][1]].values()) if t.dim() == 2]
    assert all(huge), "the huge-page variant's tables are not in huge pages"
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench sparse")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rows", type=int, default=1 << 18)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--apply-rows", type=int, default=1 << 20)
    p.add_argument("--apply-touched", type=int, default=5000)
    args = p.parse_args(argv)
    touched = [args.rows >> s for s in (10, 8, 6, 4, 3, 2, 1, 0)]
    cfg = {"rows": args.rows, "dim": args.dim, "repeat": args.repeat, "touched": touched,
           "apply_rows": args.apply_rows, "apply_touched": args.apply_touched}
    applied = apply_times(args.apply_rows, args.dim, args.apply_touched, 40 * args.repeat)
    print(f"## Lazy Adam on {args.apply_touched:,} rows of {args.apply_rows:,} x {args.dim}: huge pages "
          f"{applied['huge']:.2f} ms, ordinary pages {applied['ordinary']:.2f} ms "
          f"({applied['ordinary'] / applied['huge']:.2f}x)\n")
    out = run_worker(mpirt_launch(args.ranks), WORKER, cfg, what="sparse")
    rows = []
    for r in out:
        best = "allgather" if r["allgather"] < r["allreduce"] else "allreduce"
        rows.append([f"{r['touched']:,}", f"{100 * r['gathered_rows'] / args.rows:.1f}%",
                     f"{1e3 * r['allgather']:.1f}", f"{1e3 * r['allreduce']:.1f}",
                     f"{r['allreduce'] / r['allgather']:.2f}x", r["picked"], "yes" if r["picked"] == best else "no"])
    print(f"## Sparse rows vs dense allreduce, table {args.rows:,} x {args.dim} float32 "
          f"({4 * args.rows * args.dim / 2**20:.0f} MiB), {args.ranks} ranks (median of {args.repeat})\n")
    print(table(rows, ["rows touched per rank", "gathered / table", "allgather ms", "allreduce ms",
                       "allreduce / allgather", "auto picks", "the faster?"]))
    print("\nwrote", write_results("sparse", {"config": cfg, "ranks": args.ranks, "results": out,
                                                "apply_ms": applied}))
    return 0
