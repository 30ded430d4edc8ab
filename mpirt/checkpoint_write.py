"""Writing a checkpoint file (format: :mod:`mpirt.checkpoint`): a host snapshot, then the file.

:func:`snapshot` turns the training state into host numpy arrays plus the JSON attributes. With
``reuse`` (the background save) it copies every tensor into the buffers of the save before, the
only part a background save does in the training thread; without (a blocking save) the arrays
are views of the live tensors, no copy.

:func:`write` lays the file out, then fills it. Why not ``create_dataset(data=...)`` per array, as
before: that was 0.44x raw h5py (bench/RESULTS.md), as SHA-256 of every array (~60 ms per 100 MB
here), the HDF5 write and the fsync ran one after the other, and h5py holds the GIL (and its own
lock, which the training thread's data reads wait on) for the whole write. Now h5py only declares
the datasets (contiguous, allocated at creation, never filled) and reads their file offsets; the
bytes go in with ``os.pwrite`` while one helper thread hashes them (both release the GIL, so on two
cores they overlap), and each range is handed to the kernel's write-back as soon as it is written
(``posix_fadvise(DONTNEED)``), so the final fsync finds little left and the checkpoint does not
evict the data set from the page cache. Measured figures: bench/results/checkpoint-2core.md.
"""

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

FORMAT = "mpirt.checkpoint"
SCHEMA_VERSION = 1


@dataclass
class State:
    """What a checkpoint file holds: ``arrays`` (dataset path -> C-contiguous host array), ``attrs``
    (the root attributes of :data:`mpirt.checkpoint.ATTRS`, JSON strings) and ``groups`` (the
    optimizer's ``param_groups`` as JSON)."""

    arrays: dict
    attrs: dict
    groups: str


def snapshot(*, spec, params, optimizer=None, position, rng=None, world_size, meta=None, reuse=None):
    """The :class:`State` of a checkpoint.

    Args:
        reuse: None: arrays are views of the tensors where they can be (the caller writes before the
            tensors change). A dict (the arrays of the save before, kept by the caller): every array
            is copied, into the buffer of the same name when its shape and dtype match, so the
            tensors may change as soon as this returns.
    """
    attrs = {"spec": json.dumps(spec, sort_keys=True), "position": json.dumps(position, sort_keys=True),
             "meta": json.dumps(meta or {}, sort_keys=True, default=str), "world_size": int(world_size)}
    tensors = {f"params/{k}": v for k, v in params.items()}
    groups = []
    if optimizer:
        for i, st in optimizer.get("state", {}).items():
            for k, v in st.items():
                if v is None:  # e.g. SGD's momentum_buffer before the first step
                    continue
                tensors[f"optimizer/state/{int(i)}/{k}"] = v
        groups = optimizer.get("param_groups", [])
    arrays = {name: _host(v, None if reuse is None else reuse.get(name), copy=reuse is not None)
              for name, v in tensors.items()}
    for k, v in (rng or {}).items():
        a = _host(v, None, copy=reuse is not None)
        arrays[f"rng/{k}"] = a.astype(np.uint8, copy=False)
    return State(arrays, attrs, json.dumps(groups, sort_keys=True))


def _host(x, buf, copy):
    """``x`` (a tensor, array or number) as a C-contiguous host array; a copy (into ``buf`` when it
    fits) if ``copy``."""
    if hasattr(x, "detach"):
        import torch

        x = x.detach()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16: stored as float32, as before
            x = x.float()
        dtype = torch.empty((), dtype=x.dtype).numpy().dtype
        if not copy and x.device.type == "cpu":
            return _contiguous(x.numpy())
        if buf is None or buf.shape != tuple(x.shape) or buf.dtype != dtype:
            buf = np.empty(tuple(x.shape), dtype)
        torch.from_numpy(buf).copy_(x)  # torch's copy runs on its intra-op threads
        return buf
    a = np.asarray(x)
    if not copy:
        return _contiguous(a)
    if buf is None or buf.shape != a.shape or buf.dtype != a.dtype:
        buf = np.empty(a.shape, a.dtype)
    np.copyto(buf, a)
    return buf


