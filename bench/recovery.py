"""Recovery after a SIGKILL, broken down, at 2/4/8 ranks; hang detection; torchrun restart as baseline;
and the loss of a whole host (crash, partition) at 6 and 12 ranks over 3 simulated hosts.

    python -m bench recovery [--ranks 2 4 8] [--repeat 3] [--hang-timeout 2] [--host-ranks 6 12]

The host rows need root (scripts/hosts/local-hosts.sh: network namespaces); ``--host-ranks`` with no
value skips them.

mpirt's side runs the test suite's shard job (tests/jobs/squares.py) under
``mpirt launch`` with an injected fault and reads the phases from the events log
and the ledger log. The baseline is torchrun (gloo) restarting its workers after
one is SIGKILLed, timed from the kill to the first allreduce after the restart.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile

from bench.common import mpi_env, table, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "tests", "jobs", "squares.py")
MPIRT = [sys.executable, "-m", "mpirt"]


def _env():
    return mpi_env(PYTHONUNBUFFERED="1")


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mpirt_recovery(n, fault, hang_timeout, shards=200):
    """One run with ``fault``; returns the phases of the recovery in milliseconds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.npy")
        cmd = MPIRT + ["launch", "-n", str(n), "--hang-timeout", str(hang_timeout), "--", sys.executable, JOB,
                       out, "--shards", str(shards), "--inject-fault", fault]
        subprocess.run(cmd, check=True, timeout=300, env=_env(), capture_output=True)
        events = _read(out + ".events")
        ledger = _read(out + ".parts/ledger.jsonl") if os.path.exists(out + ".parts/ledger.jsonl") else []
    return phases_of(events, ledger)


def phases_of(events, ledger):
    """The recovery's phases in ms, from the first fault to the first unit committed after the change
    (view 1); None when every unit was committed before it."""
    fault_t = next(e["time"] for e in events if e["event"] == "fault")
    view = next(e for e in events if e["event"] == "view" and e["view"] == 1)
    replan = next(e for e in events if e["event"] == "replan" and e["view"] == 1)
    fresh = [r["time"] for r in ledger if r["view"] == 1 and not r.get("recovered")]
    if not fresh:
        return None  # nothing was left to commit after the change: nothing to time
    first = min(fresh)
    b = view["breakdown"]
    return {
        "detect": (view["error_time"] - fault_t) * 1e3,
        "revoke+shrink": (b["revoke_s"] + b["shrink_s"]) * 1e3,
        "agree": (b["agree_s"] + b["sync_s"]) * 1e3,
        "replan": replan["replan_s"] * 1e3,
        "first unit": (first - replan["time"]) * 1e3,
        "reconfigure": (first - view["error_time"]) * 1e3,
        "lost": len(view["failed"]),
        "total": (first - fault_t) * 1e3,
    }


TORCH_WORKER = r'''
import os, sys, time, signal, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank(); attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
out = sys.argv[1]
x = torch.ones(1 << 18)
for step in range(40):
    dist.all_reduce(x)
    if attempt == 0 and rank == 1 and step == 10:
        with open(out + ".kill", "w") as f: f.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    if attempt > 0 and step == 0 and rank == 0:
        with open(out + ".first", "w") as f: f.write(repr(time.time()))
dist.destroy_process_group()
'''


