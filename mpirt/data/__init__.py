"""The HDF5 data set: format, preparation, verification and the reader.

Import-light on purpose: nothing here imports h5py or numpy until a name is used
(``from mpirt.data import open_dataset`` is cheap; calling it loads h5py).

    from mpirt.data import open_dataset
    with open_dataset("data.h5") as ds:
        batch = ds.split("train").read(0, 256)
"""

_LAZY = {
    "open_dataset": "mpirt.data.reader",
    "Dataset": "mpirt.data.reader",
    "Split": "mpirt.data.reader",
    "Batch": "mpirt.data.reader",
}
# (Full verification is mpirt.data.verify.verify: a name here would be shadowed by the submodule.)


def open_dataset(path, verify_header=True):
    """Open an mpirt data set read-only; see :func:`mpirt.data.reader.open_dataset`."""
    from mpirt.data.reader import open_dataset as _open

    return _open(path, verify_header=verify_header)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mpirt.data' has no attribute '{name}'")


__all__ = list(_LAZY)
