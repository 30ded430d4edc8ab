"""Per-model defaults (mpirt.train.defaults): a run with no tuning flag trains well."""

import re

import pytest

from harness import run_cli

pytestmark = [pytest.mark.mpi, pytest.mark.cli]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddigits") / "digits.h5"
    run_cli("prepare", "digits", out, "--shard-rows", "256").check()
    return out


def accuracy(res):
    return float(re.search(r"test accuracy ([0-9.]+)%", res.stdout).group(1))


@pytest.mark.parametrize("n, faults", [(1, []), (3, ["--inject-fault", "kill:member=1:step=100"])])
def test_the_digits_cnn_with_no_tuning_flag_reaches_97_percent(digits, n, faults):
    res = run_cli("launch", "-n", str(n), "--", "mpirt", "train", "--data", digits, "--model", "cnn", "--no-progress",
                  *faults, timeout=300)
    res.check()
    assert "230 steps" in res.stdout  # 10 epochs of 23
    if faults:
        assert "2 view(s)" in res.stdout
    assert accuracy(res) >= 97.0, res.stdout


def test_help_lists_each_models_defaults_and_a_flag_wins(digits):
    res = run_cli("train", "--help", timeout=60).check()
    text = " ".join(res.stdout.split())
    assert "default per model: linear 10, mlp 10, cnn 10, fasttext 10" in text
    assert "fasttext adam" in text and "cnn constant" in text
    res = run_cli("train", "--data", digits, "--model", "mlp", "--epochs", "1", "--no-progress", timeout=120).check()
    assert "23 steps" in res.stdout
