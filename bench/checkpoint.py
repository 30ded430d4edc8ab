"""Checkpoints: save and load against raw h5py, and what checkpoints cost a training run.

    python -m bench checkpoint [--floats 20000000] [--repeat 3] [--train-steps 40] [--no-train]

1. Save and load of ``--floats`` float32 in 160 tensors of ResNet-50-like sizes (torch tensors, as a
   model's), each repeat running every variant once, interleaved:
   - raw h5py: one ``create_dataset`` per tensor, nothing else (and the same plus an fsync);
   - mpirt, blocking (``--checkpoint-sync``): manifest of SHA-256 per array, HMAC signature, write,
     fsync, rename (:mod:`mpirt.checkpoint_write`);
   - mpirt in the background (the default): what the caller waits for (the copy into host
     memory), and the time until the file is on disk under its name;
   - load: mpirt (every digest and the signature verified) against raw h5py reading the arrays.
   Ratios are raw time / mpirt time (above 1: mpirt is faster).
2. ``mpirt train`` of a 20M-parameter MLP (784 features, ``--hidden 4096``, SGD with momentum: a
   160 MB checkpoint) on one rank for ``--train-steps`` steps: without checkpoints, with
   ``--checkpoint-every 5 --checkpoint-sync``, with ``--checkpoint-every 5`` (background), and the
   same into a directory in /dev/shm (tmpfs: the save without the disk), interleaved in each repeat.
   Time: from the job's first view to its ``finish`` event (the training loop, the last save and the
   test evaluation; not Python's and MPI's start-up).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

from bench.common import mpi_env, table, write_results

TRAIN_VARIANTS = {"none": [], "sync": ["--checkpoint-every", "5", "--checkpoint-sync"],
                  "background": ["--checkpoint-every", "5"], "background_tmpfs": ["--checkpoint-every", "5"]}
# "background_tmpfs" saves into /dev/shm (memory, no block device): the save's own CPU apart from what
# the storage path costs. On the 2-core VM, writing 160 MB to its virtio disk cost ~0.3 s of kernel
# CPU a save (/proc/stat), against ~0.1 s into tmpfs (bench/results/checkpoint-2core.md).
TMPFS = "/dev/shm"
LABELS = {"background_tmpfs": "background, into tmpfs (/dev/shm)"}


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench checkpoint")
    p.add_argument("--floats", type=int, default=20_000_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--no-train", action="store_true", help="only the save/load part")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=os.environ.get("MPIRT_BENCH_TMP")) as tmp:
        results = {"floats": args.floats, "seconds": save_load(tmp, args.floats, args.repeat)}
        if not args.no_train:
            results["train"] = train(tmp, args.train_steps, args.repeat)
    print(tables(results))
    print("\nwrote", write_results("checkpoint", results))
    return 0


def save_load(tmp, floats, repeat):
    """{variant: [seconds of each repeat]}, every variant run once per repeat, in turn."""
    import torch

    from bench.kernels import resnet_like_sizes
    from mpirt.checkpoint import CheckpointDir, load, save

    rng = np.random.default_rng(0)
    params = {f"layer{i}.weight": torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
              for i, n in enumerate(resnet_like_sizes(total=floats))}
    ours, raw = os.path.join(tmp, "ckpt.h5"), os.path.join(tmp, "raw.h5")
    fields = {"spec": {}, "params": params, "position": {"step": 1}, "world_size": 1}
    background = CheckpointDir(os.path.join(tmp, "bg"), keep=1, key=b"bench", background=True)

    def save_raw(fsync=False):
        with h5py.File(raw, "w") as f:
            for k, v in params.items():
                f.create_dataset(k, data=v.numpy())
        if fsync:
            fd = os.open(raw, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    def load_raw():
        with h5py.File(raw, "r") as f:
            return {k: f[k][()] for k in f}

    def save_background():
        t0 = time.perf_counter()
        background.save(1, **fields)
        t1 = time.perf_counter()
        background.wait()
        return {"save_background_blocking": t1 - t0, "save_background_on_disk": time.perf_counter() - t0}

    steps = {"save_raw": save_raw, "save_raw_fsync": lambda: save_raw(True),
             "save_mpirt": lambda: save(ours, key=b"bench", **fields), "save_background": save_background,
             "load_mpirt": lambda: load(ours, key=b"bench"), "load_raw": load_raw}
    seconds = {}
    for i in range(repeat + 1):  # the first round warms up (page cache, the background buffers)
        for name, fn in steps.items():
            t0 = time.perf_counter()
            out = fn()
            parts = out if name == "save_background" else {name: time.perf_counter() - t0}
            for k, v in parts.items():
                if i:
                    seconds.setdefault(k, []).append(v)
    return seconds


def train(tmp, steps, repeat):
    """{variant: [seconds from the first view to the finish event]} of one-rank training runs."""
    from mpirt.data.prepare import Options, prepare_dense

    data = os.path.join(tmp, "mlp784.h5")
    rows = steps * 64 * 10 // 8  # 80% train: ``steps`` steps of 64 in one epoch
    rng = np.random.default_rng(0)
    prepare_dense(rng.standard_normal((rows, 784), dtype=np.float32), rng.integers(0, 10, rows), data,
                  Options(shard_rows=1024))
    env = mpi_env(PYTHONUNBUFFERED="1")
    seconds = {}
    for i in range(repeat):
        for name, extra in TRAIN_VARIANTS.items():
            run = os.path.join(tmp, f"{name}-{i}")
            os.makedirs(run)
            if name.endswith("_tmpfs") and not os.path.isdir(TMPFS):
                continue
            shm = tempfile.mkdtemp(dir=TMPFS, prefix="mpirt-bench-ck-") if name.endswith("_tmpfs") else None
            ck = ["--checkpoint-dir", os.path.join(shm or run, "ck")] if extra else []
            cmd = [sys.executable, "-m", "mpirt", "train", "--data", data, "--model", "mlp", "--hidden", "4096",
                   "--lr", "0.01", "--epochs", "1", "--no-progress", "--events", os.path.join(run, "events.jsonl"),
                   "--report", os.path.join(run, "report"), *ck, *extra]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
            finally:
                if shm:
                    shutil.rmtree(shm, ignore_errors=True)
            if res.returncode != 0:
                raise SystemExit(f"bench checkpoint: training '{name}' failed: {res.stderr[-2000:]}")
            with open(os.path.join(run, "events.jsonl")) as f:
                events = [json.loads(line) for line in f]
            with open(os.path.join(run, "report", "report.json")) as f:
                stats = json.load(f).get("checkpoints")
            t = [e["time"] for e in events if e["event"] in ("view", "finish")]
            seconds.setdefault(name, []).append(t[-1] - t[0])
            done = events[-1]["step"]  # the finish event
            seconds.setdefault(f"{name}_checkpoints", []).append(stats)
    return {"steps": done, "params": 20_037_642, "seconds": seconds}


def _med(v):
    v = [x for x in v if x is not None]
    return sorted(v)[len(v) // 2] if v else None


SAVE_ROWS = (("save, blocking (--checkpoint-sync)", "save_mpirt"),
             ("save in the background: the caller waits", "save_background_blocking"),
             ("save in the background: until on disk", "save_background_on_disk"),
             ("raw h5py save", "save_raw"), ("raw h5py save + fsync", "save_raw_fsync"))


def tables(results):
    """The markdown tables of a run's results (printed, and in bench/RESULTS.md); rows whose figures
    a results file lacks (an older run) are left out."""
    s = {k: _med(v) for k, v in results["seconds"].items()}
    mb = 4 * results["floats"] / 1e6
    n = len(results["seconds"]["save_raw"])
    raw, raw_fsync = s["save_raw"], s.get("save_raw_fsync")
    rows = [[what, f"{1e3 * s[k]:.0f}", f"{mb / s[k]:.0f}", f"{raw / s[k]:.2f}x",
             f"{raw_fsync / s[k]:.2f}x" if raw_fsync else ""] for what, k in SAVE_ROWS if s.get(k)]
    rows.append(["load (every digest verified)", f"{1e3 * s['load_mpirt']:.0f}", f"{mb / s['load_mpirt']:.0f}",
                 f"{s['load_raw'] / s['load_mpirt']:.2f}x (raw h5py load {1e3 * s['load_raw']:.0f} ms)", ""])
    out = [f"Checkpoint of {results['floats'] / 1e6:.0f}M floats in 160 tensors (median of {n}, interleaved):", "",
           table(rows, ["op", "ms", "MB/s", "raw h5py / this", "raw h5py + fsync / this"])]
    tr = results.get("train")
    if tr:
        t = {k: _med(v) for k, v in tr["seconds"].items() if not k.endswith("_checkpoints")}
        rows = [[LABELS.get(name, name), f"{t[name]:.2f}", f"{t[name] / t['none']:.3f}x",
                 _waits(tr["seconds"].get(f"{name}_checkpoints"))] for name in TRAIN_VARIANTS if t.get(name)]
        out += ["", f"Training a {tr['params'] / 1e6:.0f}M-parameter MLP on 1 rank, {tr['steps']} steps (median of "
                f"{len(tr['seconds']['none'])}, interleaved):", "",
                table(rows, ["checkpoints every 5 steps", "s", "time / without", "saves (one run)"])]
    return "\n".join(out)


def _waits(stats):
    if not stats or not stats[0]:
        return ""
    st = stats[len(stats) // 2]
    return (f"{st['saves']} saves, {st['blocking_s']:.2f} s blocking training, {st['waited']} waited for the one "
            f"before ({st['wait_s']:.2f} s)")
