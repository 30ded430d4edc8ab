"""Writer and reader round trips on real HDF5 files: dense, ragged, npz, determinism, reader API."""

import json

import h5py
import numpy as np
import pytest

from mpirt.data import open_dataset
from mpirt.data.html import clean_html
from mpirt.data.prepare import Options, prepare_dense, prepare_npz, prepare_text
from mpirt.data.synth import SynthText, write_jsonl
from mpirt.data.tokens import Hasher
from mpirt.data.verify import verify
from mpirt.errors import DataError

SPLITS = ("train", "val", "test")


def check_layout(sp):
    """The shard table covers every row once, in order, on chunk boundaries, matching the HDF5 chunks."""
    s = sp.shards
    if sp.n_rows == 0:
        assert s.shape == (0, 2)
        return
    assert s[0, 0] == 0 and s[-1, 1] == sp.n_rows and np.all(s[1:, 0] == s[:-1, 1]) and np.all(s[:, 1] > s[:, 0])
    assert np.all(s[:, 0] % sp.chunk_rows == 0)
    for name in ("y", "row_index") + (("X",) if sp.kind == "dense" else ("offsets",)):
        assert sp.group[name].chunks[0] == sp.chunk_rows
    for k in range(len(s)):
        assert sp.verify_shard(k)


def test_dense_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, 3, 4)).astype(np.float32)
    y = rng.integers(0, 5, size=1000)
    out = tmp_path / "d.h5"
    prepare_dense(X, y, out, Options(shard_rows=64))
    seen = []
    with open_dataset(out) as ds:
        assert (ds.feature_kind, ds.feature_shape, ds.n_features, ds.n_classes) == ("dense", (3, 4), 12, 5)
        assert ds.class_names == ["0", "1", "2", "3", "4"]
        for name in SPLITS:
            sp = ds.split(name)
            check_layout(sp)
            b = sp.read(0, sp.n_rows)
            assert b.X.dtype == np.float32 and b.y.dtype == np.int64 and b.row_index.dtype == np.int64
            assert np.all(np.diff(b.row_index) > 0), "rows keep their input order"
            np.testing.assert_array_equal(b.X, X[b.row_index])
            np.testing.assert_array_equal(b.y, y[b.row_index])
            seen.extend(b.row_index.tolist())
            # Reversed shards, and ranges crossing chunk boundaries, read back the same rows.
            for ranges in (sp.shards[::-1], [(5, 70), (0, 3), (sp.n_rows - 1, sp.n_rows)]):
                rb = sp.read_ranges(ranges)
                ri = np.concatenate([np.arange(a, b_) for a, b_ in ranges])
                np.testing.assert_array_equal(rb.row_index, b.row_index[ri])
                np.testing.assert_array_equal(rb.X, X[rb.row_index])
    assert sorted(seen) == list(range(1000)), "every input row in exactly one split"
    summary = verify(out)
    assert sum(s["rows"] for s in summary["splits"].values()) == 1000
    assert abs(summary["splits"]["val"]["rows"] - 100) <= 5 and abs(summary["splits"]["test"]["rows"] - 100) <= 5


def write_docs(path, n, seed=0):
    rows = [{"text": f"<p>doc {i} <b>word{i % 7}</b></p> &amp; shared", "label": ["pos", "neg", "mid"][(i * seed) % 3]}
            for i in range(n)]
    lines = [json.dumps(r) for r in rows]
    lines[3] = ""  # a blank line is not a row, but its number counts
    path.write_text("\n".join(lines) + "\n")
    return rows


@pytest.mark.parametrize("bigrams", [False, True])
def test_text_round_trip(tmp_path, bigrams):
    src = tmp_path / "in.jsonl"
    rows = write_docs(src, 3000, seed=1)
    out = tmp_path / "t.h5"
    prepare_text(src, out, Options(shard_rows=100), n_features=1 << 12, bigrams=bigrams, workers=2)
    h = Hasher(1 << 12, bigrams=bigrams)
    seen = []
    with open_dataset(out) as ds:
        assert ds.feature_kind == "hashed_tokens" and ds.feature_shape is None and ds.n_features == 4096
        assert ds.class_names == ["mid", "neg", "pos"], "sorted class names"
        assert ds.attrs["bigrams"] == bigrams and ds.attrs["hash_seed"] == 0
        for name in SPLITS:
            sp = ds.split(name)
            check_layout(sp)
            b = sp.read(0, sp.n_rows)
            assert b.ids.dtype == np.uint32 and b.offsets[0] == 0 and b.offsets[-1] == len(b.ids)
            for r in range(len(b)):
                src_row = rows[b.row_index[r]]
                assert b.ids[b.offsets[r]:b.offsets[r + 1]].tolist() == h.ids(clean_html(src_row["text"])).tolist()
                assert ds.class_names[b.y[r]] == src_row["label"]
            seen.extend(b.row_index.tolist())
            # A batch read in pieces (rebased offsets) equals the same rows read at once.
            if sp.n_rows > 150:
                pieces = sp.read_ranges([(120, 150), (0, 10), (99, 101)])
                whole = [b.ids[b.offsets[r]:b.offsets[r + 1]].tolist() for r in
                         list(range(120, 150)) + list(range(10)) + [99, 100]]
                got = [pieces.ids[pieces.offsets[r]:pieces.offsets[r + 1]].tolist() for r in range(len(pieces))]
                assert got == whole
                part = sp.read(99, 101)
                assert part.offsets[0] == 0 and part.ids.tolist() == sum(whole[-2:], [])
    assert sorted(seen) == [i for i in range(3000) if i != 3]