def _contiguous(a):
    # not np.ascontiguousarray: it makes a 0-d array 1-d, and a scalar is stored 0-d
    return a if a.flags.c_contiguous else a.copy(order="C")


def digest(a):
    """``sha256:dtype:shape`` of an array's bytes, as the manifest records it."""
    a = np.ascontiguousarray(a)
    return f"{hashlib.sha256(memoryview(a).cast('B') if a.size else b'').hexdigest()}:{a.dtype.str}:{list(a.shape)}"


def manifest(digests, attrs, groups):
    """The manifest (canonical JSON) from the arrays' digests, the attributes and the param groups."""
    entries = dict(digests)
    entries["@attrs"] = hashlib.sha256(json.dumps(attrs, sort_keys=True).encode()).hexdigest()
    entries["@param_groups"] = hashlib.sha256(groups.encode()).hexdigest()
    return json.dumps(entries, sort_keys=True)


def write(tmp, state, key=None):
    """Write ``state`` into the new file ``tmp`` (the caller renames it), manifest and signatures last.

    Encrypted (the policy's ``encrypt``), the arrays go through h5py into the container, which
    encrypts them a chunk at a time; plain, they are written at their file offsets (:func:`_fill`).
    """
    from mpirt.outputs import h5_writing
    from mpirt.secure.policy import current

    encrypted = current().encrypt
    with h5_writing(tmp, content=FORMAT, libver="latest") as f:
        f.attrs["mpirt_format"] = FORMAT
        f.attrs["schema_version"] = SCHEMA_VERSION
        for k, v in state.attrs.items():
            f.attrs[k] = v
        f.require_group("params")
        f.require_group("optimizer").attrs["param_groups"] = state.groups
        # One hashing thread beside this one's writes: hashlib releases the GIL for large buffers.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpirt-ckpt-hash") as pool:
            digests = pool.map(digest, state.arrays.values())
            if encrypted:
                for name, a in state.arrays.items():
                    f.create_dataset(name, data=a, track_times=False)
            else:
                _fill(tmp, f, state.arrays, _layout(f, state.arrays))
            text = manifest(zip(state.arrays, digests), state.attrs, state.groups)
        f.attrs["manifest"] = text
        f.add_signature(sign_manifest(text, key))


def sign_manifest(text, key):
    """The signature attributes of a checkpoint whose manifest is ``text``: ``signature`` (HMAC of
    the manifest with the checkpoint key, as schema 1 always had it) and the policy's Ed25519 one."""
    from mpirt.secure.policy import current
    from mpirt.secure.sign import sign

    return sign("checkpoint", hashlib.sha256(text.encode()).hexdigest(), key, current().signing_key,
                hmac_message=text.encode())


def _layout(f, arrays):
    """Declare every dataset, contiguous and allocated now; {name: its byte offset in the file, or
    None where HDF5 gives none (0-d and empty datasets: written through h5py)}."""
    import h5py

    offsets = {}
    for name, a in arrays.items():
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.CONTIGUOUS)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # a fill would write every byte twice
        d = f.create_dataset(name, shape=a.shape, dtype=a.dtype, dcpl=dcpl, track_times=False)
        offsets[name] = d.id.get_offset() if a.size else None
    return offsets


def _fill(tmp, f, arrays, offsets):
    fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for name, a in arrays.items():
            at = offsets[name]
            if at is None:
                if a.size:
                    f[name][()] = a
                continue
            view = memoryview(a).cast("B")
            while view:  # pwrite may write less than asked (a signal, a nearly full disk)
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            # Start the write-back of this range now: the fsync before the rename then waits for
            # less, and the pages are dropped once clean instead of evicting the data set. Advice
            # only: a filesystem that refuses it loses nothing.
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(fd, offsets[name], a.nbytes, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
