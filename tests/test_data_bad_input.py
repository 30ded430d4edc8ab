"""Every kind of bad input, through the CLI as a user types it.

Each gets exit status 1 (bad data) or 2 (usage), exactly one line on stderr naming the
file and the problem, no traceback, and nothing at the output path afterwards (not even
a temporary file beside it).
"""

import json
import os

import h5py
import numpy as np
import pytest

from harness import run_cli

pytestmark = pytest.mark.cli


def one_line_error(res, code, *words):
    assert res.returncode == code, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{res.stderr}"
    assert lines[0].startswith("mpirt"), lines[0]
    for w in words:
        assert str(w) in lines[0], lines[0]
    assert "Traceback" not in res.output
    return lines[0]


def nothing_at(directory, name="o.h5"):
    left = [n for n in os.listdir(directory) if n.startswith(name)]
    assert not left, f"left behind: {left}"


def copy(src, dst):
    dst.write_bytes(src.read_bytes())
    return dst


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "digits.h5"
    run_cli("prepare", "digits", out, "--shard-rows", "128").check()
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "text.h5"
    run_cli("prepare", "synth-text", out, "--rows", "2000", "--features", "4096", "--shard-rows", "256").check()
    return out


# -- inputs that are not there or not data ----------------------------------------------------------
@pytest.mark.parametrize("kind, name", [("text", "nope.jsonl"), ("npz", "nope.npz")])
def test_missing_input(tmp_path, kind, name):
    one_line_error(run_cli("prepare", kind, tmp_path / name, tmp_path / "o.h5"), 1, name, "no such file")
    nothing_at(tmp_path)


def test_inspect_missing_file(tmp_path):
    one_line_error(run_cli("inspect", tmp_path / "nope.h5"), 1, "nope.h5", "no such file")


def test_inspect_a_directory(tmp_path):
    one_line_error(run_cli("inspect", tmp_path), 1, str(tmp_path), "directory")


def test_inspect_not_hdf5(tmp_path):
    (tmp_path / "notes.h5").write_text("just some text\n")
    one_line_error(run_cli("inspect", tmp_path / "notes.h5"), 1, "notes.h5", "not a readable HDF5 file")


def test_inspect_hdf5_that_is_not_a_dataset(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2]
    one_line_error(run_cli("inspect", tmp_path / "other.h5"), 1, "other.h5", "not an mpirt data set")


def test_npz_that_is_not_an_npz(tmp_path):
    (tmp_path / "in.npz").write_bytes(b"PK\x03\x04 not really a zip")
    one_line_error(run_cli("prepare", "npz", tmp_path / "in.npz", tmp_path / "o.h5"), 1, "in.npz", "not a readable .npz")
    nothing_at(tmp_path)


# -- damaged or edited data sets -----------------------------------------------------------------------
def test_wrong_schema_version(tmp_path, digits):
    bad = copy(digits, tmp_path / "v99.h5")
    with h5py.File(bad, "a") as f:
        f.attrs["schema_version"] = 99
    one_line_error(run_cli("inspect", bad), 1, "v99.h5", "schema version 99", "reads version 1")


def test_missing_split_group(tmp_path, digits):
    bad = copy(digits, tmp_path / "nogroup.h5")
    with h5py.File(bad, "a") as f:
        del f["val"]
    one_line_error(run_cli("inspect", bad), 1, "nogroup.h5", "missing split group 'val'")


@pytest.mark.parametrize("which", ["digits", "text"])
def test_truncated_file(tmp_path, request, which):
    data = request.getfixturevalue(which).read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    one_line_error(run_cli("inspect", cut), 1, "cut.h5", "not a readable HDF5 file", "truncated")


