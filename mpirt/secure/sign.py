"""Signatures over a file's manifest: HMAC-SHA256 with the shared secret, Ed25519 with a key pair.

Every signed mpirt file has a manifest digest that covers everything it holds (a data set: its
attributes, root arrays, shard tables and per-shard SHA-256, :func:`mpirt.data.integrity.manifest_digest`;
a checkpoint: its manifest of array digests). The signed message names the kind of file, so a data
set's signature can never pass as a checkpoint's. Root attributes:

- ``signature``: hex HMAC-SHA256 (checkpoints: of the manifest text, as schema 1 always had it);
- ``signature_ed25519``, ``signer`` (the public key's ``SHA256:`` fingerprint) and ``signer_key``
  (the raw public key, hex: shown by ``mpirt inspect``, never trusted by itself).

An HMAC proves the file was made by someone holding the secret; an Ed25519 signature proves it was
made by the holder of one private key, and anyone with the public key can check it (docs/security.md).
"""

import hashlib
import hmac

SIGNATURE_ATTRS = ("signature", "signature_ed25519", "signer", "signer_key")


def message(kind, digest):
    return b"mpirt signature v1\0" + kind.encode() + b"\0" + digest.encode()


def sign(kind, digest, secret=None, signing_key=None, hmac_message=None):
    """The signature attributes of a file of ``kind`` whose manifest digest is ``digest``.

    Args:
        hmac_message: what the HMAC covers when not :func:`message` (checkpoints: the manifest).
    """
    from mpirt.secure.keys import fingerprint, raw_public

    attrs = {}
    if secret:
        attrs["signature"] = hmac.new(secret, hmac_message or message(kind, digest), hashlib.sha256).hexdigest()
    if signing_key is not None:
        attrs["signature_ed25519"] = signing_key.sign(message(kind, digest)).hex()
        attrs["signer"] = fingerprint(signing_key.public_key())
        attrs["signer_key"] = raw_public(signing_key.public_key()).hex()
    return attrs


def describe(attrs):
    """{"hmac": bool, "ed25519": fingerprint or None}: what a file says it is signed with."""
    signer = attrs.get("signer")
    return {"hmac": attrs.get("signature") is not None,
            "ed25519": _text(signer) if attrs.get("signature_ed25519") is not None else None}


def verify(path, kind, digest, attrs, policy, error, check_hmac=True, vouched=()):
    """Check a file's signatures against what this process trusts; return who vouched for it.

    - the HMAC, when the file has one and ``policy.secret`` is known (``check_hmac``), must match;
      a caller that checks it otherwise (checkpoints: with their own key) passes ``check_hmac=False``
      and what already vouched in ``vouched``;
    - an Ed25519 signature, when public keys are trusted (``--verify-key``), must be valid and by one
      of them; without trusted keys it is not checked (the key it names proves nothing by itself);
    - with ``policy.require_signature``, at least one of those must have been checked.

    Returns:
        the list of what vouched: "hmac", "ed25519 SHA256:...".

    Raises:
        error: one line naming ``path`` and what failed.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    vouched = list(vouched)
    mac = attrs.get("signature")
    if mac is not None and check_hmac and policy.secret:
        expect = hmac.new(policy.secret, message(kind, digest), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expect, _text(mac)):
            raise error(f"{path}: HMAC signature does not match (tampered, or signed with another key)")
        vouched.append("hmac")
    sig = attrs.get("signature_ed25519")
    if sig is not None and policy.verify_keys:
        signer = _text(attrs.get("signer", ""))
        trusted = policy.verify_keys.get(signer)
        if trusted is None:
            raise error(f"{path}: signed by {signer}, which is not a --verify-key key")
        try:
            Ed25519PublicKey.from_public_bytes(trusted).verify(bytes.fromhex(_text(sig)), message(kind, digest))
        except (InvalidSignature, ValueError):
            raise error(f"{path}: Ed25519 signature by {signer} does not match (tampered or corrupted)") from None
        vouched.append(f"ed25519 {signer}")
    if policy.require_signature and not vouched:
        have = describe(attrs)
        what = ("is not signed" if not have["hmac"] and not have["ed25519"] else
                "is signed, but not by a key given here")
        raise error(f"{path}: {what}, and --require-signature is set (give the signer's --verify-key "
                    f"or the --key-file it was signed with)")
    return vouched


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def h5_digest(f):
    """SHA-256 (hex) of a whole small HDF5 output (predictions, word counts): every attribute but
    the signatures, and every dataset's name, type, shape and bytes."""
    import h5py

    from mpirt.data.integrity import _canonical_attrs, _dataset_bytes

    h = hashlib.sha256(b"mpirt.output manifest v1\0")
    h.update(_canonical_attrs(f.attrs, skip=SIGNATURE_ATTRS))
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    for name in sorted(names):
        d = f[name]
        h.update(f"{name}:{d.dtype.str}:{list(d.shape)}\0".encode() + _dataset_bytes(d))
    return h.hexdigest()


def sign_file(f, kind, digest_of=h5_digest):
    """Sign the finished file open in ``f`` (:class:`mpirt.secure.h5.File`) as the policy says: HMAC
    with the secret key, Ed25519 with ``--sign-key``, over ``digest_of(f)``; unsigned without either.
    Data sets pass :func:`mpirt.data.integrity.manifest_digest`; job outputs are digested whole."""
    from mpirt.secure.policy import current

    policy = current()
    if policy.secret or policy.signing_key is not None:
        f.add_signature(sign(kind, digest_of(f), policy.secret, policy.signing_key))


def provenance(ds, data_sha256):
    """What an output records of the data set it came from: its digest (``data_sha256``, which the
    caller has computed already: :func:`mpirt.data.integrity.dataset_digest`), and who signed it."""
    return {"data_sha256": data_sha256, "data_signer": _text(ds.attrs.get("signer", "")),
            "data_verified_by": ", ".join(ds.vouched) or "nobody (not verified)", "data_encrypted": ds.encrypted}
