"""What this process encrypts, signs, verifies and requires: set once from the command line.

Readers deep in the stack (every rank's data set reader, the checkpoint loader) decrypt and verify
without each call site passing keys: the command's handler calls :func:`configure` first, as a
program configures logging. A process that never configures (a test, a library user) gets the
environment's settings: ``MPIRT_DATA_KEY`` decrypts, nothing else is checked.
"""

import os
from dataclasses import dataclass, field

from mpirt.config import DATA_KEY


@dataclass
class Policy:
    """Attributes:
        secret: the shared secret (``--key-file``, else ``MPIRT_DATA_KEY``): decrypts encrypted
            inputs, encrypts outputs with ``encrypt``, HMAC-signs data sets and outputs.
        encrypt: write outputs in the encrypted container.
        signing_key: an Ed25519 private key (``--sign-key``): outputs are signed with it.
        verify_keys: {fingerprint: raw public key} (``--verify-key``): whose signatures are trusted.
        require_signature: refuse an input no trusted key or secret has signed.
        private: create files 0600 and directories 0700 (``--private``, and always with ``encrypt``).
    """

    secret: bytes = None
    encrypt: bool = False
    signing_key: object = None
    verify_keys: dict = field(default_factory=dict)
    require_signature: bool = False
    private: bool = False

    @property
    def signer(self):
        from mpirt.secure.keys import fingerprint

        return fingerprint(self.signing_key.public_key()) if self.signing_key is not None else None


_current = None


def current():
    """The policy set by :func:`configure`, else one from the environment."""
    global _current
    if _current is None:
        from mpirt.secure.keys import secret_from_env

        _current = Policy(secret=secret_from_env(DATA_KEY))
    return _current


def set_policy(policy):
    """Make ``policy`` this process's (None: back to the environment's); return the one before."""
    global _current
    before, _current = _current, policy
    return before


def configure(args):
    """Build and set this process's policy from a command's flags (:func:`add_flags`).

    Raises:
        UsageError: a key file that is missing, too open or not a key; ``--encrypt`` without a
            secret; ``--require-signature`` with nothing to verify against.
    """
    from mpirt.errors import UsageError
    from mpirt.secure.keys import fingerprint, load_private, load_public, raw_public, secret_from_env, secret_from_file

    key_file = getattr(args, "key_file", None)
    secret = secret_from_file(key_file) if key_file else secret_from_env(DATA_KEY)
    encrypt = bool(getattr(args, "encrypt", False))
    if encrypt and not secret:
        raise UsageError(f"--encrypt needs a key: give --key-file FILE (make one with 'mpirt keygen --secret FILE') "
                         f"or set {DATA_KEY}")
    verify = {}
    for path in getattr(args, "verify_key", None) or ():
        key = load_public(path)
        verify[fingerprint(key)] = raw_public(key)
    require = bool(getattr(args, "require_signature", False))
    if require and not verify and not secret:
        raise UsageError("--require-signature needs something to verify with: --verify-key KEY.pub or --key-file")
    sign_key = getattr(args, "sign_key", None)
    policy = Policy(secret=secret, encrypt=encrypt, signing_key=load_private(sign_key) if sign_key else None,
                    verify_keys=verify, require_signature=require,
                    private=encrypt or bool(getattr(args, "private", False)))
    set_policy(policy)
    return policy


def add_flags(parser, outputs=True, signing=True, key_file=True):
    """The security flags of a command that reads mpirt files (and with ``outputs``, writes them).

    ``key_file``: add ``--key-file`` (False where the command defines it with its own help)."""
    g = parser.add_argument_group("protection at rest (docs/security.md)")
    if key_file:
        g.add_argument("--key-file", metavar="FILE",
                       help=f"the secret key (0600): decrypts encrypted inputs, checks and makes HMAC signatures "
                            f"(or {DATA_KEY})")
    g.add_argument("--verify-key", action="append", metavar="KEY.pub",
                   help="trust Ed25519 signatures by this public key (repeatable); others are refused")
    g.add_argument("--require-signature", action="store_true",
                   help="refuse inputs not signed by a --verify-key key or the --key-file secret")
    if outputs:
        g.add_argument("--encrypt", action="store_true", help="encrypt outputs (AES-256-GCM) with the secret key")
        if signing:
            g.add_argument("--sign-key", metavar="KEY", help="sign outputs with this Ed25519 private key (mpirt keygen)")
        g.add_argument("--private", action="store_true",
                       help="create outputs 0600 and directories 0700 (always so with --encrypt)")


def private_dir_mode():
    return 0o700 if current().private else 0o777


def makedirs(path):
    """``os.makedirs`` with the policy's mode (0700 for private runs) for the directories it creates."""
    os.makedirs(path, mode=private_dir_mode(), exist_ok=True)


def spawn_options(args):
    """The security flags of ``args`` as (flag, value) pairs with absolute paths: what a joining
    rank (the same command, spawned) must be given to read and write as the job does."""
    absolute = lambda p: os.path.abspath(p) if p else None  # noqa: E731
    options = [("--key-file", absolute(getattr(args, "key_file", None))),
               ("--sign-key", absolute(getattr(args, "sign_key", None))),
               ("--encrypt", bool(getattr(args, "encrypt", False))),
               ("--private", bool(getattr(args, "private", False))),
               ("--require-signature", bool(getattr(args, "require_signature", False)))]
    return options + [("--verify-key", absolute(p)) for p in getattr(args, "verify_key", None) or ()]
