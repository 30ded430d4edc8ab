"""``mpirt prepare ratings`` on MovieLens-style files the tests write (CSV with and without a header,
``::``-separated ratings.dat): dense ids with the mapping kept, splits by time and at random, bad
lines, and checksums that catch an edited rating."""

import h5py
import numpy as np
import pytest

from harness import run_cli

pytestmark = pytest.mark.cli


def write_csv(path, n=400, header=True, sep=","):
    rng = np.random.default_rng(0)
    users = rng.integers(1, 40, n)
    items = rng.integers(100, 160, n)
    ratings = rng.integers(1, 11, n) / 2.0
    ts = rng.permutation(n) * 7 + 1_000_000
    lines = [sep.join(map(str, ("u%d" % u if sep == "," else u, m, r, t))) for u, m, r, t in zip(users, items, ratings, ts)]
    path.write_text(("userId,movieId,rating,timestamp\n" if header else "") + "\n".join(lines) + "\n")
    return users, items, ratings, ts


def read(path):
    with h5py.File(path) as f:
        out = {s: {c: f[s][c][()] for c in ("user", "item", "rating", "timestamp", "row_index")}
               for s in ("train", "val", "test")}
        out["user_ids"] = [x.decode() for x in f["user_ids"][()]]
        out["item_ids"] = [x.decode() for x in f["item_ids"][()]]
    return out


def test_csv_ids_are_dense_and_map_back_to_every_input_rating(tmp_path):
    users, items, ratings, ts = write_csv(tmp_path / "r.csv")
    res = run_cli("prepare", "ratings", tmp_path / "r.csv", tmp_path / "r.h5").check()
    assert "320 train, 40 val, 40 test ratings" in res.stdout
    d = read(tmp_path / "r.h5")
    seen = np.zeros(len(users), bool)
    for s in ("train", "val", "test"):
        part = d[s]
        for u, i, r, t, ri in zip(*(part[c] for c in ("user", "item", "rating", "timestamp", "row_index"))):
            assert d["user_ids"][u] == f"u{users[ri]}" and d["item_ids"][i] == str(items[ri])
            assert r == ratings[ri] and t == ts[ri]
            seen[ri] = True
    assert seen.all()  # every rating exactly once (400 rows over the splits)
    assert sorted(d["train"]["row_index"].tolist()) != d["train"]["row_index"].tolist()  # stored shuffled
    res = run_cli("inspect", tmp_path / "r.h5").check()
    assert "ratings" in res.stdout and "OK" in res.stdout


def test_split_by_time_puts_the_latest_ratings_in_test(tmp_path):
    write_csv(tmp_path / "r.csv", header=False)
    run_cli("prepare", "ratings", tmp_path / "r.csv", tmp_path / "r.h5", "--split-by", "time").check()
    d = read(tmp_path / "r.h5")
    assert d["train"]["timestamp"].max() < d["val"]["timestamp"].min()
    assert d["val"]["timestamp"].max() < d["test"]["timestamp"].min()
    assert len(d["test"]["timestamp"]) == 40


def test_random_split_follows_the_seed_and_dat_files_read_alike(tmp_path):
    write_csv(tmp_path / "r.dat", header=False, sep="::")
    for seed in ("1", "1", "2"):
        run_cli("prepare", "ratings", tmp_path / "r.dat", tmp_path / f"s{seed}.h5", "--seed", seed, "--force").check()
    a, b = read(tmp_path / "s1.h5"), read(tmp_path / "s2.h5")
    assert len(a["test"]["row_index"]) == 40
    assert set(a["test"]["row_index"].tolist()) != set(b["test"]["row_index"].tolist())


def test_a_bad_line_is_one_line_or_skipped_and_counted(tmp_path):
    write_csv(tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    lines[5] = "u3,101,four,1000"
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    res = run_cli("prepare", "ratings", tmp_path / "r.csv", tmp_path / "r.h5")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "r.csv:6:" in res.stderr and "--skip-bad" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.h5").exists()
    res = run_cli("prepare", "ratings", tmp_path / "r.csv", tmp_path / "r.h5", "--skip-bad").check()
    assert "1 bad lines skipped" in res.stdout


def test_an_edited_rating_is_caught_and_training_refuses_ratings(tmp_path):
    write_csv(tmp_path / "r.csv")
    run_cli("prepare", "ratings", tmp_path / "r.csv", tmp_path / "r.h5").check()
    with h5py.File(tmp_path / "r.h5", "r+") as f:
        f["train/rating"][3] = 5.0 if f["train/rating"][3] != 5.0 else 1.0
    res = run_cli("inspect", tmp_path / "r.h5")
    assert res.returncode != 0 and "train shard 0: checksum mismatch" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("train", "--data", tmp_path / "r.h5", "--model", "mlp", "--no-progress")
    assert res.returncode == 2 and "holds ratings" in res.stderr
