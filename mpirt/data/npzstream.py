"""Row blocks of the arrays inside an ``.npz`` without loading them whole.

An ``.npz`` is a zip of ``.npy`` files; each member is opened as a stream (deflate
included, for ``savez_compressed``), its header parsed with ``numpy.lib.format``, and
rows read a block at a time. Only Fortran-ordered arrays (rows not contiguous) are
loaded whole.
"""

import zipfile
import zlib

import numpy as np

from mpirt.errors import DataError


class NpzArrays:
    """The arrays of one ``.npz`` file, readable a block of rows at a time (a context manager).

    Args:
        path: the file.

    Raises:
        DataError: missing, not a zip/npz, or a member that is not a plain .npy array.
    """

    def __init__(self, path):
        self.path = str(path)
        try:
            self.zip = zipfile.ZipFile(self.path)
        except FileNotFoundError:
            raise DataError(f"{self.path}: no such file") from None
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{self.path}: not a readable .npz file ({exc})") from None
        self.names = [n[:-4] for n in self.zip.namelist() if n.endswith(".npy")]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.zip.close()

    def header(self, name):
        """(shape, dtype, fortran_order) of array ``name``."""
        with self._open(name) as f:
            return self._header(f, name)

    def _open(self, name):
        if name not in self.names:
            raise DataError(f"{self.path}: no array '{name}' (need X and y; it has {', '.join(self.names) or 'none'})")
        return self.zip.open(name + ".npy")

    def _header(self, f, name):
        fmt = np.lib.format
        try:
            version = fmt.read_magic(f)
            # Versions 2.0 and 3.0 differ from 1.0 only in the header length field (and 3.0 in an
            # encoding that matters only for exotic structured dtypes, which are refused anyway).
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise DataError(f"{self.path}: array '{name}' is not a readable .npy ({exc})") from None
        if dtype.hasobject:
            raise DataError(f"{self.path}: array '{name}' holds Python objects; save numbers or strings")
        return tuple(shape), dtype, fortran

    def blocks(self, name, max_bytes=16 << 20):
        """Yield consecutive row blocks of array ``name`` (each about ``max_bytes``)."""
        with self._open(name) as f:
            shape, dtype, fortran = self._header(f, name)
            n = shape[0] if shape else 0
            row_items = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            row_bytes = max(row_items * dtype.itemsize, 1)
            if fortran and len(shape) > 1:
                # Column-major: a row is scattered over the file, so this one is read whole.
                data = np.frombuffer(self._read(f, name, n * row_bytes), dtype=dtype)
                arr = data.reshape(shape[::-1]).transpose()
                for a in range(0, n, max(1, max_bytes // row_bytes)):
                    yield np.ascontiguousarray(arr[a:a + max(1, max_bytes // row_bytes)])
                return
            step = max(1, max_bytes // row_bytes)
            for a in range(0, n, step):
                k = min(step, n - a)
                buf = self._read(f, name, k * row_bytes)
                yield np.frombuffer(buf, dtype=dtype).reshape((k, *shape[1:]))

    def _read(self, f, name, nbytes):
        try:
            buf = f.read(nbytes)
        except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as exc:  # truncated or corrupt member
            raise DataError(f"{self.path}: array '{name}' cannot be read ({exc})") from None
        if len(buf) != nbytes:
            raise DataError(f"{self.path}: array '{name}' is truncated")
        return buf
