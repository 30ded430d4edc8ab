"""HDF5 checkpoints: atomic, checksummed, optionally signed, loadable on any number of ranks.

Parameters are replicated in data-parallel training, so one file holds the whole state.

Format (schema version 1). Root attributes: ``mpirt_format = "mpirt.checkpoint"``,
``schema_version``, ``spec``, ``position``, ``meta`` (JSON strings), ``world_size``; ``manifest``:
canonical JSON (sorted keys) mapping every dataset path to ``sha256:dtype:shape`` of its raw bytes,
and ``"@attrs"`` to the SHA-256 of the attributes above; ``signature`` (when a key is set):
hex HMAC-SHA256 of the manifest. Groups: ``params/<name>`` one dataset per parameter;
``optimizer/state/<index>/<key>`` (0-d datasets for scalars) with attribute ``param_groups`` (JSON);
``rng/<name>`` uint8 arrays.

Written to a temporary name beside the target, fsynced, renamed (:func:`mpirt.atomic.atomic_path`):
a kill during a save leaves the previous checkpoint as it was.

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
from dataclasses import dataclass

import numpy as np

from mpirt.atomic import atomic_path
from mpirt.config import CHECKPOINT_KEY
from mpirt.errors import CheckpointError, TamperedCheckpointError

FORMAT = "mpirt.checkpoint"
SCHEMA_VERSION = 1
ATTRS = ("spec", "position", "meta", "world_size")
NAME = re.compile(r"^ckpt-(\d{8})\.h5$")


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

    def optimizer_state_dict(self):
        """The optimizer state with torch tensors, for ``Optimizer.load_state_dict``."""
        import torch

        if not self.optimizer:
            return None
        state = {int(i): {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v
                          for k, v in s.items()} for i, s in self.optimizer["state"].items()}
        return {"state": state, "param_groups": self.optimizer["param_groups"]}


def _numpy(x):
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        return x.float().numpy() if str(x.dtype) == "torch.bfloat16" else x.numpy()
    return np.asarray(x)


def save(path, *, spec, params, optimizer=None, position, rng=None, world_size, meta=None, key=None):
    """Write a checkpoint to ``path`` atomically; return ``path``."""

    attrs = {"spec": json.dumps(spec, sort_keys=True), "position": json.dumps(position, sort_keys=True),
             "meta": json.dumps(meta or {}, sort_keys=True, default=str), "world_size": int(world_size)}
    arrays = {f"params/{k}": _numpy(v) for k, v in params.items()}
    groups = []
    if optimizer:
        for i, st in optimizer.get("state", {}).items():
            for k, v in st.items():
                if v is None:  # e.g. SGD's momentum_buffer before the first step
                    continue
                arrays[f"optimizer/state/{int(i)}/{k}"] = _numpy(v)
        groups = optimizer.get("param_groups", [])
    for k, v in (rng or {}).items():
        arrays[f"rng/{k}"] = _numpy(v).astype(np.uint8, copy=False)
    manifest = _manifest(arrays, attrs, json.dumps(groups, sort_keys=True))
    from mpirt.errors import CheckpointError
    from mpirt.outputs import os_error_line

    try:
        _write(path, attrs, arrays, groups, manifest, key)
    except OSError as exc:  # a full disk: one line; the temporary is gone, the checkpoints before intact
        raise CheckpointError(os_error_line(exc, path)) from None
    return path


def _write(path, attrs, arrays, groups, manifest, key):
    from mpirt.outputs import h5_writing

    with atomic_path(path) as tmp:
        with h5_writing(tmp, libver="latest") as f:
            f.attrs["mpirt_format"] = FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            for k, v in attrs.items():
                f.attrs[k] = v
            f.require_group("params")
            f.require_group("optimizer").attrs["param_groups"] = json.dumps(groups, sort_keys=True)
            for name, a in arrays.items():
                f.create_dataset(name, data=a, track_times=False)
            f.attrs["manifest"] = manifest
            if key:
                f.attrs["signature"] = hmac.new(key, manifest.encode(), hashlib.sha256).hexdigest()


def _digest(a):
    a = np.ascontiguousarray(a)
    return f"{hashlib.sha256(memoryview(a).cast('B') if a.size else b'').hexdigest()}:{a.dtype.str}:{list(a.shape)}"


def _manifest(arrays, attrs, groups):
    # hashlib releases the GIL on large buffers: the arrays are hashed on all cores.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        entries = dict(zip(arrays, pool.map(_digest, arrays.values())))
    entries["@attrs"] = hashlib.sha256(json.dumps(attrs, sort_keys=True).encode()).hexdigest()
    entries["@param_groups"] = hashlib.sha256(groups.encode()).hexdigest()
    return json.dumps(entries, sort_keys=True)


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
    import h5py

    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    if not os.path.isfile(path):  # a FIFO or a device would block or stream forever
        raise CheckpointError(f"{path}: not a regular file")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise CheckpointError(f"{path}: not a readable HDF5 file (truncated or corrupted?)") from None
    try:
        with f:
            return _read(path, f, key, verify)
    except (KeyError, ValueError, OSError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc.__class__.__name__}: {exc})") from None


def _check_signature(path, f, manifest, key, verify):
    signature = f.attrs.get("signature")
    if key:
        if signature is None:
            raise TamperedCheckpointError(f"{path}: is not signed but a checkpoint key is set")
        expect = hmac.new(key, manifest.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expect, str(signature)):
            raise TamperedCheckpointError(f"{path}: signature does not match (tampered, or signed with another key)")
    elif signature is not None and verify:
        raise TamperedCheckpointError(f"{path}: signed: give the key (--key-file or {CHECKPOINT_KEY}), "
                                      f"or --no-verify to trust it")
    return signature is not None


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
        # (_digest's ascontiguousarray makes a 0-d array 1-d: a scalar's manifest shape is [1])
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
    signed = _check_signature(path, f, manifest, key, verify)
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
        world_size=attrs["world_size"], meta=json.loads(attrs["meta"]), signed=signed and bool(key))


def resolve_key(key_file=None):
    """The HMAC key: ``--key-file``'s contents, else ``$MPIRT_CHECKPOINT_KEY``, else None.

    Raises:
        UsageError: a key file that group or others may access (refused as ssh refuses such a
            private key: whoever can read it can sign), or an empty ``MPIRT_CHECKPOINT_KEY``.
    """
    from mpirt.errors import UsageError

    if key_file:
        try:
            with open(key_file, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                if mode & 0o077:
                    raise UsageError(f"{key_file}: key file is accessible by group or others "
                                     f"(mode {mode & 0o777:o}); run 'chmod 600 {key_file}'")
                key = f.read(1 << 20).rstrip(b"\r\n")
        except OSError as exc:
            raise CheckpointError(f"{key_file}: cannot read the key file ({exc.strerror})") from None
        if not key:
            raise CheckpointError(f"{key_file}: the key file is empty")
        return key
    env = os.environ.get(CHECKPOINT_KEY)
    if env is not None and not env.strip():  # an unset-by-mistake key must not mean "unsigned"
        raise UsageError(f"{CHECKPOINT_KEY} is set but empty: unset it for unsigned checkpoints, or give the key")
    return env.encode() if env else None


class CheckpointDir:
    """``DIR/ckpt-{step:08d}.h5``, the newest ``keep`` kept."""

    def __init__(self, directory, keep=3, key=None, verify=True):
        self.directory, self.keep, self.key, self.verify = os.fspath(directory), max(1, int(keep)), key, verify

    def save(self, step, **fields):
        os.makedirs(self.directory, exist_ok=True)
        path = save(os.path.join(self.directory, f"ckpt-{int(step):08d}.h5"), key=self.key, **fields)
        for old in self.paths()[:-self.keep]:
            os.unlink(old)
        return path

    def paths(self):
        names = [os.path.basename(p) for p in glob.glob(os.path.join(self.directory, "ckpt-*.h5"))]
        return [os.path.join(self.directory, n) for n in sorted(n for n in names if NAME.match(n))]

    def latest(self):
        paths = self.paths()
        return paths[-1] if paths else None

    def load_latest(self):
        path = self.latest()
        return load(path, key=self.key, verify=self.verify) if path else None
