"""Issue 10, hostile and careless inputs (items 3, 6, 12, 13): each case failed on cdcce81.

Data sets are made by ``mpirt prepare`` and then edited with h5py the way an attacker or a broken
copy would; every command runs as a user types it. Each refusal is one line, a non-zero exit, no
traceback, and the inputs are left as they were.
"""

import json
import os
import shutil

import h5py
import numpy as np
import pytest

from harness import run_cli, one_line_error

pytestmark = pytest.mark.cli


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "digits.h5"
    run_cli("prepare", "digits", out, "--shard-rows", "128").check()
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "text.h5"
    run_cli("prepare", "synth-text", out, "--rows", "800", "--features", "1024", "--shard-rows", "128").check()
    return out


def edited(src, tmp_path, edit, name="edited.h5"):
    """A copy of ``src`` changed by ``edit(h5py.File)``."""
    dst = tmp_path / name
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def train(data, *extra, model="mlp", env=None):
    return run_cli("train", "--data", data, "--model", model, "--epochs", "1", "--no-progress", *extra, timeout=90,
                   env=env)


# -- item 3: jobs verify the shards they use -----------------------------------------------------
def relabel(f):
    y = f["train/y"]
    y[5] = (y[5] + 1) % 10  # still a valid class: only the checksum can tell


def test_train_refuses_labels_changed_behind_the_checksum(tmp_path, digits):
    data = edited(digits, tmp_path, relabel)
    before = data.read_bytes()
    one_line_error(train(data), 1, "train shard 0", "checksum mismatch")
    assert data.read_bytes() == before


def test_classify_and_wordcount_verify_the_shard_they_map(tmp_path, digits, text):
    ckpt_dir = tmp_path / "ck"
    train(digits, "--checkpoint-dir", ckpt_dir).check()
    ckpt = next(ckpt_dir.glob("ckpt-*.h5"))
    data = edited(digits, tmp_path, lambda f: f["test/X"].__setitem__((140, 0, 0), 0.5))
    one_line_error(run_cli("classify", "--data", data, "--checkpoint", ckpt, "--out", tmp_path / "p.h5"),
                   1, "test shard 1", "checksum")
    assert not (tmp_path / "p.h5").exists()
    bad_ids = edited(text, tmp_path, lambda f: f["train/ids"].__setitem__(3, 1024 + 7), name="ids.h5")
    one_line_error(run_cli("wordcount", bad_ids, "--out", tmp_path / "c.h5"), 1, "train shard 0", "token id 1031")


@pytest.mark.parametrize("edit, words", [
    (lambda f: _replace(f["train"], "shards", np.concatenate([f["train/shards"][()]] * 2)), "shard table"),
    (lambda f: (_replace(f["train"], "shards", np.zeros((0, 2), np.int64)),
                _replace(f["train"], "shard_sha256", np.zeros(0, "S64"))), "no shards"),
    (lambda f: f["train"].attrs.__setitem__("n_rows", 10**12), "n_rows says 1000000000000"),
    (lambda f: (f["train/y"].resize((10**12,)), f["train/row_index"].resize((10**12,)),
                f["train/offsets"].resize((10**12 + 1,)), f["train"].attrs.__setitem__("n_rows", 10**12)),
     "the file holds"),
    (lambda f: _replace(f["train"], "y", f["train/y"][()].astype("<f8")), "the format says <i8"),
    (lambda f: _replace(f["train"], "shards", f["train/shards"][()].reshape(-1)), "the format says (k, 2)"),
], ids=["duplicated-table", "empty-table", "n_rows-1e12", "declared-1e12-rows", "float-labels", "flat-table"])
def test_crafted_shard_tables_and_extents_are_refused_before_reading(tmp_path, text, edit, words):
    data = edited(text, tmp_path, edit)
    one_line_error(run_cli("wordcount", data, "--out", tmp_path / "c.h5", timeout=60), 1, "train", words)
    one_line_error(train(data, model="fasttext"), 1, words)


def _replace(group, name, data):
    del group[name]
    group.create_dataset(name, data=data)


