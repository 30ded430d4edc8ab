"""Stratified streaming splits, class numbering and chunk/shard planning."""

import numpy as np
import pytest

from mpirt.data.format import plan_chunks, plan_shards
from mpirt.data.prepare import ClassTable, Options
from mpirt.data.split import Stratifier
from mpirt.errors import UsageError


def test_every_class_is_split_in_proportion_at_every_point_of_the_stream():
    rng = np.random.default_rng(0)
    labels = rng.choice(4, size=6000, p=[0.6, 0.3, 0.07, 0.03])
    strat = Stratifier(0.1, 0.2, seed=1)
    # Fed in uneven blocks, as prepare does: the counters carry over.
    where = np.concatenate([strat.assign(labels[a:b]) for a, b in [(0, 1), (1, 700), (700, 701), (701, 6000)]])
    f = np.array([0.7, 0.1, 0.2])
    for c in range(4):
        mine = where[labels == c]
        counts = np.cumsum(np.eye(3, dtype=int)[mine], axis=0)  # per split, after each row of the class
        seen = np.arange(1, len(mine) + 1)[:, None]
        assert np.abs(counts - f * seen).max() < 2, f"class {c} drifted from its proportions"


@pytest.mark.parametrize("val, test", [(0.1, 0.1), (0.33, 0.33), (0.05, 0.45), (0.01, 0.2), (0.49, 0.5)])
def test_proportions_hold_for_any_fractions_and_seed(val, test):
    f = np.array([1 - val - test, val, test])
    for seed in range(40):
        where = Stratifier(val, test, seed=seed).assign(np.zeros(300, dtype=np.int64))
        counts = np.cumsum(np.eye(3, dtype=int)[where], axis=0)
        assert np.abs(counts - f * np.arange(1, 301)[:, None]).max() < 2


def test_the_seed_changes_which_rows_are_held_out():
    labels = np.zeros(1000, dtype=np.int64)
    a, b = Stratifier(0.1, 0.1, seed=0).assign(labels), Stratifier(0.1, 0.1, seed=9).assign(labels)
    assert not np.array_equal(a, b)
    assert np.array_equal(a, Stratifier(0.1, 0.1, seed=0).assign(labels)), "deterministic"
    assert np.bincount(a, minlength=3).tolist() == np.bincount(b, minlength=3).tolist() == [800, 100, 100]


def test_zero_fractions_give_empty_splits():
    where = Stratifier(0.0, 0.0).assign(np.arange(100) % 3)
    assert (where == 0).all()
    where = Stratifier(0.0, 0.5).assign(np.zeros(10, dtype=int))
    assert np.bincount(where, minlength=3).tolist() == [5, 0, 5]


def test_class_names_are_sorted_and_ids_renumbered():
    t = ClassTable()
    prov = t.encode(["pos", "neg", "pos", "mid"])
    names, remap = t.final()
    assert names == ["mid", "neg", "pos"]
    assert [names[i] for i in remap[prov]] == ["pos", "neg", "pos", "mid"]
    t = ClassTable()
    t.encode([10, 2, 1])
    assert t.final()[0] == ["1", "2", "10"], "integer labels sort as numbers"
    t = ClassTable()
    t.encode([10, "2", 1])
    assert t.final()[0] == ["1", "10", "2"], "mixed labels sort as strings"


@pytest.mark.parametrize("shard_rows, row_bytes", [(4096, 8), (4096, 256), (100_000, 1024), (99_991, 1024),
                                                   (7, 8), (1, 4 << 20), (50_000, 8), (8192, 40_000)])
def test_chunks_divide_shards_and_stay_small(shard_rows, row_bytes):
    rows, chunk = plan_chunks(shard_rows, row_bytes)
    assert rows % chunk == 0 and rows >= shard_rows and rows < shard_rows + chunk
    assert chunk <= 8192 and (chunk == 1 or chunk * row_bytes <= 4 << 20)


def test_shard_plans_cover_every_row_once():
    for n, r in [(0, 10), (1, 10), (10, 10), (11, 10), (1000, 7)]:
        s = plan_shards(n, r)
        assert s.shape == (-(-n // r), 2)
        covered = np.concatenate([np.arange(a, b) for a, b in s]) if len(s) else np.zeros(0)
        assert covered.tolist() == list(range(n))


@pytest.mark.parametrize("kwargs", [dict(shards=2, shard_rows=5), dict(shards=0), dict(shard_rows=0),
                                    dict(val_fraction=0.6, test_fraction=0.4), dict(val_fraction=-0.1),
                                    dict(test_fraction=float("nan"))])
def test_bad_options_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        Options(**kwargs)


def test_shards_option_plans_at_most_n_shards():
    shard_rows, max_shards = Options(shards=3).plan({"train": 1000, "val": 100, "test": 0})
    assert shard_rows == {"train": 334, "val": 34, "test": 1} and max_shards == {s: 3 for s in shard_rows}
    rows, _ = Options(shard_rows=500).plan({"train": 1000, "val": 100, "test": 0}, exact=True)
    assert rows == {"train": 500, "val": 100, "test": 1}, "a split smaller than a shard is one chunk"
