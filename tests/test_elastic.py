"""The elastic core under real mpiexec with ULFM: kills, hangs, leaves, joins, resume.

Every test checks the three promises: the result equals the fault-free one, every
shard is committed exactly once (ledger log), and nothing is left running.
"""

import json
import os
import sys

import numpy as np
import pytest

from harness import MPIRT, run

pytestmark = pytest.mark.mpi

JOB = os.path.join(os.path.dirname(__file__), "jobs", "squares.py")
SHARDS = 24
EXPECTED = np.arange(SHARDS * 5000, dtype=np.int64) ** 2
HANG = "2"  # seconds; the failure detector's timeout in these tests


# The default transport on one host is shared memory; these faults run on tcp too (docs/transport.md).
TRANSPORTS = pytest.mark.parametrize("transport", ["sm", "tcp"])


def launch(tmp_path, n, *faults, spare=0, extra=(), timeout=120, transport=None):
    out = tmp_path / "out.npy"
    args = [MPIRT, "launch", "-n", n, "--spare", spare, "--hang-timeout", HANG,
            *(["--transport", transport] if transport else []), "--",
            sys.executable, JOB, out, "--shards", SHARDS, *extra]
    for f in faults:
        args += ["--inject-fault", f]
    return run(args, timeout=timeout), out


def events(out):
    with open(f"{out}.events") as f:
        return [json.loads(line) for line in f]


def ledger(out):
    with open(f"{out}.parts/ledger.jsonl") as f:
        return [json.loads(line) for line in f]


def views(out):
    return [e for e in events(out) if e["event"] == "view"]


def check_exactly_once(out, shards=SHARDS):
    records = ledger(out)
    done = sorted(r["shard"] for r in records)
    assert done == list(range(shards)), f"shards committed: {done}"
    assert not [r for r in records if r.get("duplicate")], "a shard was committed twice"
    assert np.array_equal(np.load(out), np.arange(shards * 5000, dtype=np.int64) ** 2)


def test_fault_free_4_ranks(tmp_path):
    res, out = launch(tmp_path, 4)
    res.check()
    assert f"TOTAL {int(EXPECTED.sum())} VIEWS 1" in res.stdout
    check_exactly_once(out)
    assert [v["members"] for v in views(out)] == [[0, 1, 2, 3]]


@TRANSPORTS
def test_kill_one_worker(tmp_path, transport):
    res, out = launch(tmp_path, 4, "kill:member=2:step=3", transport=transport)
    res.check()
    check_exactly_once(out)
    vs = views(out)
    assert vs[-1]["failed"] == [2] and vs[-1]["members"] == [0, 1, 3]


def test_kill_two_at_once(tmp_path):
    res, out = launch(tmp_path, 5, "kill:member=1:step=4", "kill:member=3:step=4")
    res.check()
    check_exactly_once(out)
    failed = sorted(m for v in views(out) for m in v["failed"])
    assert failed == [1, 3]
    assert views(out)[-1]["members"] == [0, 2, 4]


@TRANSPORTS
def test_kill_coordinator(tmp_path, transport):
    res, out = launch(tmp_path, 4, "kill:member=coordinator:step=5", transport=transport)
    res.check()
    check_exactly_once(out)
    last = views(out)[-1]
    assert last["failed"] == [0] and last["coordinator"] == 1


def test_kill_during_commit(tmp_path):
    res, out = launch(tmp_path, 3, "kill:member=1:step=4:phase=commit")
    res.check()
    check_exactly_once(out)
    assert views(out)[-1]["failed"] == [1]
    # The killed writer's temporary file was never committed, and is cleaned up at the end.
    assert not [n for n in os.listdir(f"{out}.parts") if n.endswith(".tmp")]


@TRANSPORTS
def test_hang_is_detected_and_removed(tmp_path, transport):
    res, out = launch(tmp_path, 4, "hang:member=1:step=3", transport=transport)
    res.check()
    check_exactly_once(out)
    fault = next(e for e in events(out) if e["event"] == "fault")
    last = views(out)[-1]
    assert last["failed"] == [1]
    detected = last["time"] - fault["time"]
    # The detector's bound plus recovery; far below the 10 s the issue allows.
    assert detected < float(HANG) + 5, f"hang noticed after {detected:.1f} s"


@TRANSPORTS
def test_graceful_leave(tmp_path, transport):
    # 120 shards: the leaver's exit must be noticed before the end. On sm it was noticed 20-80 ms after
    # the exit, when 24 shards were all committed; a leave that close to the end makes the others
    # recover without the finished coordinator (both transports; docs/transport.md, "Found").
    res, out = launch(tmp_path, 4, "leave:member=2:step=3", extra=["--shards", 120], transport=transport)
    res.check()
    check_exactly_once(out, 120)
    last = views(out)[-1]
    assert last["left"] == [2] and last["failed"] == []


@TRANSPORTS
def test_join(tmp_path, transport):
    # 240 shards: leases come in batches of about 50 ms of work (mpirt.cluster.farmworker), and with
    # 24 shards of ~1 ms the two first members could hold all the work before the joiners arrive
    # (CI saw "joiners did no work" on sm, twice).
    res, out = launch(tmp_path, 2, "join:count=2:step=3", spare=2, transport=transport, extra=["--shards", 240])
    res.check()
    check_exactly_once(out, shards=240)
    last = views(out)[-1]
    assert last["joined"] == [2, 3] and last["members"] == [0, 1, 2, 3]
    assert {r["member"] for r in ledger(out)} >= {2, 3}, "joiners did no work"


@TRANSPORTS
def test_join_after_failure(tmp_path, transport):
    res, out = launch(tmp_path, 3, "kill:member=1:step=2", "join:count=1:step=6", spare=1, transport=transport)
    res.check()
    check_exactly_once(out)
    vs = views(out)
    assert vs[1]["failed"] == [1] and vs[2]["joined"] == [3]


def test_kill_a_rank_that_just_joined(tmp_path):
    # 240 shards, as in test_join: the joiner must still find work to reach its own step 4.
    res, out = launch(tmp_path, 2, "join:count=1:step=2", "kill:member=2:step=4", spare=1, extra=["--shards", 240])
    res.check()
    check_exactly_once(out, shards=240)
    vs = views(out)
    assert vs[1]["joined"] == [2] and vs[2]["failed"] == [2]


def test_fewer_than_min_ranks_stops_cleanly(tmp_path):
    res, out = launch(tmp_path, 3, "kill:member=1:step=3", extra=["--min-ranks", "3"])
    assert res.returncode == 1, res.output
    assert "fewer than --min-ranks 3" in res.output
    assert "Traceback" not in res.output
    assert not out.exists()
    committed = [n for n in os.listdir(f"{out}.parts") if n.startswith("shard-") and n.endswith(".h5")]
    assert committed, "committed work must be kept for --resume"


def test_resume_after_whole_job_killed(tmp_path):
    res, out = launch(tmp_path, 1, "kill:member=0:step=7")
    assert res.returncode != 0 and not out.exists()
    first = ledger(out)
    assert len(first) == 7
    res, out = launch(tmp_path, 2, extra=["--resume"])
    res.check()
    check_exactly_once(out)
    redone = [r for r in ledger(out)[7:] if r["shard"] in {f["shard"] for f in first}]
    assert not redone, f"committed shards were redone: {redone}"
