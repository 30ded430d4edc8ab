"""What ``mpirt inspect`` says about protection: encrypted or not, who signed, what was verified,
and where the file came from (provenance). Works without the key for what the container's trailer
tells (it says so: the trailer is checked against the tags only when the file is read with the key)."""

import json

from mpirt.secure.container import is_encrypted, read_trailer
from mpirt.secure.sign import describe

KINDS = {"mpirt.dataset": "data set", "mpirt.checkpoint": "checkpoint", "predictions": "classify output",
         "wordcount": "wordcount output"}
PROVENANCE = ("data_sha256", "data_signer", "data_verified_by", "data_encrypted", "checkpoint_sha256",
              "checkpoint_verified_by", "checkpoints")


def without_key(path):
    """{content, encrypted, signed, plaintext_bytes} of an encrypted file, from its trailer alone."""
    fields, trailer = read_trailer(path)
    return {"content": trailer.get("content"), "encrypted": f"{trailer.get('cipher')}, chunks of "
            f"{fields['chunk'] // 1024} KiB", "signed": trailer.get("signed") or {},
            "plaintext_bytes": trailer.get("plaintext_bytes")}


def content_of(f):
    """What an open mpirt HDF5 file is: ``mpirt.dataset``, ``mpirt.checkpoint``, ``predictions``..."""
    a = f.attrs
    value = a.get("mpirt_format", a.get("mpirt_output"))
    return value.decode() if isinstance(value, bytes) else value


def summary(path, f, vouched):
    """The protection summary of an open file (:class:`mpirt.secure.h5.File`)."""
    out = {"content": content_of(f), "encrypted": "AES-256-GCM" if f.encrypted else "no",
           "signed": describe(f.attrs), "verified_by": vouched}
    prov = {}
    meta = f.attrs.get("meta")
    source = json.loads(meta) if isinstance(meta, (str, bytes)) else dict(f.attrs)
    for k in PROVENANCE:
        if k in source:
            v = source[k]
            prov[k] = v.tolist() if hasattr(v, "tolist") else v
    out["provenance"] = prov
    return out


def lines(path, info):
    """The human-readable lines of :func:`summary` or :func:`without_key`."""
    signed = info.get("signed") or {}
    who = [w for w in (("HMAC" if signed.get("hmac") else None),
                       (f"Ed25519 by {signed['ed25519']}" if signed.get("ed25519") else None)) if w]
    out = [f"{path}: {KINDS.get(info.get('content'), info.get('content'))}; encrypted: {info['encrypted']}; "
           f"signed: {', '.join(who) or 'no'}"]
    if "verified_by" in info:
        out.append("  signatures verified: " + (", ".join(info["verified_by"]) or
                                                "none (give --key-file or --verify-key to check them)"))
    for k, v in (info.get("provenance") or {}).items():
        out.append(f"  {k}: {v}")
    return out


def inspect_other(path, policy):
    """Print and return the summary of a file that is not a data set, or of an encrypted file whose
    key is not known; None for a data set that can be read (``mpirt inspect`` verifies it fully)."""
    from mpirt.checkpoint import load
    from mpirt.secure.h5 import File

    if is_encrypted(path) and not policy.secret:
        info = without_key(path)
        info["note"] = "contents not verified: give the key (--key-file or MPIRT_DATA_KEY) to decrypt and check"
        return info
    from mpirt.errors import DataError
    from mpirt.secure.sign import h5_digest, verify

    try:
        f = File(path, "r")
    except OSError:
        return None  # not HDF5: the data-set reader says so in its words
    with f:
        content = content_of(f)
        if content == "mpirt.dataset" or content is None:
            return None
        if content != "mpirt.checkpoint":
            return summary(path, f, verify(path, content, h5_digest(f), f.attrs, policy, DataError))
    # A checkpoint is verified as every loader verifies it (its own key rules, every digest).
    vouched = load(path, key=policy.secret, verify=False).vouched
    with File(path, "r") as f:
        return summary(path, f, vouched)
