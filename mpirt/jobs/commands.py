"""CLI registration for the shard jobs."""

import os
import sys

from mpirt import flags
from mpirt.secure.policy import add_flags, configure, spawn_options

# The fused top-k kernel (mpirt.kernels.predict_topk) keeps k candidates per row in one warp.
TOP_K_MAX = 32


def add_elastic_options(p):
    """Options every elastic job takes."""
    p.add_argument("--events", metavar="FILE", help="membership events log (JSON lines)")
    p.add_argument("--inject-fault", action="append", default=[], metavar="SPEC",
                   help="deterministic fault, e.g. kill:member=1:step=3 (repeatable; see docs)")
    p.add_argument("--min-ranks", type=flags.positive, default=1, metavar="N", help="stop when fewer ranks remain")
    p.add_argument("--resume", action="store_true", help="keep what a killed run committed and go on")


def _add_force(p, kind):
    p.add_argument("--force", action="store_true", help=f"replace an existing --out that is not a {kind}")


def add_parser(sub):
    p = sub.add_parser("wordcount", help="count hashed tokens per class over a text data set (shard job)")
    p.add_argument("data", metavar="DATA.h5")
    p.add_argument("--out", required=True, metavar="COUNTS.h5")
    p.add_argument("--split", default="train", choices=("train", "val", "test"))
    p.add_argument("--keep-parts", action="store_true", help="keep OUT.parts/ (per-shard results, ledger log)")
    _add_force(p, "wordcount output")
    add_elastic_options(p)
    add_flags(p)
    p.set_defaults(handler="mpirt.jobs.commands:run_wordcount")

    p = sub.add_parser("classify", help="predict a split with one checkpoint or an ensemble (shard job)")
    p.add_argument("--data", required=True, metavar="DATA.h5")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--checkpoint", required=True, action="append", metavar="CKPT",
                   help="a checkpoint of 'mpirt train' (a file; a --checkpoint-dir: its newest; DIR/best: the "
                        "best by validation, from --keep-best); repeat for an ensemble (mean of probabilities)")
    p.add_argument("--out", required=True, metavar="PRED.h5")
    p.add_argument("--top-k", type=flags.integer(1, TOP_K_MAX), default=1, metavar="K",
                   help=f"classes kept per row, most likely first (1..{TOP_K_MAX})")
    p.add_argument("--key-file", metavar="FILE",
                   help="the secret key (0600): refuse checkpoints it did not sign (or MPIRT_CHECKPOINT_KEY); "
                        "decrypt encrypted inputs, encrypt with --encrypt (or MPIRT_DATA_KEY)")
    p.add_argument("--no-verify", action="store_true", help="use signed checkpoints without their key")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--keep-parts", action="store_true", help="keep OUT.parts/ (per-shard results, ledger log)")
    _add_force(p, "classify output")
    add_elastic_options(p)
    add_flags(p, key_file=False)
    p.set_defaults(handler="mpirt.jobs.commands:run_classify")


def spawn_argv(args, positional, options):
    """The command a joining rank runs: this job again, with absolute paths."""
    argv = [sys.executable, "-m", "mpirt", args.command, *[os.path.abspath(p) for p in positional]]
    for flag, value in options:
        if value is True:
            argv.append(flag)
        elif value not in (None, False):
            argv += [flag, str(value)]
    for spec in args.inject_fault:
        argv += ["--inject-fault", spec]
    return argv


def require_world(min_ranks):
    """Refuse a shard job started on fewer ranks than ``--min-ranks`` (before, it ran silently).

    The first point where the world size is known; a spawned joiner joins a running job and skips it.
    Call it right before the farm starts: it initialises MPI, and from then on a rank must reach the
    farm's heartbeat pump within --hang-timeout (loading models first could take longer).
    """
    from mpirt.comm import mpi
    from mpirt.errors import UsageError

    MPI = mpi.MPI()
    if MPI.Comm.Get_parent() != MPI.COMM_NULL:
        return
    size = MPI.COMM_WORLD.Get_size()
    if size < min_ranks:
        mpi.skip_finalize()  # as a job stopping on an error does: a rank that exits first must not block the rest
        raise UsageError(f"--min-ranks {min_ranks}: the job started with only {size} rank(s)"
                         if MPI.COMM_WORLD.Get_rank() == 0 else "")  # one line, not one a rank


