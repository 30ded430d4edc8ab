"""Issue 15: data and models protected at rest (docs/security.md).

Real files throughout: data sets made by ``mpirt prepare``, keys by ``mpirt keygen``, checkpoints by
``mpirt train`` (one rank, and three with a kill and a join), predictions by ``mpirt classify``.
Attacks are done as an attacker with write access would do them: bytes of the encrypted file
flipped, moved, cut or spliced from another file; labels changed with h5py and every checksum
recomputed.
"""

import hashlib
import os
import re
import shutil
import stat
import struct

import h5py
import numpy as np
import pytest

from harness import assert_same_model, one_line_error, run_cli

pytestmark = pytest.mark.cli

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    run_cli("keygen", "--secret", d / "secret.key").check()
    run_cli("keygen", d / "alice").check()
    run_cli("keygen", d / "mallory").check()
    return d


@pytest.fixture(scope="module")
def encrypted(keys, tmp_path_factory):
    """Digits, encrypted with the secret and signed by alice (Ed25519) and the secret (HMAC)."""
    out = tmp_path_factory.mktemp("enc") / "digits.h5"
    run_cli("prepare", "digits", out, "--shard-rows", "256", "--encrypt", "--key-file", keys / "secret.key",
            "--sign-key", keys / "alice").check()
    return out


# -- keys ---------------------------------------------------------------------------------
def test_keygen_modes_and_never_overwrites(keys, tmp_path):
    assert mode(keys / "secret.key") == 0o600 and mode(keys / "alice") == 0o600
    assert mode(keys / "alice.pub") == 0o644
    assert len(bytes.fromhex((keys / "secret.key").read_text().strip())) == 32
    one_line_error(run_cli("keygen", keys / "alice"), 2, "alice", "never overwritten")
    os.symlink(tmp_path / "elsewhere", tmp_path / "planted")
    one_line_error(run_cli("keygen", "--secret", tmp_path / "planted"), 2, "planted")
    assert not (tmp_path / "elsewhere").exists()


def test_open_key_files_are_refused(keys, encrypted, tmp_path):
    loose = tmp_path / "loose.key"
    shutil.copy(keys / "secret.key", loose)
    os.chmod(loose, 0o640)
    one_line_error(run_cli("inspect", encrypted, "--key-file", loose), 2, str(loose), "group or others", "chmod 600")
    signer = tmp_path / "signer"
    shutil.copy(keys / "alice", signer)
    os.chmod(signer, 0o604)
    one_line_error(run_cli("prepare", "digits", tmp_path / "d.h5", "--sign-key", signer), 2, str(signer),
                   "group or others")
    assert not (tmp_path / "d.h5").exists()
    one_line_error(run_cli("prepare", "digits", tmp_path / "d.h5", "--sign-key", keys / "alice.pub"), 2,
                   "is a public key", "not KEY.pub")
    assert not (tmp_path / "d.h5").exists()


def test_encrypt_needs_a_key(tmp_path):
    one_line_error(run_cli("prepare", "digits", tmp_path / "d.h5", "--encrypt"), 2, "--encrypt needs a key")
    assert os.listdir(tmp_path) == []


# -- the encrypted data set -----------------------------------------------------------------
def test_encrypted_data_set_is_private_and_opaque(encrypted, keys):
    raw = encrypted.read_bytes()
    assert mode(encrypted) == 0o600
    assert HDF5_MAGIC not in raw  # no HDF5 structure in clear, anywhere in the file
    res = run_cli("inspect", encrypted).check()  # no key: what it is and who signed, from the trailer
    assert "encrypted: AES-256-GCM" in res.stdout and "Ed25519 by SHA256:" in res.stdout, res.stdout
    assert "contents not verified" in res.stdout
    res = run_cli("inspect", encrypted, "--key-file", keys / "secret.key", "--verify-key", keys / "alice.pub").check()
    assert "signatures verified: hmac, ed25519 SHA256:" in res.stdout, res.stdout
    assert "OK:" in res.stdout
    env = {"MPIRT_DATA_KEY": (keys / "secret.key").read_text().strip()}  # the environment's key decrypts too
    assert "OK:" in run_cli("inspect", encrypted, env=env).check().stdout


