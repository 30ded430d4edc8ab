"""Row-sparse embedding gradients (mpirt.train.sparse): the merge, the lazy optimizer rule, and
fastText trained on N ranks against 1 rank over both exchanges, with faults."""

import json

import numpy as np
import pytest
import torch

from harness import assert_same_model
from mpirt.train.sparse import DENSE_WEIGHT, SparseExchange, apply_rows, merge_rows


def test_merge_sums_equal_ids():
    ids = np.array([5, 2, 5, 9, 2, 5], np.int64)
    rows = np.arange(12, dtype=np.float32).reshape(6, 2) + np.float32(0.1)
    uniq, summed = merge_rows(ids, rows)
    assert uniq.tolist() == [2, 5, 9]
    assert np.array_equal(summed[0], rows[1] + rows[4])  # two parts (2 ranks): bitwise a + b
    assert np.array_equal(summed[1], (rows[0] + rows[2]) + rows[5])  # one add at a time, in input order
    assert np.array_equal(summed[2], rows[3])
    again = merge_rows(ids.copy(), rows.copy())
    assert np.array_equal(again[1], summed)  # the same bytes, the same sums: replicas stay equal
    assert merge_rows(np.zeros(0, np.int64), np.zeros((0, 2), np.float32))[0].size == 0


def test_merge_is_in_input_order_whatever_the_threads():
    """Replicas with other thread counts (a joiner on another host) must merge to the same bits."""
    import torch

    rng = np.random.default_rng(1)
    ids = np.concatenate([np.unique(rng.zipf(1.2, 5000) % 4096) for _ in range(4)]).astype(np.int64)
    rows = rng.standard_normal((len(ids), 16)).astype(np.float32)
    uniq = np.unique(ids)
    sequential = np.zeros((len(uniq), 16), np.float32)
    for i, at in enumerate(np.searchsorted(uniq, ids)):
        sequential[at] += rows[i]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            got_ids, got = merge_rows(ids, rows)
            assert np.array_equal(got_ids, uniq)
            assert np.array_equal(got.view(np.uint32), sequential.view(np.uint32))
    finally:
        torch.set_num_threads(threads)


def test_bag_gradient_comes_summed_and_is_torchs_merged():
    """fastText's bag (mpirt.train.bagrows): backward gives one row per distinct id, bitwise torch's
    per-token gradient summed by local_rows, on 1 and 2 threads; an empty bag, a token twice in a
    bag, and the forward are torch's."""
    from mpirt.train.bagrows import bag_mean
    from mpirt.train.sparse import local_rows

    rng = np.random.default_rng(3)
    lens = rng.integers(1, 300, 12)
    lens[4] = 0
    ids = torch.from_numpy((rng.zipf(1.3, int(lens.sum())) % 5000).astype(np.int64))
    ids[1] = ids[0]  # the same token twice in the first bag
    offsets = torch.from_numpy(np.r_[0, np.cumsum(lens)[:-1]]).long()
    gout = torch.from_numpy(rng.standard_normal((12, 8)).astype(np.float32))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = {}
            for ours in (False, True):
                bag = torch.nn.EmbeddingBag(5000, 8, mode="mean", sparse=True)
                with torch.no_grad():
                    bag.weight.copy_(torch.from_numpy(rng.standard_normal((5000, 8)).astype(np.float32)) if not got
                                     else got[False][2])
                out = bag_mean(bag, ids, offsets) if ours else bag(ids, offsets)
                out.backward(gout)
                # torch's gradient: a row per token; ours: a row per distinct id
                assert bag.weight.grad._nnz() == (len(np.unique(ids.numpy())) if ours else len(ids))
                got[ours] = (*local_rows(bag.weight), bag.weight.detach().clone(), out.detach())
            (ids0, rows0, _, out0), (ids1, rows1, _, out1) = got[False], got[True]
            assert np.array_equal(ids0, ids1) and np.array_equal(ids1, np.unique(ids.numpy()))
            assert np.array_equal(rows0.view(np.uint32), rows1.view(np.uint32))
            assert torch.equal(out0, out1)
    finally:
        torch.set_num_threads(threads)


def _table(seed=0, rows=6, dim=3):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(rows, dim, generator=g))


