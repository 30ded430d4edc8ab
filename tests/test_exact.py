"""`mpirt train --exact`: byte-equal parameters, optimizer state and reports on any number of ranks,
through kills, joins, a coordinator kill, a leave and a resume on another world size.

Every comparison here is `np.array_equal` (or `==` on floats): no tolerance. The digits CNN runs 161
steps (7 epochs of 23), long enough that the default mode ends 1e-2 apart on 1 and 2 ranks.
"""

import json

import numpy as np
import pytest

from harness import assert_same_bits, checkpoint_bits, one_line_error, run_cli
from mpirt.train.exact import default_micro_batch, exponents, micro_batches, to_fixed

EPOCHS = 7
COMMON = ["--model", "cnn", "--epochs", str(EPOCHS), "--global-batch", "64", "--lr", "0.05", "--seed", "3",
          "--no-progress", "--exact"]


# -- the arithmetic, without MPI ---------------------------------------------------------------

def test_micro_batches_are_cut_the_same_on_any_world_size():
    for start, stop in [(0, 64), (1408, 1437)]:  # a full step, and an epoch's short last step
        cuts = {}
        for size in range(1, 9):
            parts = [micro_batches(start, stop, 16, r, size) for r in range(size)]
            assert len({k for k, _ in parts}) == 1
            flat = [mb for _, mine in parts for mb in mine]
            assert [j for j, _, _ in flat] == list(range(parts[0][0]))  # each once, contiguous per rank
            cuts[size] = flat
        assert all(c == cuts[1] for c in cuts.values())
        assert cuts[1][-1][2] == stop
    assert default_micro_batch(64) == 16 and default_micro_batch(60) == 15 and default_micro_batch(7) == 7


