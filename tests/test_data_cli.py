"""`mpirt prepare` and `mpirt inspect` as a user types them, on good input."""

import json
import os

import h5py
import numpy as np
import pytest

from harness import run_cli

pytestmark = pytest.mark.cli


def summary(path):
    return json.loads(run_cli("inspect", path, "--json").check().stdout)


def test_prepare_digits_and_inspect(tmp_path):
    out = tmp_path / "digits.h5"
    res = run_cli("prepare", "digits", out, "--shard-rows", "128").check()
    assert res.stdout.startswith(f"{out}: ") and "10 classes" in res.stdout
    res = run_cli("inspect", out).check()
    assert "dense, 64 features (8, 8), 10 classes: 0, 1, 2" in res.stdout
    assert res.stdout.strip().splitlines()[-1].startswith("OK: ")
    s = summary(out)
    assert sum(v["rows"] for v in s["splits"].values()) == 1797 and s["feature_shape"] == [8, 8]
    assert s["splits"]["train"]["shards"] == 12 and s["splits"]["train"]["chunk_rows"] == 128
    with h5py.File(out) as f:
        X = f["train/X"][()]
        assert X.min() >= 0 and X.max() <= 1, "pixels scaled to [0, 1]"
    assert os.listdir(tmp_path) == ["digits.h5"], "no temporary left beside the output"


def test_prepare_text_with_options(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"body": f"<b>w{i}</b> x &amp; y", "cls": i % 3}) for i in range(500)) + "\n")
    out = tmp_path / "t.h5"
    res = run_cli("prepare", "text", src, out, "--text-field", "body", "--label-field", "cls", "--hash-bits", "10",
                  "--bigrams", "--shards", "2", "--val-fraction", "0.2", "--test-fraction", "0", "--seed", "3",
                  "--hash-seed", "9", "--workers", "2").check()
    assert res.stdout.startswith(f"{out}: ") and ", 0 test rows, 3 classes" in res.stdout
    assert "hashed_tokens, 1024 features, 3 classes: 0, 1, 2" in run_cli("inspect", out).check().stdout
    s = summary(out)
    assert [s["splits"][k]["shards"] for k in ("train", "val", "test")] == [2, 2, 0]
    per_class = np.array([s["splits"][k]["per_class"] for k in ("train", "val")])
    assert per_class.sum(axis=0).tolist() == [167, 167, 166]
    assert np.all(np.abs(per_class[1] - 0.2 * per_class.sum(axis=0)) < 2), "stratified 80/20 in every class"
    with h5py.File(out) as f:
        assert f.attrs["hash_seed"] == 9 and f.attrs["bigrams"] and f.attrs["text_field"] == "body"
        # 2 words ("w<i>", "x", "y" -> 3) + 2 bigrams per row
        assert np.all(np.diff(f["train/offsets"][()]) == 5)


def test_prepare_npz(tmp_path):
    src, out = tmp_path / "in.npz", tmp_path / "o.h5"
    np.savez_compressed(src, X=np.random.default_rng(0).normal(size=(200, 5)), y=np.array(["b", "a"] * 100))
    run_cli("prepare", "npz", src, out).check()
    assert "2 classes: a, b" in run_cli("inspect", out).check().stdout


def test_synth_text_streams_and_dumps_its_jsonl(tmp_path):
    out, raw = tmp_path / "s.h5", tmp_path / "s.jsonl"
    run_cli("prepare", "synth-text", out, "--rows", "3000", "--classes", "3", "--features", "4096", "--jsonl", raw,
            "--seed", "1").check()
    s = summary(out)
    assert s["classes"] == ["topic_0", "topic_1", "topic_2"]
    assert sum(v["rows"] for v in s["splits"].values()) == 3000
    # The dumped JSONL prepared as text gives the same data set, byte for byte.
    again = tmp_path / "again.h5"
    run_cli("prepare", "text", raw, again, "--features", "4096", "--seed", "1").check()
    with h5py.File(out) as a, h5py.File(again) as b:
        for split in ("train", "val", "test"):
            for key in ("ids", "offsets", "y", "row_index", "shard_sha256"):
                np.testing.assert_array_equal(a[split][key][()], b[split][key][()])
    assert sorted(os.listdir(tmp_path)) == ["again.h5", "s.h5", "s.jsonl"]


def test_output_is_replaced_atomically(tmp_path):
    out = tmp_path / "o.h5"
    out.write_text("an old file")
    assert "--force" in run_cli("prepare", "digits", out).check(2).stderr  # not an mpirt data set: kept
    assert out.read_text() == "an old file"
    run_cli("prepare", "digits", out, "--force").check()
    assert summary(out)["feature_kind"] == "dense"
    assert os.listdir(tmp_path) == ["o.h5"]


def test_help_is_light_and_lists_the_commands():
    res = run_cli("prepare", "--help").check()
    for kind in ("text", "npz", "digits", "synth-text"):
        assert kind in res.stdout
    assert "--hash-bits" in run_cli("prepare", "text", "--help").check().stdout
