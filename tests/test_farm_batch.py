"""Batched leases, prefetch and group commits keep exactly-once: faults that strike with a batch in flight.

``MPIRT_LEASE_S`` is set high here so that guided self-scheduling alone sizes the batches (a sixth of
the pending shards over three workers, then less): every lease past the first two holds several
shards, whatever the machine's load does to the measured time per shard. The events log says what
was in flight (the coordinator's ``replan`` names the shards leased to lost members and not committed,
``handback`` what a leaving member returned), so each test checks that a batch really was.
"""

import json
import os

import pytest

from harness import assert_each_shard_once, assert_same_output, one_line_error, run_cli, wordcount_reference
from mpirt.cluster.ledger import CommitStore, ShardLedger, batch_size

# Small shards, so that a fault at step 8 strikes inside a worker's first large batch (a sixth of the
# shards pending), not in the tail where the batches have shrunk to one shard.
SHARD_ROWS, SHARDS = 40, 121  # 4,802 training rows
BIG_LEASES = {"MPIRT_LEASE_S": "10"}


# -- the parts, without MPI ------------------------------------------------------------------------
def test_batches_follow_the_measured_time_and_shrink_at_the_tail():
    assert batch_size(100, 3, None) == 1, "no measurement yet: one shard"
    assert batch_size(1000, 3, 0.001, target_s=0.05) == 50, "about target_s of work"
    assert batch_size(1000, 3, 0.2, target_s=0.05) == 1, "a long shard goes alone"
    assert batch_size(60, 3, 0.001, target_s=0.05) == 10, "pending / (2 workers) bounds it"
    sizes, pending = [], 60
    while pending:
        sizes.append(batch_size(pending, 3, 1e-4, target_s=10))
        pending -= sizes[-1]
    assert sizes[0] == 10 and sizes[-6:] == [1] * 6 and sizes == sorted(sizes, reverse=True), sizes


def test_ledger_leases_batches_and_takes_back_what_is_handed_back():
    ledger = ShardLedger([10, 30, 20, 30, 5])
    assert ledger.lease_many(1, 3) == [1, 3, 2] and ledger.pending == 2
    ledger.give_back([3, 2])
    assert ledger.pending == 4
    assert ledger.lease_many(2, 2) == [3, 2], "handed-back shards go first, largest first"
    assert ledger.lease_many(2, 9) == [0, 4] and ledger.lease_many(2, 1) == []
    ledger.give_back([4])
    ledger.give_back([4])  # handed back twice (or never leased): still one lease to give
    assert ledger.lease_many(3, 9) == [4]


def test_a_group_is_made_durable_then_committed_create_if_absent(tmp_path):
    store = CommitStore(str(tmp_path / "parts"))
    written = []
    for shard in (4, 5, 6):
        tmp = store.temp_path(shard)
        assert not os.path.exists(tmp) and f".{os.getpid()}@" in tmp, "the job creates it"
        with open(tmp, "w") as f:
            f.write(f"result {shard}")
        written.append((shard, tmp))
    store.make_durable([tmp for _, tmp in written])
    assert [store.link(shard, tmp) for shard, tmp in written] == [True, True, True]
    again = store.temp_path(5)
    with open(again, "w") as f:
        f.write("a second result")
    assert store.commit(5, again) is False, "a second commit must not replace the first"
    assert open(store.path(5)).read() == "result 5" and store.committed() == {4, 5, 6}
    assert not [n for n in os.listdir(store.dir) if n.endswith(".tmp")]


# -- under mpiexec, with faults -------------------------------------------------------------------
@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return wordcount_reference(tmp_path_factory.mktemp("batch"), shard_rows=SHARD_ROWS)


def wordcount(tmp_path, data, n, faults, spare=0, env=BIG_LEASES):
    out, events = tmp_path / "counts.h5", tmp_path / "events.jsonl"
    args = ["launch", "-n", str(n), "--spare", str(spare), "--hang-timeout", "2", "--",
            "mpirt", "wordcount", data, "--out", out, "--events", events, "--keep-parts"]
    for f in faults:
        args += ["--inject-fault", f]
    run_cli(*args, timeout=120, env=env).check()
    with open(events) as f:
        log = [json.loads(line) for line in f]
    with open(f"{out}.parts/ledger.jsonl") as f:
        ledger = f.read()
    return out, log, ledger


