"""What encryption and signatures cost: prepare, the reader, checkpoint save and load, training.

    python -m bench security [--rows 200000] [--floats 20000000] [--repeat 5] [--no-train]

Each figure beside the same operation without protection, from the same run, interleaved
(every variant once per repeat; medians), as a ratio protected / plain (goal: <= 1.10x for the
reader and checkpoints):

1. ``prepare``: ``--rows`` x 64 float32 rows (51 MB for 200,000) through the data-set writer: plain;
   signed (HMAC + Ed25519); encrypted and signed.
2. The reader: every shard of the train split read whole (a shard job's pattern), and 1,000 blocks of
   64 consecutive rows at random places (training's pattern: shuffled blocks), plain and encrypted.
3. Checkpoints of ``--floats`` float32 in 160 tensors: blocking save (HMAC, as the default key
   setup) against encrypted + HMAC + Ed25519; load with every digest and signature verified.
4. ``mpirt train`` on one rank, an MLP (hidden 512) on 40,000 such rows, one epoch (500 steps), a
   checkpoint every 5 steps: plain data and checkpoints against ``--encrypt --sign-key`` on the
   encrypted data set (the whole command, start-up included).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import mpi_env, table, write_results


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench security")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--floats", type=int, default=20_000_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-train", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=os.environ.get("MPIRT_BENCH_TMP")) as tmp:
        keys = _keys(tmp)
        results = {"rows": args.rows, "floats": args.floats, "repeat": args.repeat,
                   "prepare": prepare(tmp, keys, args.rows, args.repeat),
                   "reader": reader(tmp, keys, args.repeat),
                   "checkpoint": checkpoint(tmp, keys, args.floats, args.repeat)}
        if not args.no_train:
            results["train"] = train(tmp, keys, args.repeat)
    print(tables(results))
    print("\nwrote", write_results("security", results))
    return 0


def _keys(tmp):
    from mpirt.secure.keys import load_private, new_keypair, new_secret, secret_from_file

    new_secret(os.path.join(tmp, "secret.key"))
    new_keypair(os.path.join(tmp, "signer"))
    return {"secret": secret_from_file(os.path.join(tmp, "secret.key")),
            "signing_key": load_private(os.path.join(tmp, "signer")), "dir": tmp}


def _policy(keys, variant):
    from mpirt.secure.policy import Policy

    if variant == "plain":
        return Policy()
    if variant == "signed":
        return Policy(secret=keys["secret"], signing_key=keys["signing_key"])
    return Policy(secret=keys["secret"], signing_key=keys["signing_key"], encrypt=True, private=True)


def _interleaved(variants, repeat, fn):
    """{variant: [seconds]}: ``fn(variant)`` for each variant in turn, ``repeat`` rounds after a warm-up."""
    from mpirt.secure.policy import set_policy

    seconds = {}
    for i in range(repeat + 1):
        for v in variants:
            t0 = time.perf_counter()
            fn(v)
            if i:
                seconds.setdefault(v, []).append(time.perf_counter() - t0)
    set_policy(None)
    return seconds


def prepare(tmp, keys, rows, repeat):
    from mpirt.data.prepare import Options, prepare_dense
    from mpirt.secure.policy import set_policy

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((rows, 64), dtype=np.float32), rng.integers(0, 10, rows)

    def run(variant):
        set_policy(_policy(keys, variant))
        prepare_dense(X, y, os.path.join(tmp, f"{variant}.h5"), Options(shard_rows=4096))

    return _interleaved(("plain", "signed", "encrypted"), repeat, run)


def reader(tmp, keys, repeat):
    from mpirt.data.reader import open_dataset
    from mpirt.secure.policy import Policy, set_policy

    rng = np.random.default_rng(1)

    def run(variant):
        kind, pattern = variant.split(":")
        set_policy(Policy(secret=keys["secret"]))
        with open_dataset(os.path.join(tmp, f"{kind}.h5")) as ds:
            sp = ds.split("train")
            if pattern == "shards":
                for a, b in sp.shards:
                    sp.read(int(a), int(b))
            else:
                for a in rng.integers(0, sp.n_rows - 64, 1000) // 64 * 64:
                    sp.read(int(a), int(a) + 64)

    return _interleaved(("plain:shards", "encrypted:shards", "plain:blocks", "encrypted:blocks"), repeat, run)


def checkpoint(tmp, keys, floats, repeat):
    import torch

    from bench.kernels import resnet_like_sizes
    from mpirt.checkpoint import load, save
    from mpirt.secure.policy import set_policy

    rng = np.random.default_rng(0)
    params = {f"layer{i}.weight": torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
              for i, n in enumerate(resnet_like_sizes(total=floats))}
    fields = {"spec": {}, "params": params, "position": {"step": 1}, "world_size": 1}

    def run(variant):
        op, kind = variant.split(":")
        set_policy(_policy(keys, "plain" if kind == "plain" else "encrypted"))
        path = os.path.join(tmp, f"ckpt-{kind}.h5")
        if op == "save":
            save(path, key=keys["secret"], **fields)
        else:
            load(path, key=keys["secret"])

    return _interleaved(("save:plain", "save:encrypted", "load:plain", "load:encrypted"), repeat, run)


def train(tmp, keys, repeat, rows=40_000):
    """{variant: [seconds of the whole command]} of one-rank training with a checkpoint every 5 steps,
    on ``rows`` rows (500 steps of 64, 100 checkpoints)."""
    from mpirt.data.prepare import Options, prepare_dense
    from mpirt.secure.policy import set_policy

    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((rows, 64), dtype=np.float32), rng.integers(0, 10, rows)
    for variant in ("plain", "encrypted"):
        set_policy(_policy(keys, variant))
        prepare_dense(X, y, os.path.join(tmp, f"train-{variant}.h5"), Options(shard_rows=4096))
    set_policy(None)
    env = mpi_env(PYTHONUNBUFFERED="1")
    key_file = os.path.join(keys["dir"], "secret.key")
    variants = {"plain": ["--data", os.path.join(tmp, "train-plain.h5")],
                "encrypted": ["--data", os.path.join(tmp, "train-encrypted.h5"), "--encrypt", "--key-file", key_file,
                              "--sign-key", os.path.join(keys["dir"], "signer")]}
    seconds = {}
    for i in range(repeat):
        for name, extra in variants.items():
            ck = os.path.join(tmp, f"train-{name}-{i}")
            cmd = [sys.executable, "-m", "mpirt", "train", "--model", "mlp", "--hidden", "512", "--epochs", "1",
                   "--no-progress", "--checkpoint-dir", ck, "--checkpoint-every", "5", *extra]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
            if res.returncode != 0:
                raise SystemExit(f"bench security: training '{name}' failed: {res.stderr[-2000:]}")
            seconds.setdefault(name, []).append(time.perf_counter() - t0)
    return seconds


def _med(v):
    return sorted(v)[len(v) // 2]


def tables(results):
    """The markdown table of a run (printed, and in bench/RESULTS.md)."""
    mb_data = results["rows"] * 64 * 4 / 1e6
    mb_ckpt = results["floats"] * 4 / 1e6
    rows = []

    def pair(what, mb, plain, protected, label):
        p, q = _med(plain), _med(protected)
        rows.append([what, label, f"{1e3 * p:.0f}", f"{1e3 * q:.0f}", f"{mb / q:.0f}" if mb else "", f"{q / p:.3f}x"])

    pr = results["prepare"]
    pair(f"prepare {results['rows']:,} x 64 floats", mb_data, pr["plain"], pr["signed"], "HMAC + Ed25519 signed")
    pair(f"prepare {results['rows']:,} x 64 floats", mb_data, pr["plain"], pr["encrypted"], "encrypted + signed")
    rd = results["reader"]
    pair("read the train split, shard by shard", mb_data * 0.8, rd["plain:shards"], rd["encrypted:shards"],
         "encrypted")
    pair("read 1,000 blocks of 64 rows at random", 0, rd["plain:blocks"], rd["encrypted:blocks"], "encrypted")
    ck = results["checkpoint"]
    pair(f"checkpoint save, {mb_ckpt:.0f} MB (HMAC)", mb_ckpt, ck["save:plain"], ck["save:encrypted"],
         "encrypted + HMAC + Ed25519")
    pair(f"checkpoint load, {mb_ckpt:.0f} MB (verified)", mb_ckpt, ck["load:plain"], ck["load:encrypted"],
         "encrypted + HMAC + Ed25519")
    if results.get("train"):
        tr = results["train"]
        pair("mpirt train, 1 rank, MLP, 500 steps, checkpoint every 5", 0, tr["plain"], tr["encrypted"],
             "data and checkpoints encrypted, signed")
    n = results["repeat"]
    return (f"Protection at rest against the same without (median of {n}, interleaved; MB/s of the protected "
            f"variant):\n\n" + table(rows, ["operation", "protected", "plain ms", "protected ms", "MB/s",
                                            "protected / plain"]))
