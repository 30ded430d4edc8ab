"""Per-unit overhead of the elastic task farm against a bare mpi4py master/worker loop.

    python -m bench ledger [--ranks 4 2] [--units 1000] [--repeat 5]

Both sides do the same work per unit (a small numpy computation and one HDF5
result file written by the worker); mpirt adds the ledger, create-if-absent
commits (fsync + link) and the commit log that make recovery and --resume exact,
and leases in batches that a worker asks for ahead (the bare loop asks for one
unit at a time). The two sides run in turns, and the figure is the median of each
turn's ratio: on a shared machine the absolute times move with the load.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from bench.common import mpi_env, table, write_results

HERE = os.path.dirname(os.path.abspath(__file__))

WORK = r'''
import numpy as np, h5py
ROWS = 2000
def compute(k):
    x = np.arange(k * ROWS, (k + 1) * ROWS, dtype=np.float64)
    return np.sort(np.sin(x) * x)
def write(path, k, r):
    with h5py.File(path, "w") as f:
        f["r"] = r
'''

BARE = WORK + r'''
import os, sys, time
from mpi4py import MPI
comm = MPI.COMM_WORLD
units, out = int(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
if comm.rank == 0:
    nxt, stopped, st = 0, 0, MPI.Status()
    while stopped < comm.size - 1:
        comm.recv(source=MPI.ANY_SOURCE, tag=1, status=st)
        if nxt < units:
            comm.send(nxt, dest=st.Get_source(), tag=2); nxt += 1
        else:
            comm.send(None, dest=st.Get_source(), tag=2); stopped += 1
    print("ELAPSED", time.perf_counter() - t0, flush=True)
else:
    done = None
    while True:
        comm.send(done, dest=0, tag=1)
        k = comm.recv(source=0, tag=2)
        if k is None:
            break
        write(os.path.join(out, f"part-{k}.h5"), k, compute(k))
        done = k
'''

FARM = WORK + r'''
import os, sys, time
from mpirt.cluster.farm import run_shard_job
from mpirt.jobs.shardjob import ShardJob
class Job(ShardJob):
    def __init__(self, n): self.shard_sizes = [1] * n
    def map(self, k): return compute(k)
    def write_part(self, path, k, r): write(path, k, r)
    def reduce(self, paths): return {}
from mpirt.comm.mpi import MPI
MPI()  # MPI_Init before the clock starts, as in the bare loop
units, out = int(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
if run_shard_job(Job(units), parts_dir=out) is not None:
    print("ELAPSED", time.perf_counter() - t0, flush=True)
'''


def _run(code, n, units, launcher):
    env = mpi_env()
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "job.py")
        with open(script, "w") as f:
            f.write(code)
        out = os.path.join(tmp, "out")
        os.makedirs(out)
        cmd = launcher(n) + [sys.executable, script, str(units), out]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        line = [x for x in res.stdout.splitlines() if x.startswith("ELAPSED")]
        if not line:
            raise RuntimeError(f"{cmd}: {res.stderr[-500:]}")
        return float(line[0].split()[1])


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench ledger")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 2])
    p.add_argument("--units", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    # Both run on the same fault-tolerant launch line, so only the runtime differs.
    launcher = lambda n: [sys.executable, "-m", "mpirt", "launch", "-n", str(n), "--"]  # noqa: E731
    by_ranks, rows = {}, []
    for n in args.ranks:
        bare, farm = [], []
        for _ in range(args.repeat):
            bare.append(_run(BARE, n, args.units, launcher))
            farm.append(_run(FARM, n, args.units, launcher))
        ratios = [f / b for f, b in zip(farm, bare)]
        by_ranks[n] = {"bare_s": bare, "farm_s": farm, "ratio": statistics.median(ratios)}
        b, f = statistics.median(bare), statistics.median(farm)
        rows.append([n, f"{b:.3f}", f"{1e6 * b / args.units:.0f}", f"{f:.3f}", f"{1e6 * f / args.units:.0f}",
                     f"{statistics.median(ratios):.2f}", f"{min(ratios):.2f}-{max(ratios):.2f}"])
    print(f"## Task farm against a bare master/worker loop, {args.units} units (median of {args.repeat} turns)\n")
    print(table(rows, ["ranks", "bare s", "bare us/unit", "farm s", "farm us/unit", "farm vs bare", "range"]))
    first = by_ranks[args.ranks[0]]
    results = {"ranks": args.ranks[0], "units": args.units, "bare_s": first["bare_s"], "farm_s": first["farm_s"],
               "by_ranks": by_ranks}
    print("\nwrote", write_results("ledger", results))
    return 0
