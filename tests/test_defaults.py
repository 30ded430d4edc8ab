"""Per-model defaults (mpirt.train.defaults): a run with no tuning flag trains well."""

import os
import re
import sys

import pytest

from harness import run, run_cli

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.mancorpus import linear_baseline  # noqa: E402

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


@pytest.fixture(scope="module")
def man_pages(tmp_path_factory, groff):
    """The real-text corpus of the benchmarks (this machine's man pages as HTML, 6 sections, ~2,240
    pages; bench/mancorpus.py), prepared with the defaults of ``mpirt prepare text``, and the test
    accuracy of scikit-learn's LogisticRegression on the same hashed features."""
    d = tmp_path_factory.mktemp("man")
    run([sys.executable, "-m", "bench.mancorpus", d / "man.jsonl"], timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).check()
    run_cli("prepare", "text", d / "man.jsonl", d / "man.h5", timeout=600).check()
    return d / "man.h5", 100 * linear_baseline(d / "man.h5")


@pytest.mark.parametrize("n, faults", [(1, []), (3, ["--inject-fault", "kill:member=1:step=100"])])
def test_fasttext_with_no_tuning_flag_is_within_2_points_of_scikit_learn_on_man_pages(man_pages, n, faults):
    data, baseline = man_pages
    res = run_cli("launch", "-n", str(n), "--", "mpirt", "train", "--data", data, "--model", "fasttext",
                  "--no-progress", *faults, timeout=600)
    res.check()
    if faults:
        assert "2 view(s)" in res.stdout
    assert accuracy(res) >= baseline - 2.0, (baseline, res.stdout)


def test_help_lists_each_models_defaults_and_a_flag_wins(digits):
    res = run_cli("train", "--help", timeout=60).check()
    text = " ".join(res.stdout.split())
    assert "default per model: linear 10, mlp 10, cnn 10, fasttext 10" in text
    assert "fasttext adam" in text and "cnn constant" in text
    res = run_cli("train", "--data", digits, "--model", "mlp", "--epochs", "1", "--no-progress", timeout=120).check()
    assert "23 steps" in res.stdout
