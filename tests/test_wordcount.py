"""`mpirt wordcount`, the shard job of the elastic core, on a real text data set.

Its output must be bit-identical to a single-rank run whatever faults are injected.
"""

import json

import h5py
import numpy as np
import pytest

from harness import run_cli

pytestmark = [pytest.mark.mpi, pytest.mark.cli]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("wc") / "text.h5"
    run_cli("prepare", "synth-text", out, "--rows", "6000", "--features", "2048", "--shard-rows", "128").check()
    return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("wc1") / "counts.h5"
    res = run_cli("wordcount", data, "--out", out).check()
    assert "1 view(s)" in res.stdout
    with h5py.File(out) as f:
        return f["counts"][()], f.attrs["sha256"]


def counts_of(path):
    with h5py.File(path) as f:
        return f["counts"][()], f.attrs["sha256"]


def test_single_rank_counts_are_exact(data, reference):
    counts, _ = reference
    from mpirt.data import open_dataset

    with open_dataset(data) as ds:
        sp = ds.split("train")
        b = sp.read(0, sp.n_rows)
        expect = np.zeros_like(counts)
        np.add.at(expect, (np.repeat(b.y, np.diff(b.offsets)), b.ids.astype(np.int64)), 1)
    np.testing.assert_array_equal(counts, expect)


@pytest.mark.parametrize("n, faults, spare", [
    (4, [], 0),
    (4, ["kill:member=2:step=5", "kill:member=coordinator:step=12"], 0),
    (3, ["hang:member=1:step=4", "join:count=2:step=8"], 2),
    (4, ["leave:member=3:step=3", "kill:member=1:step=6:phase=commit"], 0),
])
def test_any_faults_give_bit_identical_counts(tmp_path, data, reference, n, faults, spare):
    out, events = tmp_path / "counts.h5", tmp_path / "events.jsonl"
    args = ["launch", "-n", str(n), "--spare", str(spare), "--hang-timeout", "2", "--",
            "mpirt", "wordcount", data, "--out", out, "--events", events, "--keep-parts"]
    for f in faults:
        args += ["--inject-fault", f]
    run_cli(*args, timeout=120).check()
    counts, digest = counts_of(out)
    assert digest == reference[1]
    np.testing.assert_array_equal(counts, reference[0])
    with open(f"{out}.parts/ledger.jsonl") as f:
        records = [json.loads(line) for line in f]
    shards = sorted(r["shard"] for r in records)
    assert shards == list(range(len(shards))) and len(shards) == 38
    assert not any(r.get("duplicate") for r in records)
    with open(events) as f:
        views = [e for e in map(json.loads, f) if e["event"] == "view"]
    removed = [m for v in views for m in v["failed"] + v["left"]]
    assert len(removed) == sum(1 for f in faults if not f.startswith("join")), views
    joined = [m for v in views for m in v["joined"]]
    assert len(joined) == sum(int(f.split("count=")[1].split(":")[0]) for f in faults if f.startswith("join"))


def test_wordcount_on_dense_data_is_refused(tmp_path):
    digits = tmp_path / "digits.h5"
    run_cli("prepare", "digits", digits).check()
    res = run_cli("wordcount", digits, "--out", tmp_path / "c.h5")
    assert res.returncode == 1 and "needs a text data set" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "c.h5").exists()


@pytest.mark.parametrize("spec, words", [
    ("boom:member=1:step=2", "action must be one of"),
    ("kill:member=1", "exactly one trigger"),
])
def test_bad_fault_spec_is_a_usage_error(tmp_path, data, spec, words):
    res = run_cli("wordcount", data, "--out", tmp_path / "c.h5", "--inject-fault", spec)
    assert res.returncode == 2 and words in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_stop_request_commits_the_leases_then_resume_finishes_exactly_once(tmp_path, data, reference):
    # SIGUSR1 (on the coordinator: it sees every commit, so the fault fires whatever the timing):
    # nothing more is leased, the leases out commit, exit 75; --resume
    # (what a requeued Slurm job runs) takes only the rest, and the counts are bit-identical.
    out, events = tmp_path / "counts.h5", tmp_path / "events.jsonl"
    args = ["launch", "-n", "3", "--hang-timeout", "2", "--", "mpirt", "wordcount", data, "--out", out,
            "--events", events, "--keep-parts"]
    res = run_cli(*args, "--inject-fault", "stop:member=coordinator:step=6", timeout=120)
    assert res.returncode == 75, res.output[-3000:]
    assert res.stderr.count("stopped on request") == 1 and "Traceback" not in res.output
    assert not out.exists()
    with open(f"{out}.parts/ledger.jsonl") as f:
        first = [json.loads(line)["shard"] for line in f]
    assert 6 <= len(first) < 38 and len(set(first)) == len(first)
    run_cli(*args, "--resume", timeout=120).check()
    assert counts_of(out)[1] == reference[1]
    with open(f"{out}.parts/ledger.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert sorted(r["shard"] for r in records) == list(range(38))
    assert not any(r.get("duplicate") for r in records)
    with open(events) as f:
        assert [e["event"] for e in map(json.loads, f)].count("preempted") == 1