def test_feature_shape_2e20_squared_is_refused_without_allocating(tmp_path):
    """A header-only data set: X declared (n, 2^20, 2^20), nothing stored."""
    from mpirt.data.writer import DatasetWriter

    path = tmp_path / "huge.h5"
    w = DatasetWriter(path, "dense", 1 << 40, {"train": 4, "val": 4, "test": 4}, feature_shape=(1, 1))
    w.finish(["a", "b"])
    with h5py.File(path, "r+") as f:
        f.attrs["feature_shape"] = np.array([1 << 20, 1 << 20])
        for s in ("train", "val", "test"):
            del f[s]["X"]
            f[s].create_dataset("X", shape=(0, 1 << 20, 1 << 20), maxshape=(None, 1 << 20, 1 << 20),
                                dtype="<f4", chunks=(4, 1, 64))
        f["train/X"].resize((4, 1 << 20, 1 << 20))
        for name in ("y", "row_index"):
            f["train"][name].resize((4,))
            f["train"][name][:] = [0, 1, 0, 1]
        f["train"].attrs["n_rows"] = 4
        _replace(f["train"], "shards", np.array([[0, 4]]))
        _replace(f["train"], "shard_sha256", np.array([b"0" * 64], "S64"))
    one_line_error(train(path, model="linear"), 1, "'X' declares", "the file holds")
    # The same header with every extent honest but the model too large: the parameter cap.
    small = tmp_path / "digits.h5"
    run_cli("prepare", "digits", small, "--shard-rows", "128").check()
    one_line_error(train(small, "--hidden", "65536", env={"MPIRT_MAX_PARAMS": "1000000"}), 2, "parameters",
                   "MPIRT_MAX_PARAMS")


def test_fasttext_on_2e32_buckets_is_capped_with_one_line(tmp_path):
    data = tmp_path / "t32.h5"
    run_cli("prepare", "synth-text", data, "--rows", "200", "--hash-bits", "32", "--shard-rows", "64").check()
    line = one_line_error(train(data, model="fasttext"), 2, "parameters", "--hash-bits")
    assert "1024.0 GiB" in line
    one_line_error(run_cli("wordcount", data, "--out", tmp_path / "c.h5"), 1, "128 GiB", "--hash-bits")
    assert not (tmp_path / "c.h5").exists()


# -- item 6: numeric flags -------------------------------------------------------------------------
# The cases of the issue (each trained to exit 0 or gave a traceback on cdcce81), then ones that
# were refused already and must stay so now that the checks moved into the flags' types.
@pytest.mark.parametrize("flag, value", [
    ("--lr", "nan"), ("--lr", "inf"), ("--weight-decay", "nan"), ("--momentum", "-5"), ("--seed", "-1"),
    ("--seed", str(2**64)), ("--hidden", "-1"), ("--hidden", "0"), ("--channels", "0"), ("--bucket-mb", "nan"),
    ("--lr", "0"), ("--seed", "1e23"), ("--epochs", "0"), ("--checkpoint-every", "-1"), ("--global-batch", "0"),
    ("--keep", "0"), ("--min-ranks", "0"),
])
def test_train_numeric_flags_are_validated(digits, flag, value):
    one_line_error(train(digits, flag, value), 2, flag)


def test_hang_timeout_nan_is_refused(tmp_path):
    one_line_error(run_cli("launch", "--hang-timeout", "nan", "--dry-run", "--", "true"), 2, "--hang-timeout")
    one_line_error(run_cli("launch", "--dry-run", "--", "true", env={"MPIRT_HANG_TIMEOUT": "nan"}), 2,
                   "MPIRT_HANG_TIMEOUT")


def test_non_finite_loss_stops_at_a_named_step_keeping_the_last_good_checkpoint(tmp_path, digits):
    ck = tmp_path / "ck"
    res = train(digits, "--lr", "1e30", "--checkpoint-dir", ck, "--checkpoint-every", "1")
    line = one_line_error(res, 1, "step 1:", "not finite", "ckpt-00000001.h5")
    assert "last good checkpoint" in line
    assert sorted(p.name for p in ck.glob("ckpt-*.h5")) == ["ckpt-00000001.h5"]
    from mpirt.checkpoint import load

    ckpt = load(ck / "ckpt-00000001.h5")
    assert all(np.isfinite(v).all() for v in ckpt.params.values())


def test_non_finite_loss_stops_every_rank_at_the_same_step_with_one_line(tmp_path, digits):
    ck = tmp_path / "ck"
    res = run_cli("launch", "-n", "2", "--", "mpirt", "train", "--data", digits, "--model", "mlp", "--epochs", "1",
                  "--no-progress", "--lr", "1e30", "--checkpoint-dir", ck, "--checkpoint-every", "1", timeout=90)
    one_line_error(res, 1, "step 1:", "not finite", "ckpt-00000001.h5")
    assert sorted(p.name for p in ck.glob("ckpt-*.h5")) == ["ckpt-00000001.h5"]


# -- item 13: smaller ones -------------------------------------------------------------------------
def test_top_k_33_is_one_line(tmp_path, digits):
    one_line_error(run_cli("classify", "--data", digits, "--checkpoint", tmp_path / "x.h5", "--out",
                           tmp_path / "p.h5", "--top-k", "33"), 2, "--top-k")


