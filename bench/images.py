"""ResNet training on an image set: 1 rank against 2, augmentation on and off, beside a plain torch loop.

    python -m bench images [--per-class 700] [--epochs 2] [--depth 10] [--width 16] [--rounds 2]

The images are real PNG/JPEG files (:mod:`mpirt.data.shapes`, 3 classes), prepared by ``mpirt prepare
images --size 32x32``. Each configuration is a whole ``mpirt launch -n N -- mpirt train --model resnet``
job; its figure is the samples/s of the report's epochs after the first (warm-up). The baseline is a
plain PyTorch loop in one process on the same uint8 rows (the same model, batch and optimizer, no MPI,
no augmentation), and the augmentation's own cost is timed on a batch (``mpirt.train.augment``).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import table, write_results

CONFIGS = [(1, "off"), (1, "on"), (2, "off"), (2, "on")]


def train(data, n, aug, args, workdir):
    report = tempfile.mkdtemp(dir=workdir, prefix=f"r{n}{aug}-")
    cmd = [sys.executable, "-m", "mpirt", "launch", "-n", str(n), "--", sys.executable, "-m", "mpirt", "train",
           "--data", data, "--model", "resnet", "--depth", str(args.depth), "--width", str(args.width),
           "--epochs", str(args.epochs), "--global-batch", str(args.batch), "--lr", "0.05",
           "--augment" if aug == "on" else "--no-augment", "--no-progress", "--report", report]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if res.returncode:
        raise SystemExit(f"images bench: {' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    with open(os.path.join(report, "report.json")) as f:
        rep = json.load(f)
    rates = [e["samples_per_s"] for e in rep["epochs"][1:]] or [rep["epochs"][0]["samples_per_s"]]
    return {"samples_per_s": float(np.median(rates)), "test_accuracy": rep["test"]["accuracy"]}


def torch_loop(data, args):
    """samples/s of a plain loop: the same model and batches, one process, no MPI, no augmentation."""
    import torch

    from mpirt.data.reader import open_dataset
    from mpirt.kernels.torch_loss import cross_entropy
    from mpirt.train import models

    with open_dataset(data) as ds:
        spec = models.spec_for("resnet", ds, normalize=True, depth=args.depth, width=args.width)
        b = ds.split("train").read(0, ds.split("train").n_rows)
    torch.manual_seed(0)
    m = models.build(spec)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    X, y = torch.from_numpy(b.X), torch.from_numpy(b.y)
    rates = []
    for _ in range(args.epochs):
        t0, n = time.perf_counter(), 0
        perm = torch.randperm(len(y))
        for i in range(0, len(y), args.batch):
            idx = perm[i:i + args.batch]
            loss = cross_entropy(m(X[idx]), y[idx], reduction="sum") / len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(idx)
        rates.append(n / (time.perf_counter() - t0))
    return float(np.median(rates[1:] or rates))


def augment_cost(data, batch):
    from mpirt.data.reader import open_dataset
    from mpirt.train.augment import augment

    with open_dataset(data) as ds:
        b = ds.split("train").read(0, batch)
    t = []
    for k in range(20):
        t0 = time.perf_counter()
        augment(b.X, 0, k, b.row_index)
        t.append(time.perf_counter() - t0)
    return float(np.median(t))


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench images")
    p.add_argument("--per-class", type=int, default=700)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--depth", type=int, default=10)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    from mpirt.data.shapes import write_shapes

    with tempfile.TemporaryDirectory() as work:
        write_shapes(os.path.join(work, "img"), args.per_class)
        data = os.path.join(work, "img.h5")
        subprocess.run([sys.executable, "-m", "mpirt", "prepare", "images", os.path.join(work, "img"), data,
                        "--size", "32x32"], check=True, capture_output=True, timeout=600)
        runs = {f"{n}-{a}": [] for n, a in CONFIGS}
        base = []
        for _ in range(args.rounds):
            base.append(torch_loop(data, args))
            for n, a in CONFIGS:
                runs[f"{n}-{a}"].append(train(data, n, a, args, work))
        aug_s = augment_cost(data, args.batch)
    med = {k: float(np.median([r["samples_per_s"] for r in v])) for k, v in runs.items()}
    results = {"config": vars(args), "runs": runs, "median": med, "torch_loop": float(np.median(base)),
               "augment_s_per_batch": aug_s}
    print(tables(results))
    print("\nwrote", write_results("images", results))
    return 0


def tables(r):
    med, base = r["median"], r["torch_loop"]
    rows = [[n, a, f"{med[f'{n}-{a}']:,.0f}", f"{med[f'{n}-{a}'] / med[f'1-{a}']:.2f}x",
             f"{med[f'{n}-{a}'] / base:.2f}x"] for n, a in CONFIGS]
    c = r["config"]
    headers = ["ranks", "augmentation", "samples/s", "vs 1 rank, same augmentation", "vs plain torch loop"]
    return table(rows, headers) + (
        f"\n\nResNet-{c['depth']} width {c['width']}, 32x32x3 images ({3 * c['per_class']:,} files), global batch "
        f"{c['batch']}; plain torch loop (1 process, no augmentation): {base:,.0f} samples/s; augmentation alone: "
        f"{1e3 * r['augment_s_per_batch']:.2f} ms a batch of {c['batch']} "
        f"({c['batch'] / r['augment_s_per_batch']:,.0f} images/s).")
