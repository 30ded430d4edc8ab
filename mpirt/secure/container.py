"""The encrypted container: any mpirt file (an HDF5 data set, checkpoint or output) under AES-256-GCM.

Layout (docs/security.md, "The encrypted container")::

    header   56 bytes: b"MPIRTENC" | version u16 | flags u16 | chunk_size u32 | file_id 16 | key_check 16
                       | trailer_max u32 | reserved u32
    chunks   chunk i at 56 + i * (chunk_size + 28): nonce 12 | ciphertext | GCM tag 16
             (every chunk holds chunk_size plaintext bytes but the last, which may hold fewer)
    trailer  JSON (what the file is, its signatures: readable without the key) | length u32 | b"MPIRTEND"

Each file gets a fresh random ``file_id`` and its own AES key, HKDF-SHA256(secret, salt=file_id), so
nonces (random, 96 bits, fresh for every encryption of a chunk) never meet under one key across
files. Chunk i's associated data is ``SHA-256(header) | i | last``, and the last chunk's also covers
the trailer: a chunk moved to another place or file, a truncated file (its new last chunk was not
written as the last), an edited header or trailer, all fail the tag. ``key_check`` (another HKDF
output) tells a wrong key from a damaged file, without revealing the key.

:class:`EncryptedFile` is a seekable binary file (read, readinto, write, seek, tell, truncate), so
h5py opens it as a file object: HDF5 files are encrypted and decrypted a chunk at a time as HDF5
reads and writes them, never whole in memory and never in clear on disk. Chunks of 64 KiB: a batch
of 64 rows read at random costs one or two chunks' decryption (~10 us each with AES-NI), not a MiB.
"""

import contextlib
import hashlib
import json
import os
import struct
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from mpirt.errors import DataError

MAGIC, END = b"MPIRTENC", b"MPIRTEND"
VERSION = 1
CHUNK = 64 << 10
NONCE, TAG = 12, 16
_HEAD = struct.Struct("<8sHHI16s16sII")
HEADER_BYTES = _HEAD.size  # 56
_TAIL = struct.Struct("<I8s")
CIPHER = "AES-256-GCM"
# Runs of whole chunks read or written in one call are done in bulk: one pread/pwrite for up to
# BULK chunks, their AES-GCM spread over threads (cryptography releases the GIL), no cache.
BULK = 64
_pool = None


