"""Seeded chaos: random fault schedules against the elastic task farm; counts lost and duplicated units.

    python -m bench chaos [--schedules 20] [--seed 0] [--ranks 4]

Each schedule draws 1 to 3 faults (kill, hang, leave of a random member or the coordinator,
joins) at random steps, runs the test suite's shard job under `mpirt launch`, and checks
the result against the fault-free one and the ledger for every shard exactly once.
Not part of CI's default run: it takes minutes.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

import numpy as np

from bench.common import write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "tests", "jobs", "squares.py")
SHARDS = 60


def schedule(rng, ranks):
    faults, members = [], list(range(ranks))
    for _ in range(rng.randint(1, 3)):
        step = rng.randint(1, SHARDS - 10)
        kind = rng.choice(["kill", "kill", "hang", "leave", "join", "coordinator"])
        if kind == "join":
            faults.append(f"join:count={rng.randint(1, 2)}:step={step}")
        elif kind == "coordinator":
            faults.append(f"kill:member=coordinator:step={step}")
        elif len(members) > 2:
            m = rng.choice(members[1:])
            members.remove(m)
            faults.append(f"{kind}:member={m}:step={step}")
    return faults


def run_one(faults, ranks, tmp):
    out = os.path.join(tmp, "out.npy")
    cmd = [sys.executable, "-m", "mpirt", "launch", "-n", str(ranks), "--spare", "4", "--hang-timeout", "2", "--",
           sys.executable, JOB, out, "--shards", str(SHARDS)]
    for f in faults:
        cmd += ["--inject-fault", f]
    env = dict(os.environ)
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, start_new_session=True)
    records = []
    if os.path.exists(out + ".parts/ledger.jsonl"):
        with open(out + ".parts/ledger.jsonl") as f:
            records = [json.loads(line) for line in f]
    committed = [r["shard"] for r in records]
    lost = SHARDS - len(set(committed))
    duplicated = len(committed) - len(set(committed)) + sum(1 for r in records if r.get("duplicate"))
    correct = proc.returncode == 0 and os.path.exists(out) and np.array_equal(
        np.load(out), np.arange(SHARDS * 5000, dtype=np.int64) ** 2)
    return {"faults": faults, "returncode": proc.returncode, "survived": bool(correct), "lost": lost,
            "duplicated": duplicated, "stderr_tail": proc.stderr[-300:] if not correct else ""}


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench chaos")
    p.add_argument("--schedules", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", type=int, default=4)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    results = []
    for i in range(args.schedules):
        faults = schedule(rng, args.ranks)
        with tempfile.TemporaryDirectory() as tmp:
            r = run_one(faults, args.ranks, tmp)
        results.append(r)
        print(f"{i:3d} {'ok  ' if r['survived'] else 'FAIL'} lost={r['lost']} dup={r['duplicated']} {' '.join(faults)}",
              flush=True)
    survived = sum(r["survived"] for r in results)
    lost = sum(r["lost"] for r in results)
    dup = sum(r["duplicated"] for r in results)
    print(f"\nsurvived {survived}/{len(results)} schedules; lost units {lost}; duplicated units {dup}")
    print("wrote", write_results("chaos", results))
    return 0 if survived == len(results) and not lost and not dup else 1
