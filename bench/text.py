"""fastText on real text: 1 rank against 2, sparse embedding gradients against dense.

    python -m bench text [--rounds 2] [--epochs 3] [--per-section 400]

The corpus is this machine's man pages as HTML (:mod:`bench.mancorpus`, ~2,240 documents in 6
sections), hashed by ``mpirt prepare text`` to 2^20 features: fastText's table is 1M x 64 (268 MB of
float32). Each configuration is a whole ``mpirt launch -n N -- mpirt train`` run (fastText's defaults:
Adam, lr 0.02; global batch 64), the configurations interleaved round by round. FACTS.md's
measurement used SGD lr 2.0, with which this corpus does not learn (17.9% test accuracy, chance for
6 classes): a benchmark of a model that learns nothing could be timing degenerate gradients.
Figures: the training loop's seconds (the report's epoch times: no start-up, no evaluation), the
whole command's wall seconds, the bytes each step put through the collectives (report.json),
test accuracy, and the ratios 2 ranks / 1 rank and sparse / dense.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench.common import table, write_results

CONFIGS = [(1, "dense"), (1, "sparse"), (2, "dense"), (2, "sparse")]


def corpus(workdir, per_section):
    """The prepared data set (built once per work directory: rendering takes ~2.5 min on 2 cores)."""
    from bench.mancorpus import build

    jsonl, h5 = os.path.join(workdir, "man.jsonl"), os.path.join(workdir, "man.h5")
    if not os.path.exists(jsonl):
        build(jsonl, per_section)
    if not os.path.exists(h5):
        subprocess.run([sys.executable, "-m", "mpirt", "prepare", "text", jsonl, h5], check=True,
                       capture_output=True, timeout=600)
    return h5


def train(data, n, grad, epochs, workdir, extra=()):
    report = tempfile.mkdtemp(dir=workdir, prefix=f"r{n}{grad}-")
    cmd = [sys.executable, "-m", "mpirt", "launch", "-n", str(n), "--", sys.executable, "-m", "mpirt", "train",
           "--data", data, "--model", "fasttext", "--global-batch", "64", "--epochs", str(epochs),
           "--embedding-grad", grad, "--no-progress", "--report", report, *extra]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"text bench: {' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    with open(os.path.join(report, "report.json")) as f:
        rep = json.load(f)
    wire = rep["wire"]
    return {"loop_s": sum(e["seconds"] for e in rep["epochs"]), "wall_s": wall,
            "after_first_s": sum(e["seconds"] for e in rep["epochs"][1:]),
            "bytes_per_step": wire["dense_bytes_per_step"] + wire.get("sparse_bytes_per_step", 0.0) if n > 1 else 0.0,
            "exchanges": wire.get("sparse_exchanges"), "test_accuracy": rep["test"]["accuracy"]}


# The loop's seconds over every epoch, and over the epochs after the first: the first also faults in
# the tables' memory (3 x 268 MB for Adam, per rank; on this VM huge pages took up to 0.4 s each).
FIGURES = ("loop_s", "after_first_s", "wall_s", "bytes_per_step")
HEADERS = ["ranks", "embedding grad", "train loop s", "epochs 2+ s", "command s", "MB a step on the wire",
           "vs 1 rank, same grad", "the same, epochs 2+", "vs 1 rank, dense"]


def rows_of(med):
    """The table of the medians (as printed and in RESULTS.md)."""
    rows = []
    for n, g in CONFIGS:
        k, one = med[f"{n}-{g}"], med[f"1-{g}"]
        after = k.get("after_first_s")
        rows.append([n, g, f"{k['loop_s']:.2f}", "-" if after is None else f"{after:.2f}", f"{k['wall_s']:.1f}",
                     f"{k['bytes_per_step'] / 1e6:.2f}" if n > 1 else "-", f"{one['loop_s'] / k['loop_s']:.2f}x",
                     "-" if after is None else f"{one['after_first_s'] / after:.2f}x",
                     f"{med['1-dense']['loop_s'] / k['loop_s']:.2f}x"])
    return rows


def _defaults_line():
    """What the runs trained with: fastText's defaults, read from the table ``mpirt train`` uses."""
    from mpirt.train.defaults import DEFAULTS

    d = DEFAULTS["fasttext"]
    return f"{d['optimizer'].capitalize()} lr {d['lr']} (fastText's defaults)"


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench text")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--per-section", type=int, default=400)
    p.add_argument("--workdir", default=os.environ.get("MPIRT_BENCH_TMP") or "/tmp/mpirt-bench-text",
                   help="where the corpus is built and kept between runs")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    data = corpus(args.workdir, args.per_section)
    runs = {f"{n}-{g}": [] for n, g in CONFIGS}
    for _ in range(args.rounds):
        for n, g in CONFIGS:
            runs[f"{n}-{g}"].append(train(data, n, g, args.epochs, args.workdir))
    med = {k: {f: sorted(r[f] for r in v)[len(v) // 2] for f in FIGURES} for k, v in runs.items()}
    print(f"## fastText on {os.path.basename(data)} (man pages as HTML), {args.epochs} epochs, global batch 64 "
          f"(median of {args.rounds} rounds)\n")
    print(table(rows_of(med), HEADERS))
    acc = sorted({f"{100 * r['test_accuracy']:.2f}%" for v in runs.values() for r in v})
    print("\nwrote", write_results("text", {"epochs": args.epochs, "runs": runs, "median": med,
                                             "optimizer": _defaults_line(),
                                             "test_accuracy": " / ".join(acc)}))
    return 0
