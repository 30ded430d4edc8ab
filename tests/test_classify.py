"""`mpirt classify` on the task farm: an ensemble of checkpoints, identical output under faults."""

import re
import sys

import h5py
import numpy as np
import pytest

from harness import run_cli

pytestmark = [pytest.mark.mpi, pytest.mark.cli]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("classify")
    data = d / "digits.h5"
    run_cli("prepare", "digits", data, "--shard-rows", "32", "--test-fraction", "0.3").check()
    ckpts = []
    for model, seed in (("linear", 1), ("mlp", 2)):
        run_cli("train", "--data", data, "--model", model, "--epochs", "2", "--seed", seed, "--no-progress",
                "--checkpoint-dir", d / model).check()
        ckpts.append(next((d / model).glob("ckpt-*.h5")))  # beside run.json and .lock
    return data, ckpts


def read(path):
    with h5py.File(path) as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def test_ensemble_one_row_per_input_row_in_order(tmp_path, setup):
    data, ckpts = setup
    out = tmp_path / "pred.h5"
    res = run_cli("classify", "--data", data, "--checkpoint", ckpts[0], "--checkpoint", ckpts[1],
                  "--out", out, "--top-k", "3").check()
    assert "2 model(s)" in res.stdout and "accuracy" in res.stdout
    pred, attrs = read(out)
    with h5py.File(data) as f:
        expect_rows = np.sort(f["test"]["row_index"][()])
    np.testing.assert_array_equal(pred["row_index"], expect_rows)
    assert pred["top_k"].shape == (len(expect_rows), 3)
    assert (np.diff(pred["prob"], axis=1) <= 1e-6).all(), "most likely first"
    assert attrs["accuracy"] > 0.8

    # the ensemble is the mean of the two models' probabilities
    import torch

    from mpirt.checkpoint import load
    from mpirt.data import open_dataset
    from mpirt.train import models

    with open_dataset(data) as ds:
        batch = ds.split("test").read(0, ds.split("test").n_rows)
    order = np.argsort(batch.row_index)
    mean = 0
    for c in ckpts:
        ck = load(c)
        m = models.build(ck.spec)
        m.load_state_dict({k: torch.from_numpy(v) for k, v in ck.params.items()})
        with torch.no_grad():
            mean = mean + torch.softmax(m(torch.from_numpy(batch.X)), 1).numpy() / 2
    np.testing.assert_allclose(pred["prob"][:, 0], mean.max(1)[order], rtol=1e-5)


@pytest.mark.parametrize("faults", [
    ["kill:member=1:shard=3", "kill:member=coordinator:step=8"],
    ["hang:member=2:shard=5", "join:count=1:step=6"],
])
def test_faults_give_identical_output(tmp_path, setup, faults):
    data, ckpts = setup
    ref = tmp_path / "ref.h5"
    run_cli("classify", "--data", data, "--checkpoint", ckpts[1], "--out", ref).check()
    out = tmp_path / "pred.h5"
    args = ["launch", "-n", "4", "--spare", "1", "--hang-timeout", "2", "--", "mpirt", "classify", "--data", data,
            "--checkpoint", ckpts[1], "--out", out]
    for f in faults:
        args += ["--inject-fault", f]
    res = run_cli(*args, timeout=180).check()
    # The coordinator's fault (kill, join) fires whatever the timing: at least one view change.
    views = int(re.search(r"(\d+) view\(s\)", res.stdout).group(1))
    assert views >= 2, res.stdout
    a, b = read(ref), read(out)
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k])
    assert a[1]["sha256"] == b[1]["sha256"]


def test_incompatible_or_tampered_checkpoint(tmp_path, setup):
    data, ckpts = setup
    text = tmp_path / "t.h5"
    run_cli("prepare", "synth-text", text, "--rows", "300").check()
    res = run_cli("classify", "--data", text, "--checkpoint", ckpts[0], "--out", tmp_path / "p.h5")
    assert res.returncode == 1 and str(ckpts[0]) in res.stderr and "Traceback" not in res.output
    bad = tmp_path / "bad.h5"
    bad.write_bytes(ckpts[0].read_bytes()[:5000])
    res = run_cli("classify", "--data", data, "--checkpoint", bad, "--out", tmp_path / "p.h5")
    assert res.returncode == 1 and "truncated or corrupted" in res.stderr
    assert not (tmp_path / "p.h5").exists()


def test_python_api_example_same_model_under_faults(tmp_path):
    example = str(__import__("pathlib").Path(__file__).parents[1] / "examples" / "elastic_loop.py")
    run_cli("launch", "-n", "1", "--", sys.executable, example, "--steps", "60", "--save", tmp_path / "one.npz").check()
    res = run_cli("launch", "-n", "4", "--spare", "1", "--", sys.executable, example,
                  "--steps", "60", "--save", tmp_path / "four.npz",
                  env={"MPIRT_FAULTS": "kill:member=2:step=10;join:count=1:step=20;kill:member=coordinator:step=40"},
                  timeout=180).check()
    assert "view 3" in res.stdout
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "four.npz")
    for k in a:
        assert np.max(np.abs(a[k] - b[k])) <= 1e-5 * np.max(np.abs(a[k]))


def test_output_does_not_depend_on_the_threads_a_rank_gets(tmp_path, setup):
    """A rank's thread count depends on how it was launched (binding); the predictions must not.
    Shards of 16 rows: there 2 of 539 probabilities differed between 1 and 2 matmul threads."""
    _, ckpts = setup
    data = tmp_path / "digits16.h5"
    run_cli("prepare", "digits", data, "--shard-rows", "16", "--test-fraction", "0.3").check()
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}.h5"
        run_cli("classify", "--data", data, "--checkpoint", ckpts[1], "--out", out,
                env={"OMP_NUM_THREADS": threads}).check()
        outs.append(read(out)[0])
    for k in outs[0]:
        assert np.array_equal(outs[0][k], outs[1][k]), k
