"""Checkpoints of `mpirt train` saved in the background, under real mpiexec + ULFM: the coordinator
SIGKILLed while a save is in flight (``phase=save``: the file written and fsynced, not renamed),
and a failed background save surfacing as one line.
"""

import os

import pytest

from harness import one_line_error, run_cli, assert_same_model
from mpirt.checkpoint import CheckpointDir, load
from test_train import assert_exactly_once, digits, final_params, n_train, records, reference, train  # noqa: F401

pytestmark = [pytest.mark.mpi, pytest.mark.cli]

KILL_SAVING = "kill:member=coordinator:step=10:phase=save"


def temporaries(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".tmp"))


def save_faults(run_dir):
    return [e for e in records(run_dir / "events.jsonl") if e["event"] == "fault" and e.get("phase") == "save"]


def test_a_kill_during_the_save_leaves_the_previous_checkpoint_and_resume_goes_on(tmp_path, digits, reference):
    # The coordinator dies in its writer before renaming step 10's file; member 1 dies at step 12,
    # before the next save (step 15): the job is gone, step 5's checkpoint is the newest.
    res, run_dir = train(tmp_path, digits, 2, "--checkpoint-every", "5",
                         faults=[KILL_SAVING, "kill:member=1:step=12"])
    assert res.returncode != 0 and not res.timed_out, res.output[-3000:]
    ck = run_dir / "ckpt"
    assert [f["member"] for f in save_faults(run_dir)] == [0]
    assert [os.path.basename(p) for p in CheckpointDir(ck).paths()] == ["ckpt-00000005.h5"]
    assert final_params(run_dir)[1]["step"] == 5  # loads, manifest verified
    # What the kill left: step 10's file, whole (written and fsynced), under its temporary name only.
    (tmp,) = temporaries(ck)
    assert tmp.startswith("ckpt-00000010.h5.")
    assert load(ck / tmp).position["step"] == 10
    res, run_dir = train(tmp_path, digits, 2, "--checkpoint-every", "5", "--resume")
    res.check()
    assert "resuming from" in res.stderr and "ckpt-00000005.h5 (step 5" in res.stderr, res.stderr[-3000:]
    assert_same_model(reference, final_params(run_dir)[0])
    assert_exactly_once(run_dir, n_train(digits))
    assert temporaries(ck) == []  # the dead writer's temporary was removed by the next save


@pytest.mark.parametrize("mode", ["background", "sync"])
def test_the_survivors_go_on_when_the_coordinator_dies_saving(tmp_path, digits, reference, mode):
    extra = ["--checkpoint-sync"] if mode == "sync" else []
    res, run_dir = train(tmp_path, digits, 3, "--checkpoint-every", "5", *extra, faults=[KILL_SAVING])
    res.check()
    views = [e for e in records(run_dir / "events.jsonl") if e["event"] == "view"]
    assert [v["failed"] for v in views] == [[], [0]]
    assert [f["member"] for f in save_faults(run_dir)] == [0]  # struck once: the new coordinator's saves go on
    assert_same_model(reference, final_params(run_dir)[0])
    assert_exactly_once(run_dir, n_train(digits))
    ck = CheckpointDir(run_dir / "ckpt")
    assert all(load(p).position["step"] > 10 for p in ck.paths())  # --keep 3 of the new coordinator's
    assert temporaries(run_dir / "ckpt") == []  # the dead writer's, removed by the next save


def test_a_failed_background_save_stops_training_with_one_line(tmp_path, digits):
    ck = tmp_path / "ck"
    res = run_cli("train", "--data", digits, "--model", "mlp", "--epochs", "2", "--no-progress",
                  "--checkpoint-dir", ck, "--checkpoint-every", "5",
                  "--inject-fault", "raise:member=coordinator:step=10:phase=save", timeout=120)
    line = one_line_error(res, 1, f"{ck}/ckpt-00000010.h5: the background save failed", "injected fault")
    assert "checkpoints before it are intact" in line
    assert sorted(os.listdir(ck)) == [".lock", "ckpt-00000005.h5", "run.json"]  # raised at step 15's save
    assert load(ck / "ckpt-00000005.h5").position["step"] == 5
