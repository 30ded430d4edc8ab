"""Background checkpoint saves (:class:`mpirt.checkpoint.CheckpointDir` with ``background=True``).

Real h5py files in ``tmp_path``; the writer's own hook (``before_rename``, the point where
``mpirt train`` checks its fence and strikes ``phase=save`` faults) holds a save in flight where a
test needs it. The multi-rank kill during a save is in tests/test_train_checkpoint.py.
"""

import errno
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from mpirt.checkpoint import CheckpointDir, load
from mpirt.errors import CheckpointError

BOUND = 60  # seconds any wait here may take on a loaded 2-core machine


def fields(step, w):
    return {"spec": {}, "params": {"w": w}, "position": {"step": step}, "world_size": 1}


def temporaries(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".tmp"))


class Gate:
    """A ``before_rename`` that stops the writer until :meth:`open` (and says when it got there)."""

    def __init__(self):
        self.reached, self.opened = threading.Event(), threading.Event()

    def __call__(self):
        self.reached.set()
        assert self.opened.wait(BOUND)

    def open(self):
        self.opened.set()


def test_the_file_appears_whole_under_its_name_and_holds_the_snapshot(tmp_path):
    d = CheckpointDir(tmp_path, keep=3, background=True)
    d.save(1, **fields(1, torch.ones(10)))
    d.wait()
    w = torch.full((4_000_000,), 2.0)
    gate = Gate()
    path = d.save(2, before_rename=gate, **fields(2, w))
    w.fill_(-1.0)  # training goes on as soon as save() returns: the checkpoint holds the snapshot
    assert gate.reached.wait(BOUND)
    # Written and fsynced, not renamed: under its name is nothing, the newest is still step 1.
    assert not os.path.exists(path)
    assert d.load_latest().position == {"step": 1}
    (tmp,) = temporaries(tmp_path)
    assert tmp.startswith("ckpt-00000002.h5.")
    gate.open()
    d.wait()
    ck = load(path)
    assert ck.position == {"step": 2} and np.all(ck.params["w"] == 2.0)
    assert temporaries(tmp_path) == [] and d.latest() == path
    d.close()


def test_a_failed_background_save_is_raised_once_as_one_line(tmp_path):
    d = CheckpointDir(tmp_path, keep=3, background=True)
    d.save(1, **fields(1, np.ones(10, np.float32)))

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    d.save(2, before_rename=full, **fields(2, np.ones(10, np.float32)))
    with pytest.raises(CheckpointError) as e:  # the next save raises it
        d.save(3, **fields(3, np.ones(10, np.float32)))
    line = str(e.value)
    assert "\n" not in line and "no space left on" in line and str(tmp_path / "ckpt-00000002.h5") in line
    d.save(4, **fields(4, np.ones(10, np.float32)))  # raised once: the saves go on
    d.wait()

    def bug():
        raise RuntimeError("injected")

    d.save(5, before_rename=bug, **fields(5, np.ones(10, np.float32)))
    with pytest.raises(CheckpointError) as e:  # the end of training (wait) raises it too
        d.wait()
    assert "ckpt-00000005.h5: the background save failed (RuntimeError: injected)" in str(e.value)
    names = sorted(os.listdir(tmp_path))
    assert names == ["ckpt-00000001.h5", "ckpt-00000004.h5"], names  # 3 was never saved: 2 failed
    assert d.load_latest().position == {"step": 4}


def test_a_new_save_waits_for_the_one_in_flight_and_is_counted(tmp_path):
    d = CheckpointDir(tmp_path, keep=5, background=True)
    gate = Gate()
    d.save(1, before_rename=gate, **fields(1, np.ones(1000, np.float32)))
    assert gate.reached.wait(BOUND)
    returned = threading.Event()
    second = threading.Thread(target=lambda: (d.save(2, **fields(2, np.ones(1000, np.float32))), returned.set()))
    second.start()
    # Never set while the first save is held: a second save is not started beside it.
    assert not returned.wait(1.0)
    assert not os.path.exists(tmp_path / "ckpt-00000001.h5")
    gate.open()
    second.join(BOUND)
    assert returned.is_set()
    d.wait()
    assert [os.path.basename(p) for p in d.paths()] == ["ckpt-00000001.h5", "ckpt-00000002.h5"]
    stats = d.stats()
    assert stats["saves"] == 2 and stats["waited"] == 1 and stats["wait_s"] > 0


def test_a_fenced_writer_stops_before_the_rename(tmp_path):
    # The lifeline of a rank that mpirt launch declared failed reads end-of-file: check_fence()
    # in the writer thread stops the process (exit 69) before the rename.
    d = CheckpointDir(tmp_path, keep=3)
    d.save(1, **fields(1, np.ones(10, np.float32)))
    child = (
        "import socket, threading, time, numpy as np\n"
        "from mpirt.comm import lifeline\n"
        "from mpirt.checkpoint import CheckpointDir\n"
        "mine, launcher = socket.socketpair()\n"
        "launcher.close()\n"
        "lifeline._client.update(sock=mine, lock=threading.Lock(), rlock=threading.Lock(), buf=b'', timeout=0.0,\n"
        "                        heard=time.monotonic())\n"
        f"d = CheckpointDir({str(tmp_path)!r}, background=True)\n"
        "d.save(2, before_rename=lifeline.check_fence, spec={}, params={'w': np.zeros(10**6, np.float32)},\n"
        "       position={'step': 2}, world_size=1)\n"
        "d.wait()\n"
        "print('renamed')\n"
    )
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=BOUND)
    assert res.returncode == 69 and "renamed" not in res.stdout, res.stdout + res.stderr
    assert "declared failed" in res.stderr
    assert [os.path.basename(p) for p in d.paths()] == ["ckpt-00000001.h5"]
    assert d.load_latest().position == {"step": 1}
