"""``mpirt lr-find``: an elastic lr sweep; the same curve and suggestion on 1 rank and on 3 ranks
through a kill (the curve within 1e-5, as any short run)."""

import json

import numpy as np
import pytest

from harness import run_cli
from mpirt.train.lrfind import diverged, suggest, sweep_lr


def test_the_sweep_and_the_rule():
    assert sweep_lr(0, 1e-4, 1.0, 5) == pytest.approx(1e-4) and sweep_lr(4, 1e-4, 1.0, 5) == pytest.approx(1.0)
    assert sweep_lr(2, 1e-4, 1.0, 5) == pytest.approx(1e-2)
    curve = [(i, 10.0 ** (i / 10 - 4), loss) for i, loss in enumerate([2.3] * 10 + [2.0, 1.5, 1.0, 0.6, 0.5, 0.7, 3.0])]
    lr, at_min = suggest(curve)
    assert curve[13][1] <= at_min <= curve[15][1] and lr == pytest.approx(at_min / 10)
    assert not diverged(curve[:16]) and diverged(curve) and diverged([(0, 1e-3, float("nan"))])


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("ldigits") / "digits.h5"
    run_cli("prepare", "digits", out, "--shard-rows", "256").check()
    return out


def _find(tmp_path, digits, n, name, *extra):
    args = ["launch", "-n", str(n), "--", "mpirt", "lr-find", "--data", digits, "--model", "mlp", "--seed", "3",
            "--steps", "46", "--min-lr", "1e-3", "--max-lr", "0.3", "--no-progress", "--out", tmp_path / name, *extra]
    res = run_cli(*args, timeout=240)
    res.check()
    return res, json.load(open(tmp_path / name / "lr_find.json"))


@pytest.mark.mpi
@pytest.mark.cli
def test_lr_find_is_the_same_on_three_ranks_through_a_kill(tmp_path, digits):
    res1, one = _find(tmp_path, digits, 1, "one")
    res3, three = _find(tmp_path, digits, 3, "three", "--inject-fault", "kill:member=2:step=20")
    assert "2 view(s)" in res3.stdout and "suggested --lr" in res3.stdout
    assert one["steps"] == three["steps"] == 46 and not one["stopped_on_divergence"]
    a = np.array([c["loss"] for c in one["curve"]])
    b = np.array([c["loss"] for c in three["curve"]])
    assert np.abs(a - b).max() <= 1e-5 * a.max()
    assert [c["lr"] for c in one["curve"]] == [c["lr"] for c in three["curve"]]
    assert one["suggested_lr"] == three["suggested_lr"] and 1e-4 <= one["suggested_lr"] <= 0.1
    assert (tmp_path / "three" / "lr_find.png").stat().st_size > 0


@pytest.mark.mpi
@pytest.mark.cli
def test_lr_find_stops_when_the_loss_diverges(tmp_path, digits):
    _, found = _find(tmp_path, digits, 2, "wide", "--max-lr", "1000", "--steps", "120")
    assert found["stopped_on_divergence"] and found["steps"] < 120
    assert found["suggested_lr"] < found["curve"][-1]["lr"]


@pytest.mark.cli
@pytest.mark.parametrize("args, words", [
    (["--min-lr", "1", "--max-lr", "0.1"], "must be below --max-lr"),
    (["--checkpoint-dir", "ck"], "lr-find trains no model to keep"),
])
def test_lr_find_refuses_what_makes_no_sense(tmp_path, digits, args, words):
    res = run_cli("lr-find", "--data", digits, "--model", "mlp", "--out", tmp_path / "o", *args, timeout=60)
    assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.output, res.output
