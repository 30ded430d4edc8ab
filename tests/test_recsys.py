"""The recommender: embedding tables sharded over the ranks, reassigned by the coordinator when members
change. The placement rules alone (no MPI), then whole runs under real mpiexec + ULFM: kills, a leave
and a join give the parameters of an uninterrupted run on 1 rank; a shard that loses its owner and its
replica together stops the job with one line; checkpoints load on another world size."""

import json

import numpy as np
import pytest

from harness import assert_same_model, run_cli
from mpirt.recsys import placement as plc


# -- placement (pure) ------------------------------------------------------------------------------
def counts(p, members):
    return [sum(v.count(m) for v in p.owner.values()) for m in members]


def test_initial_placement_is_balanced_with_a_buddy_on_another_member():
    p = plc.initial({"user": 8, "item": 8}, [0, 1, 2])
    assert counts(p, [0, 1, 2]) in ([6, 5, 5], [5, 6, 5], [5, 5, 6])
    assert all(b is not None and b != o for t in p.owner for o, b in zip(p.owner[t], p.buddy[t]))
    one = plc.initial({"user": 4}, [7])
    assert one.owner["user"] == [7] * 4 and one.buddy["user"] == [None] * 4


def test_a_dead_owner_is_replaced_by_its_buddy_and_everything_is_replicated_again():
    old = plc.initial({"user": 8, "item": 8}, [0, 1, 2, 3])
    new = plc.after_change(old, [0, 2, 3], gone=[1])
    for t in old.owner:
        for s, o in enumerate(old.owner[t]):
            assert new.owner[t][s] in (0, 2, 3) and new.buddy[t][s] not in (None, 1, new.owner[t][s])
    assert max(counts(new, [0, 2, 3])) - min(counts(new, [0, 2, 3])) <= 1
    assert all(max(v.count(m) for m in (0, 2, 3)) - min(v.count(m) for m in (0, 2, 3)) <= 1 for v in new.owner.values())
    moved = plc.moves(old, new, [0, 2, 3])
    assert all(src != 1 for _, _, src, _, _ in moved)  # nothing is sent from the dead member
    # every shard that lost a copy is copied again, from a member that holds it
    for t, s, src, dst, role in moved:
        assert src in (old.owner[t][s], old.buddy[t][s]) and dst in (new.owner[t][s], new.buddy[t][s])


def test_owner_and_buddy_lost_together_names_the_shard():
    old = plc.initial({"user": 4}, [0, 1, 2, 3])  # shard 1: owner 1, buddy 2
    with pytest.raises(plc.ShardLost, match="shard 1 of the user table is lost"):
        plc.after_change(old, [0, 3], gone=[1, 2])


def test_joiners_take_shards_over_and_leavers_hand_theirs_on():
    old = plc.initial({"user": 6, "item": 6}, [0, 1])
    grown = plc.after_change(old, [0, 1, 5], gone=[])
    assert counts(grown, [0, 1, 5]) == [4, 4, 4]
    assert all(v.count(5) == 2 for v in grown.owner.values())  # a share of each table
    # as few moves as balance needs: 4 shards change owner, and a shard that moves to its buddy costs
    # no copy
    changed = sum(a != b for t in old.owner for a, b in zip(old.owner[t], grown.owner[t]))
    assert changed == 4
    left = plc.after_change(grown, [0, 1, 5], gone=[0])
    assert 0 not in left.members() and counts(left, [1, 5]) == [6, 6]
    assert all(src in (0, 1, 5) for _, _, src, _, _ in plc.moves(grown, left, [0, 1, 5]))


# -- whole runs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ratings(tmp_path_factory):
    d = tmp_path_factory.mktemp("ratings")
    from mpirt.data.synth_ratings import write_ratings

    write_ratings(d / "r.csv", users=300, items=200, ratings=6000)
    run_cli("prepare", "ratings", d / "r.csv", d / "r.h5").check()
    return d / "r.h5"


COMMON = ["--epochs", "2", "--global-batch", "128", "--table-shards", "6", "--embed-dim", "8", "--no-progress"]


def train(tmp_path, data, n, *extra, faults=(), spare=0, name="run", model="mf", timeout=300):
    run_dir = tmp_path / name
    run_dir.mkdir()
    args = ["launch", "-n", str(n), "--spare", str(spare), "--", "mpirt", "train", "--data", data, "--model", model,
            *COMMON, "--checkpoint-dir", run_dir / "ckpt", "--events", run_dir / "events.jsonl", *extra]
    for f in faults:
        args += ["--inject-fault", f]
    return run_cli(*args, timeout=timeout), run_dir


def final(run_dir):
    from mpirt.checkpoint import CheckpointDir

    return CheckpointDir(run_dir / "ckpt").load_latest().params


def events(run_dir, kind):
    with open(run_dir / "events.jsonl") as f:
        return [e for e in map(json.loads, f) if e["event"] == kind]


@pytest.fixture(scope="module")
def reference(ratings, tmp_path_factory):
    res, run_dir = train(tmp_path_factory.mktemp("ref"), ratings, 1)
    res.check()
    assert "test rmse" in res.stdout
    return final(run_dir)


