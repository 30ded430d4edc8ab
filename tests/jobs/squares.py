"""A map-over-shards job for the elastic tests: shard k sums the squares of its numbers.

It uses only the public API (``ShardJob`` + ``run_shard_job``), as a user's job would,
and records in its part files which member computed each shard.
"""

import argparse
import os
import sys

import h5py
import numpy as np

from mpirt.atomic import atomic_path
from mpirt.cluster.farm import run_shard_job
from mpirt.comm.faults import FaultPlan
from mpirt.errors import MpirtError
from mpirt.jobs.shardjob import ShardJob

ROWS = 5000


class Squares(ShardJob):
    def __init__(self, shards, out, argv):
        self.shard_sizes = [ROWS] * shards
        self.out = out
        self.spawn_argv = argv

    def map(self, shard):
        x = np.arange(shard * ROWS, (shard + 1) * ROWS, dtype=np.int64)
        return x * x

    def write_part(self, path, shard, result):
        with h5py.File(path, "w") as f:
            f["squares"] = result
            f.attrs["pid"] = os.getpid()

    def reduce(self, paths):
        total = np.concatenate([h5py.File(p, "r")["squares"][()] for p in paths])
        with atomic_path(self.out) as tmp:
            np.save(tmp + ".npy", total)
            os.replace(tmp + ".npy", tmp)
        return {"total": int(total.sum())}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--shards", type=int, default=24)
    p.add_argument("--inject-fault", action="append", default=[])
    p.add_argument("--min-ranks", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
    try:
        summary = run_shard_job(Squares(args.shards, args.out, argv), parts_dir=args.out + ".parts",
                                events_path=args.out + ".events", faults=FaultPlan(args.inject_fault),
                                min_ranks=args.min_ranks,
                                resume=args.resume or os.environ.get("MPIRT_RESUME") == "1")
    except MpirtError as exc:
        print(f"squares: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    if summary:
        print(f"TOTAL {summary['total']} VIEWS {summary['views']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
