"""The fault matrix on both transports: every fault, many times, shared memory against tcp in the same run.

    python -m bench transport [--repeat 12] [--jobs-repeat 3] [--cases kill hang ...]

Each repetition runs every case once per transport (sm then tcp, tcp then sm on the next
repetition), under ``mpirt launch --transport T --hang-timeout 2``, bounded by ``--timeout``. An
outcome is *recovered* (exit 0 and the result checked: the shard job's output and its ledger, every
shard once; the 64 MiB loop's sums and final size; training's model against the 1-rank model;
wordcount's counts bit for bit), *hung* (the bound expired: the job's processes are killed) or
*crashed* (anything else). Detection is the first view change's error time less the fault's time
(events log); recovery is from that error to the first unit or step committed after it.
Cases: the shard job (small messages: kill, coordinator kill, hang, leave, join, join after a
shrink), the 64 MiB Allreduce loop (tests/jobs/bigreduce.py: kill, hang, coordinator kill mid-transfer,
kill then join), ``mpirt train`` (kill, join, coordinator kill) and ``mpirt wordcount`` (hang, join).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import mpi_env, table, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SQUARES = os.path.join(ROOT, "tests", "jobs", "squares.py")
BIG = os.path.join(ROOT, "tests", "jobs", "bigreduce.py")
SHARDS = 40
TRAIN = ["--model", "mlp", "--epochs", "2", "--global-batch", "64", "--lr", "0.05", "--seed", "3", "--no-progress"]

# name: (job, ranks, spare, job arguments or faults)
CASES = {
    "kill": ("squares", 4, 0, ["kill:member=2:step=5"]),
    "coordinator": ("squares", 4, 0, ["kill:member=coordinator:step=5"]),
    "hang": ("squares", 4, 0, ["hang:member=1:step=3"]),
    "leave": ("squares", 4, 0, ["leave:member=2:step=3"]),
    "join": ("squares", 2, 2, ["join:count=2:step=3"]),
    "shrink-join": ("squares", 3, 1, ["kill:member=1:step=2", "join:count=1:step=6"]),
    "64MiB-kill": ("big", 4, 0, ["--fault", "kill", "--member", "2"]),
    "64MiB-hang": ("big", 4, 0, ["--fault", "hang", "--member", "1"]),
    "64MiB-coordinator": ("big", 4, 0, ["--fault", "kill", "--member", "0"]),
    "64MiB-kill-join": ("big", 3, 1, ["--fault", "kill", "--member", "1", "--join", "1"]),
    "train": ("train", 4, 1, ["kill:member=2:step=5", "join:count=1:step=12", "kill:member=coordinator:step=20"]),
    "wordcount": ("wordcount", 3, 2, ["hang:member=1:step=4", "join:count=2:step=8"]),
}
JOBS = ("train", "wordcount")  # the slow cases: --jobs-repeat times


def _env():
    return mpi_env(PYTHONUNBUFFERED="1")


def _read(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _command(case, transport, tmp, data):
    job, n, spare, extra = CASES[case]
    cmd = [sys.executable, "-m", "mpirt", "launch", "-n", str(n), "--spare", str(spare), "--transport", transport,
           "--hang-timeout", "2", "--"]
    events = os.path.join(tmp, "events.jsonl")
    faults = [a for f in extra for a in ("--inject-fault", f)]
    if job == "squares":
        return cmd + [sys.executable, SQUARES, os.path.join(tmp, "out.npy"), "--shards", str(SHARDS), *faults]
    if job == "big":
        return cmd + [sys.executable, BIG, events, *extra]
    if job == "train":
        return cmd + ["mpirt", "train", "--data", data["digits"], *TRAIN, "--checkpoint-dir",
                      os.path.join(tmp, "ckpt"), "--events", events, *faults]
    return cmd + ["mpirt", "wordcount", data["text"], "--out", os.path.join(tmp, "counts.h5"), "--events", events,
                  *faults]


def _checked(case, tmp, stdout, data):
    """Why the job's result is wrong, or None when it is right."""
    job = CASES[case][0]
    if job == "squares":
        out = os.path.join(tmp, "out.npy")
        shards = [r["shard"] for r in _read(out + ".parts/ledger.jsonl")]
        if sorted(shards) != list(range(SHARDS)):
            return f"shards committed {sorted(shards)}"
        if not np.array_equal(np.load(out), np.arange(SHARDS * 5000, dtype=np.int64) ** 2):
            return "wrong output"
    elif job == "big":
        done = [json.loads(x[5:]) for x in stdout.splitlines() if x.startswith("DONE ")]
        _, n, _, extra = CASES[case]
        want = n - extra.count("--fault") + (int(extra[extra.index("--join") + 1]) if "--join" in extra else 0)
        if not done or done[0]["size"] != want:
            return f"final size {done and done[0]['size']} != {want}"
    elif job == "train":
        from mpirt.checkpoint import CheckpointDir

        params = CheckpointDir(os.path.join(tmp, "ckpt")).load_latest().params
        worst = max(float(np.max(np.abs(params[k].astype(np.float64) - data["ref_params"][k])))
                    / max(float(np.max(np.abs(data["ref_params"][k]))), 1e-12) for k in params)
        if worst > 1e-5:
            return f"model differs from 1 rank's by {worst:.3g}"
    else:
        import h5py

        with h5py.File(os.path.join(tmp, "counts.h5")) as a, h5py.File(data["ref_counts"]) as b:
            if a.attrs["sha256"] != b.attrs["sha256"] or not np.array_equal(a["counts"][()], b["counts"][()]):
                return "counts differ from 1 rank's"
    return None


