"""The sparse-row exchange against the dense allreduce of the same table: where they cross.

    python -m bench sparse [--ranks 2] [--rows 262144] [--dim 64] [--repeat 5]

One MPI job (``mpirt launch``, the fault-tolerant path) times :class:`mpirt.train.sparse.SparseExchange`
forced to each exchange, for a table of ``rows x dim`` float32 and a growing number of touched rows
per rank (random ids, drawn per rank, so ranks overlap as real batches do). Figures: milliseconds a
step (median), the bytes the auto rule weighs, the exchange it picks, and whether that was the faster
one. ``DENSE_WEIGHT`` in mpirt/train/sparse.py is set from where the measured times cross.
"""

import argparse

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


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench sparse")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rows", type=int, default=1 << 18)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    touched = [args.rows >> s for s in (10, 8, 6, 4, 3, 2, 1, 0)]
    cfg = {"rows": args.rows, "dim": args.dim, "repeat": args.repeat, "touched": touched}
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
    print("\nwrote", write_results("sparse", {"config": cfg, "ranks": args.ranks, "results": out}))
    return 0