def test_encrypted_reads_equal_plain_reads(encrypted, keys, tmp_path):
    plain = tmp_path / "plain.h5"
    run_cli("prepare", "digits", plain, "--shard-rows", "256").check()
    from mpirt.data.reader import open_dataset
    from mpirt.secure.keys import secret_from_file
    from mpirt.secure.policy import Policy, set_policy

    before = set_policy(Policy(secret=secret_from_file(keys / "secret.key")))
    try:
        with open_dataset(encrypted) as e, open_dataset(plain) as p:
            assert e.encrypted and not p.encrypted
            for name in ("train", "val", "test"):
                a, b = e.split(name), p.split(name)
                for lo, hi in ((0, a.n_rows), (3, 70), (a.n_rows - 10, a.n_rows)):
                    x, y = a.read(lo, hi), b.read(lo, hi)
                    np.testing.assert_array_equal(x.X, y.X)
                    np.testing.assert_array_equal(x.y, y.y)
    finally:
        set_policy(before)


def _chunks(path):
    from mpirt.secure.container import HEADER_BYTES, NONCE, TAG, read_trailer

    fields, _ = read_trailer(path)
    raw = bytearray(path.read_bytes())
    tail = struct.unpack("<I", raw[-12:-8])[0] + 12
    step = fields["chunk"] + NONCE + TAG
    return raw, HEADER_BYTES, step, tail


@pytest.mark.parametrize("attack", ["flip", "swap", "truncate", "splice", "trailer", "wrong-key"])
def test_tampered_encrypted_data_set_is_refused(attack, encrypted, keys, tmp_path):
    bad = tmp_path / "bad.h5"
    raw, head, step, tail = _chunks(encrypted)
    key = keys / "secret.key"
    if attack == "flip":
        raw[head + step + 100] ^= 1
    elif attack == "swap":  # two whole chunks exchanged: each one authentic, in the wrong place
        a, b = raw[head:head + step], raw[head + step:head + 2 * step]
        raw[head:head + 2 * step] = b + a
    elif attack == "truncate":  # whole chunks cut off the end, the trailer kept
        n_body = len(raw) - head - tail
        last = n_body - (n_body - 1) // step * step
        raw = raw[:len(raw) - tail - last - step] + raw[len(raw) - tail:]
    elif attack == "splice":  # chunk 1 of another file made with the same key
        other = tmp_path / "other.h5"
        run_cli("prepare", "digits", other, "--shard-rows", "256", "--encrypt", "--key-file", key).check()
        oraw, *_ = _chunks(other)
        raw[head + step:head + 2 * step] = oraw[head + step:head + 2 * step]
    elif attack == "trailer":  # claim another signer, without the key
        raw = raw.replace(b'"ed25519": "SHA256:', b'"ed25519": "SHA256:X', 1)
        raw[-12:-8] = struct.pack("<I", struct.unpack("<I", raw[-12:-8])[0] + 1)
    else:
        key = tmp_path / "other.key"
        run_cli("keygen", "--secret", key).check()
    bad.write_bytes(bytes(raw))
    res = run_cli("train", "--data", bad, "--model", "linear", "--epochs", "1", "--no-progress", "--key-file", key,
                  "--checkpoint-dir", tmp_path / "ck", timeout=120)
    words = {"wrong-key": "wrong key"}.get(attack, "failed authentication")
    one_line_error(res, 1, str(bad), words)
    assert not (tmp_path / "ck").exists() or not any(n.endswith(".h5") for n in os.listdir(tmp_path / "ck"))


def test_encrypted_data_without_a_key_is_one_line(encrypted, tmp_path):
    res = run_cli("train", "--data", encrypted, "--model", "linear", "--epochs", "1", "--no-progress")
    one_line_error(res, 1, str(encrypted), "is encrypted", "--key-file")


# -- signed data sets -------------------------------------------------------------------------
def _relabel_and_rehash(path):
    """What an attacker with write access does: change labels, recompute every shard checksum."""
    from mpirt.data.format import shard_digest

    with h5py.File(path, "r+") as f:
        g = f["train"]
        y = g["y"][()]
        y[:50] = (y[:50] + 1) % int(f.attrs["n_classes"])
        g["y"][...] = y
        sums = [shard_digest(y[a:b], g["row_index"][a:b], g["X"][a:b]) for a, b in g["shards"][()]]
        g["shard_sha256"][...] = np.array(sums, dtype="S64")


