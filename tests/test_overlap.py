"""Gradient buckets reduced while backward runs (mpirt.train.overlap), under real mpiexec + ULFM:
the same bits as reducing after backward, compressed too, and a kill during backward recovered."""

import pytest

from harness import assert_same_model
from test_train import assert_exactly_once, final_params, n_train, train

pytestmark = [pytest.mark.mpi, pytest.mark.cli]

SMALL_BUCKETS = ["--bucket-mb", "0.01"]  # the MLP's 4 tensors in 4 buckets: three go on the thread


@pytest.mark.parametrize("compress", [None, "bf16"])
def test_overlap_gives_the_same_bits_as_after_backward(tmp_path, digits, compress):
    """2 ranks: each element is one a + b whichever bucket it travels in, so the bits must agree."""
    extra = SMALL_BUCKETS + (["--compress", compress] if compress else [])
    res, after = train(tmp_path, digits, 2, *extra, "--no-overlap", name="after")
    res.check()
    res, during = train(tmp_path, digits, 2, *extra, name="during")
    res.check()
    a, b = final_params(after)[0], final_params(during)[0]
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k


def test_a_kill_during_backward_is_recovered(tmp_path, digits, reference):
    # Member 1 dies as its step starts: the others' overlap threads are inside the bucket collectives
    # while their backward runs; the coordinator then dies too, in a later step.
    res, run = train(tmp_path, digits, 4, *SMALL_BUCKETS, faults=["kill:member=1:step=7",
                                                                  "kill:member=coordinator:step=30"])
    res.check()
    assert_same_model(reference, final_params(run)[0])
    assert_exactly_once(run, n_train(digits))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from harness import run_cli

    out = tmp_path_factory.mktemp("digits") / "digits.h5"
    run_cli("prepare", "digits", out, "--shard-rows", "256").check()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits):
    d = tmp_path_factory.mktemp("ref")
    res, run = train(d, digits, 1, *SMALL_BUCKETS, name="one")
    res.check()
    return final_params(run)[0]
