"""Gradient allreduce: mpirt's fused, segmented allreduce against raw mpi4py and torch gloo.

    python -m bench allreduce [--ranks 2 4] [--repeat 3] [--quick] [--transports-only]

Three parts; the first two each in one MPI job launched by ``mpirt launch --transport tcp``:

1. the issue's figure: a 25M-float gradient in 160 tensors (ResNet-50-like sizes): mpirt
   ``GradAllreduce`` (pack, segmented Allreduce, unpack x 1/n) against one raw ``Allreduce`` of the
   same bytes (already flat: no pack), torch gloo one ``all_reduce`` per tensor, and gloo on a flat buffer;
2. at each rank count, a sweep of message sizes, 4 KiB to 256 MiB: raw ``Allreduce`` unsegmented, mpirt's segmented
   reduction of one buffer, and gloo; plus raw ``Allreduce`` on the shared-memory path (plain
   mpiexec with ``sm``, not fault tolerant) for reference.
3. 64 MiB on each path, 2 and 4 ranks: the fault-tolerant shared-memory path (``mpirt launch
   --transport sm``), raw ``sm`` without fault tolerance (plain ``mpiexec --mca btl sm,self``, the same
   binding as mpirt launch) and the fault-tolerant tcp path; the three jobs run in turn, ``--rounds``
   times, and each reports raw ``Allreduce`` and mpirt's segmented reduction at several segment sizes.
algbw = bytes / time, busbw = algbw * 2 (n - 1) / n, as nccl-tests define them.
"""

import argparse
import os
import sys

from bench.common import fmt_bytes, free_port, mpirt_launch, run_worker, table, write_results

WORKER = r'''
import json, os, sys, time
import numpy as np
import torch
from mpirt.comm.mpi import MPI
from mpirt.comm.elastic import ElasticComm
from mpirt.train.allreduce import GradAllreduce
MPI = MPI()
cfg = json.loads(sys.argv[1])
ec = ElasticComm()
comm, rank, size = ec.comm, ec.rank, ec.size
def timed(fn, repeat):
    fn(); comm.Barrier()
    out = []
    for _ in range(repeat):
        comm.Barrier(); t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return out
res = {}
if cfg["gloo"]:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=cfg["gloo"], rank=rank, world_size=size)
sizes = cfg["sizes"]
torch.manual_seed(0)
params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
for p in params:
    p.grad = torch.randn(p.shape)
flat = np.random.default_rng(rank).standard_normal(sum(sizes)).astype(np.float32)
R = cfg["repeat"]
for name, inflight in (("mpirt", 1), ("mpirt_inflight4", 4)):
    red = GradAllreduce(ec, params, n_stats=1, segment_bytes=cfg["segment"], inflight=inflight)
    res[name] = timed(lambda: red.allreduce([1.0]), R)
res["raw"] = timed(lambda: comm.Allreduce(MPI.IN_PLACE, flat), R)
if cfg["gloo"]:
    grads = [p.grad for p in params]
    res["gloo_per_tensor"] = timed(lambda: [dist.all_reduce(g) for g in grads], R)
    tflat = torch.from_numpy(flat)
    res["gloo_flat"] = timed(lambda: dist.all_reduce(tflat), R)
sweep = {}
for nbytes in cfg["sweep"]:
    buf = np.ones(nbytes // 4, dtype=np.float32)
    red = GradAllreduce(ec, [torch.nn.Parameter(torch.zeros(1))], n_stats=1, segment_bytes=cfg["segment"])
    r = max(2, min(R, int(2e8 // max(nbytes, 1))))
    row = {"raw": timed(lambda: comm.Allreduce(MPI.IN_PLACE, buf), r),
           "mpirt": timed(lambda: red._reduce([buf], MPI.FLOAT, MPI.SUM), r)}
    if cfg["gloo"]:
        t = torch.from_numpy(buf)
        row["gloo"] = timed(lambda: dist.all_reduce(t), r)
    sweep[nbytes] = row
if rank == 0:
    print("RESULT " + json.dumps({"fused": res, "sweep": sweep}), flush=True)
if cfg["gloo"]:
    dist.destroy_process_group()
ec.close()
'''


