"""Streaming: the writer, the pool and a whole prepare run hold a bounded amount, whatever the input size."""

import subprocess
import sys

import numpy as np

from mpirt.data.format import TOKENS
from mpirt.data.reader import open_dataset
from mpirt.data.textpipe import ordered_map
from mpirt.data.writer import DatasetWriter


def test_writer_holds_at_most_a_chunk_plus_the_block_being_appended(tmp_path):
    rng = np.random.default_rng(0)
    w = DatasetWriter(tmp_path / "w.h5", TOKENS, 1 << 10, {"train": 300, "val": 300, "test": 300})
    sent, block = 0, 97
    for _ in range(60):
        lengths = rng.integers(0, 20, size=block)
        w.append("train", np.zeros(block, np.int64), np.arange(sent, sent + block), ids=rng.integers(0, 1 << 10, lengths.sum()),
                 lengths=lengths)
        sent += block
        sw = w.splits["train"]
        assert sw._pending_rows < sw.chunk, "whole chunks go to disk as soon as they are complete"
    assert w.splits["train"].peak_pending_rows < w.splits["train"].chunk + block
    w.finish(["only"])
    with open_dataset(tmp_path / "w.h5") as ds:
        sp = ds.split("train")
        assert sp.n_rows == sent and sp.read(0, sent).row_index.tolist() == list(range(sent))
        assert all(sp.verify_shard(k) for k in range(len(sp.shards)))


def _square(x):
    return x * x


def test_the_pool_keeps_a_bounded_number_of_blocks_in_flight():
    pulled = []

    def calls():
        for i in range(40):
            pulled.append(i)
            yield _square, (i,)

    for k, result in enumerate(ordered_map(calls(), workers=2)):
        assert result == k * k, "results come back in input order"
        assert len(pulled) - k <= 2 * 2, "at most 2 blocks per worker taken ahead of the consumer"


def _peak_rss_kb(tmp_path, rows):
    """Peak RSS (kB) of `mpirt prepare synth-text` in a fresh interpreter: main process, largest worker."""
    code = ("import resource, sys; import mpirt.data.prepare as p; from mpirt.cli import main;"
            "p.SYNTH_BLOCK_ROWS = 1024;"  # small blocks: the pipeline is full long before the smaller run ends
            "rc = main(['prepare', 'synth-text', sys.argv[1], '--rows', sys.argv[2], '--features', '65536',"
            " '--workers', '2', '--shard-rows', '1024']);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
            " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"s{rows}.h5"), str(rows)],
                         capture_output=True, text=True, check=True, timeout=300)
    return [int(v) for v in res.stdout.split()[-2:]]


def test_prepare_streams_in_bounded_memory(tmp_path):
    """8x the rows, about the same peak memory: not the ~11 MB that keeping the token ids would add
    (28k rows x ~100 tokens x 4 bytes), let alone the ~37 MB of keeping the documents."""
    small, large = _peak_rss_kb(tmp_path, 4096), _peak_rss_kb(tmp_path, 32768)
    assert large[0] - small[0] < 8 * 1024, f"main process peak grew from {small[0]} to {large[0]} kB"
    assert large[1] - small[1] < 10 * 1024, f"worker peak grew from {small[1]} to {large[1]} kB"
