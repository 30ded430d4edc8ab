"""`mpirt train` under real mpiexec + ULFM: the same model on any number of ranks, with faults.

The final parameters are read back from the last checkpoint each run writes.
"""

import json
import os

import h5py
import numpy as np
import pytest

from harness import assert_same_model, run_cli

pytestmark = [pytest.mark.mpi, pytest.mark.cli]

COMMON = ["--epochs", "2", "--global-batch", "64", "--lr", "0.05", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "digits.h5"
    run_cli("prepare", "digits", out, "--shard-rows", "256").check()
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "text.h5"
    run_cli("prepare", "synth-text", out, "--rows", "3000", "--features", "4096", "--shard-rows", "256").check()
    return out


def train(tmp_path, data, n, *extra, model="mlp", faults=(), spare=0, name="run", timeout=180):
    run_dir = tmp_path / name
    run_dir.mkdir(exist_ok=True)  # outputs into a missing directory are refused (issue 10)
    # A short hang timeout only where a rank hangs: on 2 loaded cores a 2 s heartbeat timeout can
    # declare a live rank dead (docs/transport.md); the others keep the default.
    hang = ["--hang-timeout", "2"] if any(f.startswith("hang:") for f in faults) else []
    args = ["launch", "-n", str(n), "--spare", str(spare), *hang, "--",
            "mpirt", "train", "--data", data, "--model", model, *COMMON,
            "--checkpoint-dir", run_dir / "ckpt", "--audit", run_dir / "audit.jsonl",
            "--events", run_dir / "events.jsonl", *extra]
    for f in faults:
        args += ["--inject-fault", f]
    return run_cli(*args, timeout=timeout), run_dir


def final_params(run_dir):
    from mpirt.checkpoint import CheckpointDir

    ckpt = CheckpointDir(run_dir / "ckpt").load_latest()
    return ckpt.params, ckpt.position


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_exactly_once(run_dir, n_rows, epochs=2):
    """Every sample position of every epoch was consumed by exactly one committed step."""
    seen = {}
    steps = [r["step"] for r in records(run_dir / "audit.jsonl")]
    assert steps == list(range(len(steps))), "one audit line per committed step, in order"
    for r in records(run_dir / "audit.jsonl"):
        seen.setdefault(r["epoch"], []).append((r["start"], r["stop"]))
    assert sorted(seen) == list(range(epochs))
    for ranges in seen.values():
        covered = np.zeros(n_rows, dtype=int)
        for a, b in ranges:
            covered[a:b] += 1
        assert (covered == 1).all()


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    res, run_dir = train(tmp_path_factory.mktemp("ref"), digits, 1)
    res.check()
    assert "1 view(s)" in res.stdout
    return final_params(run_dir)[0]


def n_train(data):
    with h5py.File(data) as f:
        return int(f["train"].attrs["n_rows"])


@pytest.mark.parametrize("n", [2, 3, 4])
def test_n_ranks_give_the_model_of_one_rank(tmp_path, digits, reference, n):
    res, run_dir = train(tmp_path, digits, n)
    res.check()
    params, position = final_params(run_dir)
    assert position["step"] == 2 * -(-n_train(digits) // 64)
    assert_same_model(reference, params)


def test_kill_join_and_coordinator_kill_give_the_same_model(tmp_path, digits, reference):
    faults = ["kill:member=2:step=5", "join:count=1:step=12", "kill:member=coordinator:step=20",
              "kill:member=1:step=30:phase=commit"]
    res, run_dir = train(tmp_path, digits, 4, faults=faults, spare=1)
    res.check()
    views = [e for e in records(run_dir / "events.jsonl") if e["event"] == "view"]
    assert [v["failed"] for v in views] == [[], [2], [], [0], [1]]
    assert views[2]["joined"] == [4]
    assert views[-1]["members"] == [3, 4]
    assert_same_model(reference, final_params(run_dir)[0])
    assert_exactly_once(run_dir, n_train(digits))


def test_hang_and_leave_on_text(tmp_path, text):
    res, one = train(tmp_path, text, 1, "--optimizer", "adam", "--lr", "0.01", model="fasttext", name="one")
    res.check()
    faults = ["hang:member=1:step=4", "leave:member=2:step=9"]
    res, run_dir = train(tmp_path, text, 3, "--optimizer", "adam", "--lr", "0.01", model="fasttext",
                         faults=faults, name="three")
    res.check()
    views = [e for e in records(run_dir / "events.jsonl") if e["event"] == "view"]
    assert [(v["failed"], v["left"]) for v in views] == [([], []), ([1], []), ([], [2])]
    assert_same_model(final_params(one)[0], final_params(run_dir)[0])
    assert_exactly_once(run_dir, n_train(text))


def test_resume_after_the_whole_job_was_killed(tmp_path, digits, reference):
    # Blocking saves: a background save of step 10 may still be in flight when the whole job dies at
    # step 17 (then no checkpoint exists; test_train_checkpoint covers kills during background saves).
    res, run_dir = train(tmp_path, digits, 2, "--checkpoint-every", "10", "--checkpoint-sync",
                         faults=["kill:member=0:step=17", "kill:member=1:step=17"])
    assert res.returncode != 0
    assert final_params(run_dir)[1]["step"] == 10
    res, run_dir = train(tmp_path, digits, 3, "--checkpoint-every", "10", "--resume")
    res.check()
    assert_same_model(reference, final_params(run_dir)[0])
    assert_exactly_once(run_dir, n_train(digits))
    ckpts = sorted(n for n in os.listdir(run_dir / "ckpt") if n.startswith("ckpt-"))
    assert len(ckpts) == 3, ckpts  # --keep 3


def test_stop_request_saves_and_resume_gives_the_same_model(tmp_path, digits, reference):
    # SIGUSR1 (Slurm's --signal) on one rank: every member stops after the same step, the
    # coordinator saves it, exit 75; resuming on another world size ends with the same model.
    res, run_dir = train(tmp_path, digits, 2, faults=["stop:member=1:step=9"])
    assert res.returncode == 75, res.output[-3000:]
    stops = [ln for ln in res.stderr.splitlines() if "stopped on request" in ln]
    assert len(stops) == 1 and "after step 10 " in stops[0] and "--resume" in stops[0], res.stderr
    assert "Traceback" not in res.output
    assert final_params(run_dir)[1]["step"] == 10
    assert [e["step"] for e in records(run_dir / "events.jsonl") if e["event"] == "preempted"] == [10]
    res, run_dir = train(tmp_path, digits, 3, "--resume")
    res.check()
    assert_same_model(reference, final_params(run_dir)[0])
    assert_exactly_once(run_dir, n_train(digits))


def test_falling_below_min_ranks_stops_with_a_checkpoint_and_resumes_to_the_same_model(tmp_path, digits, reference):
    # A lost node under Slurm: the survivors hold the whole model, so too few of them is a stop
    # (checkpoint, exit 75, requeued by `mpirt launch --requeue`), not a failure.
    res, run_dir = train(tmp_path, digits, 3, "--min-ranks", "3", faults=["kill:member=2:step=12"])
    assert res.returncode == 75, res.output[-3000:]
    assert "only 2 rank(s) remain, fewer than --min-ranks 3" in res.stderr and "Traceback" not in res.output
    step = final_params(run_dir)[1]["step"]
    assert [e["step"] for e in records(run_dir / "events.jsonl") if e["event"] == "preempted"] == [step]
    res, run_dir = train(tmp_path, digits, 3, "--min-ranks", "3", "--resume")
    res.check()
    assert_same_model(reference, final_params(run_dir)[0])
    assert_exactly_once(run_dir, n_train(digits))


def test_every_member_leaving_at_once_is_a_stop_with_a_checkpoint(tmp_path, digits):
    # What Slurm's preemption or `scancel` does: SIGTERM to every rank.
    res, run_dir = train(tmp_path, digits, 2, faults=["leave:member=0:step=5", "leave:member=1:step=5"])
    assert res.returncode == 75, res.output[-3000:]
    assert "every member was asked to leave" in res.stderr and "Traceback" not in res.output
    assert final_params(run_dir)[1]["step"] == 6


def test_signed_checkpoints_refuse_tampering(tmp_path, digits):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    key.chmod(0o600)
    res, run_dir = train(tmp_path, digits, 2, "--key-file", key, "--epochs", "1")
    res.check()
    ckpt = sorted((run_dir / "ckpt").glob("ckpt-*.h5"))[-1]
    with h5py.File(ckpt, "r+") as f:
        name = next(iter(f["params"]))
        f["params"][name][(0,) * f["params"][name].ndim] += 1.0
    res, _ = train(tmp_path, digits, 2, "--key-file", key, "--resume")
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert lines and str(ckpt) in lines[0] and "Traceback" not in res.output


@pytest.mark.parametrize("args, words", [
    (["--model", "fasttext"], "needs hashed tokens"),
    (["--model", "mlp", "--epochs", "0"], "--epochs: 0 is not >= 1"),
    (["--model", "nope"], "invalid choice"),
])
def test_bad_flags_are_one_line(tmp_path, digits, args, words):
    res = run_cli("train", "--data", digits, *args)
    assert res.returncode == 2, res.output
    assert words in res.stderr and "Traceback" not in res.output


def test_missing_data_file(tmp_path):
    res = run_cli("train", "--data", tmp_path / "none.h5", "--model", "mlp")
    assert res.returncode != 0 and "none.h5" in res.stderr and "Traceback" not in res.output


def test_report_has_json_and_plots(tmp_path, digits):
    report = tmp_path / "report"
    res = run_cli("train", "--data", digits, "--model", "cnn", "--epochs", "2", "--report", report, "--no-progress")
    res.check()
    doc = json.loads((report / "report.json").read_text())
    assert len(doc["epochs"]) == 2
    assert 0.5 < doc["test"]["accuracy"] <= 1.0
    for png in ("loss.png", "accuracy.png", "confusion.png", "throughput.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# What the default mode (no --exact) guarantees over a long run: not the same bits, since each rank
# sums its own slice in float32 (the parameters of 1 and 2 ranks drift apart to about 1e-2 over
# these 161 steps), but the same samples in the same steps and an equivalent model. Measured on
# seeds 0-2 (2026-12-01): final train loss within 0.8% relative of 1 rank's, test accuracy equal.
# The bands below (5% relative, 2 points) are the claim README.md makes.
LONG_LOSS_BAND, LONG_ACCURACY_BAND = 0.05, 0.02


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_long_runs_on_n_ranks_are_statistically_equivalent_to_one_rank(tmp_path, digits, seed):
    figures = {}
    for n in (1, 2, 4):
        run_dir = tmp_path / f"n{n}"
        run_dir.mkdir()
        args = ["launch", "-n", str(n), "--", "mpirt", "train", "--data", digits, "--model", "cnn", "--epochs", "7",
                "--global-batch", "64", "--lr", "0.05", "--seed", str(seed), "--no-progress", "--report", run_dir,
                "--audit", run_dir / "audit.jsonl"]
        run_cli(*args, timeout=300).check()
        report = json.loads((run_dir / "report.json").read_text())
        figures[n] = (report["epochs"][-1]["train_loss"], report["test"]["accuracy"])
        assert_exactly_once(run_dir, n_train(digits), epochs=7)
    loss1, acc1 = figures[1]
    for n in (2, 4):
        loss, acc = figures[n]
        assert abs(loss - loss1) <= LONG_LOSS_BAND * loss1, f"{n} ranks: train loss {loss} vs {loss1} on 1 rank"
        assert abs(acc - acc1) <= LONG_ACCURACY_BAND, f"{n} ranks: test accuracy {acc} vs {acc1} on 1 rank"


def test_a_diverging_run_stops_before_the_step_and_keeps_the_last_good_checkpoint(tmp_path, digits):
    """--lr 1e30: step 0 is applied, step 1's loss is inf; both ranks stop before applying it, with one
    line, and the checkpoint of step 1 (written after step 0) is the newest, and finite, with no
    temporary left behind."""
    from harness import one_line_error

    res, run_dir = train(tmp_path, digits, 2, "--lr", "1e30", "--checkpoint-every", "1")
    line = one_line_error(res, 1, "step 1:", "is not finite", "ckpt-00000001.h5")
    assert "--lr" in line
    assert sorted(os.listdir(run_dir / "ckpt")) == [".lock", "ckpt-00000001.h5", "run.json"], "nothing else left behind"
    params, position = final_params(run_dir)
    assert position["step"] == 1
    assert all(np.isfinite(v).all() for v in params.values())
