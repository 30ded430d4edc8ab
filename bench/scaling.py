"""Strong and weak scaling of ``mpirt train``: the digits CNN, a 20M-parameter MLP, fastText.

    python -m bench scaling [--ranks 1 2 4] [--models cnn fasttext] [--epochs 4] [--tag NAME]

Each point is one real ``mpirt launch -n N -- mpirt train`` job (ULFM, tcp). Throughput is the median of
the per-epoch samples/s of its report, the first epoch left out (warm-up); validation is not timed.
- strong: the same global batch at every N (the 1-rank run is the baseline);
- weak: the same batch per rank (global = per-rank x N; the 1-rank run of that batch is the baseline).
Efficiency = samples/s at N / (N x samples/s at 1). The 1-rank runs are the baselines of the same run.

``mpirt launch`` gives each rank its share of the cores as intra-op threads, so on C cores the 1-rank run
already computes on all C, and "N x the 1-rank run" asks N ranks to beat C cores' work N times over.
The efficiency per core is the textbook one: samples/s at N / (cores used x samples/s of 1 rank on one
core), cores used = min(N x threads a rank, C); the 1-rank, 1-thread runs (OMP_NUM_THREADS=1) are its
baseline, measured in the same run. On 1 rank it is how well the intra-op threads use the cores
(bench/model.py fits compute from the 1-thread runs and the threads' speed-up from the pair).
``--tag`` names the result file (``scaling-TAG.json``): Slurm's array (scripts/slurm/scaling.sbatch) writes
one per rank count, and ``--merge`` folds them into ``scaling.json``.
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench.common import OUT_DIR, mpi_env, table, write_results
from mpirt.comm.launch import threads_per_rank

MODELS = {
    # model -> (prepare args, train args, strong global batch, weak per-rank batch, epochs x --epochs)
    # The digits set has 1,437 training rows (11 steps an epoch at 128): 4x the epochs, so that
    # each timed epoch is not lost in timer and scheduling noise.
    "cnn": (["digits"], ["--model", "cnn", "--channels", "16"], 128, 64, 4),
    "fasttext": (["synth-text", "--rows", "24000", "--features", "65536"], ["--model", "fasttext"], 256, 128, 1),
    # 20M parameters (64-4480-4480-10): 80 MB of gradient a step, where overlap has something to hide.
    "mlp20m": (["digits"], ["--model", "mlp", "--hidden", "4480"], 128, 64, 1),
}


def _env():
    return mpi_env(PYTHONUNBUFFERED="1")


def prepare(tmp, model):
    out = os.path.join(tmp, f"{model}.h5")
    if not os.path.exists(out):
        subprocess.run([sys.executable, "-m", "mpirt", "prepare", *MODELS[model][0], out], check=True,
                       capture_output=True, timeout=600, env=_env())
    return out


def measure(data, model, n, global_batch, epochs, threads=None):
    """samples/s of each epoch of one real training job on ``n`` ranks (``threads``: OMP_NUM_THREADS)."""
    env = _env()
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mpirt", "launch", "-n", str(n), "--", "mpirt", "train", "--data", data,
               *MODELS[model][1], "--epochs", str(epochs), "--global-batch", str(global_batch), "--lr", "0.05",
               "--report", os.path.join(tmp, "report"), "--no-progress"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        if res.returncode != 0:
            raise SystemExit(f"scaling: {model} on {n} ranks failed: {res.stderr[-2000:]}")
        with open(os.path.join(tmp, "report", "report.json")) as f:
            report = json.load(f)
    from mpirt.train.models import build

    n_params = sum(p.numel() for p in build(report["spec"]).parameters())
    return ([e["samples_per_s"] for e in report["epochs"]], n_params, report.get("wire", {}),
            report.get("intra_op_threads") or threads or threads_per_rank(n, os.cpu_count()))


def run(ranks, models, epochs):
    points, cores = [], os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            data = prepare(tmp, model)
            _, _, strong_batch, weak_batch, more = MODELS[model]
            for n in ranks:
                for mode, batch in (("strong", strong_batch), ("weak", weak_batch * n)):
                    # The 1-rank run on one core (the per-core baseline) beside the one on every core.
                    for threads in ([1, None] if n == 1 and cores > 1 else [None]):
                        per_epoch, n_params, wire, used = measure(data, model, n, batch, epochs * more, threads)
                        points.append({"model": model, "mode": mode, "ranks": n, "global_batch": batch,
                                       "params": n_params, "cores": cores, "wire": wire,
                                       "threads": used, "one_core": threads == 1,
                                       "samples_per_s": per_epoch[1:] or per_epoch, "first_epoch": per_epoch[0]})
                        print(f"{model} {mode} n={n} batch={batch} threads={points[-1]['threads']}: "
                              f"{statistics.median(points[-1]['samples_per_s']):,.0f} samples/s", flush=True)
    return points


def efficiency(points):
    """One dict per point: model, mode, ranks, threads, samples/s, ``efficiency`` against the 1-rank
    run of the same series (None for the 1-thread runs), and ``per_core`` against the 1-rank 1-thread
    run (None where the run has none)."""
    med, one = {}, {}
    for p in points:
        key = (p["model"], p["mode"])
        thr = statistics.median(p["samples_per_s"])
        if p.get("one_core"):
            one[key] = thr
        else:
            med[key + (p["ranks"],)] = (thr, p)
    rows = []
    for (model, mode, n), (thr, p) in sorted(med.items()):
        base, base1 = med.get((model, mode, 1), (None,))[0], one.get((model, mode))
        cores = p.get("cores") or os.cpu_count()
        threads = p.get("threads", threads_per_rank(n, cores))
        row = {"model": model, "mode": mode, "ranks": n, "threads": threads,
               "global_batch": p["global_batch"], "samples_per_s": thr,
               "efficiency": thr / (n * base) if base else None,
               "per_core": thr / (min(n * threads, cores) * base1) if base1 else None}
        if n == 1 and base1:
            rows.append(dict(row, threads=1, samples_per_s=base1, efficiency=None, per_core=1.0))
        rows.append(row)
    return rows


def _pct(x):
    return "-" if x is None else f"{100 * x:.0f}%"


def rows_of(points):
    """The table of :func:`efficiency`, as printed and in RESULTS.md."""
    return [[r["model"], r["mode"], r["ranks"], r["threads"], r["global_batch"], f"{r['samples_per_s']:,.0f}",
             _pct(r["efficiency"]), _pct(r["per_core"])] for r in efficiency(points)]


HEADERS = ["model", "scaling", "ranks", "threads a rank", "global batch", "samples/s",
           "efficiency vs 1 rank on every core", "efficiency per core vs 1 rank on one core"]


def print_tables(points):
    print(table(rows_of(points), HEADERS))


def merge():
    """Fold scaling-*.json (one per Slurm array task) into scaling.json."""
    out_dir = os.environ.get("MPIRT_BENCH_OUT", OUT_DIR)
    points, machine = [], None
    for path in sorted(glob.glob(os.path.join(out_dir, "scaling-*.json"))):
        with open(path) as f:
            doc = json.load(f)
        points += doc["results"]["points"]
        machine = doc["machine"]
    if not points:
        raise SystemExit(f"scaling --merge: no scaling-*.json in {out_dir}")
    print_tables(points)
    print("wrote", write_results("scaling", {"points": points, "merged_from_machine": machine}))


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench scaling")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["cnn", "mlp20m", "fasttext"])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--tag", help="write scaling-TAG.json (a part for --merge) instead of scaling.json")
    p.add_argument("--merge", action="store_true", help="fold the scaling-*.json parts into scaling.json")
    args = p.parse_args(argv)
    if args.merge:
        return merge()
    points = run(args.ranks, args.models, args.epochs)
    print_tables(points)
    name = f"scaling-{args.tag}" if args.tag else "scaling"
    print("wrote", write_results(name, {"points": points, "epochs": args.epochs}))
    return 0
