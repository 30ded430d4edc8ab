"""Issue 10, checkpoints (items 3, 4, 5, 7, 12): each case failed on cdcce81.

Real ``mpirt train`` / ``mpirt classify`` runs on one rank, on data sets ``mpirt prepare`` makes;
crafted checkpoints are real ones edited with h5py (and, where an attacker would, with the
manifest recomputed).
"""

import fcntl
import json
import os
import shutil

import h5py
import pytest

from harness import MPIRT, run, run_cli, one_line_error

pytestmark = pytest.mark.cli


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "digits.h5"
    run_cli("prepare", "digits", out, "--shard-rows", "256").check()
    return out


def train(data, ck, *extra, model="linear", env=None):
    return run_cli("train", "--data", data, "--model", model, "--epochs", "1", "--no-progress",
                   "--checkpoint-dir", ck, *extra, timeout=90, env=env)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """A finished run's checkpoint directory (copied by tests that change it)."""
    ck = tmp_path_factory.mktemp("trained") / "ck"
    train(digits, ck, "--seed", "1").check()
    return ck


def copy_dir(src, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(src, dst)
    return dst


def names(ck):
    return sorted(p.name for p in ck.glob("ckpt-*.h5"))


# -- item 4: a checkpoint directory belongs to one run --------------------------------------------
def test_new_run_in_an_old_directory_is_refused_and_loses_nothing(tmp_path, digits, trained):
    ck = copy_dir(trained, tmp_path)
    before = {n: (ck / n).read_bytes() for n in names(ck)}
    one_line_error(train(digits, ck, "--seed", "1", "--keep", "1", "--epochs", "1"), 2, "earlier run", "--resume")
    assert {n: (ck / n).read_bytes() for n in names(ck)} == before


@pytest.mark.parametrize("flags, differs", [
    (["--seed", "2"], "--seed (was 1, now 2)"),
    (["--seed", "1", "--global-batch", "32"], "--global-batch (was 64, now 32)"),
    (["--seed", "1", "--lr", "0.2"], "--lr"),
    (["--seed", "1", "--model", "mlp"], "--model"),
    (["--seed", "1", "--data", None], "--data"),
])
def test_resume_with_another_identity_names_the_flag(tmp_path, digits, trained, flags, differs):
    ck = copy_dir(trained, tmp_path)
    if None in flags:  # the same rows, split with another seed: another data set
        other = tmp_path / "other.h5"
        run_cli("prepare", "digits", other, "--shard-rows", "256", "--seed", "5").check()
        flags = flags[:-2]
        data = other
    else:
        data = digits
    args = [a for a in flags if a != "--model" and a != "mlp"]
    model = "mlp" if "mlp" in flags else "linear"
    one_line_error(train(data, ck, "--resume", *args, model=model), 2, "--resume", differs)


def test_resume_with_the_same_identity_goes_on(tmp_path, digits, trained):
    ck = copy_dir(trained, tmp_path)
    train(digits, ck, "--seed", "1", "--resume", "--epochs", "2").check()
    assert names(ck)[-1] == "ckpt-00000046.h5"


def test_a_locked_directory_is_refused_with_one_line(tmp_path, digits):
    ck = tmp_path / "ck"
    ck.mkdir()
    with open(ck / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running job holds
        one_line_error(train(digits, ck), 1, "in use by another job")
    assert names(ck) == []
    train(digits, ck).check()  # and free once the holder is gone


def test_keep_k_deletes_only_checkpoints_of_the_same_run(tmp_path, digits, trained):
    ck = tmp_path / "ck"
    train(digits, ck, "--seed", "3", "--checkpoint-every", "5", "--keep", "1").check()
    assert names(ck) == ["ckpt-00000023.h5"]
    foreign = sorted(trained.glob("ckpt-*.h5"))[-1]
    shutil.copyfile(foreign, ck / "ckpt-00000001.h5")  # another run's file, lower step
    train(digits, ck, "--seed", "3", "--checkpoint-every", "5", "--keep", "1", "--resume", "--epochs", "2").check()
    assert names(ck) == ["ckpt-00000001.h5", "ckpt-00000046.h5"]


def test_checkpoint_dir_that_is_a_file_is_refused_before_training(tmp_path, digits):
    f = tmp_path / "file"
    f.write_text("not a directory")
    one_line_error(train(digits, f), 2, "not a directory")
    assert f.read_text() == "not a directory"


# -- item 3: checkpoints and predictions name the data they came from --------------------------------
def test_checkpoints_and_predictions_record_the_data_digest(tmp_path, digits, trained):
    from mpirt.checkpoint import load
    from mpirt.data.integrity import dataset_digest
    from mpirt.data.reader import open_dataset

    with open_dataset(digits) as ds:
        digest = dataset_digest(ds)
    ckpt = sorted(trained.glob("ckpt-*.h5"))[-1]
    assert load(ckpt).meta["data_sha256"] == digest
    run_cli("classify", "--data", digits, "--checkpoint", ckpt, "--out", tmp_path / "p.h5").check()
    with h5py.File(tmp_path / "p.h5") as f:
        assert f.attrs["data_sha256"] == digest and list(f.attrs["checkpoint_data_sha256"]) == [digest]


# -- item 5: signed checkpoints ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def signed(digits, tmp_path_factory):
    ck = tmp_path_factory.mktemp("signed") / "ck"
    train(digits, ck, env={"MPIRT_CHECKPOINT_KEY": "s3cret"}).check()
    return sorted(ck.glob("ckpt-*.h5"))[-1]


def redo_manifest(path, edit):
    """What an attacker without the key can do: change the arrays, then recompute the manifest
    (datasets too large to read here get an entry with a made-up digest, as an attacker would)."""
    from mpirt.checkpoint import ATTRS, _manifest

    with h5py.File(path, "r+") as f:
        edit(f)
        arrays, huge = {}, {}
        f.visititems(lambda n, o: (huge if o.size > 1 << 24 else arrays).__setitem__(n, o)
                     if isinstance(o, h5py.Dataset) else None)
        attrs = {k: (f.attrs[k] if k != "world_size" else int(f.attrs[k])) for k in ATTRS}
        entries = json.loads(_manifest({n: o[()] for n, o in arrays.items()}, attrs,
                                       f["optimizer"].attrs["param_groups"]))
        entries.update({n: f"{'0' * 64}:{o.dtype.str}:{list(o.shape)}" for n, o in huge.items()})
        f.attrs["manifest"] = json.dumps(entries, sort_keys=True)


def test_signed_checkpoint_without_the_key_is_refused(tmp_path, digits, signed):
    out = tmp_path / "p.h5"
    one_line_error(run_cli("classify", "--data", digits, "--checkpoint", signed, "--out", out), 1,
                   "signed: give the key", "--no-verify")
    run_cli("classify", "--data", digits, "--checkpoint", signed, "--out", out, "--no-verify").check()
    ck = tmp_path / "ck"
    shutil.copytree(signed.parent, ck)
    one_line_error(train(digits, ck, "--resume", "--epochs", "2"), 1, "signed: give the key")


def test_redone_manifest_does_not_pass(tmp_path, digits, signed):
    bad = tmp_path / "bad.h5"
    shutil.copyfile(signed, bad)
    redo_manifest(bad, lambda f: f["params/body.weight"].__setitem__((0, 0), 9.0))
    for env in ({}, {"MPIRT_CHECKPOINT_KEY": "s3cret"}):
        one_line_error(run_cli("classify", "--data", digits, "--checkpoint", bad, "--out", tmp_path / "p.h5",
                               env=env), 1, "bad.h5")
    assert not (tmp_path / "p.h5").exists()


def test_key_file_readable_by_others_and_empty_env_key_are_refused(tmp_path, digits, signed):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    key.chmod(0o644)
    out = tmp_path / "p.h5"
    one_line_error(run_cli("classify", "--data", digits, "--checkpoint", signed, "--out", out, "--key-file", key),
                   2, "accessible by group or others", "chmod 600")
    key.chmod(0o600)
    run_cli("classify", "--data", digits, "--checkpoint", signed, "--out", out, "--key-file", key).check()
    one_line_error(run_cli("classify", "--data", digits, "--checkpoint", signed, "--out", out,
                           env={"MPIRT_CHECKPOINT_KEY": ""}), 2, "MPIRT_CHECKPOINT_KEY is set but empty")


# -- item 7: hashing parameters travel with the model ------------------------------------------------
def test_classify_refuses_a_model_hashed_with_another_seed(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for path, seed in ((a, "1"), (b, "2")):
        run_cli("prepare", "synth-text", path, "--rows", "400", "--features", "1024", "--hash-seed", seed,
                "--shard-rows", "128").check()
    ck = tmp_path / "ck"
    train(a, ck, model="fasttext").check()
    ckpt = next(ck.glob("ckpt-*.h5"))
    one_line_error(run_cli("classify", "--data", b, "--checkpoint", ckpt, "--out", tmp_path / "p.h5"), 1,
                   "hash_seed 1 (data: 2)")
    run_cli("classify", "--data", a, "--checkpoint", ckpt, "--out", tmp_path / "p.h5").check()


# -- item 12: crafted checkpoints are refused before any large allocation -----------------------------
def undeclared(f):
    f.create_dataset("params/huge", shape=(1 << 30,), dtype="<f4", chunks=(1 << 16,))  # never written


def declared(f):
    undeclared(f)
    del f["params/huge"]
    f.create_dataset("params/huge", shape=(1 << 40,), dtype="<f4", chunks=(1 << 20,))


def huge_spec(f):
    spec = json.loads(f.attrs["spec"])
    f.attrs["spec"] = json.dumps(dict(spec, name="mlp", hidden=1 << 22))  # 2^44 weights


def bounded_cli(*args, limit_kb=2_500_000):
    """``mpirt ARGS`` with its address space capped: what cdcce81 allocated first fails here."""
    return run(["bash", "-c", f'ulimit -v {limit_kb}; exec "$0" "$@"', MPIRT, *map(str, args)], timeout=60)


@pytest.mark.parametrize("edit, redo, words", [
    (undeclared, False, "params/huge"),
    (declared, True, "does not hold"),
    (huge_spec, True, "parameters"),
], ids=["undeclared-2^30", "declared-2^40", "spec-2^44-params"])
def test_crafted_checkpoints_are_refused_before_allocating(tmp_path, digits, trained, edit, redo, words):
    bad = tmp_path / "bad.h5"
    shutil.copyfile(sorted(trained.glob("ckpt-*.h5"))[-1], bad)
    if redo:
        redo_manifest(bad, edit)
    else:
        with h5py.File(bad, "r+") as f:
            edit(f)
    assert os.path.getsize(bad) < 1 << 20
    res = bounded_cli("classify", "--data", digits, "--checkpoint", bad, "--out", tmp_path / "p.h5")
    one_line_error(res, 1, "bad.h5", words)
    assert not (tmp_path / "p.h5").exists()