@pytest.mark.mpi
@pytest.mark.cli
def test_kills_a_leave_and_a_join_give_the_model_of_one_rank(tmp_path, ratings, reference):
    # 4 ranks: member 2 killed at step 10, member 1 leaves (SIGTERM) at 30, one joins at 45, the
    # coordinator is killed at 60 (75 steps in all).
    faults = ["kill:member=2:step=10", "leave:member=1:step=30", "join:count=1:step=45", "kill:member=coordinator:step=60"]
    res, run_dir = train(tmp_path, ratings, 4, faults=faults, spare=1)
    res.check()
    views = events(run_dir, "view")
    assert [v["failed"] for v in views] == [[], [2], [], [], [0]]
    assert views[2]["left"] == [1] and views[3]["joined"] == [4]
    assert views[-1]["members"] == [3, 4]
    moves = [(m["gone"], m["moved"]) for m in events(run_dir, "shards")]
    # the kill, the leaver's hand-over, the recovery once it has gone (nothing left to move), the
    # join, the coordinator's kill
    assert [g for g, _ in moves] == [[2], [1], [1], [], [0]]
    assert [n > 0 for _, n in moves] == [True, True, False, True, True]
    assert_same_model(reference, final(run_dir))


@pytest.mark.mpi
@pytest.mark.cli
def test_twotower_on_three_ranks_with_a_kill_is_the_model_of_one_rank(tmp_path, ratings):
    # one epoch (38 steps): the towers' float32 allreduce drifts past 1e-5 over longer runs, as any
    # dense model does in the default mode (README)
    res1, one = train(tmp_path, ratings, 1, "--epochs", "1", model="twotower", name="one")
    res1.check()
    res3, three = train(tmp_path, ratings, 3, "--epochs", "1", "--report", tmp_path / "rep", model="twotower",
                        faults=["kill:member=1:step=20"], name="three")
    res3.check()
    assert "2 view(s)" in res3.stdout
    assert_same_model(final(one), final(three))
    rmse = [float(r.stdout.split("test rmse ")[1].split()[0]) for r in (res1, res3)]
    assert abs(rmse[0] - rmse[1]) < 1e-4
    # recall@10 and NDCG@10 with the item table sharded over 2 ranks, against all of it on one
    ranking = [[x for x in r.stdout.splitlines() if x.startswith("test recall@10")] for r in (res1, res3)]
    assert len(ranking[0]) == 1 and ranking[0] == ranking[1]
    with open(tmp_path / "rep" / "report.json") as f:
        report = json.load(f)
    assert 0 <= report["test_ranking"]["recall@10"] <= 1 and len(report["val_rmse"]) == 1
    assert (tmp_path / "rep" / "rmse.png").stat().st_size > 0


@pytest.mark.mpi
@pytest.mark.cli
def test_a_shard_and_its_replica_lost_together_stop_the_job_with_one_line_and_it_resumes(tmp_path, ratings,
                                                                                        reference):
    # 4 ranks, 6 shards a table dealt round-robin: shard 1 of the item table lives on members 1 and 2
    res, run_dir = train(tmp_path, ratings, 4, "--checkpoint-every", "4",
                         faults=["kill:member=1:step=9", "kill:member=2:step=9"])
    assert res.returncode != 0 and "Traceback" not in res.stderr
    lines = {line for line in res.stderr.splitlines() if "is lost" in line}
    assert len(lines) == 1, res.stderr
    line = lines.pop()
    assert "table is lost: its owner (member 1) and its replica (member 2) failed together" in line
    assert f"resume from the newest checkpoint: {run_dir / 'ckpt' / 'ckpt-00000008.h5'}" in line
    res = run_cli("launch", "-n", "2", "--", "mpirt", "train", "--data", ratings, "--model", "mf", *COMMON,
                  "--checkpoint-dir", run_dir / "ckpt", "--resume", timeout=300)
    res.check()
    assert_same_model(reference, final(run_dir))
    res = run_cli("train", "--data", ratings, "--model", "mf", *COMMON, "--seed", "5", "--checkpoint-dir",
                  run_dir / "ckpt", "--resume", timeout=300)
    assert res.returncode == 2 and "was made with another seed" in res.stderr


@pytest.mark.mpi
@pytest.mark.cli
def test_a_checkpoint_resumes_on_another_world_size(tmp_path, ratings, reference):
    res, run_dir = train(tmp_path, ratings, 2, "--epochs", "1", name="resume")
    res.check()
    res = run_cli("launch", "-n", "3", "--", "mpirt", "train", "--data", ratings, "--model", "mf", *COMMON,
                  "--checkpoint-dir", run_dir / "ckpt", "--resume", timeout=300)
    res.check()
    assert_same_model(reference, final(run_dir))


@pytest.mark.cli
def test_ratings_take_only_the_recommender_models(tmp_path, ratings):
    res = run_cli("train", "--data", ratings, "--model", "cnn", "--no-progress")
    assert res.returncode == 2 and "--model mf or --model twotower" in res.stderr
    res = run_cli("train", "--data", ratings, "--model", "mf", "--exact", "--no-progress")
    assert res.returncode == 2 and "does not take --exact" in res.stderr


@pytest.mark.cli
def test_classify_refuses_a_recommender_in_one_line(tmp_path, ratings):
    res, run_dir = train(tmp_path, ratings, 1, "--epochs", "1")
    res.check()
    from mpirt.checkpoint import CheckpointDir

    ckpt = CheckpointDir(run_dir / "ckpt").latest()
    res = run_cli("classify", "--data", ratings, "--checkpoint", ckpt, "--out", tmp_path / "p.h5")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "classify takes classification models" in res.stderr and not (tmp_path / "p.h5").exists()
