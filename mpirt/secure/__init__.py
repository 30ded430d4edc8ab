"""Protection at rest: encrypted files, signatures, key files and private outputs (docs/security.md).

- :mod:`.container`: the AES-256-GCM container any mpirt file can live in;
- :mod:`.keys`: secret keys and Ed25519 key pairs, their files and permissions;
- :mod:`.sign`: HMAC and Ed25519 signatures over a file's manifest;
- :mod:`.policy`: what this process encrypts, signs, verifies and requires (set from the command line);
- :mod:`.h5`: HDF5 files opened and created through the policy (encrypted or not, the same calls).
"""