def test_same_input_same_bytes_whatever_the_worker_count(tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, 3000, seed=2)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"t{workers}.h5"
        prepare_text(src, out, Options(shard_rows=256, seed=4), n_features=1 << 14, workers=workers)
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes(), "deterministic down to the file's bytes"
    with h5py.File(outs[0]) as a, h5py.File(outs[1]) as b:
        for name in SPLITS:
            for key in ("ids", "offsets", "y", "row_index", "shards", "shard_sha256"):
                np.testing.assert_array_equal(a[name][key][()], b[name][key][()])
    other = tmp_path / "seed5.h5"
    prepare_text(src, other, Options(shard_rows=256, seed=5), n_features=1 << 14, workers=1)
    with h5py.File(outs[0]) as a, h5py.File(other) as b:
        assert not np.array_equal(a["val/row_index"][()], b["val/row_index"][()]), "the seed moves the split"


def test_generated_documents_depend_on_seed_and_row_only(tmp_path):
    gen = SynthText(classes=3, seed=7)
    assert gen.jsonl_lines(1000, 100) == gen.jsonl_lines(0, 2000)[1000:1100], "any range, any block size"
    assert SynthText(classes=3, seed=8).jsonl_lines(0, 5) != gen.jsonl_lines(0, 5)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, 2500, classes=3, seed=7)
    write_jsonl(b, 2500, classes=3, seed=7, workers=2)
    assert a.read_bytes() == b.read_bytes()
    lines = a.read_bytes().splitlines()
    assert len(lines) == 2500 and lines[:100] == gen.jsonl_lines(0, 100)
    labels = {json.loads(line)["label"] for line in lines}
    assert labels == {"topic_0", "topic_1", "topic_2"}


def test_shards_option_gives_at_most_n_chunk_aligned_shards(tmp_path):
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(10_000, 16)), rng.integers(0, 3, size=10_000)
    out = tmp_path / "d.h5"
    prepare_dense(X, y, out, Options(shards=7))
    with open_dataset(out) as ds:
        for name in SPLITS:
            sp = ds.split(name)
            check_layout(sp)
            assert len(sp.shards) == 7
    src = tmp_path / "in.jsonl"
    write_jsonl(src, 2000)
    prepare_text(src, tmp_path / "t.h5", Options(shards=5), n_features=1 << 10, workers=1)
    with open_dataset(tmp_path / "t.h5") as ds:
        for name in SPLITS:
            check_layout(ds.split(name))
            assert 4 <= len(ds.split(name).shards) <= 5


def test_npz_is_streamed_with_any_layout_and_labels(tmp_path, monkeypatch):
    import mpirt.data.dense as dense

    monkeypatch.setattr(dense, "BLOCK_BYTES", 4096)  # many small blocks, so streaming is exercised
    rng = np.random.default_rng(2)
    X = rng.normal(size=(700, 6, 5))
    labels = np.array(["cat", "dog", "émeu"])[rng.integers(0, 3, size=700)]
    cases = [(np.savez, X, labels), (np.savez_compressed, X, np.char.encode(labels, "utf-8")), (np.savez, np.asfortranarray(X), labels),
             (np.savez, X.astype(">f8"), rng.integers(0, 4, size=700).astype(np.uint8))]
    for k, (save, Xs, ys) in enumerate(cases):
        src, out = tmp_path / f"in{k}.npz", tmp_path / f"o{k}.h5"
        save(src, X=Xs, y=ys)
        prepare_npz(src, out, Options(shard_rows=128))
        with open_dataset(out) as ds:
            names = ds.class_names
            expect = [n.decode() if isinstance(n, bytes) else str(n) for n in ys]
            if ys.dtype.kind == "u":
                assert names == [str(c) for c in range(int(ys.max()) + 1)], "integer labels are class ids"
            else:
                assert names == ["cat", "dog", "émeu"], "string labels sorted into class names"
            for name in SPLITS:
                sp = ds.split(name)
                check_layout(sp)
                b = sp.read(0, sp.n_rows)
                np.testing.assert_array_equal(b.X, X[b.row_index].astype(np.float32))
                assert [names[i] for i in b.y] == [expect[i] for i in b.row_index]


def test_reader_api_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_dataset(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        open_dataset(tmp_path / "text.h5")
    out = tmp_path / "d.h5"
    prepare_dense(np.ones((50, 2)), np.arange(50) % 2, out, Options())
    with open_dataset(out) as ds:
        sp = ds.split("train")
        with pytest.raises(IndexError):
            sp.read(0, sp.n_rows + 1)
        with pytest.raises(IndexError):
            sp.read_ranges([(0, 1), (-1, 2)])
        with pytest.raises(DataError, match="no split 'dev'"):
            ds.split("dev")
        assert len(sp.read(3, 3)) == 0 and sp.read(3, 3).X.shape == (0, 2)
        assert sp.chunk_ranges().tolist() == [[0, sp.n_rows]]
    with h5py.File(out, "a") as f:
        del f["test"]
    with pytest.raises(DataError, match="missing split group 'test'"):
        open_dataset(out)
    with h5py.File(out, "a") as f:
        f.attrs["schema_version"] = 2
    with pytest.raises(DataError, match="schema version 2"):
        open_dataset(out)
    ds = open_dataset(out, verify_header=False)  # a tool may still look inside
    ds.close()


def test_open_twice_in_one_process_with_other_locking(tmp_path):
    """HDF5 refuses a second open with other locking flags; the reader falls back to the defaults."""
    out = tmp_path / "d.h5"
    prepare_dense(np.ones((20, 2)), np.arange(20) % 2, out, Options())
    with h5py.File(out, "r") as f, open_dataset(out) as ds:
        assert ds.split("train").read(0, 2).X.tolist() == f["train/X"][0:2].tolist()
