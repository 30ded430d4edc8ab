"""Seeded chaos: random fault schedules against the elastic task farm; counts lost and duplicated units.

    python -m bench chaos [--schedules 20] [--seed 0] [--ranks 4] [--hosts] [--hostile]

Each schedule draws 1 to 3 faults (kill, hang, leave of a random member or the coordinator,
joins) at random steps, runs the test suite's shard job under `mpirt launch`, and checks
the result against the fault-free one and the ledger for every shard exactly once.
With ``--hosts`` the job runs on 6 ranks over 3 simulated hosts (scripts/hosts/local-hosts.sh,
root) and every schedule has one host fault (crash, freeze or partition of a random host, the
coordinator's included) mixed with 0 to 2 process faults on the other hosts.
``--hostile`` runs the hostile-inputs set instead (bench/hostile.py): bad files and flags, each
must be one line, a non-zero exit, no traceback, inputs intact.
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

from bench.common import mpi_env, write_results

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


HOSTS = os.path.join(ROOT, "scripts", "hosts", "local-hosts.sh")
AGENT = os.path.join(ROOT, "scripts", "hosts", "ssh")
PER_HOST = 2


def host_schedule(rng):
    """One host fault (any of the 3 hosts) plus 0 to 2 process faults on members of the other hosts."""
    host = rng.randint(1, 3)
    on_host = [(host - 1) * PER_HOST + i for i in range(PER_HOST)]
    faults = [f"{rng.choice(['host-crash', 'host-freeze', 'host-cut'])}:member={rng.choice(on_host)}"
              f":step={rng.randint(1, SHARDS - 10)}"]
    # At most one process fault per other host: a host left with no member is a second host lost,
    # which the quorum (a majority of hosts) rightly refuses to survive.
    others = [rng.choice([(h - 1) * PER_HOST + i for i in range(PER_HOST)]) for h in (1, 2, 3) if h != host]
    for m in rng.sample(others, rng.randint(0, 2)):
        faults.append(f"{rng.choice(['kill', 'hang', 'leave'])}:member={m}:step={rng.randint(1, SHARDS - 10)}")
    return faults, f"node{host}"


def run_one(faults, ranks, tmp, host=None):
    out = os.path.join(tmp, "out.npy")
    cmd = [sys.executable, "-m", "mpirt", "launch", "-n", str(ranks), "--hang-timeout", "3" if host else "2"]
    if host:
        hostfile = os.path.join(tmp, "hostfile")
        with open(hostfile, "w") as f:
            f.write("".join(f"node{i} slots={PER_HOST}\n" for i in (1, 2, 3)))
        cmd += ["--hostfile", hostfile, "--launch-agent", AGENT]
    else:
        cmd += ["--spare", "4"]
    cmd += ["--", sys.executable, JOB, out, "--shards", str(SHARDS)]
    for f in faults:
        cmd += ["--inject-fault", f]
    env = mpi_env()
    if host:
        cmd = [AGENT, "head", " ".join(cmd)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, start_new_session=True)
    finally:
        if host:  # give the host back, whatever the fault left on it
            for action in ("thaw", "heal", "crash"):
                subprocess.run([HOSTS, action, host], capture_output=True)
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
    p.add_argument("--hosts", action="store_true", help="6 ranks over 3 simulated hosts, one host fault each")
    p.add_argument("--hostile", action="store_true", help="the hostile-inputs set (bench/hostile.py)")
    args = p.parse_args(argv)
    if args.hostile:
        from bench import hostile

        with tempfile.TemporaryDirectory() as tmp:
            results = hostile.report(hostile.run(tmp))
        print("wrote", write_results("hostile", results))
        return 0 if all(r["ok"] for r in results) else 1
    rng = random.Random(args.seed)
    results = []
    if args.hosts and subprocess.run([HOSTS, "status"], capture_output=True).returncode != 0:
        subprocess.run([HOSTS, "start", "3"], check=True, capture_output=True)
    for i in range(args.schedules):
        faults, host = host_schedule(rng) if args.hosts else (schedule(rng, args.ranks), None)
        with tempfile.TemporaryDirectory() as tmp:
            r = run_one(faults, 3 * PER_HOST if host else args.ranks, tmp, host)
        results.append(r)
        print(f"{i:3d} {'ok  ' if r['survived'] else 'FAIL'} lost={r['lost']} dup={r['duplicated']} {' '.join(faults)}",
              flush=True)
    survived = sum(r["survived"] for r in results)
    lost = sum(r["lost"] for r in results)
    dup = sum(r["duplicated"] for r in results)
    print(f"\nsurvived {survived}/{len(results)} schedules; lost units {lost}; duplicated units {dup}")
    print("wrote", write_results("chaoshosts" if args.hosts else "chaos", results))
    return 0 if survived == len(results) and not lost and not dup else 1