def _times(case, tmp, stdout):
    """(detect ms, recover ms) of the first view change after a fault, or (None, None)."""
    job = CASES[case][0]
    events = _read(os.path.join(tmp, "out.npy.events" if job == "squares" else "events.jsonl"))
    fault = next((e["time"] for e in events if e["event"] == "fault"), None)
    view = next((e for e in events if e["event"] == "view" and e.get("error_time")), None)
    if fault is None or view is None:
        return None, None
    err = view["error_time"]
    after = []
    if job == "squares":
        after = [r["time"] for r in _read(os.path.join(tmp, "out.npy.parts", "ledger.jsonl"))
                 if r["view"] >= view["view"] and not r.get("recovered")]
    elif job == "big":
        done = [json.loads(x[5:]) for x in stdout.splitlines() if x.startswith("DONE ")]
        after = [t for t in (done[0]["resumed"] if done else []) if t]
    return (err - fault) * 1e3, ((min(after) - err) * 1e3 if after else None)


def run_case(case, transport, data, timeout):
    """One run: its outcome (recovered, hung, crashed), wall seconds, detection and recovery ms."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = _command(case, transport, tmp, data)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                cwd=tmp, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_session(proc)
            out, err = proc.communicate()
            return {"outcome": "hung", "wall_s": timeout, "why": err[-400:]}
        wall = time.perf_counter() - t0
        why = f"exit {proc.returncode}" if proc.returncode else _checked(case, tmp, out, data)
        detect, recover = _times(case, tmp, out)
    return {"outcome": "crashed" if why else "recovered", "wall_s": wall, "detect_ms": detect,
            "recover_ms": recover, "why": (why + ": " + err[-400:]) if why else ""}


def _kill_session(proc):
    """SIGKILL the launcher's session and every rank (stopped ones too): they run in its session."""
    import psutil

    procs = [p for p in psutil.process_iter(["pid"]) if _session(p) == proc.pid]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _session(p):
    try:
        return os.getsid(p.pid)
    except OSError:
        return None


def _prepare(tmp):
    """The data sets, and the 1-rank results that training and wordcount must equal."""
    from mpirt.checkpoint import CheckpointDir

    mpirt = [sys.executable, "-m", "mpirt"]
    data = {"digits": os.path.join(tmp, "digits.h5"), "text": os.path.join(tmp, "text.h5"),
            "ref_counts": os.path.join(tmp, "ref.h5")}
    for cmd in (["prepare", "digits", data["digits"], "--shard-rows", "256"],
                ["prepare", "synth-text", data["text"], "--rows", "6000", "--features", "2048", "--shard-rows", "128"],
                ["wordcount", data["text"], "--out", data["ref_counts"]],
                ["train", "--data", data["digits"], *TRAIN, "--checkpoint-dir", os.path.join(tmp, "refckpt")]):
        subprocess.run(mpirt + cmd, check=True, capture_output=True, timeout=300, env=_env(), cwd=tmp)
    data["ref_params"] = CheckpointDir(os.path.join(tmp, "refckpt")).load_latest().params
    return data


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench transport")
    p.add_argument("--repeat", type=int, default=12, help="runs of each case per transport")
    p.add_argument("--jobs-repeat", type=int, default=3, help="runs of the train and wordcount cases per transport")
    p.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    p.add_argument("--timeout", type=float, default=180.0, help="bound on one run: past it, the run hung")
    args = p.parse_args(argv)
    runs = {c: {"sm": [], "tcp": []} for c in args.cases}
    with tempfile.TemporaryDirectory() as tmp:
        data = _prepare(tmp) if set(args.cases) & set(JOBS) else {}
        for i in range(args.repeat):
            order = ("sm", "tcp") if i % 2 == 0 else ("tcp", "sm")
            for case in args.cases:
                if case in JOBS and i >= args.jobs_repeat:
                    continue
                for t in order:
                    r = run_case(case, t, data, args.timeout)
                    runs[case][t].append(r)
                    print(f"{i:3d} {case:18s} {t:3s} {r['outcome']:9s} {r['wall_s']:6.1f} s "
                          f"detect {_ms(r.get('detect_ms'))} recover {_ms(r.get('recover_ms'))} {r['why'][:200]}",
                          flush=True)
    print_matrix(runs)
    print("\nwrote", write_results("transport", runs))
    bad = [r for c in runs.values() for rs in c.values() for r in rs if r["outcome"] != "recovered"]
    return 1 if bad else 0


def _ms(x):
    return "-" if x is None else f"{x:.0f} ms"


def _med(runs, key):
    xs = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def print_matrix(runs):
    rows = []
    for case, by in runs.items():
        row = [case]
        for t in ("sm", "tcp"):
            rs = by[t]
            counts = {o: sum(r["outcome"] == o for r in rs) for o in ("recovered", "hung", "crashed")}
            row.append(f"{counts['recovered']}/{len(rs)}" + "".join(f", {v} {k}" for k, v in counts.items()
                                                                    if v and k != "recovered"))
        for key, digits in (("detect_ms", 0), ("recover_ms", 0), ("wall_s", 1)):
            sm, tcp = _med(by["sm"], key), _med(by["tcp"], key)
            row += [f"{x:.{digits}f}" if x is not None else "-" for x in (sm, tcp)]
            row.append(f"{sm / tcp:.2f}" if sm and tcp else "-")
        rows.append(row)
    print("\n## Fault matrix: outcomes per transport, medians (detection and recovery in ms, wall in s)\n")
    print(table(rows, ["case", "sm recovered", "tcp recovered", "detect sm", "detect tcp", "sm/tcp",
                       "recover sm", "recover tcp", "sm/tcp", "wall sm", "wall tcp", "sm/tcp"]))
