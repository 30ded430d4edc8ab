"""I/O benchmarks: `prepare text` against the obvious pipeline, its memory as rows grow, and the
reader against raw h5py slicing of the same rows.

    python -m bench io [--rows 1000000] [--baseline-rows 20000] [--quick]
"""

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

from bench.common import table, timeit, write_results


def prepare_subprocess(src, out):
    """Run `mpirt prepare text` as a user would; return (seconds, peak RSS in MB of it and its workers)."""
    code = ("import resource, sys, time; from mpirt.cli import main; t = time.perf_counter();"
            "rc = main(['prepare', 'text', sys.argv[1], sys.argv[2], '--features', '1048576']);"
            "dt = time.perf_counter() - t;"
            "print(dt, max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
            " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024)")
    res = subprocess.run([sys.executable, "-c", code, src, out], capture_output=True, text=True, check=True,
                         timeout=3600)
    dt, peak = res.stdout.split()[-2:]
    return float(dt), float(peak)


def obvious_prepare(src, out, rows):
    """The pipeline written the obvious way: BeautifulSoup per document, a hash per token, a row at a time."""
    from bs4 import BeautifulSoup

    t0 = time.perf_counter()
    with open(src) as f, h5py.File(out, "w") as h:
        ids = h.create_dataset("ids", (0,), maxshape=(None,), dtype="u4")
        lab = h.create_dataset("y", (0,), maxshape=(None,), dtype="i8")
        classes = {}
        for i, line in enumerate(f):
            if i == rows:
                break
            doc = json.loads(line)
            text = BeautifulSoup(doc["text"], "html.parser").get_text(" ")
            toks = [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") % (1 << 20)
                    for w in text.lower().split() if w.isalnum()]
            n = ids.shape[0]
            ids.resize((n + len(toks),))
            ids[n:] = toks
            lab.resize((i + 1,))
            lab[i] = classes.setdefault(doc["label"], len(classes))
    return time.perf_counter() - t0


def reader_suite(tmp, repeat):
    from mpirt.data import open_dataset
    from mpirt.data.prepare import Options, prepare_dense

    rng = np.random.default_rng(0)
    n, d = 200_000, 256
    dense = os.path.join(tmp, "dense.h5")
    prepare_dense(rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 10, n), dense,
                  Options(shard_rows=4096, val_fraction=0.0, test_fraction=0.0))
    text = os.path.join(tmp, "text.h5")
    rows = []
    for batch in (256, 4096):
        for kind, path in (("dense", dense), ("ragged", text)):
            with open_dataset(path) as ds:
                sp = ds.split("train")
                m = sp.n_rows
                spans = [(i, min(i + batch, m)) for i in range(0, m, batch)]

                def ours():
                    for a, b in spans:
                        sp.read(a, b)

            with h5py.File(path, "r") as f:
                g = f["train"]
                # Dataset handles looked up once, as any careful h5py loop would.
                y, ri = g["y"], g["row_index"]
                X = g["X"] if kind == "dense" else None
                offsets, ids = (g["offsets"], g["ids"]) if kind != "dense" else (None, None)

                def raw():
                    for a, b in spans:
                        y[a:b]
                        ri[a:b]
                        if kind == "dense":
                            X[a:b]
                        else:
                            off = offsets[a:b + 1]
                            ids[off[0]:off[-1]]

                t_raw = statistics.median(timeit(raw, repeat=repeat))
            with open_dataset(path) as ds:
                sp = ds.split("train")
                t_ours = statistics.median(timeit(ours, repeat=repeat))
            rows.append([kind, batch, f"{m / t_ours:,.0f}", f"{m / t_raw:,.0f}", f"{t_raw / t_ours:.2f}x"])
    return rows


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench io")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--baseline-rows", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="100k rows, 5k for the baseline")
    p.add_argument("--reader-only", action="store_true", help="only the reader figures (on a 200k-row text set)")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.baseline_rows = 100_000, 5_000
    from mpirt.data.synth import write_jsonl

    results = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        if args.reader_only:
            from mpirt.cli import main as cli

            cli(["prepare", "synth-text", os.path.join(tmp, "text.h5"), "--rows", "200000", "--features", "1048576"])
            rows = reader_suite(tmp, args.repeat)
            print(table(rows, ["kind", "batch", "mpirt reader", "raw h5py", "mpirt / raw"]))
            print("\nwrote", write_results("io-reader", {"reader": rows}))
            return 0
        small, big = os.path.join(tmp, "small.jsonl"), os.path.join(tmp, "big.jsonl")
        write_jsonl(big, args.rows, seed=1)
        write_jsonl(small, args.rows // 4, seed=1)
        mb = os.path.getsize(big) / 1e6
        t_big, peak_big = prepare_subprocess(big, os.path.join(tmp, "text.h5"))
        t_small, peak_small = prepare_subprocess(small, os.path.join(tmp, "small.h5"))
        t_obv = obvious_prepare(big, os.path.join(tmp, "obvious.h5"), args.baseline_rows)
        obv_rate = args.baseline_rows / t_obv
        print(f"## prepare text ({args.rows:,} synthetic rows, {mb:,.0f} MB of JSONL)\n")
        print(table([
            ["mpirt prepare text", f"{args.rows / t_big:,.0f}", f"{mb / t_big:.1f}", f"{args.rows / t_big / obv_rate:.1f}x"],
            [f"obvious (BeautifulSoup, hash per token, row at a time; {args.baseline_rows:,} rows)",
             f"{obv_rate:,.0f}", f"{obv_rate * mb / args.rows:.1f}", "1.0x"],
        ], ["pipeline", "rows/s", "MB/s", "vs obvious"]))
        print(f"\npeak memory: {peak_small:.0f} MB at {args.rows // 4:,} rows, {peak_big:.0f} MB at {args.rows:,} rows "
              f"(ratio {peak_big / peak_small:.2f})\n")
        results["prepare"] = {"rows": args.rows, "seconds": t_big, "mb": mb, "obvious_rows": args.baseline_rows,
                              "obvious_seconds": t_obv, "peak_mb": {args.rows // 4: peak_small, args.rows: peak_big}}
        rows = reader_suite(tmp, args.repeat)
        print("## reader: rows/s over the train split, sequential batches\n")
        print(table(rows, ["kind", "batch", "mpirt reader", "raw h5py", "mpirt / raw"]))
        results["reader"] = rows
    print("\nwrote", write_results("io", results))
    return 0
