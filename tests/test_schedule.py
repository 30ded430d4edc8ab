"""Learning-rate schedules, warmup and clipping (mpirt.train.schedule): functions of the committed
step and of the reduced gradient, so the same on any number of ranks, through kills and resumes."""

import math

import numpy as np
import pytest
import torch

from harness import assert_same_bits, assert_same_model, checkpoint_bits, run_cli
from mpirt.train.schedule import clip_global_norm, lr_at, warmup_steps


def test_the_schedules_shapes():
    kw = dict(base=0.4, warmup=0, total_steps=100)
    assert [lr_at(s, schedule="constant", **kw) for s in (0, 50, 99)] == [0.4] * 3
    assert lr_at(0, schedule="linear", **kw) == 0.4 and lr_at(50, schedule="linear", **kw) == pytest.approx(0.2)
    assert lr_at(99, schedule="linear", **kw) == pytest.approx(0.004)
    assert lr_at(50, schedule="cosine", **kw) == pytest.approx(0.2) and lr_at(0, schedule="cosine", **kw) == 0.4
    assert [lr_at(s, schedule="step", **kw) for s in (49, 50, 74, 75)] == pytest.approx([0.4, 0.04, 0.04, 0.004])
    # Warmup rises linearly to the base, then the schedule runs over the steps after it.
    w = dict(base=1.0, warmup=10, total_steps=110)
    assert [lr_at(s, schedule="linear", **w) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, schedule="linear", **w) == 1.0 and lr_at(60, schedule="linear", **w) == pytest.approx(0.5)
    assert lr_at(60, schedule="cosine", **w) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert warmup_steps(0.1, 250) == 25 and warmup_steps(7, 250) == 7 and warmup_steps(0, 250) == 0