WORKER64 = r'''
import json, sys, time
import numpy as np
import torch
from mpirt.comm.mpi import MPI
from mpirt.comm.elastic import ElasticComm
from mpirt.train.allreduce import GradAllreduce
MPI = MPI()
cfg = json.loads(sys.argv[1])
ec = ElasticComm()
comm = ec.comm
buf = np.ones(cfg["nbytes"] // 4, dtype=np.float32)
def timed(fn, repeat):
    fn(); comm.Barrier()
    out = []
    for _ in range(repeat):
        comm.Barrier(); t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return out
res = {"raw": timed(lambda: comm.Allreduce(MPI.IN_PLACE, buf), cfg["repeat"])}
for seg in cfg["segments"]:
    red = GradAllreduce(ec, [torch.nn.Parameter(torch.zeros(1))], n_stats=1, segment_bytes=seg)
    res[str(seg)] = timed(lambda: red._reduce([buf], MPI.FLOAT, MPI.SUM), cfg["repeat"])
if ec.rank == 0:
    print("RESULT " + json.dumps(res), flush=True)
ec.close()
'''
PATHS = ("ft_sm", "raw_sm", "ft_tcp")


def _job(launcher, n, cfg, worker=WORKER):
    return run_worker(launcher, worker, cfg, what="allreduce")


def _med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main(argv):
    from bench.kernels import resnet_like_sizes

    p = argparse.ArgumentParser(prog="python -m bench allreduce")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="rank counts of the size sweep")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--segment-kib", type=int, default=8192)
    p.add_argument("--quick", action="store_true", help="2.5M floats and sizes up to 16 MiB")
    p.add_argument("--rounds", type=int, default=3, help="part 3: turns of the three paths")
    p.add_argument("--transports-only", action="store_true", help="part 3 only (64 MiB on each path)")
    args = p.parse_args(argv)
    if args.transports_only:
        results = {"transports": transports(args.ranks, args.rounds, args.repeat)}
        print("\nwrote", write_results("allreduce-transports", results))
        return 0
    total = 2_500_000 if args.quick else 25_000_000
    top = 24 if args.quick else 28
    sizes = [1 << k for k in range(12, top + 1, 2)]
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    results = {"ranks": args.ranks, "total_floats": total, "sizes": sizes, "sweep": {}}
    for n in args.ranks:
        # The fused 160-tensor figure at the largest rank count only (it is the slow part).
        fused = n == max(args.ranks)
        cfg = {"sizes": resnet_like_sizes(total=total) if fused else [1000], "repeat": args.repeat,
               "segment": args.segment_kib << 10, "sweep": sizes, "gloo": f"tcp://127.0.0.1:{free_port()}"}
        ft = _job(mpirt_launch(n, "--transport", "tcp"), n, cfg)
        # As mpirt launch does when ranks outnumber cores: idle ranks yield the core.
        yield_idle = ["--mca", "mpi_yield_when_idle", "1"] if n > (os.cpu_count() or 1) else []
        sm = _job([mpiexec, "-n", str(n), "--oversubscribe", "--bind-to", "none", "--mca", "btl", "sm,self",
                   *yield_idle], n,
                  dict(cfg, gloo=None, sizes=[1000]))
        results["sweep"][n] = {size: dict(ft["sweep"][str(size)], raw_sm=sm["sweep"][str(size)]["raw"])
                               for size in sizes}
        if fused:
            results["fused"], results["fused_ranks"], results["tensors"] = ft["fused"], n, len(cfg["sizes"])
        _print_sweep(n, results["sweep"][n])
    _print_fused(results, args.repeat)
    results["transports"] = transports(args.ranks, args.rounds, args.repeat)
    print("\nwrote", write_results("allreduce", results))
    return 0


SEGMENTS = (2 << 20, 8 << 20, 16 << 20, 64 << 20)


def _launchers(n):
    """Each path's launcher; raw sm binds as ``mpirt launch`` does (to cores, unless ranks outnumber them)."""
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    over = ["--oversubscribe", "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1"] \
        if n > (os.cpu_count() or 1) else []
    mpirt = [sys.executable, "-m", "mpirt", "launch", "-n", str(n), "--transport"]
    return {"ft_sm": mpirt + ["sm", "--"], "ft_tcp": mpirt + ["tcp", "--"],
            "raw_sm": [mpiexec, "-n", str(n), *over, "--mca", "btl", "sm,self"]}


