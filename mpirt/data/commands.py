"""CLI: ``mpirt prepare {text,npz,digits,synth-text}`` and ``mpirt inspect``.

Only argparse is imported here; numpy, h5py and scikit-learn are imported by the
handlers, so ``mpirt --help`` stays fast.
"""

import argparse
import signal

from mpirt.secure.policy import add_flags


def _power_of_two(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 2 or value & (value - 1) or value > 1 << 32:
        raise argparse.ArgumentTypeError(f"{value} is not a power of two between 2 and 2^32 (e.g. 1048576 = 2^20)")
    return value


def _bits(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if not 1 <= value <= 32:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and 32")
    return value


def _int_at_least(lo, hi=None):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is not between {lo} and {hi}" if hi is not None
                                             else f"{value} is less than {lo}")
        return value
    return parse


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1)")
    return value


def _common(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--shards", type=_int_at_least(1), metavar="N", help="N shards per split (at most)")
    g.add_argument("--shard-rows", type=_int_at_least(1), metavar="R",
                   help="rows per shard (default 4096; rounded up to a whole number of chunks if need be)")
    p.add_argument("--val-fraction", type=_fraction, default=0.1, metavar="F", help="stratified (default 0.1)")
    p.add_argument("--test-fraction", type=_fraction, default=0.1, metavar="F", help="stratified (default 0.1)")
    p.add_argument("--seed", type=_int_at_least(0, 2**63 - 1), default=0, metavar="S",
                   help="split seed; synth-text: also the documents' (default 0)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output file that is not an mpirt data set")
    add_flags(p)


def _text_options(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--features", type=_power_of_two, metavar="2^K",
                   help="hash buckets, a power of two (default 1048576)")
    g.add_argument("--hash-bits", type=_bits, metavar="K", help="2^K hash buckets (same as --features 2^K)")
    p.add_argument("--hash-seed", type=_int_at_least(0, 2**64 - 1), default=0, metavar="S",
                   help="hash key (default 0)")
    p.add_argument("--bigrams", action="store_true", help="also hash adjacent word pairs")
    p.add_argument("--workers", type=_int_at_least(1), metavar="W",
                   help="tokenising processes (default: usable cores, at most 8; 1: none)")


def add_parser(sub):
    prep = sub.add_parser("prepare", help="make a sharded HDF5 data set (text, npz, digits, images, cifar, ratings, synth-text)",
                          description="Make a sharded, checksummed HDF5 data set (docs/dataset-format.md). "
                                      "The output is written under a temporary name and renamed into place: "
                                      "an existing OUT.h5 (an mpirt data set, or any file with --force) is "
                                      "replaced only when the new one is complete.")
    kinds = prep.add_subparsers(dest="kind", metavar="KIND", parser_class=type(prep), required=True)
    p = kinds.add_parser("text", help="JSONL with text (HTML allowed) and label fields")
    p.add_argument("input", metavar="IN.jsonl")
    p.add_argument("output", metavar="OUT.h5")
    p.add_argument("--text-field", default="text", metavar="NAME", help="JSON key of the text (default text)")
    p.add_argument("--label-field", default="label", metavar="NAME", help="JSON key of the label (default label)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed lines (and count them) instead of failing")
    _text_options(p)
    _common(p)
    p = kinds.add_parser("npz", help="an .npz with arrays X (n, ...) and y (n,) of ints or strings")
    p.add_argument("input", metavar="IN.npz")
    p.add_argument("output", metavar="OUT.h5")
    _common(p)
    p = kinds.add_parser("digits", help="scikit-learn's bundled 8x8 digits (1,797 images, features (8, 8) in [0, 1])")
    p.add_argument("output", metavar="OUT.h5")
    _common(p)
    p = kinds.add_parser("images", help="a folder with one sub-folder of PNG/JPEG images per class",
                         description="Images as uint8 RGB pixels (H, W, 3), streamed. --size HxW scales each "
                                     "image, keeping its aspect ratio, until it covers HxW, then cuts out the "
                                     "centre HxW (resize then centre crop; nothing is stretched).")
    p.add_argument("input_dir", metavar="DIR")
    p.add_argument("output", metavar="OUT.h5")
    p.add_argument("--size", metavar="HxW", help="e.g. 32x32 (default: the first image's size)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable or truncated images (and count them) instead of failing")
    _common(p)
    p = kinds.add_parser("cifar", help="CIFAR-10 or CIFAR-100 as downloaded (python or binary version)",
                         description="The unpacked cifar-10-batches-py, cifar-100-python or the binary "
                                     "version's folder. The test batch is the test split; --val-fraction of "
                                     "the training batches (stratified) is the validation split; "
                                     "--test-fraction is not used.")
    p.add_argument("input_dir", metavar="DIR")
    p.add_argument("output", metavar="OUT.h5")
    _common(p)
    p = kinds.add_parser("ratings", help="MovieLens-style ratings: userId,movieId,rating,timestamp CSV or ratings.dat",
                         description="Ratings for the recommender models: a CSV of userId,movieId,rating,timestamp "
                                     "(header optional: with one, columns are found by name) or MovieLens' "
                                     "'::'-separated ratings.dat. Ids become dense indices; the original ids "
                                     "are stored.")
    p.add_argument("input", metavar="FILE")
    p.add_argument("output", metavar="OUT.h5")
    p.add_argument("--split-by", choices=("random", "time"), default="random",
                   help="random (seeded by --seed), or time: the latest --test-fraction of ratings are the test "
                        "split and the --val-fraction before them val (default random)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed lines (and count them) instead of failing")
    _common(p)
    p = kinds.add_parser("synth-text", help="generated noisy HTML documents, any number of rows")
    p.add_argument("output", metavar="OUT.h5")
    p.add_argument("--rows", type=_int_at_least(1), required=True, metavar="N")
    p.add_argument("--classes", type=_int_at_least(2), default=4, metavar="C", help="(default 4)")
    p.add_argument("--jsonl", metavar="FILE", help="also write the generated documents as JSONL")
    _text_options(p)
    _common(p)
    prep.set_defaults(handler="mpirt.data.commands:run_prepare")

    p = sub.add_parser("inspect", help="summarise and fully verify a data set; show what any mpirt file is, "
                                       "whether it is encrypted, who signed it and where it came from")
    p.add_argument("path", metavar="FILE.h5")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_flags(p, outputs=False)
    p.set_defaults(handler="mpirt.data.commands:run_inspect")


def _check_paths(args):
    """Every path, before any work: one line for a mistake, and nothing destroyed."""
    from mpirt.outputs import check_input, check_output

    inputs = []
    if getattr(args, "input", None) is not None:
        check_input(args.input)
        inputs.append(("the input", args.input))
    if getattr(args, "input_dir", None) is not None:
        inputs.append(("the input", args.input_dir))
    if getattr(args, "jsonl", None):
        check_output(args.jsonl, "jsonl", inputs, force=args.force, flag="--jsonl")
        inputs.append(("--jsonl", args.jsonl))
    check_output(args.output, "dataset", inputs, force=args.force)


def _terminated(signum, frame):
    # A second SIGTERM must not interrupt the clean-up that this one starts.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from mpirt.errors import Terminated

    raise Terminated("terminated (SIGTERM); temporary files removed")


def run_prepare(args):
    from mpirt.data import dense, images, prepare
    from mpirt.errors import DataError
    from mpirt.outputs import os_error_line
    from mpirt.secure.policy import configure

    configure(args)
    opts = prepare.Options(args.shards, args.shard_rows, args.val_fraction, args.test_fraction, args.seed)
    _check_paths(args)
    # SIGTERM unwinds like Ctrl-C does, through the code that removes the temporary files.
    signal.signal(signal.SIGTERM, _terminated)
    text = {}
    if args.kind in ("text", "synth-text"):
        text = dict(n_features=args.features or (1 << (args.hash_bits or 20)), hash_seed=args.hash_seed,
                    bigrams=args.bigrams, workers=args.workers)
    try:
        if args.kind == "text":
            result = prepare.prepare_text(args.input, args.output, opts, text_field=args.text_field,
                                          label_field=args.label_field, skip_bad=args.skip_bad, **text)
        elif args.kind == "synth-text":
            result = prepare.prepare_text("synth-text", args.output, opts, synth=(args.rows, args.classes, args.seed),
                                          jsonl_out=args.jsonl, **text)
        elif args.kind == "images":
            result = images.prepare_images(args.input_dir, args.output, opts, skip_bad=args.skip_bad,
                                           size=images.parse_size(args.size) if args.size else None)
        elif args.kind == "cifar":
            result = images.prepare_cifar(args.input_dir, args.output, opts)
        elif args.kind == "ratings":
            from mpirt.data.ratings import prepare_ratings

            result = prepare_ratings(args.input, args.output, opts, split_by=args.split_by, skip_bad=args.skip_bad)
        elif args.kind == "npz":
            result = dense.prepare_npz(args.input, args.output, opts)
        else:
            result = dense.prepare_digits(args.output, opts)
    except OSError as exc:  # disk full, permission denied, an unreadable input: one line, not a traceback
        raise DataError(os_error_line(exc, args.output)) from None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    rows = result["rows"]
    if args.kind == "ratings":
        skipped = f", {result['skipped']} bad lines skipped" if result["skipped"] else ""
        print(f"{args.output}: {rows['train']} train, {rows['val']} val, {rows['test']} test ratings, "
              f"{result['users']} users, {result['items']} items{skipped}")
        return 0
    unit = "images" if args.kind == "images" else "lines"
    skipped = f", {result['skipped']} bad {unit} skipped" if result["skipped"] else ""
    print(f"{args.output}: {rows['train']} train, {rows['val']} val, {rows['test']} test rows, "
          f"{len(result['classes'])} classes{skipped}")
    return 0


def run_inspect(args):
    import json

    from mpirt.data.verify import verify
    from mpirt.log import escape
    from mpirt.outputs import check_input

    from mpirt.secure import inspect as protection
    from mpirt.secure.policy import configure

    policy = configure(args)
    check_input(args.path, "data set")
    other = protection.inspect_other(args.path, policy)
    if other is not None:  # a checkpoint or job output, or an encrypted file without its key
        print(json.dumps(other, indent=1) if args.json else "\n".join(
            protection.lines(args.path, other) + ([f"  {other['note']}"] if "note" in other else [])))
        return 0
    summary = verify(args.path)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    if summary["feature_kind"] == "ratings":
        print(f"{args.path}: ratings, {summary['users']} users, {summary['items']} items, split by "
              f"{summary['split_by']}")
        for name, s in summary["splits"].items():
            mean = f"  mean rating {s['mean_rating']:.3f}" if s["mean_rating"] is not None else ""
            print(f"  {name:<5} {s['rows']:>9} ratings  {s['shards']:>5} shards of chunks of {s['chunk_rows']}{mean}")
        print("\n".join(protection.lines(args.path, summary["protection"])))
        print(f"OK: {args.path}: schema, shard table, checksums and indices verified")
        return 0
    shape = summary["feature_shape"]
    classes = summary["classes"]
    print(f"{args.path}: {summary['feature_kind']}, {summary['n_features']} features"
          + (f" {tuple(shape)}" if shape else "") + f", {len(classes)} classes: "
          + ", ".join(escape(c) for c in classes[:10]) + (" ..." if len(classes) > 10 else ""))
    for name, s in summary["splits"].items():
        extra = f"  {s['tokens']:>11} tokens" if "tokens" in s else ""
        print(f"  {name:<5} {s['rows']:>9} rows  {s['shards']:>5} shards of chunks of {s['chunk_rows']}{extra}"
              f"  per class {s['per_class'][:10]}" + (" ..." if len(s["per_class"]) > 10 else ""))
    print("\n".join(protection.lines(args.path, summary["protection"])))
    print(f"OK: {args.path}: schema, shard table, checksums, labels and features verified")
    return 0