def test_relabelled_data_set_with_recomputed_checksums(keys, tmp_path):
    data = tmp_path / "d.h5"
    run_cli("prepare", "digits", data, "--shard-rows", "256", "--key-file", keys / "secret.key",
            "--sign-key", keys / "alice").check()
    _relabel_and_rehash(data)
    # The checksums agree with the rows: without a key, nothing can tell (docs/security.md).
    run_cli("inspect", data).check()
    one_line_error(run_cli("inspect", data, "--key-file", keys / "secret.key"), 1, str(data), "HMAC signature")
    one_line_error(run_cli("train", "--data", data, "--model", "linear", "--epochs", "1", "--no-progress",
                           "--verify-key", keys / "alice.pub"), 1, str(data), "Ed25519 signature")
    one_line_error(run_cli("inspect", data, "--verify-key", keys / "mallory.pub"), 1, "not a --verify-key key")


def test_require_signature(keys, tmp_path):
    plain = tmp_path / "plain.h5"
    run_cli("prepare", "digits", plain).check()
    one_line_error(run_cli("inspect", plain, "--require-signature"), 2, "--require-signature needs")
    one_line_error(run_cli("inspect", plain, "--require-signature", "--verify-key", keys / "alice.pub"), 1,
                   str(plain), "is not signed", "--require-signature")
    signed = tmp_path / "signed.h5"
    run_cli("prepare", "digits", signed, "--sign-key", keys / "mallory").check()
    one_line_error(run_cli("inspect", signed, "--require-signature", "--key-file", keys / "secret.key"), 1,
                   "not by a key given here")
    run_cli("inspect", signed, "--require-signature", "--verify-key", keys / "mallory.pub").check()


# -- checkpoints, outputs, provenance ------------------------------------------------------------
def test_public_key_classify_node(keys, tmp_path):
    """Train signs with alice's private key; classify holds only alice.pub (no secret anywhere)."""
    data = tmp_path / "d.h5"
    run_cli("prepare", "digits", data, "--sign-key", keys / "alice").check()
    ck = tmp_path / "ck"
    run_cli("train", "--data", data, "--model", "linear", "--epochs", "1", "--no-progress", "--checkpoint-dir", ck,
            "--sign-key", keys / "alice", "--verify-key", keys / "alice.pub", "--require-signature",
            timeout=120).check()
    out = tmp_path / "pred.h5"
    trust = ["--verify-key", keys / "alice.pub", "--require-signature"]
    run_cli("classify", "--data", data, "--checkpoint", ck, "--out", out, *trust, timeout=120).check()
    with h5py.File(out, "r") as f:
        from mpirt.data.integrity import dataset_digest
        from mpirt.data.reader import open_dataset

        with open_dataset(data) as ds:
            assert f.attrs["data_sha256"] == dataset_digest(ds)
        assert f.attrs["data_signer"].startswith("SHA256:")
        assert list(f.attrs["checkpoint_verified_by"]) == [f"ed25519 {f.attrs['data_signer']}"]
    res = run_cli("inspect", out, "--verify-key", keys / "alice.pub").check()
    assert "checkpoint_sha256" in res.stdout and "data_verified_by: ed25519" in res.stdout, res.stdout
    one_line_error(run_cli("classify", "--data", data, "--checkpoint", ck, "--out", tmp_path / "p2.h5",
                           "--verify-key", keys / "mallory.pub"), 1, "not a --verify-key key")
    # An attacker changes a weight and recomputes the manifest: the Ed25519 signature no longer matches.
    ckpt = sorted(p for p in ck.iterdir() if p.name.startswith("ckpt-"))[-1]
    from mpirt.checkpoint_write import digest

    with h5py.File(ckpt, "r+") as f:
        name = next(n for n in f["params"])
        w = f["params"][name][()]
        w.flat[0] += 1.0
        f["params"][name][...] = w
        import json

        manifest = json.loads(f.attrs["manifest"])
        manifest[f"params/{name}"] = digest(w)
        f.attrs["manifest"] = json.dumps(manifest, sort_keys=True)
    one_line_error(run_cli("classify", "--data", data, "--checkpoint", ckpt, "--out", tmp_path / "p3.h5", *trust),
                   1, str(ckpt), "Ed25519 signature")
    assert not (tmp_path / "p3.h5").exists()