def transports(ranks, rounds, repeat, nbytes=64 << 20):
    """Part 3: 64 MiB on the three paths, in turn, ``rounds`` times; samples pooled per path."""
    out = {}
    for n in ranks:
        launchers = _launchers(n)
        pooled = {p: {} for p in PATHS}
        for r in range(rounds):
            for path in PATHS[r % 3:] + PATHS[:r % 3]:  # a different path first in each round
                res = _job(launchers[path], n, {"nbytes": nbytes, "segments": list(SEGMENTS), "repeat": repeat},
                           WORKER64)
                for k, v in res.items():
                    pooled[path].setdefault(k, []).extend(v)
        out[n] = pooled
        _print_transports(n, nbytes, pooled)
    return out


def _print_transports(n, nbytes, pooled):
    m = {p: {k: _med(v) for k, v in pooled[p].items()} for p in PATHS}
    rows = []
    for key, label in [("raw", "raw Allreduce, one 64 MiB message")] + [
            (str(s), f"mpirt segmented, {s >> 20} MiB segments") for s in SEGMENTS]:
        bw = {p: busbw(nbytes, m[p][key], n) for p in PATHS}
        rows.append([label] + [f"{bw[p]:.2f}" for p in PATHS]
                    + [f"{bw['ft_sm'] / bw['raw_sm']:.2f}x", f"{bw['ft_tcp'] / bw['raw_sm']:.2f}x",
                       f"{bw['ft_sm'] / bw['ft_tcp']:.2f}x"])
    best = {p: min(SEGMENTS, key=lambda s: m[p][str(s)]) >> 20 for p in ("ft_sm", "ft_tcp")}
    print(f"\n## 64 MiB allreduce by path, {n} ranks: busbw GB/s (median of {len(pooled['ft_sm']['raw'])})\n")
    print(table(rows, ["what", "FT sm", "raw sm (no FT)", "FT tcp", "FT sm / raw sm", "FT tcp / raw sm",
                       "FT sm / FT tcp"]))
    print(f"\nfastest segment: FT sm {best['ft_sm']} MiB, FT tcp {best['ft_tcp']} MiB")


def busbw(nbytes, seconds, n):
    """nccl-tests' bus bandwidth of an allreduce, GB/s: algbw x 2(n-1)/n."""
    return nbytes / seconds / 1e9 * 2 * (n - 1) / n


def _print_fused(results, repeat):
    f = {k: _med(v) for k, v in results["fused"].items()}
    nbytes, n = 4 * results["total_floats"], results["fused_ranks"]
    rows = [[name, f"{1e3 * f[key]:.1f}", f"{nbytes / f[key] / 1e9:.2f}", f"{f[key] / f['mpirt']:.2f}x"]
            for name, key in (("mpirt GradAllreduce (pack, segments, unpack)", "mpirt"),
                              ("mpirt, 4 segments in flight (Iallreduce)", "mpirt_inflight4"),
                              ("raw mpi4py Allreduce, one flat buffer", "raw"),
                              ("torch gloo, all_reduce per tensor", "gloo_per_tensor"),
                              ("torch gloo, one flat buffer", "gloo_flat"))]
    print(f"\n## Fused allreduce: {results['total_floats'] / 1e6:.1f}M floats in {results['tensors']} tensors, "
          f"{n} ranks, FT tcp path (median of {repeat})\n")
    print(table(rows, ["what", "ms", "algbw GB/s", "time / mpirt"]))


def _print_sweep(n, sweep):
    rows = []
    for size, r in sweep.items():
        m = {k: _med(v) for k, v in r.items()}
        rows.append([fmt_bytes(size)] + [f"{busbw(size, m[k], n):.2f}" for k in ("raw", "mpirt", "gloo", "raw_sm")]
                    + [f"{m['raw'] / m['mpirt']:.2f}x", f"{m['gloo'] / m['mpirt']:.2f}x"])
    print(f"\n## busbw (GB/s) by message size, {n} ranks\n")
    print(table(rows, ["bytes", "raw Allreduce (tcp)", "mpirt segmented (tcp)", "gloo", "raw Allreduce (sm, no FT)",
                       "mpirt vs raw tcp", "mpirt vs gloo"]))