def _step(opt_cls, p, ids, rows, **hp):
    opt = opt_cls([p], **hp)
    apply_rows(opt, p, np.array(ids, np.int64), np.asarray(rows, np.float32))
    return opt


def test_sgd_without_momentum_is_the_dense_update():
    p, q = _table(), _table()
    g = torch.zeros_like(q)
    rows = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    g[[1, 4]] = torch.from_numpy(rows)
    _step(torch.optim.SGD, p, [1, 4], rows, lr=0.3, momentum=0.0)
    dense = torch.optim.SGD([q], lr=0.3)
    q.grad = g
    dense.step()
    assert torch.equal(p.data, q.data)


def test_momentum_and_weight_decay_move_touched_rows_only():
    p = _table()
    before = p.data.clone()
    opt = torch.optim.SGD([p], lr=0.5, momentum=0.9, weight_decay=0.1)
    g1 = np.ones((1, 3), np.float32)
    apply_rows(opt, p, np.array([2]), g1)
    buf = opt.state[p]["momentum_buffer"]
    expect_g = torch.from_numpy(g1) + 0.1 * before[[2]]
    assert torch.allclose(buf[[2]], expect_g)
    assert torch.equal(buf[[0, 1, 3, 4, 5]], torch.zeros(5, 3))
    assert torch.allclose(p.data[[2]], before[[2]] - 0.5 * expect_g)
    # A step touching row 3 only: row 2 keeps its buffer and does not move (the lazy rule).
    moved = p.data.clone()
    apply_rows(opt, p, np.array([3]), g1)
    assert torch.equal(p.data[[2]], moved[[2]])
    assert torch.allclose(buf[[2]], expect_g)
    assert not torch.equal(p.data[[3]], moved[[3]])


@pytest.mark.parametrize("fused", [False, True], ids=["one-tensor", "fused"])
def test_adam_on_rows_touched_every_step_is_torch_adam(fused):
    """Bit for bit the dense optimizer's update, by its own kernel (mpirt train's is fused)."""
    p, q = _table(), _table()
    opt = torch.optim.Adam([p], lr=0.01, weight_decay=0.01, fused=fused)
    dense = torch.optim.Adam([q], lr=0.01, weight_decay=0.01, fused=fused)
    rng = np.random.default_rng(1)
    for _ in range(5):
        rows = rng.standard_normal((6, 3)).astype(np.float32)
        apply_rows(opt, p, np.arange(6), rows)
        q.grad = torch.from_numpy(rows.copy())
        dense.step()
    assert torch.equal(p.data, q.data)
    assert float(opt.state[p]["step"]) == 5.0
    # And the state travels as torch's: a fresh optimizer loads it.
    again = torch.optim.Adam([_table()], lr=0.01, fused=fused)
    again.load_state_dict(opt.state_dict())


def test_large_tables_live_in_huge_pages_with_the_same_updates(monkeypatch):
    """A table of at least MIN_BYTES: the optimizer's moments are made in (and a loaded state moved
    to) huge-page memory, zero where untouched, and the update is bitwise the one on ordinary memory."""
    from mpirt.train import hugepages

    rows = hugepages.MIN_BYTES // (4 * 64)
    p, q = torch.nn.Parameter(torch.zeros(rows, 64)), torch.nn.Parameter(torch.zeros(rows, 64))
    p.data = hugepages.rehome(p.data)
    assert hugepages.is_huge(p.data) and not hugepages.is_huge(q.data)
    opt, ref = torch.optim.Adam([p], lr=0.01), torch.optim.Adam([q], lr=0.01)
    rng = np.random.default_rng(2)
    for _ in range(3):
        ids = np.unique(rng.integers(0, rows, 500))
        g = rng.standard_normal((len(ids), 64)).astype(np.float32)
        apply_rows(opt, p, ids, g)
        with monkeypatch.context() as m:  # the reference: every table in ordinary memory
            m.setattr(hugepages, "MIN_BYTES", 1 << 62)
            apply_rows(ref, q, ids, g)
    for k in ("exp_avg", "exp_avg_sq"):
        assert hugepages.is_huge(opt.state[p][k])
        assert ref.state[q][k].untyped_storage().data_ptr() not in hugepages._LIVE
        assert torch.equal(opt.state[p][k], ref.state[q][k])
        assert torch.count_nonzero(opt.state[p][k].abs().sum(1)) <= 1500  # untouched rows stay zero
    assert torch.equal(p.data, q.data)
    # A state loaded from a checkpoint (ordinary tensors) is moved on the next step, values kept.
    again = torch.optim.Adam([p], lr=0.01)
    again.load_state_dict(opt.state_dict())
    loaded = again.state[p]["exp_avg"].clone()
    apply_rows(again, p, np.zeros(0, np.int64), np.zeros((0, 64), np.float32))
    assert hugepages.is_huge(again.state[p]["exp_avg"])
    assert torch.equal(again.state[p]["exp_avg"], loaded)


