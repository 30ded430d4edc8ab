"""`mpirt prepare` and `mpirt inspect` as a user types them, good input and every kind of bad input.

Bad input gets one line on stderr naming the file and the problem, a non-zero exit status
(2 usage, 1 data), no traceback, and nothing (not even a temporary file) at the output path.
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
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in res.output


def nothing_written(directory, name):
    left = [n for n in os.listdir(directory) if n.startswith(name)]
    assert not left, f"left behind: {left}"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "digits.h5"
    run_cli("prepare", "digits", out, "--shard-rows", "128").check()
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "text.h5"
    run_cli("prepare", "synth-text", out, "--rows", "3000", "--features", "4096", "--shard-rows", "256").check()
    return out


def test_prepare_and_inspect_digits(digits):
    res = run_cli("inspect", digits).check()
    assert "dense, 64 features (8, 8), 10 classes" in res.stdout and "OK" in res.stdout
    summary = json.loads(run_cli("inspect", digits, "--json").check().stdout)
    assert sum(s["rows"] for s in summary["splits"].values()) == 1797


def test_prepare_text_from_jsonl(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"body": f"<b>w{i}</b> x", "cls": i % 2}) for i in range(100)))
    out = tmp_path / "t.h5"
    res = run_cli("prepare", "text", src, out, "--text-field", "body", "--label-field", "cls",
                  "--features", "1024", "--bigrams", "--shards", "2").check()
    assert "2 classes" in res.stdout
    assert "hashed_tokens, 1024 features" in run_cli("inspect", out).check().stdout


def test_prepare_npz(tmp_path):
    src, out = tmp_path / "in.npz", tmp_path / "o.h5"
    np.savez(src, X=np.random.default_rng(0).normal(size=(200, 5)), y=np.array(["a", "b"] * 100))
    run_cli("prepare", "npz", src, out).check()
    assert "2 classes: a, b" in run_cli("inspect", out).check().stdout


def test_missing_input(tmp_path):
    res = run_cli("prepare", "text", tmp_path / "nope.jsonl", tmp_path / "o.h5")
    one_line_error(res, 1, "nope.jsonl", "no such file")
    nothing_written(tmp_path, "o.h5")


def test_inspect_missing_file(tmp_path):
    one_line_error(run_cli("inspect", tmp_path / "nope.h5"), 1, "nope.h5", "no such file")


def test_inspect_not_hdf5(tmp_path):
    bad = tmp_path / "notes.h5"
    bad.write_text("just some text\n")
    one_line_error(run_cli("inspect", bad), 1, "notes.h5", "not a readable HDF5 file")


def test_inspect_hdf5_that_is_not_a_dataset(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1, 2]
    one_line_error(run_cli("inspect", other), 1, "not an mpirt data set")


def test_wrong_schema_version(tmp_path, digits):
    copy = tmp_path / "v99.h5"
    copy.write_bytes(digits.read_bytes())
    with h5py.File(copy, "a") as f:
        f.attrs["schema_version"] = 99
    one_line_error(run_cli("inspect", copy), 1, "v99.h5", "schema version 99")


def test_truncated_file(tmp_path, text):
    cut = tmp_path / "cut.h5"
    data = text.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    one_line_error(run_cli("inspect", cut), 1, "cut.h5")


def test_corrupted_shard_bytes(tmp_path, text):
    bad = tmp_path / "flipped.h5"
    bad.write_bytes(text.read_bytes())
    with h5py.File(bad, "r") as f:
        info = f["train/ids"].id.get_chunk_info(0)
    with open(bad, "r+b") as f:
        f.seek(info.byte_offset + 100)
        byte = f.read(1)
        f.seek(info.byte_offset + 100)
        f.write(bytes([byte[0] ^ 0x01]))
    one_line_error(run_cli("inspect", bad), 1, "flipped.h5", "train shard 0", "checksum mismatch")


def test_labels_out_of_range(tmp_path, digits):
    bad = tmp_path / "labels.h5"
    bad.write_bytes(digits.read_bytes())
    with h5py.File(bad, "a") as f:
        f["val/y"][3] = 42
    one_line_error(run_cli("inspect", bad), 1, "labels.h5", "label 42 out of range")


def test_nan_in_dataset_features(tmp_path, digits):
    bad = tmp_path / "nan.h5"
    bad.write_bytes(digits.read_bytes())
    with h5py.File(bad, "a") as f:
        x = f["test/X"][5]
        x[0, 0] = np.nan
        f["test/X"][5] = x
    one_line_error(run_cli("inspect", bad), 1, "nan.h5", "test row 5", "NaN or inf")


def test_nan_in_npz_is_refused(tmp_path):
    src = tmp_path / "nan.npz"
    X = np.ones((10, 3))
    X[3, 1] = np.inf
    np.savez(src, X=X, y=np.arange(10) % 2)
    one_line_error(run_cli("prepare", "npz", src, tmp_path / "o.h5"), 1, "nan.npz", "row 3")
    nothing_written(tmp_path, "o.h5")


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_jsonl(tmp_path, content):
    src = tmp_path / "empty.jsonl"
    src.write_text(content)
    res = run_cli("prepare", "text", src, tmp_path / "o.h5")
    one_line_error(res, 1, "empty.jsonl")
    assert "empty input" in res.stderr or "no rows" in res.stderr
    nothing_written(tmp_path, "o.h5")


def test_empty_npz(tmp_path):
    src = tmp_path / "empty.npz"
    np.savez(src, X=np.zeros((0, 4)), y=np.zeros(0, dtype=int))
    one_line_error(run_cli("prepare", "npz", src, tmp_path / "o.h5"), 1, "empty input")
    nothing_written(tmp_path, "o.h5")


def test_npz_without_y(tmp_path):
    src = tmp_path / "noy.npz"
    np.savez(src, X=np.zeros((3, 4)))
    one_line_error(run_cli("prepare", "npz", src, tmp_path / "o.h5"), 1, "no array 'y'")


def _jsonl_with_bad_lines(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": f"t{i}", "label": "a" if i % 2 else "b"}) for i in range(20)]
    lines[6] = '{"text": "broken", "label": '  # line 7
    lines[11] = json.dumps({"text": "no label"})  # line 12
    src.write_text("\n".join(lines) + "\n")
    return src


def test_malformed_jsonl_names_the_line(tmp_path):
    res = run_cli("prepare", "text", _jsonl_with_bad_lines(tmp_path), tmp_path / "o.h5")
    one_line_error(res, 1, "in.jsonl:7: not valid JSON", "--skip-bad")
    nothing_written(tmp_path, "o.h5")


def test_missing_field_names_the_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "x", "label": 1}) + "\n" + json.dumps({"text": "y"}) + "\n")
    one_line_error(run_cli("prepare", "text", src, tmp_path / "o.h5"), 1, "in.jsonl:2: no 'label' field")


def test_skip_bad_counts_what_it_skipped(tmp_path):
    out = tmp_path / "o.h5"
    res = run_cli("prepare", "text", _jsonl_with_bad_lines(tmp_path), out, "--skip-bad").check()
    assert "2 bad lines skipped" in res.stdout
    summary = json.loads(run_cli("inspect", out, "--json").check().stdout)
    assert sum(s["rows"] for s in summary["splits"].values()) == 18


@pytest.mark.parametrize("args, words", [
    (["prepare", "digits", "o.h5", "--bogus"], "unrecognized arguments: --bogus"),
    (["prepare", "text", "in.jsonl", "o.h5", "--features", "1000"], "not a power of two"),
    (["prepare", "digits", "o.h5", "--shards", "2", "--shard-rows", "5"], "not allowed with argument"),
    (["prepare", "digits", "o.h5", "--val-fraction", "0.7", "--test-fraction", "0.5"], "leave rows for training"),
    (["prepare", "pictures", "o.h5"], "invalid choice: 'pictures'"),
    (["prepare", "digits", "missing-dir/o.h5"], "does not exist"),
    (["inspect"], "required: FILE.h5"),
])
def test_usage_errors(tmp_path, args, words):
    res = run_cli(*args, cwd=tmp_path)
    one_line_error(res, 2, words)
    nothing_written(tmp_path, "o.h5")


def test_failed_prepare_keeps_the_previous_output(tmp_path, digits):
    out = tmp_path / "o.h5"
    out.write_bytes(digits.read_bytes())
    before = out.read_bytes()
    one_line_error(run_cli("prepare", "text", _jsonl_with_bad_lines(tmp_path), out), 1, "not valid JSON")
    assert out.read_bytes() == before, "a failed run must not touch what was there"
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "o.h5"]
