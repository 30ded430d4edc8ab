"""What a run with no tuning flag gets, beside a tuned run and a scikit-learn linear model.

    python -m bench defaults [--seeds 3]

Each model's default run (``mpirt train --data D --model M`` and nothing else; the defaults are
``mpirt.train.defaults``) with seeds 0..K-1, one tuned run (the flags below, found by sweeping),
and scikit-learn's LogisticRegression on the same rows as the yardstick (digits: raw pixels;
man pages: tf-idf of the same hashed ids, :func:`bench.mancorpus.linear_baseline`). One rank each:
N ranks train the same model (tests). Figures: test accuracy and the whole command's seconds.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import table, write_results

# (data set, model, the tuned run's flags): the best of a sweep (the SGD lr 2.0, 30 epochs
# reached 79.5% without momentum and 47.8% with 0.9, with sparse embedding updates); the CNN's is a
# longer cosine run.
RUNS = [("digits", "linear", ["--optimizer", "sgd", "--lr", "0.5", "--epochs", "30", "--lr-schedule", "cosine"]),
        ("digits", "mlp", ["--optimizer", "sgd", "--lr", "0.1", "--epochs", "30", "--lr-schedule", "cosine"]),
        ("digits", "cnn", ["--optimizer", "sgd", "--lr", "0.1", "--epochs", "30", "--lr-schedule", "cosine"]),
        ("man", "fasttext", ["--optimizer", "adam", "--lr", "0.05", "--epochs", "10", "--lr-schedule", "linear"]),
        # The image models at --width 16 (a size, not a tuning flag: ResNet-18 at its default width 64 takes
        # minutes an epoch on 2 cores) on the generated shapes set (mpirt.data.shapes: real PNG/JPEG files)
        ("shapes", "resnet", ["--optimizer", "sgd", "--lr", "0.05", "--epochs", "20", "--lr-schedule", "cosine"]),
        ("shapes", "vgg", ["--optimizer", "sgd", "--lr", "0.01", "--epochs", "20", "--lr-schedule", "cosine"])]
SIZE = {"resnet": ["--width", "16"], "vgg": ["--width", "16"]}


def train(data, model, flags):
    cmd = [sys.executable, "-m", "mpirt", "train", "--data", data, "--model", model, "--no-progress",
           *SIZE.get(model, []), *flags]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    m = re.search(r"test accuracy ([0-9.]+)%", res.stdout)
    if res.returncode or not m:
        raise SystemExit(f"defaults bench: {' '.join(cmd)} failed:\n{res.stdout[-1000:]}{res.stderr[-2000:]}")
    return {"accuracy": float(m.group(1)), "seconds": wall}


def pixels_baseline(h5):
    """LogisticRegression (max_iter raised until it converges) on a dense data set's raw pixels."""
    from sklearn.linear_model import LogisticRegression

    from mpirt.data.reader import open_dataset

    with open_dataset(h5) as ds:
        tr, te = (ds.split(s).read(0, ds.split(s).n_rows) for s in ("train", "test"))
    m = LogisticRegression(max_iter=5000).fit(tr.X.reshape(len(tr.y), -1) / 255.0 if tr.X.dtype == np.uint8
                                              else tr.X.reshape(len(tr.y), -1), tr.y)
    Xt = te.X.reshape(len(te.y), -1)
    return float((m.predict(Xt / 255.0 if Xt.dtype == np.uint8 else Xt) == te.y).mean())


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench defaults")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workdir", default=os.environ.get("MPIRT_BENCH_TMP") or "/tmp/mpirt-bench-text",
                   help="where the man-page corpus is built and kept between runs (shared with bench text)")
    args = p.parse_args(argv)
    from bench.mancorpus import linear_baseline
    from bench.text import corpus

    os.makedirs(args.workdir, exist_ok=True)
    data = {"man": corpus(args.workdir, 400)}
    tmp = tempfile.mkdtemp(dir=args.workdir, prefix="digits-")
    data["digits"] = os.path.join(tmp, "digits.h5")
    subprocess.run([sys.executable, "-m", "mpirt", "prepare", "digits", data["digits"], "--shard-rows", "256"],
                   check=True, capture_output=True, timeout=600)
    from mpirt.data.shapes import write_shapes

    write_shapes(os.path.join(tmp, "shapes"), per_class=400)
    data["shapes"] = os.path.join(tmp, "shapes.h5")
    subprocess.run([sys.executable, "-m", "mpirt", "prepare", "images", os.path.join(tmp, "shapes"), data["shapes"],
                    "--size", "32x32"], check=True, capture_output=True, timeout=600)
    base, base_s = {}, {}
    for name in ("digits", "shapes"):
        t0 = time.perf_counter()
        base[name] = 100 * pixels_baseline(data[name])
        base_s[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    base["man"] = 100 * linear_baseline(data["man"])
    base_s["man"] = time.perf_counter() - t0
    results = []
    for ds, model, tuned in RUNS:
        default = [train(data[ds], model, ["--seed", str(s)]) for s in range(args.seeds)]
        results.append({"data": ds, "model": model, "default": default, "tuned_flags": tuned,
                        "tuned": train(data[ds], model, tuned), "sklearn": base[ds], "sklearn_s": base_s[ds]})
    print(tables(results))
    print("\nwrote", write_results("defaults", results))
    return 0


def tables(results):
    rows = []
    for r in results:
        accs = "/".join(f"{d['accuracy']:.1f}" for d in r["default"])
        secs = sorted(d["seconds"] for d in r["default"])[len(r["default"]) // 2]
        worst = min(d["accuracy"] for d in r["default"])
        rows.append([r["data"], r["model"], accs, f"{secs:.1f}", f"{r['tuned']['accuracy']:.1f}",
                     f"{r['tuned']['seconds']:.1f}", " ".join(r["tuned_flags"]), f"{r['sklearn']:.1f}",
                     f"{worst - r['sklearn']:+.1f}"])
    return table(rows, ["data", "model", "default: test acc % (seeds 0,1,..)", "default s", "tuned: test acc %",
                        "tuned s", "tuned flags", "scikit-learn LogisticRegression %",
                        "worst default - scikit-learn (points)"]) + (
        "\n\nOne rank; seconds are the whole `mpirt train` command (median over the seeds); the image models "
        "at --width 16 on the generated shapes set (1,200 PNG/JPEG files, 32x32).")