def flip_low_byte(path, dataset, offset):
    """Flip the lowest bit of one byte inside a dataset's first chunk (a float stays finite, an id small)."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + offset)
        byte = f.read(1)[0]
        f.seek(info.byte_offset + offset)
        f.write(bytes([byte ^ 0x01]))


@pytest.mark.parametrize("which, dataset, offset, words", [
    ("digits", "train/X", 4 * 70, ["train shard 0", "checksum mismatch"]),  # low mantissa byte of row 1
    ("text", "val/ids", 4 * 100, ["val shard 0", "checksum mismatch"]),  # low byte of the 101st id
    ("text", "train/row_index", 8 * 300, ["train shard 1", "checksum mismatch"]),
])
def test_corrupted_bytes_fail_the_checksum(tmp_path, request, which, dataset, offset, words):
    bad = copy(request.getfixturevalue(which), tmp_path / "flipped.h5")
    flip_low_byte(bad, dataset, offset)
    one_line_error(run_cli("inspect", bad), 1, "flipped.h5", *words)


def test_labels_out_of_range(tmp_path, digits):
    bad = copy(digits, tmp_path / "labels.h5")
    with h5py.File(bad, "a") as f:
        f["val/y"][3] = 42
    one_line_error(run_cli("inspect", bad), 1, "labels.h5", "val row 3", "label 42 out of range 0..9")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_in_dataset_features(tmp_path, digits, value):
    bad = copy(digits, tmp_path / "nan.h5")
    with h5py.File(bad, "a") as f:
        x = f["test/X"][5]
        x[0, 0] = value
        f["test/X"][5] = x
    one_line_error(run_cli("inspect", bad), 1, "nan.h5", "test row 5", "NaN or inf")


def test_token_id_beyond_the_features(tmp_path, text):
    bad = copy(text, tmp_path / "ids.h5")
    with h5py.File(bad, "a") as f:
        f["train/ids"][10] = 5000
    one_line_error(run_cli("inspect", bad), 1, "ids.h5", "train shard 0", "token id 5000 >= n_features 4096")


def test_offsets_that_go_backwards(tmp_path, text):
    bad = copy(text, tmp_path / "off.h5")
    with h5py.File(bad, "a") as f:
        f["train/offsets"][300] = 0
    one_line_error(run_cli("inspect", bad), 1, "off.h5", "train shard 1", "offsets decrease")


def test_shard_table_with_a_gap(tmp_path, text):
    bad = copy(text, tmp_path / "gap.h5")
    with h5py.File(bad, "a") as f:
        f["train/shards"][1, 0] += 1
    one_line_error(run_cli("inspect", bad), 1, "gap.h5", "train", "does not cover rows")


def test_shard_table_off_the_chunks(tmp_path, text):
    bad = copy(text, tmp_path / "align.h5")
    with h5py.File(bad, "a") as f:
        s = f["train/shards"][()]
        s[0, 1] += 3
        s[1, 0] += 3
        f["train/shards"][...] = s
    one_line_error(run_cli("inspect", bad), 1, "align.h5", "not aligned to chunks of 256 rows")


# -- bad npz inputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("X, y, words", [
    (np.where(np.arange(30).reshape(10, 3) == 7, np.nan, 1.0), np.arange(10) % 2, ["NaN or inf in X at row 2"]),
    (np.where(np.arange(30).reshape(10, 3) == 29, np.inf, 1.0), np.arange(10) % 2, ["NaN or inf in X at row 9"]),
    (np.where(np.arange(30).reshape(10, 3) == 4, 1e39, 1.0), np.arange(10) % 2, ["beyond float32 range", "row 1"]),
    (np.zeros((0, 4)), np.zeros(0, dtype=int), ["empty input"]),
    (np.zeros((5, 2)), np.arange(4), ["X has 5 rows but y has 4"]),
    (np.zeros(5), np.arange(5), ["X has shape (5,)"]),
    (np.array([["a", "b"]] * 3), np.arange(3), ["X must be numeric"]),
    (np.zeros((3, 2)), np.array([0, -1, 1]), ["negative label -1"]),
    (np.zeros((3, 2)), np.array([0.5, 1, 0]), ["whole numbers"]),
])
def test_bad_npz_is_refused(tmp_path, X, y, words):
    np.savez(tmp_path / "in.npz", X=X, y=y)
    one_line_error(run_cli("prepare", "npz", tmp_path / "in.npz", tmp_path / "o.h5"), 1, "in.npz", *words)
    nothing_at(tmp_path)


def test_npz_without_y(tmp_path):
    np.savez(tmp_path / "noy.npz", X=np.zeros((3, 4)))
    one_line_error(run_cli("prepare", "npz", tmp_path / "noy.npz", tmp_path / "o.h5"), 1, "noy.npz", "no array 'y'")
    nothing_at(tmp_path)


# -- bad JSONL -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, words", [("", ["empty input"]), ("\n\n  \n", ["no rows"])])
def test_empty_jsonl(tmp_path, content, words):
    (tmp_path / "empty.jsonl").write_text(content)
    one_line_error(run_cli("prepare", "text", tmp_path / "empty.jsonl", tmp_path / "o.h5"), 1, "empty.jsonl", *words)
    nothing_at(tmp_path)


def jsonl_with_bad_lines(tmp_path):
    """20 lines: line 7 is broken JSON, line 12 lacks its label, line 17 has a numeric text."""
    lines = [json.dumps({"text": f"t{i}", "label": "a" if i % 2 else "b"}) for i in range(20)]
    lines[6] = '{"text": "broken", "label": '
    lines[11] = json.dumps({"text": "no label"})
    lines[16] = json.dumps({"text": 17, "label": "a"})
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    return src


def test_malformed_jsonl_names_the_line(tmp_path):
    res = run_cli("prepare", "text", jsonl_with_bad_lines(tmp_path), tmp_path / "o.h5")
    one_line_error(res, 1, "in.jsonl:7: not valid JSON", "--skip-bad")
    nothing_at(tmp_path)


@pytest.mark.parametrize("line, words", [
    ({"text": "y"}, ["in.jsonl:2: no 'label' field"]),
    ({"label": "y"}, ["in.jsonl:2: no 'text' field"]),
    ({"text": ["a"], "label": "y"}, ["in.jsonl:2: 'text' is not a string"]),
    ({"text": "a", "label": 1.5}, ["in.jsonl:2: 'label' must be"]),
    ([1, 2], ["in.jsonl:2: not a JSON object"]),
])
def test_bad_fields_name_the_line(tmp_path, line, words):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "x", "label": 1}) + "\n" + json.dumps(line) + "\n")
    one_line_error(run_cli("prepare", "text", src, tmp_path / "o.h5"), 1, *words)
    nothing_at(tmp_path)


def test_line_numbers_count_across_blocks(tmp_path):
    src = tmp_path / "big.jsonl"
    good = json.dumps({"text": "word " * 2000, "label": "a"})  # ~10 kB a line: the bad one is in a later block
    src.write_text("\n".join([good] * 999 + ["{oops"] + [good] * 5) + "\n")
    one_line_error(run_cli("prepare", "text", src, tmp_path / "o.h5", "--workers", "2"), 1, "big.jsonl:1000: not valid JSON")
    nothing_at(tmp_path)


def test_skip_bad_counts_what_it_skipped(tmp_path):
    out = tmp_path / "o.h5"
    res = run_cli("prepare", "text", jsonl_with_bad_lines(tmp_path), out, "--skip-bad").check()
    assert "3 bad lines skipped" in res.stdout
    s = json.loads(run_cli("inspect", out, "--json").check().stdout)
    assert sum(v["rows"] for v in s["splits"].values()) == 17


def test_skip_bad_with_nothing_left(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{\n[1]\n")
    res = run_cli("prepare", "text", tmp_path / "bad.jsonl", tmp_path / "o.h5", "--skip-bad")
    one_line_error(res, 1, "bad.jsonl", "no rows (2 bad lines skipped)")
    nothing_at(tmp_path)


# -- flags and output paths ----------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["prepare", "digits", "o.h5", "--bogus"], "unrecognized arguments: --bogus"),
    (["prepare", "text", "in.jsonl", "o.h5", "--features", "1000"], "not a power of two"),
    (["prepare", "text", "in.jsonl", "o.h5", "--features", "many"], "'many' is not an integer"),
    (["prepare", "text", "in.jsonl", "o.h5", "--hash-bits", "40"], "not between 1 and 32"),
    (["prepare", "text", "in.jsonl", "o.h5", "--features", "1024", "--hash-bits", "10"], "not allowed with"),
    (["prepare", "digits", "o.h5", "--shards", "2", "--shard-rows", "5"], "not allowed with argument"),
    (["prepare", "digits", "o.h5", "--shards", "0"], "0 is less than 1"),
    (["prepare", "digits", "o.h5", "--val-fraction", "1.5"], "not in [0, 1)"),
    (["prepare", "digits", "o.h5", "--val-fraction", "0.7", "--test-fraction", "0.5"], "leave rows for training"),
    (["prepare", "digits", "o.h5", "--seed", "-1"], "--seed"),
    (["prepare", "synth-text", "o.h5"], "required: --rows"),
    (["prepare", "synth-text", "o.h5", "--rows", "10", "--classes", "1"], "1 is less than 2"),
    (["prepare", "pictures", "o.h5"], "invalid choice: 'pictures'"),
    (["prepare", "digits", "missing-dir/o.h5"], "does not exist"),
    (["prepare", "digits", "."], "is a directory"),
    (["inspect"], "required: FILE.h5"),
])
def test_usage_errors(tmp_path, args, words):
    one_line_error(run_cli(*args, cwd=tmp_path), 2, words)
    nothing_at(tmp_path)


def test_failed_prepare_keeps_the_previous_output(tmp_path, digits):
    out = copy(digits, tmp_path / "o.h5")
    before = out.read_bytes()
    one_line_error(run_cli("prepare", "text", jsonl_with_bad_lines(tmp_path), out), 1, "not valid JSON")
    assert out.read_bytes() == before, "a failed run must not touch what was there"
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "o.h5"], "and leaves no temporary file"