def test_encrypted_elastic_run_resume_and_outputs(encrypted, keys, tmp_path):
    """3 ranks with a kill and a join on the encrypted data set, encrypted signed checkpoints; resume;
    classify and wordcount outputs encrypted; the same model as the plain run."""
    key = ["--key-file", keys / "secret.key"]
    common = ["--model", "mlp", "--epochs", "2", "--seed", "3", "--no-progress", "--checkpoint-every", "8"]
    run_dir = tmp_path / "enc"
    run_dir.mkdir()
    res = run_cli("launch", "-n", "3", "--spare", "1", "--", "mpirt", "train", "--data", encrypted, *common, *key,
                  "--encrypt", "--sign-key", keys / "alice", "--checkpoint-dir", run_dir / "ck",
                  "--inject-fault", "kill:member=1:step=5", "--inject-fault", "join:count=1:step=9", timeout=240)
    res.check()
    assert int(re.search(r"(\d+) view\(s\)", res.stdout).group(1)) >= 3, res.stdout  # the kill and the join
    ckpts = sorted(p for p in (run_dir / "ck").iterdir() if p.name.startswith("ckpt-"))
    assert ckpts and all(HDF5_MAGIC not in p.read_bytes() and mode(p) == 0o600 for p in ckpts)
    assert len(ckpts) == 3  # --keep's default: the run knows its own encrypted checkpoints and prunes them
    assert mode(run_dir / "ck") == 0o700
    # The plain run on a plain copy of the same data: the same parameters.
    plain = tmp_path / "plain.h5"
    run_cli("prepare", "digits", plain, "--shard-rows", "256").check()
    run_cli("train", "--data", plain, *common, "--checkpoint-dir", tmp_path / "plain-ck", timeout=180).check()
    from mpirt.checkpoint import CheckpointDir
    from mpirt.secure.keys import secret_from_file
    from mpirt.secure.policy import Policy, set_policy

    before = set_policy(Policy(secret=secret_from_file(keys / "secret.key")))
    try:
        a = CheckpointDir(run_dir / "ck", key=secret_from_file(keys / "secret.key")).load_latest()
    finally:
        set_policy(before)
    b = CheckpointDir(tmp_path / "plain-ck").load_latest()
    assert a.encrypted and a.vouched == ["hmac"]
    assert_same_model(a.params, b.params)
    # Without the key, resume is one line; with it, it goes on.
    one_line_error(run_cli("train", "--data", plain, *common, "--checkpoint-dir", run_dir / "ck", "--resume",
                           "--epochs", "3"), 1, "is encrypted")
    # classify: encrypted output, replaced by a rerun without --force (the trailer says what it is)
    out = tmp_path / "pred.h5"
    for _ in range(2):
        run_cli("classify", "--data", encrypted, "--checkpoint", run_dir / "ck", "--out", out, *key, "--encrypt",
                timeout=120).check()
    assert HDF5_MAGIC not in out.read_bytes() and mode(out) == 0o600
    res = run_cli("inspect", out, *key).check()
    assert "classify output; encrypted: AES-256-GCM" in res.stdout and "data_encrypted: True" in res.stdout