def test_min_ranks_above_the_world_size_and_resume_without_a_directory(tmp_path, digits, text):
    res = run_cli("launch", "-n", "2", "--", "mpirt", "train", "--data", digits, "--model", "linear",
                  "--no-progress", "--min-ranks", "3", timeout=90)
    one_line_error(res, 2, "--min-ranks 3: the job started with only 2 rank(s)")
    res = run_cli("launch", "-n", "2", "--", "mpirt", "wordcount", text, "--out", tmp_path / "c.h5",
                  "--min-ranks", "3", timeout=90)
    one_line_error(res, 2, "--min-ranks 3: the job started with only 2 rank(s)")
    assert not (tmp_path / "c.h5").exists()
    one_line_error(train(digits, "--resume"), 2, "--resume needs --checkpoint-dir")


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_lone_surrogate_is_a_bad_line(tmp_path):
    rows = [{"text": f"word{i} common", "label": "ab"[i % 2]} for i in range(20)]
    rows.insert(3, '{"text": "bad \\ud800 here", "label": "a"}')
    rows.insert(7, '{"text": "fine", "label": "\\udfff"}')
    src = jsonl(tmp_path / "in.jsonl", rows)
    res = run_cli("prepare", "text", src, tmp_path / "o.h5", "--features", "1024", "--skip-bad")
    res.check()
    assert "2 bad lines skipped" in res.stdout
    one_line_error(run_cli("prepare", "text", src, tmp_path / "o2.h5", "--features", "1024"), 1,
                   "in.jsonl:4", "surrogate")
    assert not (tmp_path / "o2.h5").exists()


def test_label_1_and_number_1_are_not_merged(tmp_path):
    rows = [{"text": f"w{i}", "label": 1 if i % 2 else "1"} for i in range(10)]
    src = jsonl(tmp_path / "in.jsonl", rows)
    one_line_error(run_cli("prepare", "text", src, tmp_path / "o.h5", "--features", "1024"), 1,
                   '"1"', "one class")
    assert not (tmp_path / "o.h5").exists()


def test_class_names_with_escape_sequences_are_printed_escaped(tmp_path):
    rows = [{"text": f"w{i}", "label": "\x1b[31mred\x1b[0m" if i % 2 else "plain\nline"} for i in range(10)]
    src = jsonl(tmp_path / "in.jsonl", rows)
    run_cli("prepare", "text", src, tmp_path / "o.h5", "--features", "1024").check()
    res = run_cli("inspect", tmp_path / "o.h5").check()
    assert "\x1b" not in res.stdout and "\\x1b[31mred\\x1b[0m" in res.stdout and "plain\\nline" in res.stdout


def test_many_classes_are_stored_and_old_files_still_read(tmp_path):
    n = 6000
    X = np.random.default_rng(0).random((2 * n, 2), dtype=np.float32)
    y = np.array([f"class-{i:05d}-with-a-longer-name" for i in range(n)] * 2)
    np.savez(tmp_path / "in.npz", X=X, y=y)
    out = tmp_path / "many.h5"
    res = run_cli("prepare", "npz", tmp_path / "in.npz", out, "--val-fraction", "0", "--test-fraction", "0")
    res.check()
    assert f"{n} classes" in res.stdout
    run_cli("inspect", out).check()
    # A file of an older mpirt keeps the names in a root attribute (it fits when they are few).
    old = tmp_path / "old.h5"
    run_cli("prepare", "digits", old, "--shard-rows", "128").check()
    with h5py.File(old, "r+") as f:
        names = f["class_names"][()]
        del f["class_names"]
        f.attrs["class_names"] = names
    assert "10 classes" in run_cli("inspect", old).check().stdout


def test_a_fifo_as_data_or_checkpoint_is_refused_not_waited_on(tmp_path, digits):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_line_error(run_cli("train", "--data", fifo, "--model", "mlp", timeout=30), 1, "is a FIFO")
    one_line_error(run_cli("classify", "--data", digits, "--checkpoint", fifo, "--out", tmp_path / "p.h5",
                           timeout=30), 1, "is a FIFO")


def test_crafted_class_names_dataset_is_refused_before_reading(tmp_path, digits):
    def edit(f):
        del f["class_names"]
        f.create_dataset("class_names", shape=(10**9,), dtype=h5py.string_dtype(), chunks=(1024,))
    data = edited(digits, tmp_path, edit)
    one_line_error(run_cli("inspect", data), 1, "'class_names' declares", "the file holds 0 bytes")
