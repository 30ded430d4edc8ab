"""The step protocol, the group and an elastic loop over the in-process fake transport
(mpirt.comm.fake): members are threads, faults strike in the fake world, no mpiexec."""

import numpy as np
import pytest
import torch

from mpirt.cluster.commit import PROTOCOL, Slots, StepCommitter
from mpirt.cluster.group import run_job
from mpirt.comm.fake import FakeWorld, group_of
from mpirt.comm.faults import FaultPlan
from mpirt.errors import ProcessFailure, QuorumLost
from mpirt.train.allreduce import GradAllreduce

SLOTS = Slots("samples", "loss")
BATCH, STEPS = 12, 10


def test_slots_are_named_job_first_then_the_protocols():
    s = Slots("samples", "loss", "correct")
    assert s.names == ("samples", "loss", "correct") + PROTOCOL
    assert (s.SAMPLES, s.LOSS, s.CORRECT, s.LEAVING, s.JOINERS, s.PREEMPT, s.NONFINITE) == tuple(range(7))
    assert s.job_indices() == (0, 1, 2) and len(s.zeros()) == len(s) == 7
    assert s.named(np.arange(7.0))["joiners"] == 4.0
    with pytest.raises(ValueError):
        Slots()


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH * STEPS, 5, generator=g), torch.randn(BATCH * STEPS, 1, generator=g)


def _loop(ec, specs, log):
    """An elastic loop as the trainer runs it: begin, compute this rank's slice, commit, apply,
    change members; on a failure recover and redo the step. Logs what each member committed."""
    X, y = _data()
    group = group_of(ec, faults=FaultPlan(specs, environ={}))
    model = torch.nn.Linear(5, 1)
    g = torch.Generator().manual_seed(1)  # not the global generator: the members are threads
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    committer = StepCommitter(group, GradAllreduce(ec, list(model.parameters()), n_stats=len(SLOTS)), SLOTS)

    def state():
        return {"step": step, "model": {k: v.clone() for k, v in model.state_dict().items()}}
    step = 0
    if group.joined:
        got = group.sync_view(joiner=True)
        step = got["step"]
        model.load_state_dict(got["model"])
    else:
        group.sync_view()
    mine = log.setdefault(ec.world_id, {"steps": [], "samples": []})
    while step < STEPS:
        try:
            stats = committer.begin(step)
            a = step * BATCH + BATCH * group.rank // group.size
            b = step * BATCH + BATCH * (group.rank + 1) // group.size
            opt.zero_grad(set_to_none=False)
            loss = torch.nn.functional.mse_loss(model(X[a:b]), y[a:b], reduction="sum")
            loss.backward()
            stats[SLOTS.SAMPLES], stats[SLOTS.LOSS] = b - a, float(loss.detach())
            totals = committer.commit(step, stats)
            opt.step()
            mine["steps"].append(step)
            mine["samples"].append(int(totals[SLOTS.SAMPLES]))
            step += 1
            committer.change_members(step - 1, totals, state=state)
        except ProcessFailure:
            committer.recover(step)
    mine["params"] = [p.detach().numpy().copy() for p in model.parameters()]
    mine["view"] = group.view
    mine["member"] = group.member


def _run(n, specs=(), hosts=None):
    log = {}
    world = FakeWorld(n, joiner=lambda ec: _loop(ec, specs, log), hosts=hosts)
    world.start(_loop, list(specs), log)
    assert world.join() == [], "a member deadlocked"
    return world, log


def test_a_loop_on_three_members_trains_the_model_of_one():
    _, one = _run(1)
    world, three = _run(3)
    assert not world.errors
    for member in three.values():
        assert member["steps"] == list(range(STEPS)) and member["samples"] == [BATCH] * STEPS
        for a, b in zip(member["params"], one[0]["params"]):
            assert np.abs(a - b).max() <= 1e-6


@pytest.mark.parametrize("phase", ["take", "commit"])
def test_a_member_killed_in_a_step_is_recovered_and_the_step_is_redone_once(phase):
    """phase=commit: killed after its reduction went through, before Agree: the others did not
    commit the step either (Agree is uniform), and redo it without the dead member."""
    _, one = _run(1)
    world, log = _run(3, [f"kill:member=1:step=4:phase={phase}"])
    assert not world.errors and world.killed == {1}
    assert log[1]["steps"] == [0, 1, 2, 3]  # nothing committed at or after the step it died in
    for m in (0, 2):
        assert log[m]["steps"] == list(range(STEPS)) and log[m]["samples"] == [BATCH] * STEPS
        assert log[m]["view"].members == [0, 2] and log[m]["view"].failed == [1]
        for a, b in zip(log[m]["params"], one[0]["params"]):
            assert np.abs(a - b).max() <= 1e-6


def test_the_coordinator_killed_then_a_joiner_merged():
    world, log = _run(3, ["kill:member=coordinator:step=3", "join:count=2:step=6"])
    assert not world.errors and world.killed == {0}
    survivors = {m: rec for m, rec in log.items() if m != 0}
    assert sorted(survivors) == [1, 2, 3, 4]
    for m, rec in survivors.items():
        assert rec["view"].members == [1, 2, 3, 4] and rec["view"].joined == [3, 4]
        assert rec["steps"] == (list(range(STEPS)) if m < 3 else list(range(7, STEPS)))
        # Steps 7.. ran on 4 members: still the whole global batch a step, each row once.
        assert rec["samples"][-1] == BATCH
        assert all(np.array_equal(a, b) for a, b in zip(rec["params"], survivors[1]["params"]))


