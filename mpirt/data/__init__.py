"""The HDF5 data set: format, preparation, verification and the reader.

Import-light on purpose: ``open_dataset`` imports h5py only when called.
"""


def open_dataset(path, verify_header=True):
    """Open an mpirt data set read-only; see :mod:`mpirt.data.reader`."""
    from mpirt.data.reader import open_dataset as _open

    return _open(path, verify_header=verify_header)


__all__ = ["open_dataset"]
