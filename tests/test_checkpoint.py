"""HDF5 checkpoints: round trip of a real optimizer, tampering refused, atomic saves, keep K."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from mpirt.checkpoint import CheckpointDir, load, resolve_key, save
from mpirt.errors import CheckpointError, TamperedCheckpointError, UsageError



def trained(opt_name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = (torch.optim.Adam(model.parameters(), lr=0.01) if opt_name == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, (x, y)


def write(path, model, opt, key=None):
    return save(path, spec={"name": "test"}, params=model.state_dict(), optimizer=opt.state_dict(),
                position={"step": 3, "epoch": 0}, rng={"torch": torch.get_rng_state().numpy()}, world_size=4,
                meta={"note": "x"}, key=key)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_round_trip_continues_training_identically(tmp_path, opt_name):
    model, opt, (x, y) = trained(opt_name)
    path = write(tmp_path / "c.h5", model, opt)
    ck = load(path)
    assert ck.position == {"step": 3, "epoch": 0} and ck.world_size == 4 and ck.spec == {"name": "test"}
    model2, opt2, _ = trained(opt_name)
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # make sure the load, not the seed, restores them
    model2.load_state_dict({k: torch.from_numpy(v) for k, v in ck.params.items()})
    opt2.load_state_dict(ck.optimizer_state_dict())
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(ck.rng["torch"], torch.get_rng_state().numpy())


def tamper_value(f):
    d = f["params/0.weight"]
    d[0, 0] = d[0, 0] + 1


def tamper_spec(f):
    f.attrs["spec"] = '{"name": "evil"}'


def delete_param(f):
    del f["params/0.bias"]


def add_param(f):
    f["params/extra"] = np.zeros(3)


@pytest.mark.parametrize("edit, words", [
    (tamper_value, "params/0.weight"), (tamper_spec, "@attrs"), (delete_param, "params/0.bias"),
    (add_param, "params/extra"),
])
def test_edited_checkpoint_is_refused(tmp_path, edit, words):
    model, opt, _ = trained("sgd")
    path = write(tmp_path / "c.h5", model, opt)
    with h5py.File(path, "r+") as f:
        edit(f)
    with pytest.raises(TamperedCheckpointError) as e:
        load(path)
    assert str(path) in str(e.value) and "do not match its manifest" in str(e.value) and words in str(e.value)


def test_signatures(tmp_path):
    model, opt, _ = trained("sgd")
    signed = write(tmp_path / "s.h5", model, opt, key=b"k1")
    assert load(signed, key=b"k1").signed
    with pytest.raises(TamperedCheckpointError, match="signature does not match"):
        load(signed, key=b"k2")
    unsigned = write(tmp_path / "u.h5", model, opt)
    with pytest.raises(TamperedCheckpointError, match="is not signed"):
        load(unsigned, key=b"k1")
    # re-signing is impossible without the key: editing the manifest breaks the signature
    with h5py.File(signed, "r+") as f:
        f["params/0.bias"][0] = 5.0
        f.attrs["manifest"] = f.attrs["manifest"].replace("a", "b", 1)
    with pytest.raises(TamperedCheckpointError):
        load(signed, key=b"k1")


def test_foreign_truncated_and_missing_files(tmp_path):
    model, opt, _ = trained("sgd")
    path = write(tmp_path / "c.h5", model, opt)
    half = tmp_path / "half.h5"
    half.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    noise = tmp_path / "noise.h5"
    noise.write_bytes(os.urandom(4096))
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    for p, words in ((half, "truncated or corrupted"), (noise, "truncated or corrupted"),
                     (other, "not an mpirt checkpoint"), (tmp_path / "none.h5", "no such checkpoint")):
        with pytest.raises(CheckpointError) as e:
            load(p)
        assert str(p) in str(e.value) and words in str(e.value)


def test_keep_k_and_failed_save_leaves_previous(tmp_path):
    model, opt, _ = trained("sgd")
    d = CheckpointDir(tmp_path / "ck", keep=2)
    for step in range(5):
        d.save(step, spec={}, params=model.state_dict(), position={"step": step}, world_size=1)
    assert [os.path.basename(p) for p in d.paths()] == ["ckpt-00000003.h5", "ckpt-00000004.h5"]
    with pytest.raises(TypeError):
        d.save(5, spec={}, params={"bad": object()}, position={"step": 5}, world_size=1)
    assert sorted(os.listdir(tmp_path / "ck")) == ["ckpt-00000003.h5", "ckpt-00000004.h5"]
    assert d.load_latest().position == {"step": 4}


def test_killed_saver_leaves_previous_usable(tmp_path):
    d = CheckpointDir(tmp_path, keep=3)
    d.save(1, spec={}, params={"w": np.ones(10, np.float32)}, position={"step": 1}, world_size=1)
    child = (
        "import sys, numpy as np\n"
        "from mpirt.checkpoint import CheckpointDir\n"
        "import mpirt.atomic as A, os\n"
        "real = A.fsync\n"
        "def stop(path):\n"
        "    sys.stdout.write('saving\\n'); sys.stdout.flush(); sys.stdin.readline()\n"
        "A.fsync = stop\n"
        f"CheckpointDir({str(tmp_path)!r}).save(2, spec={{}}, params={{'w': np.zeros(10**7, np.float32)}},"
        " position={'step': 2}, world_size=1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "saving\n"  # written, not yet renamed
        proc.kill()
    finally:
        proc.wait(timeout=30)
    assert d.latest().endswith("ckpt-00000001.h5")
    assert d.load_latest().position == {"step": 1}


def test_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("MPIRT_CHECKPOINT_KEY", raising=False)
    assert resolve_key() is None
    monkeypatch.setenv("MPIRT_CHECKPOINT_KEY", "abc")
    assert resolve_key() == b"abc"
    f = tmp_path / "k"
    f.write_text("xyz\n")
    f.chmod(0o600)  # a key others can read is refused (tests/test_harden_checkpoint.py)
    assert resolve_key(f) == b"xyz"
    # Key files are read in one place for every use (mpirt.secure.keys): a bad one is a usage error.
    f.write_text("")
    with pytest.raises(UsageError, match="empty"):
        resolve_key(f)
    with pytest.raises(UsageError, match="cannot read"):
        resolve_key(tmp_path / "missing")