def _spread(fn, count):
    """``fn(range)`` over range(count), cut into one contiguous piece per worker when there is
    enough to share (a thread hand-off costs more than a 64 KiB chunk's AES-GCM)."""
    global _pool
    workers = min(4, os.cpu_count() or 1)
    if count < 16 or workers < 2:
        fn(range(count))
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mpirt-aead")
    cuts = [count * w // workers for w in range(workers + 1)]
    for f in [_pool.submit(fn, range(a, b)) for a, b in zip(cuts, cuts[1:])]:
        f.result()


class DecryptError(DataError):
    """A wrong key, or a damaged, tampered or reordered chunk: one line naming the file."""


def is_encrypted(path):
    """Whether ``path`` starts with the container's magic (False for a missing or short file)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _derive(secret, file_id, what):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32 if what == b"key" else 16, salt=file_id,
                info=b"mpirt container v1 " + what).derive(secret)


def read_trailer(path):
    """(header fields, trailer dict) of an encrypted file, without the key (not authenticated:
    :class:`EncryptedFile` checks both against the tags when it reads the file with the key).

    Raises:
        DecryptError: not a container, or its header or trailer is unreadable.
    """
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        size = os.fstat(f.fileno()).st_size
        fields = _parse_header(path, head)
        if size < HEADER_BYTES + _TAIL.size:
            raise DecryptError(f"{path}: encrypted file is truncated (no trailer)")
        f.seek(size - _TAIL.size)
        n, end = _TAIL.unpack(f.read(_TAIL.size))
        if end != END or n > fields["trailer_max"] or n > size - HEADER_BYTES - _TAIL.size:
            raise DecryptError(f"{path}: encrypted file is truncated or damaged (no valid trailer)")
        f.seek(size - _TAIL.size - n)
        raw = f.read(n)
    fields["trailer_raw"] = raw  # what the last chunk's tag covers
    try:
        return fields, json.loads(raw)
    except ValueError:
        raise DecryptError(f"{path}: encrypted file's trailer is not JSON (damaged)") from None


def _parse_header(path, head):
    if len(head) < HEADER_BYTES or not head.startswith(MAGIC):
        raise DecryptError(f"{path}: not an mpirt encrypted file")
    _, version, flags, chunk, file_id, check, trailer_max, _ = _HEAD.unpack(head)
    if version != VERSION:
        raise DecryptError(f"{path}: encrypted container version {version}, this mpirt reads {VERSION}")
    if not 4096 <= chunk <= 64 << 20:
        raise DecryptError(f"{path}: encrypted file's header is damaged (chunk size {chunk})")
    return {"version": version, "flags": flags, "chunk": chunk, "file_id": file_id, "key_check": check,
            "trailer_max": trailer_max, "raw": head}


class EncryptedFile:
    """A container file opened for reading (``"r"``) or writing a new one (``"w"``).

    Writing keeps up to ``cache_chunks`` chunks in clear in memory; a chunk pushed out is encrypted
    to disk, and read back (decrypted) if HDF5 writes into it again. :meth:`close` encrypts what
    is left, the last chunk marked last, and the trailer. Reading keeps the last ``cache_chunks``
    chunks decrypted.

    Args:
        path: the file (for writing, a new temporary name: the caller renames it).
        secret: the key's bytes (any length; each file's AES key is derived from it).
        trailer: (writing) a dict, or a function called at close that returns one: what the file is
            and its signatures, shown by ``mpirt inspect`` without the key.
    """

    def __init__(self, path, mode, secret, trailer=None, cache_chunks=256, chunk=CHUNK):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if mode not in ("r", "w"):
            raise ValueError(f"mode {mode!r}")
        self.path, self.mode, self.pos, self.closed = os.fspath(path), mode, 0, False
        self._cache, self._cache_max = OrderedDict(), max(2, int(cache_chunks))
        self._scratch = bytearray()  # the ciphertext of bulk reads and writes, reused
        self._trailer = trailer
        if mode == "w":
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            file_id = os.urandom(16)
            self.chunk = int(chunk)
            head = _HEAD.pack(MAGIC, VERSION, 0, self.chunk, file_id, _derive(secret, file_id, b"check"),
                              1 << 20, 0)
            os.pwrite(self._fd, head, 0)
            self.size = 0  # plaintext bytes
            self._stored = {}  # chunk index -> plaintext length of its copy on disk
            self._dirty = set()
            self._head_digest = hashlib.sha256(head).digest()
            self._aead = AESGCM(_derive(secret, file_id, b"key"))
        else:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._open_read(secret, AESGCM)
            except BaseException:
                os.close(self._fd)
                raise

    def _open_read(self, secret, AESGCM):
        fields, self.trailer = read_trailer(self.path)
        self._trailer_raw = fields["trailer_raw"]
        file_id, self.chunk = fields["file_id"], fields["chunk"]
        if _derive(secret, file_id, b"check") != fields["key_check"]:
            raise DecryptError(f"{self.path}: wrong key (the file was encrypted with another one)")
        body = os.fstat(self._fd).st_size - HEADER_BYTES - _TAIL.size - len(self._trailer_raw)
        step = self.chunk + NONCE + TAG
        self.n_chunks = -(-body // step)
        last_len = body - (self.n_chunks - 1) * step - NONCE - TAG if self.n_chunks else -1
        if self.n_chunks == 0 or last_len < 0:
            raise DecryptError(f"{self.path}: encrypted file is truncated (no complete last chunk)")
        self.size = (self.n_chunks - 1) * self.chunk + last_len
        self._head_digest = hashlib.sha256(fields["raw"]).digest()
        self._aead = AESGCM(_derive(secret, file_id, b"key"))
        # The last chunk, now: its tag covers the trailer and says it is the last, so a cut or a
        # changed trailer is refused at open, not whenever a reader reaches the end.
        self._load(self.n_chunks - 1)

    # -- the chunks -------------------------------------------------------------
    def _aad(self, i, last):
        aad = self._head_digest + struct.pack("<QB", i, int(last))
        return aad + hashlib.sha256(self._trailer_raw).digest() if last else aad

    def _offset(self, i):
        return HEADER_BYTES + i * (self.chunk + NONCE + TAG)

    def _load(self, i):
        """Chunk ``i`` in clear (a bytearray; cached)."""
        data = self._cache.get(i)
        if data is not None:
            self._cache.move_to_end(i)
            return data
        if self.mode == "w":
            n = self._stored.get(i)
            data = bytearray(self._decrypt(i, os.pread(self._fd, n + NONCE + TAG, self._offset(i)), False)) \
                if n is not None else bytearray()
        else:
            n = self.chunk if i < self.n_chunks - 1 else self.size - i * self.chunk
            data = self._decrypt(i, os.pread(self._fd, n + NONCE + TAG, self._offset(i)), i == self.n_chunks - 1)
        self._cache[i] = data
        while len(self._cache) > self._cache_max:
            self._evict()
        return data

    def _decrypt(self, i, blob, last):
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead.decrypt(blob[:NONCE], blob[NONCE:], self._aad(i, last))
        except (InvalidTag, ValueError):
            raise DecryptError(f"{self.path}: chunk {i} failed authentication (tampered, reordered or "
                               f"truncated file)") from None

    def _encrypt_to_disk(self, i, data, last):
        nonce = os.urandom(NONCE)
        blob = nonce + self._aead.encrypt(nonce, data, self._aad(i, last))
        view, at = memoryview(blob), self._offset(i)
        while view:
            n = os.pwrite(self._fd, view, at)
            view, at = view[n:], at + n
        self._stored[i] = len(data)

    def _evict(self):
        i, data = self._cache.popitem(last=False)
        if self.mode == "w" and i in self._dirty:
            self._dirty.discard(i)
            self._encrypt_to_disk(i, data, last=False)

    # -- the file interface h5py uses --------------------------------------------
    def readable(self):
        return True

    def writable(self):
        return self.mode == "w"

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, buf):
        out = memoryview(buf).cast("B")
        n = max(0, min(len(out), self.size - self.pos))
        done = 0
        while done < n:
            i, at = divmod(self.pos + done, self.chunk)
            whole = min((n - done) // self.chunk, BULK, self.n_chunks - 1 - i) if self.mode == "r" and not at else 0
            if whole >= 2 and i not in self._cache:
                self._read_whole(i, whole, out[done:done + whole * self.chunk])
                done += whole * self.chunk
                continue
            data = self._load(i)
            k = min(n - done, len(data) - at)
            if k <= 0:  # a hole HDF5 never wrote (writing mode): zeros, as a sparse file reads
                k = min(n - done, self.chunk - at)
                out[done:done + k] = bytes(k)
            else:
                out[done:done + k] = data[at:at + k]
            done += k
        self.pos += n
        return n

    def read(self, n=-1):
        n = self.size - self.pos if n is None or n < 0 else n
        buf = bytearray(max(0, min(n, self.size - self.pos)))
        got = self.readinto(buf)
        return bytes(buf[:got])

    def _read_whole(self, i, count, out):
        """Chunks [i, i + count), none of them the last, decrypted straight into ``out``."""
        step = self.chunk + NONCE + TAG
        if len(self._scratch) < count * step:
            self._scratch = bytearray(count * step)
        blob = memoryview(self._scratch)[:count * step]
        got = os.preadv(self._fd, [blob], self._offset(i))
        if got < count * step:
            raise DecryptError(f"{self.path}: chunk {i + got // step} is cut short (truncated file)")

        def some(ks):
            from cryptography.exceptions import InvalidTag

            for k in ks:
                piece = blob[k * step:(k + 1) * step]
                try:
                    self._aead.decrypt_into(piece[:NONCE], piece[NONCE:], self._aad(i + k, False),
                                            out[k * self.chunk:(k + 1) * self.chunk])
                except (InvalidTag, ValueError):
                    raise DecryptError(f"{self.path}: chunk {i + k} failed authentication (tampered, reordered "
                                       f"or truncated file)") from None

        _spread(some, count)

    def _write_whole(self, i, src):
        """Encrypt whole chunks (``src``: a multiple of the chunk size) straight to disk as chunks i, ..."""
        count = len(src) // self.chunk
        step = self.chunk + NONCE + TAG
        if len(self._scratch) < count * step:
            self._scratch = bytearray(count * step)
        out = memoryview(self._scratch)[:count * step]

        def some(ks):
            for k in ks:
                nonce = os.urandom(NONCE)
                out[k * step:k * step + NONCE] = nonce
                self._aead.encrypt_into(nonce, src[k * self.chunk:(k + 1) * self.chunk], self._aad(i + k, False),
                                        out[k * step + NONCE:(k + 1) * step])

        _spread(some, count)
        view, at = out, self._offset(i)
        while view:
            n = os.pwrite(self._fd, view, at)
            view, at = view[n:], at + n
        # Start the write-back of this range now, as the plain checkpoint writer does: the fsync
        # before the rename then waits for little. Advice only.
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(self._fd, self._offset(i), len(out), os.POSIX_FADV_DONTNEED)
        for k in range(i, i + count):
            self._stored[k] = self.chunk
            self._dirty.discard(k)

    def write(self, buf):
        if self.mode != "w":
            raise OSError(f"{self.path}: opened for reading")
        src = memoryview(buf).cast("B")
        done = 0
        while done < len(src):
            i, at = divmod(self.pos + done, self.chunk)
            whole = 0 if at else min((len(src) - done) // self.chunk, BULK)
            while whole and any(j in self._cache for j in range(i, i + whole)):
                whole -= 1  # a chunk in the cache holds bytes of its own: through the cache
            if whole >= 2:
                self._write_whole(i, src[done:done + whole * self.chunk])
                done += whole * self.chunk
                continue
            k = min(len(src) - done, self.chunk - at)
            data = self._load(i)
            if len(data) < at:
                data.extend(bytes(at - len(data)))
            data[at:at + k] = src[done:done + k]
            self._dirty.add(i)
            done += k
        self.pos += len(src)
        self.size = max(self.size, self.pos)
        return len(src)

    def truncate(self, size=None):
        size = self.pos if size is None else int(size)
        if self.mode == "w":
            last = size // self.chunk
            for i in [j for j in self._cache if j * self.chunk >= size and j > 0]:
                del self._cache[i]
                self._dirty.discard(i)
            for j in [j for j in self._stored if j * self.chunk >= size and j > 0]:
                del self._stored[j]
            if size % self.chunk or last == 0:
                data = self._load(last)
                del data[size - last * self.chunk:]
                self._dirty.add(last)
            self.size = size
        return size

    def flush(self):
        pass

    def close(self):
        """Writing: encrypt what is left, the last chunk marked last, then the trailer."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.mode == "w":
                self._finish()
        finally:
            os.close(self._fd)

    def _finish(self):
        trailer = self._trailer() if callable(self._trailer) else (self._trailer or {})
        trailer = dict(trailer, cipher=CIPHER, plaintext_bytes=self.size, chunk_bytes=self.chunk)
        self._trailer_raw = json.dumps(trailer, sort_keys=True).encode()
        n = max(1, -(-self.size // self.chunk))
        for i in range(n - 1):  # every chunk but the last must be whole on disk
            if i in self._dirty or self._stored.get(i) != self.chunk:
                data = self._load(i)
                data.extend(bytes(self.chunk - len(data)))
                self._dirty.discard(i)
                self._encrypt_to_disk(i, data, last=False)
        data = self._load(n - 1)
        keep = self.size - (n - 1) * self.chunk
        del data[keep:]
        data.extend(bytes(keep - len(data)))  # a file extended by truncate() past what was written
        self._encrypt_to_disk(n - 1, data, last=True)
        at = self._offset(n - 1) + NONCE + len(data) + TAG
        tail = self._trailer_raw + _TAIL.pack(len(self._trailer_raw), END)
        os.pwrite(self._fd, tail, at)
        os.ftruncate(self._fd, at + len(tail))
        self._cache.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