def test_the_exchange_is_chosen_by_bytes():
    p = _table(rows=1000, dim=4)
    ex = SparseExchange(ec=None, params=[p])
    sparse_per_row = 8 + 4 * 4
    dense = 4 * 1000 * 4 * DENSE_WEIGHT
    few = np.array([int(dense / sparse_per_row / 4)] * 2)
    many = np.array([int(dense / sparse_per_row)] * 2)
    assert ex.choose(p, few) == "allgather"
    assert ex.choose(p, many) == "allreduce"
    assert SparseExchange(None, [p], mode="allgather").choose(p, many) == "allgather"


# -- under mpiexec -----------------------------------------------------------------------------------

ADAM = ["--optimizer", "adam", "--lr", "0.01"]


@pytest.mark.mpi
@pytest.mark.cli
def test_fasttext_sparse_on_n_ranks_is_one_rank_over_both_exchanges(tmp_path, text):
    from test_train import final_params, train

    res, one = train(tmp_path, text, 1, *ADAM, model="fasttext", name="one")
    res.check()
    ref = final_params(one)[0]
    for mode, n in (("allgather", 3), ("allreduce", 2)):
        res, run = train(tmp_path, text, n, *ADAM, "--sparse-exchange", mode, "--report", tmp_path / mode,
                         model="fasttext", name=mode)
        res.check()
        assert_same_model(ref, final_params(run)[0])
        with open(tmp_path / mode / "report.json") as f:
            wire = json.load(f)["wire"]
        assert wire["sparse_exchanges"][mode] > 0 and wire["sparse_exchanges"][({"allgather", "allreduce"} - {mode}).pop()] == 0
        assert 0 < wire["sparse_rows_per_step"] < 4096


@pytest.mark.mpi
@pytest.mark.cli
def test_fasttext_sparse_momentum_with_a_kill_and_a_join(tmp_path, text):
    from test_train import assert_exactly_once, final_params, n_train, train

    sgd = ["--optimizer", "sgd", "--lr", "0.2", "--momentum", "0.9", "--weight-decay", "0.0001"]
    res, one = train(tmp_path, text, 1, *sgd, model="fasttext", name="one")
    res.check()
    res, run = train(tmp_path, text, 3, *sgd, model="fasttext", spare=1, name="three",
                     faults=["kill:member=1:step=5", "join:step=12"])
    res.check()
    assert_same_model(final_params(one)[0], final_params(run)[0])
    assert_exactly_once(run, n_train(text))


@pytest.mark.mpi
@pytest.mark.cli
def test_sparse_resume_keeps_the_rows_momentum(tmp_path, text):
    """The lazy momentum buffer is optimizer state: a resumed run ends as the uninterrupted one."""
    from test_train import final_params, train

    # Blocking saves: step 10's must be on disk when the whole job dies at step 17.
    sgd = ["--optimizer", "sgd", "--lr", "0.2", "--momentum", "0.9", "--checkpoint-every", "10", "--checkpoint-sync"]
    res, whole = train(tmp_path, text, 2, *sgd, model="fasttext", name="whole")
    res.check()
    res, cut = train(tmp_path, text, 2, *sgd, model="fasttext", name="cut",
                     faults=["kill:member=0:step=17", "kill:member=1:step=17"])
    assert res.returncode != 0
    res, cut = train(tmp_path, text, 3, *sgd, "--resume", model="fasttext", name="cut")
    res.check()
    assert_same_model(final_params(whole)[0], final_params(cut)[0])


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from harness import run_cli

    out = tmp_path_factory.mktemp("text") / "text.h5"
    run_cli("prepare", "synth-text", out, "--rows", "3000", "--features", "4096", "--shard-rows", "256").check()
    return out