def test_losing_the_majority_at_once_stops_the_minority_without_committing():
    """Members on three hosts; two hosts' members die at once: the one left is no majority."""
    world, log = _run(3, ["kill:member=1:step=2", "kill:member=2:step=2"], hosts=["node1", "node2", "node3"])
    assert isinstance(world.errors.get(0), QuorumLost), world.errors
    assert log[0]["steps"] == [0, 1]
    # On one host, losing members never costs the quorum.
    world, log = _run(3, ["kill:member=1:step=2", "kill:member=2:step=2"])
    assert not world.errors and log[0]["steps"] == list(range(STEPS)) and log[0]["view"].failed == [1, 2]


def test_a_member_raising_in_its_step_is_seen_as_failed_by_the_others():
    """An exception is a process that ends: the others recover past it, as from a kill."""
    world, log = _run(3, ["raise:member=2:step=5:phase=commit"])
    assert isinstance(world.errors.get(2), RuntimeError) and "injected fault" in str(world.errors[2])
    assert log[2]["steps"] == [0, 1, 2, 3, 4]
    assert log[0]["steps"] == list(range(STEPS)) and log[0]["view"].failed == [2]


# -- the shard farm over the fake transport ------------------------------------------------------

class _Squares:
    """A map-over-shards job: shard i's part holds i*i."""

    shard_sizes = [1] * 60
    spawn_argv = ()

    def map(self, shard):
        return shard * shard

    def write_part(self, path, shard, result):
        with open(path, "w") as f:
            f.write(str(result))

    def reduce(self, paths):
        return {"values": [int(open(p).read()) for p in paths]}

    def identity(self):
        return {"job": "squares", "shards": len(self.shard_sizes)}


def _farm_member(ec, parts, specs, out):
    from mpirt.cluster.farm import Farm

    group = group_of(ec, faults=FaultPlan(specs, environ={}), events_path=str(parts / "events.jsonl"))
    farm = Farm(_Squares(), parts_dir=str(parts), group=group)
    summary = run_job(group, farm.run, farm.parts.release)
    if summary is not None:
        out["summary"], out["view"] = summary, group.view


@pytest.mark.parametrize("specs", [[], ["kill:member=1:step=10", "kill:member=coordinator:step=30"],
                                   ["join:count=2:step=5", "kill:member=3:step=40"]])
def test_the_farm_commits_every_shard_once_through_kills_and_joins(tmp_path, specs, monkeypatch):
    """A member's step= fault fires only if it takes a shard at or after that many are done; the
    coordinator's and the joins always do. Whatever fired, the output is every shard once."""
    import json

    monkeypatch.setenv("MPIRT_FSYNC", "0")  # threads of one process: a crash is a thread ending, not a node
    parts, out = tmp_path / "parts", {}
    world = FakeWorld(3, joiner=lambda ec: _farm_member(ec, parts, specs, out))
    world.start(_farm_member, parts, specs, out)
    assert world.join() == [], "a member deadlocked"
    assert not world.errors, world.errors
    assert out["summary"]["values"] == [i * i for i in range(60)]
    events = [json.loads(line) for line in open(parts / "events.jsonl")]
    assert not [e for e in events if e["event"] == "duplicate"]
    views = [e for e in events if e["event"] == "view"]
    assert {m for v in views for m in v["failed"]} == world.killed
    if specs and specs[0].startswith("kill"):
        assert 0 in world.killed  # the coordinator's fault fires in its own loop
    if specs and specs[0].startswith("join"):
        assert [v["joined"] for v in views if v["joined"]] == [[3, 4]]


# -- mpirt.elastic on the same protocol, under mpiexec ----------------------------------------------

@pytest.mark.mpi
@pytest.mark.cli
def test_the_python_api_strikes_commit_phase_faults_and_redoes_the_step(tmp_path):
    """mpirt.elastic used to mark every fault due at a step as fired before its phase came, so a
    phase=commit fault never struck there. Now it strikes after the reduction, before Agree."""
    import json
    import sys
    from pathlib import Path

    from harness import run_cli

    example = str(Path(__file__).parents[1] / "examples" / "elastic_loop.py")
    args = [sys.executable, example, "--steps", "60"]
    run_cli("launch", "-n", "1", "--", *args, "--save", tmp_path / "one.npz").check()
    events = tmp_path / "events.jsonl"
    res = run_cli("launch", "-n", "3", "--", *args, "--save", tmp_path / "three.npz",
                  env={"MPIRT_FAULTS": "kill:member=1:step=20:phase=commit", "MPIRT_EVENTS": events}, timeout=300)
    res.check()
    assert "view 1" in res.stdout
    log = [json.loads(line) for line in open(events)]
    assert [(e["fault"], e.get("phase")) for e in log if e["event"] == "fault"] == [
        ("kill:member=1:step=20:phase=commit", "commit")]
    assert [e["failed"] for e in log if e["event"] == "view"] == [[], [1]]
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "three.npz")
    for k in a.files:
        assert np.abs(a[k] - b[k]).max() <= 1e-5, k
