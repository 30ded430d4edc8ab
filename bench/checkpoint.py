"""Checkpoint save and load against raw h5py writing and reading the same arrays.

    python -m bench checkpoint [--floats 25000000] [--repeat 3]

160 float32 tensors of ResNet-50-like sizes. mpirt adds a SHA-256 per array (manifest), an HMAC
signature, an fsync and a rename on save, and the same verification on load; raw h5py writes one
dataset per tensor and reads them back, nothing else. Ratios are raw time / mpirt time.
"""

import argparse
import os
import tempfile

import h5py
import numpy as np

from bench.common import table, timeit, write_results


def main(argv):
    from bench.kernels import resnet_like_sizes
    from mpirt.checkpoint import load, save

    p = argparse.ArgumentParser(prog="python -m bench checkpoint")
    p.add_argument("--floats", type=int, default=25_000_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    params = {f"layer{i}.weight": rng.standard_normal(n, dtype=np.float32)
              for i, n in enumerate(resnet_like_sizes(total=args.floats))}
    with tempfile.TemporaryDirectory(dir=os.environ.get("MPIRT_BENCH_TMP")) as tmp:
        ours, raw = os.path.join(tmp, "ckpt.h5"), os.path.join(tmp, "raw.h5")

        def save_ours():
            save(ours, spec={}, params=params, position={"step": 1}, world_size=1, key=b"bench")

        def save_raw():
            with h5py.File(raw, "w") as f:
                for k, v in params.items():
                    f.create_dataset(k, data=v)

        def load_raw():
            with h5py.File(raw, "r") as f:
                return {k: f[k][()] for k in f}

        t = {"save_mpirt": timeit(save_ours, args.repeat), "save_raw": timeit(save_raw, args.repeat),
             "load_mpirt": timeit(lambda: load(ours, key=b"bench"), args.repeat),
             "load_raw": timeit(load_raw, args.repeat)}
    med = {k: sorted(v)[len(v) // 2] for k, v in t.items()}
    mb = 4 * args.floats / 1e6
    rows = [[op, f"{1e3 * med[op + '_mpirt']:.0f}", f"{mb / med[op + '_mpirt']:.0f}", f"{1e3 * med[op + '_raw']:.0f}",
             f"{mb / med[op + '_raw']:.0f}", f"{med[op + '_raw'] / med[op + '_mpirt']:.2f}x"] for op in ("save", "load")]
    print(f"## Checkpoint of {args.floats / 1e6:.0f}M floats in 160 tensors (median of {args.repeat})\n")
    print(table(rows, ["op", "mpirt ms", "MB/s", "raw h5py ms", "MB/s", "raw / mpirt"]))
    print("\nwrote", write_results("checkpoint", {"floats": args.floats, "seconds": t}))
    return 0
