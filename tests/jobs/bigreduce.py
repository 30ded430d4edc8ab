"""A loop of large in-place Allreduces (64 MiB by default) that a fault strikes in the middle of one.

For the transport fault matrix (tests/test_transport.py, ``python -m bench transport``): a member
SIGKILLs or SIGSTOPs itself while a transfer is under way (a timer fires half an Allreduce after it
entered one: the shared-memory single-copy path is busy then), the survivors must get an error,
rebuild the view (``ElasticGroup.recover``) and go on; optionally ``--join`` ranks are spawned and
merged in later. Each step's sum is checked (every rank adds ones: each element must equal the view's
size). The coordinator prints ``DONE {json}`` with the steps, the final size and, per view change,
when the first step after it committed (the events log has the fault and the error times).
"""

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time

import numpy as np

from mpirt.elastic import init
from mpirt.errors import ProcessFailure

SIGNALS = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP}


def arm(group, action, delay):
    """Strike this process with ``action`` ``delay`` seconds from now (inside the next Allreduce)."""
    def strike():
        group.events.write("fault", fault=f"{action}:member={group.member}:mid-allreduce", member=group.member,
                           view=group.view.id)
        os.kill(os.getpid(), SIGNALS[action])

    threading.Timer(delay, strike).start()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("events")
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--fault", choices=tuple(SIGNALS), action="append", default=[])
    p.add_argument("--member", type=int, action="append", default=[], help="who strikes each --fault")
    p.add_argument("--at", type=int, default=4, help="the step in which the faults strike")
    p.add_argument("--join", type=int, default=0, help="ranks spawned after step --at + 2")
    args = p.parse_args()
    group = init(events=args.events, spawn_argv=[sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
    MPI = group.ec.MPI
    buf = np.empty((args.mib << 20) // 4, dtype=np.float32)
    step = group.sync_view(joiner=True)["step"] if group.joined else 0
    took, resumed = [], []
    while step < args.steps:
        for action, member in zip(args.fault, args.member):
            if step == args.at and member == group.member and group.view.id == 0:
                arm(group, action, statistics.median(took) / 2)
        buf.fill(1.0)
        t0 = time.perf_counter()
        failed = False
        try:
            with group.ec.guard():
                group.ec.comm.Allreduce(MPI.IN_PLACE, buf)
        except ProcessFailure:
            failed = True
        try:
            ok = group.ec.agree(not failed)
        except ProcessFailure:
            ok = False
        if not ok:
            group.recover(payload={"step": step})
            resumed.append(None)
            continue
        size = group.ec.size
        if buf[0] != size or buf[-1] != size or buf[len(buf) // 2] != size:
            print(f"bigreduce: wrong sum at step {step}: {buf[0]} != {size}", file=sys.stderr, flush=True)
            return 3
        took.append(time.perf_counter() - t0)
        if resumed and resumed[-1] is None:
            resumed[-1] = time.time()
        step += 1
        if args.join and step == args.at + 2:
            group.grow(args.join)
            group.sync_view(payload={"step": step} if group.is_coordinator else None)
    if group.is_coordinator:
        print("DONE " + json.dumps({"steps": step, "size": group.ec.size, "resumed": resumed,
                                    "median_s": statistics.median(took)}), flush=True)
    group.ec.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
