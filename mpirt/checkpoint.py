"""HDF5 checkpoints: atomic, checksummed, optionally signed, loadable on any number of ranks.

Parameters are replicated in data-parallel training, so one file holds the whole state.

Format (schema version 1). Root attributes: ``mpirt_format = "mpirt.checkpoint"``,
``schema_version``, ``spec``, ``position``, ``meta`` (JSON strings), ``world_size``; ``manifest``:
canonical JSON (sorted keys) mapping every dataset path to ``sha256:dtype:shape`` of its raw bytes,
and ``"@attrs"`` to the SHA-256 of the attributes above; ``signature`` (when a key is set):
hex HMAC-SHA256 of the manifest; ``signature_ed25519``, ``signer``, ``signer_key`` (``--sign-key``:
:mod:`mpirt.secure.sign`). With ``--encrypt`` the file is inside the encrypted container
(:mod:`mpirt.secure.container`), written through h5py instead of at file offsets. Groups: ``params/<name>`` one dataset per parameter;
``optimizer/state/<index>/<key>`` (0-d datasets for scalars) with attribute ``param_groups`` (JSON);
``rng/<name>`` uint8 arrays.

Written to a temporary name beside the target, fsynced, renamed (:func:`mpirt.atomic.atomic_path`):
a kill during a save leaves the previous checkpoint as it was. Datasets are contiguous; how the
file is written fast is in :mod:`mpirt.checkpoint_write`. :class:`CheckpointDir` saves in the
background when asked (:mod:`mpirt.checkpoint_async`): then only the copy of the state into host
memory blocks the caller.

Reading checks the manifest's names, dtypes and shapes against the file's datasets and their
stored bytes before reading any of them (a crafted header must not make every rank allocate what it
claims), then the digests. ``mpirt train`` adds to ``meta``: ``data_sha256`` (the data set's digest),
``features`` (text: how tokens were hashed) and ``run`` (the run's identity, :mod:`mpirt.train.rundir`).
"""

import glob
import hashlib
import hmac
import json
import os
import re
import time
from dataclasses import dataclass

import numpy as np

from mpirt.atomic import atomic_path, remove_stale
from mpirt.checkpoint_async import BackgroundSaver
from mpirt.checkpoint_write import FORMAT, SCHEMA_VERSION, digest, manifest, snapshot, write
from mpirt.config import CHECKPOINT_KEY
from mpirt.errors import CheckpointError, TamperedCheckpointError
from mpirt.secure.policy import makedirs as private_makedirs
ATTRS = ("spec", "position", "meta", "world_size")
NAME = re.compile(r"^ckpt-(\d{8})\.h5$")
TEMPORARY = re.compile(r"^((?:ckpt-\d{8}|best)\.h5)\..+\.tmp$")
BEST = "best.h5"  # the best checkpoint by validation (--keep-best), beside the newest --keep


@dataclass
class Checkpoint:
    path: str
    spec: dict
    params: dict
    optimizer: dict
    position: dict
    rng: dict
    world_size: int
    meta: dict
    signed: bool
    vouched: list = None  # what verified it: "hmac", "ed25519 SHA256:..."
    digest: str = ""  # SHA-256 of its manifest: names this checkpoint's content (provenance)
    encrypted: bool = False

    def optimizer_state_dict(self):
        """The optimizer state with torch tensors, for ``Optimizer.load_state_dict``."""
        import torch

        if not self.optimizer:
            return None
        state = {int(i): {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v
                          for k, v in s.items()} for i, s in self.optimizer["state"].items()}
        return {"state": state, "param_groups": self.optimizer["param_groups"]}


def save(path, *, spec, params, optimizer=None, position, rng=None, world_size, meta=None, key=None,
         before_rename=None):
    """Write a checkpoint to ``path`` atomically, blocking; return ``path``.

    Args:
        before_rename: called once the file is whole and fsynced, before it is renamed to ``path``
            (a fence check, a fault): raising there leaves ``path`` and the checkpoints before as
            they were.

    Raises:
        CheckpointError: one line naming ``path`` (a full disk: the temporary is gone).
    """
    state = snapshot(spec=spec, params=params, optimizer=optimizer, position=position, rng=rng,
                     world_size=world_size, meta=meta)
    return _save_state(path, state, key, before_rename)


