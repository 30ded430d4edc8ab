"""CLI: ``mpirt prepare {text,npz,digits,synth-text}`` and ``mpirt inspect``."""

import os


def _power_of_two(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 2 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"{value} is not a power of two (e.g. 1048576 = 2^20)")
    return value


def _common(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--shards", type=int, metavar="N", help="about N shards per split")
    g.add_argument("--shard-rows", type=int, metavar="R", help="rows per shard (default 4096)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F")
    p.add_argument("--test-fraction", type=float, default=0.1, metavar="F")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")


def _text_options(p):
    p.add_argument("--features", type=_power_of_two, default=1 << 20, metavar="2^K",
                   help="hash buckets, a power of two (default 1048576)")
    p.add_argument("--hash-seed", type=int, default=0, metavar="S")
    p.add_argument("--bigrams", action="store_true", help="also hash adjacent word pairs")
    p.add_argument("--workers", type=int, metavar="W", help="tokenising processes (default: cores, at most 4)")


def add_parser(sub):
    prep = sub.add_parser("prepare", help="make a sharded HDF5 data set (text, npz, digits, synth-text)")
    kinds = prep.add_subparsers(dest="kind", metavar="KIND", parser_class=type(prep), required=True)
    p = kinds.add_parser("text", help="JSONL with text (HTML allowed) and label fields")
    p.add_argument("input", metavar="IN.jsonl")
    p.add_argument("output", metavar="OUT.h5")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed lines (and count them) instead of failing")
    _text_options(p)
    _common(p)
    p = kinds.add_parser("npz", help="an .npz with arrays X (n, ...) and y (n,)")
    p.add_argument("input", metavar="IN.npz")
    p.add_argument("output", metavar="OUT.h5")
    _common(p)
    p = kinds.add_parser("digits", help="scikit-learn's bundled 8x8 digits (1,797 images)")
    p.add_argument("output", metavar="OUT.h5")
    _common(p)
    p = kinds.add_parser("synth-text", help="generated noisy HTML documents, any number of rows")
    p.add_argument("output", metavar="OUT.h5")
    p.add_argument("--rows", type=int, required=True, metavar="N")
    p.add_argument("--classes", type=int, default=4, metavar="C")
    p.add_argument("--jsonl", metavar="FILE", help="also write the raw documents as JSONL")
    _text_options(p)
    _common(p)
    prep.set_defaults(handler="mpirt.data.commands:run_prepare")

    p = sub.add_parser("inspect", help="summarise and fully verify a data set")
    p.add_argument("path", metavar="FILE.h5")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler="mpirt.data.commands:run_inspect")


def run_prepare(args):
    from mpirt.data import prepare
    from mpirt.errors import UsageError

    opts = prepare.Options(args.shards, args.shard_rows, args.val_fraction, args.test_fraction, args.seed)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UsageError(f"{args.output}: directory {out_dir} does not exist")
    if args.kind == "text":
        result = prepare.prepare_text(args.input, args.output, opts, text_field=args.text_field,
                                      label_field=args.label_field, n_features=args.features,
                                      hash_seed=args.hash_seed, bigrams=args.bigrams, skip_bad=args.skip_bad,
                                      workers=args.workers)
    elif args.kind == "synth-text":
        from mpirt.data.synth import SynthText

        if args.rows < 1 or args.classes < 2:
            raise UsageError("synth-text needs --rows >= 1 and --classes >= 2")
        gen = SynthText(classes=args.classes, seed=args.seed)
        blocks = _tee_jsonl(gen.jsonl_lines(args.rows, prepare.BLOCK), args.jsonl)
        result = prepare.prepare_text(f"synth-text({args.rows})", args.output, opts, n_features=args.features,
                                      hash_seed=args.hash_seed, bigrams=args.bigrams, workers=args.workers,
                                      blocks=blocks, n_estimate=args.rows)
    elif args.kind == "npz":
        X, y = prepare.load_npz(args.input)
        result = prepare.prepare_dense(X, y, args.output, opts, source=args.input)
    else:
        X, y, names = prepare.load_digits_images()
        result = prepare.prepare_dense(X, y, args.output, opts, class_names=names, source="sklearn digits")
    rows = result["rows"]
    skipped = f", {result['skipped']} bad lines skipped" if result["skipped"] else ""
    print(f"{args.output}: {rows['train']} train, {rows['val']} val, {rows['test']} test rows, "
          f"{len(result['classes'])} classes{skipped}")
    return 0


def _tee_jsonl(blocks, path):
    """Number the generated lines like a file's, and copy them to ``path`` when asked."""
    from mpirt.atomic import atomic_path

    line = 1
    if not path:
        for lines in blocks:
            yield line, lines
            line += len(lines)
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for lines in blocks:
            f.write(b"\n".join(lines) + b"\n")
            yield line, lines
            line += len(lines)


def run_inspect(args):
    import json

    from mpirt.data.verify import verify

    summary = verify(args.path)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    shape = summary["feature_shape"]
    print(f"{args.path}: {summary['feature_kind']}, {summary['n_features']} features"
          + (f" {tuple(shape)}" if shape else "") + f", {len(summary['classes'])} classes: "
          + ", ".join(summary["classes"][:10]) + (" ..." if len(summary["classes"]) > 10 else ""))
    for name, s in summary["splits"].items():
        print(f"  {name:<5} {s['rows']:>9} rows  {s['shards']:>5} shards  per class {s['per_class'][:10]}")
    print("OK: checksums, shard table, labels and features verified")
    return 0