def check_paths(args, kind, data, others=()):
    """Every path of a shard job, before MPI work starts (every rank decides alike).

    Args:
        kind: the output's kind (:data:`mpirt.outputs.KINDS`).
        data: the data set; others: (flag, path) of the other inputs.
    """
    from mpirt.outputs import check_input, check_output, check_parent

    check_input(data, "data set")
    for flag, path in others:
        check_input(path, flag.lstrip("-").replace("-", " "))
    inputs = [("--data" if args.command == "classify" else "DATA.h5", data), *others]
    if args.events:
        check_parent(args.events, "--events")
        inputs.append(("--events", args.events))
    check_output(args.out, kind, inputs, force=args.force, flag="--out")


def _run_job(job, args, out, events, faults):
    from mpirt.cluster.farm import run_shard_job

    return run_shard_job(job, parts_dir=out + ".parts", events_path=events, faults=faults,
                         min_ranks=args.min_ranks, resume=args.resume or os.environ.get("MPIRT_RESUME") == "1",
                         remove_parts=not args.keep_parts)


def run_classify(args):
    from mpirt.checkpoint import resolve_key
    from mpirt.comm.faults import FaultPlan
    from mpirt.errors import UsageError
    from mpirt.jobs.classify import Classify

    from mpirt.checkpoint import resolve

    configure(args)
    if args.min_ranks < 1 or args.top_k < 1:
        raise UsageError("--min-ranks and --top-k must be >= 1")
    args.checkpoint = [resolve(c) for c in args.checkpoint]  # a run's directory, DIR/best: the file
    check_paths(args, "predictions", args.data, [("--checkpoint", c) for c in args.checkpoint]
                + ([("--key-file", args.key_file)] if args.key_file else []))
    faults = FaultPlan(args.inject_fault)
    out = os.path.abspath(args.out)
    events = os.path.abspath(args.events) if args.events else None
    ckpts = [os.path.abspath(c) for c in args.checkpoint]
    options = [("--data", os.path.abspath(args.data)), ("--out", out), ("--split", args.split),
               ("--top-k", args.top_k), ("--device", args.device), ("--events", events),
               ("--min-ranks", args.min_ranks), ("--keep-parts", args.keep_parts), ("--force", args.force),
               ("--no-verify", args.no_verify)] + spawn_options(args)
    options += [("--checkpoint", c) for c in ckpts]
    job = Classify(args.data, ckpts, out, split=args.split, top_k=args.top_k, key=resolve_key(args.key_file),
                   device=args.device, spawn_argv=spawn_argv(args, [], options), verify=not args.no_verify)
    require_world(args.min_ranks)
    summary = _run_job(job, args, out, events, faults)
    if summary is not None:
        acc = summary["accuracy"]
        print(f"classify: {summary['rows']} rows, {summary['models']} model(s), {summary['shards']} shards, "
              f"{summary['views']} view(s)" + (f", accuracy {100 * acc:.2f}%" if acc is not None else "")
              + f" -> {out}", flush=True)
    return 0


def run_wordcount(args):
    from mpirt.comm.faults import FaultPlan
    from mpirt.errors import UsageError
    from mpirt.jobs.wordcount import WordCount

    configure(args)
    if args.min_ranks < 1:
        raise UsageError("--min-ranks must be >= 1")
    check_paths(args, "wordcount", args.data)
    faults = FaultPlan(args.inject_fault)
    out = os.path.abspath(args.out)
    events = os.path.abspath(args.events) if args.events else None
    argv = spawn_argv(args, [args.data], [("--out", out), ("--split", args.split), ("--events", events),
                                           ("--min-ranks", args.min_ranks), ("--keep-parts", args.keep_parts),
                                           ("--force", args.force)] + spawn_options(args))
    job = WordCount(args.data, out, args.split, spawn_argv=argv)
    require_world(args.min_ranks)
    summary = _run_job(job, args, out, events, faults)
    if summary is not None:
        print(f"wordcount: {summary['rows']} rows, {summary['tokens']} tokens, {summary['shards']} shards, "
              f"{summary['views']} view(s) -> {out} (sha256 {summary['sha256'][:16]})")
    return 0