def _save_state(path, state, key, before_rename=None):
    from mpirt.outputs import os_error_line

    try:
        with atomic_path(path, before_rename=before_rename) as tmp:
            write(tmp, state, key)
    except OSError as exc:  # a full disk: one line; the temporary is gone, the checkpoints before intact
        raise CheckpointError(os_error_line(exc, path)) from None
    return path


def _manifest(arrays, attrs, groups):
    # hashlib releases the GIL on large buffers: the arrays are hashed on all cores.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return manifest(zip(arrays, pool.map(digest, arrays.values())), attrs, groups)


def resolve(path):
    """A checkpoint named on a command line: a file; a run's directory (its newest checkpoint); or
    ``DIR/best`` (the best by validation, written with ``--keep-best``).

    Raises:
        CheckpointError: a directory that holds no checkpoint, or ``DIR/best`` that was never written.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        latest = CheckpointDir(path).latest()
        if latest is None:
            raise CheckpointError(f"{path}: no checkpoint in this directory")
        return latest
    if not os.path.exists(path) and os.path.basename(path) == "best":
        best = os.path.join(os.path.dirname(path) or ".", BEST)
        if not os.path.exists(best):
            raise CheckpointError(f"{path}: no best checkpoint in {os.path.dirname(path) or '.'} (train with "
                                  f"--keep-best to write one)")
        return best
    return path


def load(path, key=None, verify=True):
    """Read and verify ``path``.

    Args:
        key: the HMAC key: the signature must match it (an unsigned file is refused).
        verify: without a key, refuse a signed file (its signature cannot be checked, and a file
            whose arrays and manifest were both redone still passes the manifest). False trusts it
            (``--no-verify``); the manifest is checked either way.

    Raises:
        CheckpointError: missing, unreadable or foreign file; TamperedCheckpointError: contents or
            signature do not match, or datasets the manifest does not declare or the file cannot hold.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    if not os.path.isfile(path):  # a FIFO or a device would block or stream forever
        raise CheckpointError(f"{path}: not a regular file")
    from mpirt.secure.container import DecryptError
    from mpirt.secure.h5 import File

    try:
        f = File(path, "r")
    except DecryptError as exc:
        raise TamperedCheckpointError(str(exc)) from None
    except OSError:
        raise CheckpointError(f"{path}: not a readable HDF5 file (truncated or corrupted?)") from None
    try:
        with f:
            return _read(path, f, key, verify)
    except DecryptError as exc:  # a chunk read after the open failed its tag
        raise TamperedCheckpointError(str(exc)) from None
    except (KeyError, ValueError, OSError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc.__class__.__name__}: {exc})") from None


def _check_signature(path, f, manifest, key, verify):
    """The HMAC with the checkpoint key (a key set: the file must be signed with it), then the
    policy's Ed25519 keys and ``--require-signature`` (:func:`mpirt.secure.sign.verify`); returns
    what vouched for the file."""
    from mpirt.secure.policy import current
    from mpirt.secure.sign import verify as verify_signatures

    signature = f.attrs.get("signature")
    vouched = []
    if key:
        if signature is None:
            raise TamperedCheckpointError(f"{path}: is not signed but a checkpoint key is set")
        expect = hmac.new(key, manifest.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expect, str(signature)):
            raise TamperedCheckpointError(f"{path}: signature does not match (tampered, or signed with another key)")
        vouched.append("hmac")
    elif signature is not None and verify and not (current().verify_keys and "signature_ed25519" in f.attrs):
        raise TamperedCheckpointError(f"{path}: signed: give the key (--key-file or {CHECKPOINT_KEY}), "
                                      f"or --no-verify to trust it")
    return verify_signatures(path, "checkpoint", hashlib.sha256(manifest.encode()).hexdigest(), f.attrs, current(),
                             TamperedCheckpointError, check_hmac=False, vouched=vouched)


