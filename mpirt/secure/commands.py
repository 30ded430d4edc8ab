"""CLI: ``mpirt keygen``: a secret key, or an Ed25519 key pair."""


def add_parser(sub):
    p = sub.add_parser("keygen", help="make an Ed25519 key pair (KEY, KEY.pub) or, with --secret, a secret key",
                       description="KEY: an Ed25519 private key (PEM, 0600) for --sign-key, and KEY.pub, the "
                                   "public key for --verify-key. --secret: 32 random bytes (hex, 0600) for "
                                   "--key-file: encryption and HMAC signatures. Never overwrites a file.")
    p.add_argument("path", metavar="KEY")
    p.add_argument("--secret", action="store_true", help="a secret key instead of a key pair")
    p.set_defaults(handler="mpirt.secure.commands:run_keygen")


def run_keygen(args):
    from mpirt.outputs import check_parent
    from mpirt.secure.keys import new_keypair, new_secret

    check_parent(args.path)
    if args.secret:
        new_secret(args.path)
        print(f"{args.path}: secret key (mode 600); give it as --key-file, keep it off shared storage")
        return 0
    fp = new_keypair(args.path)
    print(f"{args.path}: Ed25519 private key (mode 600) for --sign-key; {args.path}.pub: public key {fp} "
          f"for --verify-key")
    return 0