def test_the_fixed_point_sum_does_not_depend_on_the_partition():
    rng = np.random.default_rng(0)
    # Magnitudes over 30 binary orders, signs mixed: float32 sums of these depend on the order.
    grads = [(rng.standard_normal(4096) * 2.0 ** rng.integers(-20, 10, 4096)).astype(np.float32) for _ in range(12)]
    peak = max(float(np.abs(g).max()) for g in grads)
    scale = np.ldexp(1.0, np.repeat(exponents([peak], len(grads)), 4096))
    reference = sum(to_fixed(g, scale) for g in grads)
    float_sums = set()
    for size in (1, 2, 3, 5, 12):
        parts = [sum((to_fixed(g, scale) for g in grads[12 * r // size:12 * (r + 1) // size]),
                     np.zeros(4096, np.int64)) for r in range(size)]
        assert np.array_equal(sum(parts[::-1]), reference)
        float_sums.add(sum(np.sum(grads[12 * r // size:12 * (r + 1) // size], axis=0) for r in range(size)).tobytes())
    assert len(float_sums) > 1, "the float32 sums should differ by partition, or this test shows nothing"
    # No overflow at the largest magnitude: K micro-batches of +peak stay below 2^62.
    worst = sum(to_fixed(np.full(4, peak, np.float32), scale[:4]) for _ in grads)
    assert 0 < worst[0] <= 2 ** 62


# -- mpirt train under mpiexec ------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "digits.h5"
    run_cli("prepare", "digits", out, "--shard-rows", "256").check()
    return out


def train(tmp_path, data, n, *extra, faults=(), spare=0, name="run", timeout=300):
    run_dir = tmp_path / name
    run_dir.mkdir(exist_ok=True)
    args = ["launch", "-n", str(n), "--spare", str(spare), "--", "mpirt", "train", "--data", data, *COMMON,
            "--checkpoint-dir", run_dir / "ckpt", "--report", run_dir, "--events", run_dir / "events.jsonl", *extra]
    for f in faults:
        args += ["--inject-fault", f]
    return run_cli(*args, timeout=timeout), run_dir


def final_state(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    return {"bits": checkpoint_bits(run_dir / "ckpt"), "epochs": report["epochs"]}


def assert_identical(a, b):
    """Byte-equal parameters and optimizer state; the same reported figures, to the last bit."""
    assert a["bits"][2]["step"] == b["bits"][2]["step"] == EPOCHS * 23
    assert_same_bits(a["bits"], b["bits"])
    figures = ("train_loss", "val_loss", "val_accuracy")
    assert [[e.get(f) for f in figures] for e in a["epochs"]] == [[e.get(f) for f in figures] for e in b["epochs"]]


@pytest.fixture(scope="module")
def one_rank(digits, tmp_path_factory):
    res, run_dir = train(tmp_path_factory.mktemp("one"), digits, 1)
    res.check()
    return final_state(run_dir)


@pytest.mark.mpi
@pytest.mark.cli
@pytest.mark.parametrize("n", [2, 3, 4])
def test_n_ranks_give_the_bits_of_one_rank(tmp_path, digits, one_rank, n):
    res, run_dir = train(tmp_path, digits, n)
    res.check()
    assert_identical(one_rank, final_state(run_dir))


@pytest.mark.mpi
@pytest.mark.cli
def test_kill_join_coordinator_kill_and_leave_give_the_bits_of_one_rank(tmp_path, digits, one_rank):
    faults = ["kill:member=1:step=20", "join:count=1:step=45", "kill:member=coordinator:step=70",
              "kill:member=2:step=95:phase=commit", "leave:member=3:step=120"]
    res, run_dir = train(tmp_path, digits, 4, faults=faults, spare=1)
    res.check()
    views = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    views = [v for v in views if v["event"] == "view"]
    assert [(v["failed"], v["left"], v["joined"]) for v in views] == [
        ([], [], []), ([1], [], []), ([], [], [4]), ([0], [], []), ([2], [], []), ([], [3], [])]
    assert views[-1]["members"] == [4]
    assert_identical(one_rank, final_state(run_dir))


@pytest.mark.mpi
@pytest.mark.cli
def test_a_resume_on_another_world_size_gives_the_bits_of_one_rank(tmp_path, digits, one_rank):
    res, run_dir = train(tmp_path, digits, 2, "--checkpoint-every", "25", "--checkpoint-sync",
                         faults=["kill:member=0:step=60", "kill:member=1:step=60"])
    assert res.returncode != 0
    res, run_dir = train(tmp_path, digits, 3, "--checkpoint-every", "25", "--resume")
    res.check()
    assert "resuming from" in res.stderr and "step 50" in res.stderr
    state = final_state(run_dir)
    # The report of a resumed run holds the epochs after the resume; the model holds everything.
    state["epochs"] = state["epochs"][:0]
    assert_identical({**one_rank, "epochs": []}, state)


@pytest.mark.mpi
@pytest.mark.cli
def test_fasttext_sparse_rows_give_the_bits_of_one_rank_with_a_kill_a_hang_and_a_join(tmp_path):
    """The embedding's touched rows are summed in int64 too (merged by row id), and Adam's lazy
    per-row update sees the same rows on any world size."""
    text = tmp_path / "text.h5"
    run_cli("prepare", "synth-text", text, "--rows", "3000", "--features", "4096", "--shard-rows", "256").check()
    states = []
    for n, spare, faults in ((1, 0, []), (3, 1, ["--inject-fault", "kill:member=1:step=10",
                                                 "--inject-fault", "hang:member=2:step=18",
                                                 "--inject-fault", "join:count=1:step=25"])):
        ckpt = tmp_path / f"ckpt{n}"
        res = run_cli("launch", "-n", str(n), "--spare", str(spare), "--hang-timeout", "2", "--", "mpirt", "train",
                      "--data", text, "--model", "fasttext", "--epochs", "2", "--global-batch", "64", "--optimizer", "adam", "--lr", "0.01",
                      "--seed", "3", "--no-progress", "--exact", "--checkpoint-dir", ckpt, *faults, timeout=300)
        res.check()
        assert f"{1 + len(faults) // 2} view(s)" in res.stdout, res.stdout
        states.append(checkpoint_bits(ckpt))
    assert_same_bits(*states)


# -- refusals ------------------------------------------------------------------------------------

@pytest.mark.cli
@pytest.mark.parametrize("extra, words", [
    (["--compress", "bf16"], ["--exact", "--compress", "number of ranks"]),
    (["--micro-batch", "24"], ["--micro-batch 24", "--global-batch 64"]),
])
def test_what_cannot_go_with_exact_is_refused_in_one_line(tmp_path, digits, extra, words):
    res = run_cli("train", "--data", digits, *COMMON, *extra)
    one_line_error(res, 2, *words)


@pytest.mark.cli
def test_micro_batch_without_exact_is_refused(tmp_path, digits):
    res = run_cli("train", "--data", digits, "--model", "mlp", "--micro-batch", "16")
    one_line_error(res, 2, "--micro-batch", "--exact")


# -- the Python API (mpirt.elastic) ------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.cli
def test_the_python_api_with_exact_gives_the_bits_of_one_rank_under_faults(tmp_path):
    import sys
    from pathlib import Path

    example = str(Path(__file__).parents[1] / "examples" / "elastic_loop.py")
    args = [sys.executable, example, "--steps", "150", "--exact"]
    run_cli("launch", "-n", "1", "--", *args, "--save", tmp_path / "one.npz").check()
    res = run_cli("launch", "-n", "4", "--spare", "1", "--", *args, "--save", tmp_path / "four.npz",
                  env={"MPIRT_FAULTS": "kill:member=2:step=30;join:count=1:step=60;kill:member=coordinator:step=90"},
                  timeout=300)
    res.check()
    assert "view 3" in res.stdout
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "four.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        assert np.array_equal(a[k], b[k]), f"{k} differs"
