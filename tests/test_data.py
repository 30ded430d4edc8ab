"""The data layer without the CLI: HTML clean-up, hashing, splits, writer/reader round trips."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from mpirt.data import open_dataset
from mpirt.data.html import clean_html
from mpirt.data.prepare import Options, prepare_dense, prepare_text
from mpirt.data.split import Stratifier
from mpirt.data.synth import write_jsonl
from mpirt.data.tokens import Hasher, tokenize
from mpirt.data.verify import verify


@pytest.mark.parametrize("html, words", [
    ("<p>Hello <b>World</b></p>", ["hello", "world"]),
    ("a<!-- <b>hidden</b> comment -->b", ["a", "b"]),
    ("x<script type='t'>var hidden = '<p>';</script>y", ["x", "y"]),
    ("x<STYLE>.hidden{}</STYLE>y", ["x", "y"]),
    ("fish &amp; chips &#39;n&#39; caf&eacute;", ["fish", "chips", "n", "café"]),
    ('<a title="a>b" href=\'c>d\'>link</a> text', ["link", "text"]),
    ("<![CDATA[kept text]]> after", ["kept", "text", "after"]),
    ("no markup at all_here", ["no", "markup", "at", "all", "here"]),
])
def test_html_cleanup(html, words):
    assert tokenize(clean_html(html)) == words


def test_hashing_is_stable_across_processes():
    h = Hasher(1 << 16, seed=7)
    here = h.ids("the quick brown fox").tolist()
    code = "from mpirt.data.tokens import Hasher; print(Hasher(1 << 16, seed=7).ids('the quick brown fox').tolist())"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(there.stdout) == here
    assert Hasher(1 << 16, seed=8).ids("the quick brown fox").tolist() != here
    assert all(0 <= i < 1 << 16 for i in here)


def test_bigrams_add_one_id_per_pair():
    h = Hasher(1 << 20, bigrams=True)
    ids = h.ids("a b c")
    assert len(ids) == 5 and len(set(ids.tolist())) == 5
    assert Hasher(1 << 20, bigrams=True).ids("b a").tolist()[2] != ids[3], "order matters for bigrams"


def test_stratified_splits_keep_class_proportions():
    labels = np.repeat(np.arange(3), [1000, 300, 50])
    np.random.default_rng(0).shuffle(labels)
    where = Stratifier(0.1, 0.2, seed=1).assign(labels)
    for c, n in enumerate([1000, 300, 50]):
        counts = np.bincount(where[labels == c], minlength=3)
        assert abs(counts[1] - 0.1 * n) <= 1 and abs(counts[2] - 0.2 * n) <= 1


def test_dense_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, 3, 4)).astype(np.float32)
    y = rng.integers(0, 5, size=1000)
    out = tmp_path / "d.h5"
    prepare_dense(X, y, out, Options(shard_rows=64, val_fraction=0.1, test_fraction=0.1))
    seen = []
    with open_dataset(out) as ds:
        assert ds.feature_kind == "dense" and ds.feature_shape == (3, 4) and ds.n_classes == 5
        for name in ("train", "val", "test"):
            sp = ds.split(name)
            shards = sp.shards
            assert shards[0, 0] == 0 and shards[-1, 1] == sp.n_rows and np.all(shards[1:, 0] == shards[:-1, 1])
            assert np.all(shards[:, 0] % sp.chunk_rows == 0)
            assert sp.group["X"].chunks[0] == sp.chunk_rows
            b = sp.read(0, sp.n_rows)
            np.testing.assert_array_equal(b.X, X[b.row_index])
            np.testing.assert_array_equal(b.y, y[b.row_index])
            seen.extend(b.row_index.tolist())
            ranges = [(a, b_) for a, b_ in shards[::-1]]
            rb = sp.read_ranges(ranges)
            np.testing.assert_array_equal(rb.X, X[rb.row_index])
    assert sorted(seen) == list(range(1000)), "every input row in exactly one split"
    verify(str(out))


def test_text_round_trip_and_determinism(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"text": f"<p>doc {i} word{i % 7}</p> shared", "label": ["pos", "neg", "mid"][i % 3]} for i in range(500)]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    outs = []
    for k, workers in enumerate((1, 2)):
        out = tmp_path / f"t{k}.h5"
        prepare_text(str(src), str(out), Options(shard_rows=32), n_features=1 << 12, workers=workers)
        outs.append(out)
    h = Hasher(1 << 12)
    with open_dataset(outs[0]) as ds, h5py.File(outs[1]) as other:
        assert ds.class_names == ["pos", "neg", "mid"], "class ids in order of first appearance"
        for name in ("train", "val", "test"):
            sp = ds.split(name)
            b = sp.read(0, sp.n_rows)
            for r in range(0, len(b), 37):
                src_row = rows[b.row_index[r]]
                expect = h.ids(clean_html(src_row["text"])).tolist()
                assert b.ids[b.offsets[r]:b.offsets[r + 1]].tolist() == expect
                assert ds.class_names[b.y[r]] == src_row["label"]
            for key in ("ids", "offsets", "y", "row_index", "shard_sha256"):
                np.testing.assert_array_equal(sp.group[key][()], other[name][key][()])


def test_prepare_streams_in_bounded_memory(tmp_path):
    """Peak memory of `prepare synth-text` barely grows when the input grows 4x."""
    code = ("import resource, sys; from mpirt.cli import main;"
            "main(['prepare', 'synth-text', sys.argv[1], '--rows', sys.argv[2], '--features', '65536', '--workers', '1']);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peaks = []
    for rows in (20000, 80000):
        res = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"s{rows}.h5"), str(rows)],
                             capture_output=True, text=True, check=True, timeout=300)
        peaks.append(int(res.stdout.split()[-1]))
    assert peaks[1] < peaks[0] * 1.25, f"peak RSS grew from {peaks[0]} to {peaks[1]} kB"


def test_synth_jsonl_is_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, 300, seed=3)
    write_jsonl(b, 300, seed=3)
    assert a.read_bytes() == b.read_bytes()
    first = json.loads(a.read_text().splitlines()[0])
    assert first["label"].startswith("topic_") and "<" in first["text"]