def torchrun_restart(n):
    """Seconds from a worker's SIGKILL to the first allreduce after torchrun restarts the group."""
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "worker.py")
        with open(script, "w") as f:
            f.write(TORCH_WORKER)
        out = os.path.join(tmp, "t")
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        if not os.path.exists(torchrun):
            torchrun = shutil.which("torchrun") or torchrun
        proc = subprocess.Popen([torchrun, "--standalone", f"--nproc_per_node={n}", "--max_restarts=1",
                                 "--monitor_interval=0.1", script, out], env=_env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            # torchrun's restart hung (seen at 4 workers). Its workers run in sessions of their own,
            # so the whole tree is killed, not only torchrun's process group.
            import psutil

            tree = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            for child in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            proc.wait()
            psutil.wait_procs(tree, timeout=10)
        if not os.path.exists(out + ".first"):
            return None, "restart did not complete"
        kill = float(open(out + ".kill").read())
        first = float(open(out + ".first").read())
    return (first - kill) * 1e3, None


HOSTS = os.path.join(ROOT, "scripts", "hosts", "local-hosts.sh")
AGENT = os.path.join(ROOT, "scripts", "hosts", "ssh")


def host_recovery(n, fault, hang_timeout, shards=400):
    """``n`` ranks over node1..node3 (n/3 each), member 2 strikes ``fault`` on its host (node1 holds the
    coordinator). Phases in ms, from the fault to the first unit committed after it."""
    with tempfile.TemporaryDirectory() as tmp:
        hostfile = os.path.join(tmp, "hostfile")
        with open(hostfile, "w") as f:
            f.write("".join(f"node{i} slots={n // 3}\n" for i in (1, 2, 3)))
        out = os.path.join(tmp, "out.npy")
        victim = n // 3  # the first member on node2
        line = " ".join([sys.executable, "-m", "mpirt", "launch", "-n", str(n), "--hostfile", hostfile,
                         "--launch-agent", AGENT, "--hang-timeout", str(hang_timeout), "--", sys.executable, JOB,
                         out, "--shards", str(shards), "--inject-fault", f"{fault}:member={victim}:step=20"])
        try:
            subprocess.run([AGENT, "head", line], check=True, timeout=300, env=_env(), capture_output=True)
            events = _read(out + ".events")
            ledger = _read(out + ".parts/ledger.jsonl")
        finally:  # give the host back, whatever the fault left there
            subprocess.run([HOSTS, "heal", "node2"], capture_output=True)
            subprocess.run([HOSTS, "crash", "node2"], capture_output=True)
    return phases_of(events, ledger)


def host_rows(ranks, repeat, hang_timeout, results):
    if subprocess.run([HOSTS, "status"], capture_output=True).returncode != 0:
        subprocess.run([HOSTS, "start", "3"], check=True, capture_output=True)
    rows = []
    for fault in ("host-crash", "host-cut"):
        for n in ranks:
            # A partition is detected only after a whole heartbeat timeout of silence: the job must
            # still have units left by then (400 were all committed before it at 12 ranks).
            shards = 400 if fault == "host-crash" else 3000
            runs = [r for r in (host_recovery(n, fault, hang_timeout, shards) for _ in range(repeat)) if r]
            results.setdefault(fault, {})[n] = runs
            if not runs:
                rows.append([fault, n, "-", "no run changed view before the end"] + ["-"] * 6)
                continue
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append([fault, n, f"{int(med['lost'])} ({len(runs)}/{repeat} runs)"] + [f"{med[k]:.1f}" for k in (
                "detect", "revoke+shrink", "agree", "replan", "first unit", "reconfigure", "total")])
    print(f"\n## Loss of a whole host: 3 hosts, n/3 ranks each (ms, median of {repeat} runs; "
          f"heartbeat timeout {hang_timeout:g} s)\n")
    print(table(rows, ["fault", "ranks", "members lost", "detect", "revoke+shrink", "agree+sync", "re-plan",
                       "first unit", "after detection", "total"]))


def main(argv):
    p = argparse.ArgumentParser(prog="python -m bench recovery")
    p.add_argument("--ranks", type=int, nargs="*", default=[2, 4, 8])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--hang-timeout", type=float, default=2.0)
    p.add_argument("--host-ranks", type=int, nargs="*", default=[6, 12])
    args = p.parse_args(argv)
    results = {"kill": {}, "hang": {}, "torchrun": {}}
    rows = []
    for n in args.ranks:
        runs = [mpirt_recovery(n, "kill:member=1:step=20", args.hang_timeout) for _ in range(args.repeat)]
        results["kill"][n] = runs
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        torch_runs = [torchrun_restart(n) for _ in range(args.repeat)]
        results["torchrun"][n] = [t for t, _ in torch_runs]
        ok = [t for t, _ in torch_runs if t is not None]
        tr = statistics.median(ok) if ok else None
        rows.append([n] + [f"{med[k]:.1f}" for k in ("detect", "revoke+shrink", "agree", "replan", "first unit",
                                                       "total")]
                    + [f"{tr:.0f}" if tr else f"failed ({len(ok)}/{len(torch_runs)})",
                       f"{tr / med['total']:.0f}x" if tr else "-"])
    print("## Recovery after SIGKILL of one worker (ms, median of", args.repeat, "runs)\n")
    print(table(rows, ["ranks", "detect", "revoke+shrink", "agree+sync", "re-plan", "first unit", "mpirt total",
                       "torchrun restart", "torchrun / mpirt"]))
    hang_rows = []
    for n in args.ranks[:2]:
        runs = [mpirt_recovery(n, "hang:member=1:step=20", args.hang_timeout) for _ in range(args.repeat)]
        results["hang"][n] = runs
        det = statistics.median(r["detect"] for r in runs)
        hang_rows.append([n, f"{args.hang_timeout * 1e3:.0f}", f"{det:.0f}", f"{det / (args.hang_timeout * 1e3):.2f}"])
    print("\n## Hang (SIGSTOP) detection against the configured bound (ms)\n")
    print(table(hang_rows, ["ranks", "bound", "detected after", "ratio"]))
    if args.host_ranks:
        host_rows(args.host_ranks, args.repeat, args.hang_timeout, results)
    print("\nwrote", write_results("recovery", results))
    return 0
