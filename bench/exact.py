"""The cost of ``mpirt train --exact`` beside the default mode, in the same run.

    python -m bench exact [--rounds 3] [--epochs 7]

Digits (``mpirt prepare digits``), global batch 64, SGD: the MLP (128 hidden) and the CNN; and
fastText with Adam on synthetic text (``mpirt prepare synth-text``, 6,000 documents hashed to 2^16
features: a 65,536 x 64 table with row-sparse gradients). Each at 1, 2 and 4 ranks, each configuration a whole ``mpirt launch -n N -- mpirt train`` run, interleaved
round by round. The figure is the training loop's samples/s (the report's epoch times: no start-up,
no evaluation), median over the rounds, and ``--exact`` / default step time.

Where the cost goes, at 2 ranks on the CNN, from three more configurations:
- default with one intra-op thread (``OMP_NUM_THREADS=1``): the thread count alone;
- ``--exact --micro-batch 32``: one micro-batch per rank, so the same forward/backward shapes as the
  default: what the fixed-point sum and its MAX allreduce add;
- ``--exact`` (micro-batch 16, two per rank): the rest is the smaller micro-batches.

"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench.common import table, write_results

MODELS = ("mlp", "cnn", "fasttext")
FLAGS = {"mlp": ["--lr", "0.05"], "cnn": ["--lr", "0.05"], "fasttext": ["--optimizer", "adam", "--lr", "0.01"]}
RANKS = (1, 2, 4)
# (label, extra flags, extra environment): the main grid, then the breakdown at 2 ranks (CNN).
MODES = {"default": ([], {}), "exact": (["--exact"], {})}
BREAKDOWN = {"default, 1 thread": ([], {"OMP_NUM_THREADS": "1"}),
             "exact, micro-batch 32": (["--exact", "--micro-batch", "32"], {})}


def data_set(workdir, model):
    name = "text" if model == "fasttext" else "digits"
    path = os.path.join(workdir, f"{name}.h5")
    if not os.path.exists(path):
        how = ["synth-text", path, "--rows", "6000", "--features", "65536"] if name == "text" else ["digits", path]
        subprocess.run([sys.executable, "-m", "mpirt", "prepare", *how], check=True, capture_output=True, timeout=600)
    return path


def train(model, n, flags, env, epochs, workdir):
    """samples/s of the training loop of one whole run."""
    report = tempfile.mkdtemp(dir=workdir, prefix=f"{model}{n}-")
    cmd = [sys.executable, "-m", "mpirt", "launch", "-n", str(n), "--", sys.executable, "-m", "mpirt", "train",
           "--data", data_set(workdir, model), "--model", model, "--epochs", str(epochs), "--global-batch", "64",
           *FLAGS[model], "--seed", "3", "--no-progress", "--report", report, *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, **env})
    if res.returncode:
        raise SystemExit(f"exact bench: {' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    with open(os.path.join(report, "report.json")) as f:
        epochs_ = json.load(f)["epochs"]
    return sum(e["samples_per_s"] * e["seconds"] for e in epochs_) / sum(e["seconds"] for e in epochs_)


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench exact")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=7)
    p.add_argument("--workdir", default=os.environ.get("MPIRT_BENCH_TMP") or "/tmp/mpirt-bench-exact")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    configs = [(m, n, mode, *MODES[mode]) for m in MODELS for n in RANKS for mode in MODES]
    configs += [("cnn", 2, label, *BREAKDOWN[label]) for label in BREAKDOWN]
    runs = {f"{m} {n} {mode}": [] for m, n, mode, _, _ in configs}
    for _ in range(args.rounds):
        for m, n, mode, flags, env in configs:
            runs[f"{m} {n} {mode}"].append(train(m, n, flags, env, args.epochs, args.workdir))
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    results = {"epochs": args.epochs, "runs": runs, "median": med}
    print("\n".join(tables(results)))
    print("wrote", write_results("exact", results))
    return 0


def tables(results):
    """Markdown lines: the grid, then where the cost goes (also bench/report.py's section)."""
    med = results["median"]
    rows = [[m, n, f"{med[f'{m} {n} default']:,.0f}", f"{med[f'{m} {n} exact']:,.0f}",
             f"{med[f'{m} {n} default'] / med[f'{m} {n} exact']:.2f}x"] for m in MODELS for n in RANKS]
    base = med["cnn 2 default"]
    cost = [[label, f"{med[f'cnn 2 {label}']:,.0f}", f"{base / med[f'cnn 2 {label}']:.2f}x"]
            for label in ("default", "default, 1 thread", "exact, micro-batch 32", "exact")]
    rounds = len(next(iter(results["runs"].values())))
    return [f"Global batch 64, {results['epochs']} epochs, median of {rounds} rounds; samples/s of the training loop.",
            "",
            table(rows, ["model", "ranks", "default samples/s", "--exact samples/s", "--exact step time / default"]),
            "", "Where the cost goes (CNN, 2 ranks):", "",
            table(cost, ["configuration", "samples/s", "step time / default"]), "",
            f"One intra-op thread costs {base / med['cnn 2 default, 1 thread']:.2f}x and the fixed-point sum with its "
            f"MAX allreduce {base / med['cnn 2 exact, micro-batch 32']:.2f}x (one micro-batch of 32 rows per rank: the "
            "default mode's shapes); the rest is the smaller micro-batches (two forward/backward passes of 16 rows "
            "instead of one of 32: per-call overhead on a small model). `--micro-batch` trades that against how many "
            "ranks can share a step (global batch / micro-batch).", ""]