def fault_record(log):
    faults = [e for e in log if e["event"] == "fault"]
    assert len(faults) == 1, faults
    return faults[0]


@pytest.mark.mpi
@pytest.mark.cli
@pytest.mark.parametrize("fault, removed", [
    ("kill:member=2:step=8", "failed"),  # a worker dies holding a batch: the rest of it is leased again
    ("kill:member=1:step=8:phase=commit", "failed"),  # dies with a batch written, made durable, not linked
    ("hang:member=3:step=8", "failed"),  # frozen with a batch: declared failed, killed, never commits it
])
def test_a_worker_lost_with_a_batch_in_flight(tmp_path, text, fault, removed):
    data, ref = text
    out, log, ledger = wordcount(tmp_path, data, 4, [fault])
    assert_same_output(ref, out)
    assert_each_shard_once(ledger, SHARDS)
    member = int(fault.split("member=")[1].split(":")[0])
    released = next(e for e in log if e["event"] == "replan")["released"]
    assert set(released) == {str(member)} and len(released[str(member)]) >= 2, f"no batch in flight: {released}"
    # Leased again and done once, by the others: it never committed them (killed, or fenced and killed).
    by = {r["shard"]: r["member"] for r in map(json.loads, ledger.splitlines())}
    assert all(by[s] not in (member, None) for s in released[str(member)]), (released, by)
    views = [e for e in log if e["event"] == "view"]
    assert views[-1][removed] == [member] and member not in views[-1]["members"]


@pytest.mark.mpi
@pytest.mark.cli
def test_the_coordinator_lost_while_workers_hold_batches(tmp_path, text):
    data, ref = text
    out, log, ledger = wordcount(tmp_path, data, 4, ["kill:member=coordinator:step=8"])
    assert_same_output(ref, out)
    assert_each_shard_once(ledger, SHARDS)
    leased = fault_record(log)["held"]  # {member: shards} leased and not reported when it died
    assert max(len(s) for s in leased.values()) >= 2, leased
    views = [e for e in log if e["event"] == "view"]
    assert views[-1]["failed"] == [0] and views[-1]["coordinator"] == 1


@pytest.mark.mpi
@pytest.mark.cli
def test_a_worker_leaves_and_hands_its_batch_back(tmp_path, text):
    data, ref = text
    out, log, ledger = wordcount(tmp_path, data, 4, ["leave:member=2:step=8"])
    assert_same_output(ref, out)
    assert_each_shard_once(ledger, SHARDS)
    returned = [s for e in log if e["event"] == "handback" for s in e["shards"]]
    assert returned and all(e["member"] == 2 for e in log if e["event"] == "handback"), log
    by = {r["shard"]: r["member"] for r in map(json.loads, ledger.splitlines())}
    # Done by the others (recorded as recovered when they had not reported them yet as member 2 left).
    assert all(by[s] != 2 for s in returned), (returned, by)
    views = [e for e in log if e["event"] == "view"]
    assert views[-1]["left"] == [2] and views[-1]["failed"] == []


@pytest.mark.mpi
@pytest.mark.cli
def test_joiners_come_in_once_the_batches_are_committed(tmp_path, text):
    data, ref = text
    out, log, ledger = wordcount(tmp_path, data, 3, ["join:count=2:step=8"], spare=2)
    assert_same_output(ref, out)
    assert_each_shard_once(ledger, SHARDS)
    views = [e for e in log if e["event"] == "view"]
    assert [m for v in views for m in v["joined"]] == [3, 4] and views[-1]["members"] == [0, 1, 2, 3, 4]
    assert {r["member"] for r in map(json.loads, ledger.splitlines())} & {3, 4}, "the joiners did no work"


def test_a_bad_lease_time_is_one_line(tmp_path, text):
    data, _ = text
    res = run_cli("wordcount", data, "--out", tmp_path / "c.h5", env={"MPIRT_LEASE_S": "0"})
    one_line_error(res, 2, "MPIRT_LEASE_S")
    assert not (tmp_path / "c.h5").exists()