def test_private_outputs_and_umask(keys, tmp_path):
    data = tmp_path / "d.h5"
    run_cli("prepare", "digits", data, "--private").check()
    assert mode(data) == 0o600
    shared = tmp_path / "shared.h5"
    run_cli("prepare", "digits", shared).check()
    assert mode(shared) == 0o666 & ~_umask()
    run_cli("train", "--data", data, "--model", "linear", "--epochs", "1", "--no-progress", "--private",
            "--checkpoint-dir", tmp_path / "ck", "--report", tmp_path / "rep", timeout=120).check()
    assert mode(tmp_path / "ck") == 0o700 and mode(tmp_path / "rep") == 0o700
    assert all(mode(p) == 0o600 for p in (tmp_path / "ck").iterdir() if p.name != ".lock")
    assert all(mode(p) == 0o600 for p in (tmp_path / "rep").iterdir())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_world_writable_directory_warning(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    res = run_cli("prepare", "digits", open_dir / "d.h5").check()
    assert "world-writable without the sticky bit" in res.stderr, res.stderr
    os.chmod(open_dir, 0o1777)
    res = run_cli("prepare", "digits", open_dir / "e.h5").check()
    assert "world-writable" not in res.stderr


def test_temporary_names_are_random_exclusive_and_private(tmp_path):
    from mpirt.atomic import atomic_path, create_exclusive, remove_stale

    seen = set()
    for _ in range(20):
        tmp = create_exclusive(str(tmp_path), "out.h5.1@host.", ".tmp")
        name = os.path.basename(tmp)
        assert len(name.split(".")[-2]) == 16 and mode(tmp) == 0o600
        seen.add(name)
    assert len(seen) == 20
    # A planted symlink where the output goes is replaced by the rename, never written through.
    target = tmp_path / "victim"
    target.write_text("precious")
    os.symlink(target, tmp_path / "result.txt")
    with atomic_path(tmp_path / "result.txt") as tmp, open(tmp, "w") as f:
        f.write("new")
    assert target.read_text() == "precious" and not os.path.islink(tmp_path / "result.txt")
    # A dead writer's temporary in the new form is removed by the next writer.
    dead = tmp_path / f"x.h5.{2 ** 22 + 7}@{os.uname().nodename}.{'ab' * 8}.tmp"
    dead.write_text("")
    assert remove_stale(tmp_path / "x.h5") == [dead.name]


def test_prepare_ratings_and_text_encrypted(keys, tmp_path):
    from mpirt.data.synth_ratings import write_ratings

    csv = tmp_path / "ratings.csv"
    write_ratings(csv, users=50, items=40, ratings=2000)
    key = ["--key-file", keys / "secret.key"]
    for kind, args in (("ratings", [csv, tmp_path / "r.h5"]), ("synth-text", [tmp_path / "t.h5", "--rows", "300"])):
        run_cli("prepare", kind, *args, *key, "--encrypt", "--sign-key", keys / "alice").check()
    for out in (tmp_path / "r.h5", tmp_path / "t.h5"):
        assert HDF5_MAGIC not in out.read_bytes()
        res = run_cli("inspect", out, *key, "--verify-key", keys / "alice.pub", "--require-signature").check()
        assert "OK:" in res.stdout and "ed25519 SHA256:" in res.stdout, res.stdout
    counts = tmp_path / "counts.h5"
    run_cli("wordcount", tmp_path / "t.h5", "--out", counts, *key, "--encrypt", timeout=120).check()
    assert "wordcount output; encrypted" in run_cli("inspect", counts, *key).check().stdout


def test_container_unit_round_trip_and_holes(tmp_path):
    """HDF5's write pattern in miniature: out of order, rewrites of evicted chunks, a hole, truncate."""
    from mpirt.secure.container import DecryptError, EncryptedFile

    path, secret = tmp_path / "c.bin", b"k" * 32
    rng = np.random.default_rng(0)
    ref = bytearray(300_000)
    with EncryptedFile(path, "w", secret, trailer={"content": "test"}, cache_chunks=2, chunk=4096) as f:
        for _ in range(200):
            at, n = int(rng.integers(0, 280_000)), int(rng.integers(1, 20_000))
            data = rng.bytes(n)
            f.seek(at)
            f.write(data)
            ref[at:at + n] = data
        f.truncate(290_000)
    del ref[290_000:]
    with EncryptedFile(path, "r", secret) as f:
        assert f.size == len(ref) and f.read() == bytes(ref)
        f.seek(12_345)
        assert f.read(10_000) == bytes(ref[12_345:22_345])
        assert f.trailer["content"] == "test"
    with pytest.raises(DecryptError, match="wrong key"):
        EncryptedFile(path, "r", b"j" * 32)
    assert hashlib.sha256(path.read_bytes()).hexdigest() != hashlib.sha256(bytes(ref)).hexdigest()