def _datasets(path, f, expected):
    """The file's datasets by name, checked against the manifest before any is read: a crafted
    file must not make every rank allocate what its headers claim (2^40 elements) to find out."""
    import h5py

    found = {}
    f.visititems(lambda name, obj: found.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    declared = {k for k in expected if not k.startswith("@")}
    odd = sorted(found.keys() ^ declared)
    if odd:
        raise TamperedCheckpointError(f"{path}: contents do not match its manifest (tampered or corrupted): "
                                      f"{', '.join(odd[:3])}")
    total = 0
    for name, d in found.items():
        _, dtype, shape = expected[name].split(":", 2)
        # (digest's ascontiguousarray makes a 0-d array 1-d: a scalar's manifest shape is [1])
        if d.dtype.str != dtype or (list(d.shape) or [1]) != json.loads(shape):
            raise TamperedCheckpointError(f"{path}: contents do not match its manifest (tampered or corrupted): "
                                          f"{name}")
        nbytes = d.size * d.dtype.itemsize
        if d.dtype.kind not in "biuf" or (nbytes and d.id.get_storage_size() < nbytes):
            raise TamperedCheckpointError(f"{path}: dataset {name} declares {nbytes} bytes that the file does not "
                                          f"hold (crafted or truncated)")
        total += nbytes
    if total > os.path.getsize(path):
        raise TamperedCheckpointError(f"{path}: datasets declare {total} bytes, more than the file's size")
    return found


def _read(path, f, key, verify=True):
    if f.attrs.get("mpirt_format") != FORMAT:
        raise CheckpointError(f"{path}: not an mpirt checkpoint")
    if int(f.attrs.get("schema_version", -1)) != SCHEMA_VERSION:
        raise CheckpointError(f"{path}: checkpoint schema {f.attrs.get('schema_version')} is not "
                              f"{SCHEMA_VERSION} (written by another mpirt version)")
    manifest = f.attrs.get("manifest")
    if manifest is None:
        raise TamperedCheckpointError(f"{path}: has no manifest (tampered or corrupted)")
    vouched = _check_signature(path, f, manifest, key, verify)
    expected = json.loads(manifest)
    if not isinstance(expected, dict) or not all(isinstance(v, str) for v in expected.values()):
        raise TamperedCheckpointError(f"{path}: its manifest is not a map of digests (tampered or corrupted)")
    arrays = {name: d[()] for name, d in _datasets(path, f, expected).items()}
    attrs = {k: (f.attrs[k] if k != "world_size" else int(f.attrs[k])) for k in ATTRS}
    groups = f["optimizer"].attrs["param_groups"] if "optimizer" in f else "[]"
    actual = json.loads(_manifest({k: np.asarray(v) for k, v in arrays.items()}, attrs, groups))
    bad = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
    if bad:
        raise TamperedCheckpointError(f"{path}: contents do not match its manifest (tampered or corrupted): "
                                      f"{', '.join(bad[:3])}")
    opt_state = {}
    for name, a in arrays.items():
        if name.startswith("optimizer/state/"):
            _, _, i, k = name.split("/", 3)
            opt_state.setdefault(int(i), {})[k] = a if np.ndim(a) else a.item() if a.dtype.kind != "f" else np.array(a)
    return Checkpoint(
        path=path, spec=json.loads(attrs["spec"]),
        params={k[len("params/"):]: np.asarray(v) for k, v in arrays.items() if k.startswith("params/")},
        optimizer={"state": opt_state, "param_groups": json.loads(groups)} if "optimizer" in f else {},
        position=json.loads(attrs["position"]),
        rng={k[len("rng/"):]: np.asarray(v) for k, v in arrays.items() if k.startswith("rng/")},
        world_size=attrs["world_size"], meta=json.loads(attrs["meta"]), signed="hmac" in vouched, vouched=vouched,
        digest=hashlib.sha256(manifest.encode()).hexdigest(),
        encrypted=f.encrypted)


def resolve_key(key_file=None):
    """The HMAC key: ``--key-file``'s contents, else ``$MPIRT_CHECKPOINT_KEY``, else None.

    Raises:
        UsageError: a key file that group or others may access (refused as ssh refuses such a
            private key: whoever can read it can sign), an unreadable or empty one, or an empty
            ``MPIRT_CHECKPOINT_KEY`` (:mod:`mpirt.secure.keys`, the one reader of key files).
    """
    from mpirt.secure.keys import secret_from_env, secret_from_file

    return secret_from_file(key_file) if key_file else secret_from_env(CHECKPOINT_KEY)


class CheckpointDir:
    """``DIR/ckpt-{step:08d}.h5``, the newest ``keep`` kept.

    Args:
        background: save in the background (:meth:`save` returns once the state is in host
            memory; :meth:`wait` for it to be on disk), else block until it is.
    """

    def __init__(self, directory, keep=3, key=None, verify=True, background=False):
        self.directory, self.keep, self.key, self.verify = os.fspath(directory), max(1, int(keep)), key, verify
        self.saver = BackgroundSaver() if background else None
        self.saves, self.blocking_s = 0, 0.0  # saves, and what they cost the caller's thread
        self._buffers = {}  # the snapshot of the save before: the next one copies into them

    def save(self, step, before_rename=None, name=None, **fields):
        """Save the checkpoint of ``step`` (``fields``: as for :func:`save`); return its path.

        ``name``: a file name in place of ``ckpt-{step}.h5`` (:data:`BEST`), never pruned by ``keep``.

        Blocking, it is written, fsynced, renamed and the old ones pruned on return. In the
        background, this waits for the save before (at most one in flight: see
        :class:`BackgroundSaver`), copies the state into host memory and returns; the rest runs
        on the saver's thread, ``before_rename`` included, and the file appears under its name
        only once whole: a crash at any point leaves the checkpoints before valid.

        Raises:
            CheckpointError: this save failed (blocking), or the one before did (background).
        """
        t0 = time.perf_counter()
        private_makedirs(self.directory)
        path = os.path.join(self.directory, name or f"ckpt-{int(step):08d}.h5")
        if self.saver is None:
            self._write(path, snapshot(**fields), before_rename)
        else:
            # At most one save in flight (see BackgroundSaver.wait), and waited for before the
            # snapshot: it reuses the buffers the save before writes from.
            self.saver.wait(next_save=True)
            state = snapshot(reuse=self._buffers, **fields)
            self._buffers = state.arrays
            self.saver.submit(path, lambda: self._write(path, state, before_rename))
        self.saves += 1
        self.blocking_s += time.perf_counter() - t0
        return path

    def _write(self, path, state, before_rename):
        _save_state(path, state, self.key, before_rename)
        for old in self.paths()[:-self.keep]:
            os.unlink(old)
        # A writer killed before its rename (a coordinator lost mid-save) left its temporary, which
        # the next save of the same step would remove; the next steps' saves have other names.
        for name in {m.group(1) for m in map(TEMPORARY.match, os.listdir(self.directory)) if m}:
            remove_stale(os.path.join(self.directory, name))

    def wait(self):
        """Wait until the save in flight (if any) is on disk under its name.

        Raises:
            CheckpointError: it failed (one line naming the file); the checkpoints before are intact.
        """
        if self.saver is not None:
            self.saver.wait()

    def close(self):
        """Wait for the save in flight. A failure nobody was told of is logged, not raised: a run that
        ended normally waited (and raised) already, so this closes after another error, not to be hidden."""
        error = self.saver.pending_error() if self.saver is not None else None
        if error is not None:
            from mpirt.log import get_logger

            get_logger("mpirt.checkpoint").error("%s", error)
        self._buffers = {}

    def stats(self):
        """{saves, background, blocking_s, waited, wait_s}: what checkpoints cost the caller."""
        saver = self.saver
        return {"background": saver is not None, "saves": self.saves, "blocking_s": round(self.blocking_s, 4),
                "waited": saver.waited if saver else 0, "wait_s": round(saver.wait_s, 4) if saver else 0.0}

    def paths(self):
        names = [os.path.basename(p) for p in glob.glob(os.path.join(self.directory, "ckpt-*.h5"))]
        return [os.path.join(self.directory, n) for n in sorted(n for n in names if NAME.match(n))]

    def latest(self):
        paths = self.paths()
        return paths[-1] if paths else None

    def best(self):
        path = os.path.join(self.directory, BEST)
        return path if os.path.exists(path) else None

    def load_latest(self):
        path = self.latest()
        return load(path, key=self.key, verify=self.verify) if path else None
