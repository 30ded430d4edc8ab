"""Key files: the shared secret (encryption, HMAC) and Ed25519 key pairs (``mpirt keygen``).

A private key file (the secret, or an Ed25519 private key) that group or others may access is
refused, as ssh refuses such a key: whoever can read it can decrypt and sign. Keys are created
0600 with O_EXCL (never over an existing file, never through a planted symlink). A key never comes
from a flag's value: ``ps`` shows every process's command line to every user.
"""

import base64
import hashlib
import os
import stat

from mpirt.errors import UsageError

SECRET_BYTES = 32
MAX_KEY_FILE = 1 << 20


def read_private(path, what="key file"):
    """The bytes of a private key file, refused if group or others may access it.

    Raises:
        UsageError: the file is missing or unreadable, empty, not a regular file, or too open.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: a symlink, refused like ssh does for a key it cannot trust
            raise UsageError(f"{path}: {what} is a symbolic link; give the file itself") from None
        raise UsageError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path}: {what} is not a regular file")
        if st.st_mode & 0o077:
            raise UsageError(f"{path}: {what} is accessible by group or others (mode {st.st_mode & 0o777:o}); "
                             f"run 'chmod 600 {path}'")
        data = f.read(MAX_KEY_FILE)
    if not data.strip():
        raise UsageError(f"{path}: the {what} is empty")
    return data


def secret_from_file(path):
    """A secret key file's key: its bytes without the trailing newline."""
    return read_private(path, "key file").rstrip(b"\r\n")


def secret_from_env(name):
    """The secret in environment variable ``name``, or None when unset.

    Raises:
        UsageError: set but empty (an unset-by-mistake key must not mean "no key").
    """
    value = os.environ.get(name)
    if value is None:
        return None
    if not value.strip():
        raise UsageError(f"{name} is set but empty: unset it, or give the key")
    return value.encode()


def write_new(path, data, mode=0o600):
    """Create ``path`` holding ``data``, exclusively (never over a file or through a symlink).

    Raises:
        UsageError: ``path`` exists, or its directory cannot be written.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise UsageError(f"{path}: exists; keys are never overwritten (remove it first)") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot create it ({exc.strerror})") from None
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow what a key file is
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def new_secret(path):
    """Write a new random secret (32 bytes, hex) to ``path``, 0600."""
    write_new(path, os.urandom(SECRET_BYTES).hex().encode() + b"\n")


def new_keypair(path):
    """Write a new Ed25519 private key to ``path`` (PEM, 0600) and its public key to ``path.pub``
    (PEM, 0644); return the public key's fingerprint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if os.path.lexists(path + ".pub"):
        raise UsageError(f"{path}.pub: exists; keys are never overwritten (remove it first)")
    write_new(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    write_new(path + ".pub", public, 0o644)
    return fingerprint(key.public_key())


def load_private(path):
    """An Ed25519 private key from a PEM file (``mpirt keygen``), permissions checked."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if os.fspath(path).endswith(".pub"):  # before its mode: chmod 600 on a public key would not help
        raise UsageError(f"{path}: is a public key; --sign-key takes the private key (KEY, not KEY.pub)")
    data = read_private(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise UsageError(f"{path}: not an unencrypted PEM private key (make one with 'mpirt keygen')") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path}: not an Ed25519 key (make one with 'mpirt keygen')")
    return key


def load_public(path):
    """An Ed25519 public key from a PEM file (``KEY.pub`` of ``mpirt keygen``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the public key ({exc.strerror})") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise UsageError(f"{path}: not a PEM public key (give the KEY.pub that 'mpirt keygen' wrote)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{path}: not an Ed25519 public key")
    return key


def raw_public(key):
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key):
    """``SHA256:<base64>`` of the raw public key, as ssh prints a key's fingerprint."""
    raw = key if isinstance(key, bytes) else raw_public(key)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")