def test_clipping_scales_dense_and_sparse_parts_to_the_global_norm():
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    p.grad, q.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])
    rows = [(np.array([1, 5]), np.array([[0.0, 12.0], [0.0, 0.0]], np.float32))]
    norm = clip_global_norm([p, q], rows, max_norm=6.5)
    assert norm == pytest.approx(13.0)
    assert torch.allclose(p.grad, torch.tensor([1.5, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(q.grad, torch.tensor([0.0, 2.0]), atol=1e-6)
    assert rows[0][1][0, 1] == pytest.approx(6.0, abs=1e-5)
    assert clip_global_norm([p, q], rows, max_norm=100.0) == pytest.approx(6.5, abs=1e-4)  # under: unchanged
    assert torch.allclose(p.grad, torch.tensor([1.5, 0.0, 0.0]), atol=1e-6)


# -- mpirt train ------------------------------------------------------------------------------------
TUNED = ["--lr-schedule", "cosine", "--warmup", "0.2", "--clip-norm", "0.5", "--lr", "0.2"]


def _train(tmp_path, data, n, name, *extra, faults=(), model="mlp"):
    run_dir = tmp_path / name
    run_dir.mkdir(exist_ok=True)
    args = ["launch", "-n", str(n), "--", "mpirt", "train", "--data", data, "--model", model, "--epochs", "2",
            "--global-batch", "64", "--seed", "3", "--no-progress", "--checkpoint-dir", run_dir / "ckpt", *extra]
    for f in faults:
        args += ["--inject-fault", f]
    return run_cli(*args, timeout=240), run_dir


def _params(run_dir):
    from test_train import final_params

    return final_params(run_dir)[0]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdigits") / "digits.h5"
    run_cli("prepare", "digits", out, "--shard-rows", "256").check()
    return out


@pytest.mark.mpi
@pytest.mark.cli
def test_schedule_warmup_and_clipping_give_one_ranks_model_on_three_ranks_with_a_kill(tmp_path, digits):
    """46 steps: every one warmed up, decayed or clipped (the 0.5 norm clips most of them)."""
    res, one = _train(tmp_path, digits, 1, "one", *TUNED, "--report", tmp_path / "report")
    res.check()
    res, three = _train(tmp_path, digits, 3, "three", *TUNED, faults=["kill:member=1:step=20"])
    res.check()
    assert "2 view(s)" in res.stdout
    assert_same_model(_params(one), _params(three))
    untuned, _ = _train(tmp_path, digits, 1, "plain", "--lr", "0.2")
    untuned.check()
    assert not all(np.allclose(a, b) for a, b in zip(_params(one).values(), _params(tmp_path / "plain").values()))
    import json

    report = json.load(open(tmp_path / "report" / "report.json"))
    assert len(report["lr"]) == 46 and report["lr"][0] == pytest.approx(0.2 / 9)  # warmup: 9 of 46 steps
    assert max(report["lr"]) == pytest.approx(0.2) and report["lr"][-1] < 0.001
    assert (tmp_path / "report" / "lr.png").stat().st_size > 0


@pytest.mark.mpi
@pytest.mark.cli
def test_with_exact_the_schedule_and_clipping_are_bit_identical_on_any_world_size(tmp_path, digits):
    res, one = _train(tmp_path, digits, 1, "one", *TUNED, "--exact")
    res.check()
    res, two = _train(tmp_path, digits, 2, "two", *TUNED, "--exact", faults=["kill:member=1:step=30"])
    res.check()
    assert_same_bits(checkpoint_bits(one / "ckpt"), checkpoint_bits(two / "ckpt"))


@pytest.mark.mpi
@pytest.mark.cli
def test_a_stopped_run_resumes_on_the_same_curve_and_refuses_another(tmp_path, digits):
    res, one = _train(tmp_path, digits, 2, "ref", *TUNED)
    res.check()
    res, run = _train(tmp_path, digits, 2, "run", *TUNED, faults=["stop:member=1:step=15"])
    assert res.returncode == 75, res.output[-2000:]
    # Another schedule over the same checkpoints: refused, one line naming the flag, nothing touched.
    bad, _ = _train(tmp_path, digits, 2, "run", *TUNED[:-2], "--lr-schedule", "linear", "--resume")
    assert bad.returncode == 2 and "--lr-schedule" in bad.stderr and "Traceback" not in bad.output, bad.output
    res, run = _train(tmp_path, digits, 3, "run", *TUNED, "--resume")
    res.check()
    assert_same_model(_params(one), _params(run))


# -- early stopping and the best checkpoint -------------------------------------------------------
# lr 0.2 on digits: the val loss stops improving after a few epochs. With --exact every world size
# makes the same decisions from the same bits.
EARLY = ["--exact", "--lr", "0.2", "--epochs", "30", "--early-stop", "2", "--keep-best"]


def _early(tmp_path, digits, n, name, *extra, faults=()):
    res, run = _train(tmp_path, digits, n, name, *EARLY, "--report", tmp_path / name / "report", *extra,
                      faults=faults)
    return res, run


def _early_state(run):
    import json

    return json.load(open(run / "report" / "report.json"))["early_stop"]


@pytest.mark.mpi
@pytest.mark.cli
def test_early_stopping_and_the_best_checkpoint_are_the_same_on_three_ranks_with_a_kill(tmp_path, digits):
    res, one = _early(tmp_path, digits, 1, "one")
    res.check()
    early = _early_state(one)
    assert early["stopped"] is not None and early["stopped"] < 29 and early["since"] == 2, early
    assert f"early stop after epoch {early['stopped'] + 1}" in res.stdout
    res, three = _early(tmp_path, digits, 3, "three", faults=["kill:member=1:step=40"])
    res.check()
    assert "2 view(s)" in res.stdout
    assert _early_state(three) == early
    assert_same_bits(checkpoint_bits(one / "ckpt" / "best.h5"), checkpoint_bits(three / "ckpt" / "best.h5"))
    assert_same_bits(checkpoint_bits(one / "ckpt"), checkpoint_bits(three / "ckpt"))
    # The best checkpoint is the best epoch's step, and classify takes it by name.
    assert checkpoint_bits(one / "ckpt" / "best.h5")[2]["step"] == early["best_step"]
    out = run_cli("classify", "--data", digits, "--checkpoint", one / "ckpt" / "best", "--out", tmp_path / "p.h5",
                  timeout=120)
    out.check()
    missing = run_cli("classify", "--data", digits, "--checkpoint", tmp_path / "nowhere" / "best", "--out",
                      tmp_path / "q.h5", timeout=120)
    assert missing.returncode != 0 and "Traceback" not in missing.output
    assert len(missing.stderr.strip().splitlines()) == 1 and "best" in missing.stderr, missing.stderr


@pytest.mark.mpi
@pytest.mark.cli
def test_early_stopping_resumes_to_the_same_decision_after_a_stop(tmp_path, digits):
    """Stopped (SIGUSR1) at the end of an epoch, before its validation, and resumed on another
    world size: the resumed run validates that epoch and stops where the uninterrupted one did."""
    res, ref = _early(tmp_path, digits, 2, "ref")
    res.check()
    early = _early_state(ref)
    per = 23  # steps an epoch (1,437 training rows / 64)
    stop_at = per * (early["stopped"]) - 1  # the last step of the epoch before the one it stopped after
    res, run = _early(tmp_path, digits, 2, "run", faults=[f"stop:member=1:step={stop_at}"])
    assert res.returncode == 75, res.output[-2000:]
    res, run = _early(tmp_path, digits, 3, "run", "--resume")
    res.check()
    assert _early_state(run) == early
    assert_same_bits(checkpoint_bits(ref / "ckpt" / "best.h5"), checkpoint_bits(run / "ckpt" / "best.h5"))
    assert_same_bits(checkpoint_bits(ref / "ckpt"), checkpoint_bits(run / "ckpt"))


@pytest.mark.cli
@pytest.mark.parametrize("args, words", [
    (["--keep-best"], "--keep-best needs --checkpoint-dir"),
    (["--early-stop", "-1"], "--early-stop"),
    (["--monitor", "val_f1"], "invalid choice"),
])
def test_early_stop_flags_are_checked(tmp_path, digits, args, words):
    res = run_cli("train", "--data", digits, "--model", "mlp", *args, timeout=60)
    assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.output, res.output
