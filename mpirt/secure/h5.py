"""HDF5 files through the policy: ``File(path, "r")`` reads a plain or an encrypted file alike;
``create(path, content)`` writes an encrypted one when the policy says so.

An h5py.File subclass, so every caller keeps h5py's interface, and closing the HDF5 file closes
(and, when writing, completes) the container under it.
"""

import h5py

from mpirt.secure.container import DecryptError, EncryptedFile, is_encrypted


class File(h5py.File):
    """An HDF5 file on ``path``, decrypted (``"r"``) or encrypted (``"w"`` with ``secret``) on the fly.

    Args:
        secret: the key (reading: default the policy's). Writing: encrypt with it; None writes plain.
        trailer: writing, encrypted: what ``mpirt inspect`` shows without the key (a dict, or a
            function called at close).
        kwargs: h5py.File's (``locking`` is dropped for an encrypted file: nothing to lock).
    """

    def __init__(self, path, mode="r", secret=None, trailer=None, **kwargs):
        self._container, self._signed = None, {}
        if mode == "r" and is_encrypted(path):
            from mpirt.config import DATA_KEY
            from mpirt.secure.policy import current

            secret = secret or current().secret
            if not secret:
                raise DecryptError(f"{path}: is encrypted; give its key (--key-file FILE or {DATA_KEY})")
            self._container = EncryptedFile(path, "r", secret)
        elif mode == "w" and secret:
            self._container = EncryptedFile(path, "w", secret, trailer=trailer)
        elif mode not in ("r", "w"):
            raise ValueError(f"mode {mode!r}")
        if self._container is None:
            super().__init__(path, mode, **kwargs)
            return
        kwargs.pop("locking", None)
        try:
            super().__init__(self._container, mode, **kwargs)
        except BaseException:
            self._container.close()
            raise

    def add_signature(self, attrs):
        """Write signature attributes (:func:`mpirt.secure.sign.sign`); an encrypted file's trailer
        repeats who signed, for ``mpirt inspect`` without the key."""
        for k, v in attrs.items():
            self.attrs[k] = v
        self._signed.update(attrs)

    @property
    def encrypted(self):
        return self._container is not None

    @property
    def trailer(self):
        """An encrypted file's trailer as read (None for a plain file or one being written)."""
        return getattr(self._container, "trailer", None)

    def close(self):
        try:
            super().close()
        finally:
            if self._container is not None:
                self._container.close()


def create(path, content, **kwargs):
    """A new HDF5 file at ``path`` (a temporary name), encrypted if the policy says ``encrypt``.

    ``content``: what the file is (``mpirt.dataset``, ``mpirt.checkpoint``, ``predictions``...), in the
    trailer of an encrypted file together with its signatures (:func:`signed_trailer`).
    """
    from mpirt.secure.policy import current

    policy = current()
    if not policy.encrypt:
        return File(path, "w", **kwargs)
    # The trailer is made at close, when the signatures are known (f is bound by then).
    f = File(path, "w", secret=policy.secret, trailer=lambda: signed_trailer(content, f._signed), **kwargs)
    return f


def signed_trailer(content, attrs):
    """The trailer of an encrypted file: what it is and who signed it (not secret: no key needed)."""
    from mpirt.secure.sign import describe

    return {"content": content, "signed": describe(attrs)}


__all__ = ["File", "create", "DecryptError"]
