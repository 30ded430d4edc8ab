"""``mpirt train``: the command line of elastic data-parallel training."""

import argparse
import os
import sys
from dataclasses import dataclass, field

from mpirt import flags
from mpirt.jobs.commands import add_elastic_options, spawn_argv
from mpirt.secure.policy import add_flags
from mpirt.train.defaults import describe, fill
from mpirt.train.schedule import SCHEDULES


@dataclass
class TrainConfig:
    """Everything a training process needs (the CLI fills it; the Python API may too)."""

    data: str
    spec: dict
    epochs: int = 1
    global_batch: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    checkpoint_dir: str = None
    checkpoint_every: int = 0
    checkpoint_sync: bool = False  # True: saves block training (--checkpoint-sync); else in the background
    keep: int = 3
    resume: bool = False
    key: bytes = None
    audit: str = None
    events: str = None
    faults: object = None
    min_ranks: int = 1
    report: str = None
    compress: str = None
    bucket_bytes: int = 16 << 20
    overlap: bool = True  # reduce gradient buckets while backward runs (mpirt.train.overlap)
    embedding_grad: str = "sparse"  # fasttext's table: row-sparse gradients (mpirt.train.sparse) or dense
    sparse_exchange: str = "auto"  # how sparse rows travel: by bytes, or forced (mpirt.train.sparse.MODES)
    exact: bool = False  # bit-identical on any number of ranks (mpirt.train.exact)
    micro_batch: int = None  # --exact: rows a micro-batch (a divisor of global_batch)
    lr_schedule: str = "constant"  # the learning rate over steps (mpirt.train.schedule)
    warmup: float = 0.0  # steps of linear warmup (>= 1), or a fraction of the run (< 1)
    clip_norm: float = None  # clip the reduced gradient to this global L2 norm
    augment: bool = False  # crop and flip images, drawn from (seed, epoch, row) (mpirt.train.augment)
    early_stop: int = 0  # epochs without a better --monitor value before training stops (0: never)
    monitor: str = "val_loss"  # val_loss (lower is better) or val_accuracy (higher)
    keep_best: bool = False  # keep DIR/best.h5: the checkpoint of the best epoch by --monitor
    sweep: dict = None  # mpirt lr-find: {"min", "max", "steps", "out"}: an lr sweep, not a training run
    progress: object = None
    spawn_argv: list = field(default_factory=list)
    verify: bool = True  # False: trust a signed checkpoint without its key (--no-verify)
    data_sha256: str = None  # the data set's digest (mpirt.data.integrity.dataset_digest)
    features: dict = None  # how a text data set was hashed; checkpoints carry it for classify
    provenance: dict = None  # the data set's digest and signer (mpirt.secure.sign.provenance): in checkpoints, reports


def add_parser(sub):
    p = sub.add_parser("train", help="elastic data-parallel training (run under mpirt launch / mpiexec)")
    add_train_options(p)
    p.set_defaults(handler="mpirt.train.commands:run_train")
    f = sub.add_parser("lr-find", help="sweep the learning rate over a short run; plot the loss, suggest --lr",
                       description="A short elastic run whose learning rate grows from --min-lr to --max-lr "
                                   "(geometrically, over --steps steps, stopping when the loss diverges). Writes "
                                   "OUT/lr_find.json and OUT/lr_find.png and prints the suggested --lr. Takes "
                                   "'mpirt train''s flags (the model, batch and optimizer to tune for).")
    add_train_options(f)
    f.add_argument("--min-lr", type=flags.number(0, lo_open=True), default=1e-5)
    f.add_argument("--max-lr", type=flags.number(0, lo_open=True), default=10.0)
    f.add_argument("--steps", type=flags.positive, default=200, help="steps of the sweep at most (default 200)")
    f.add_argument("--out", required=True, metavar="DIR", help="where lr_find.json and lr_find.png go")
    f.set_defaults(handler="mpirt.train.commands:run_lr_find")


def add_train_options(p):
    p.add_argument("--data", required=True, metavar="DATA.h5", help="a data set from 'mpirt prepare'")
    p.add_argument("--model", required=True,
                   choices=("linear", "mlp", "fasttext", "cnn", "resnet", "vgg", "mf", "twotower"),
                   help="resnet and vgg: image models for 'prepare images'/'cifar' data sets (and digits); mf "
                        "and twotower: recommenders for 'prepare ratings' data sets, their embedding tables "
                        "sharded over the ranks")
    p.add_argument("--table-shards", type=flags.positive, metavar="S",
                   help="mf, twotower: shards per embedding table, spread over the ranks (default 16)")
    p.add_argument("--epochs", type=flags.positive, help=f"default per model: {describe('epochs')}")
    p.add_argument("--global-batch", type=flags.positive, default=64, metavar="B", help="samples a step, over all ranks")
    p.add_argument("--lr", type=flags.number(0, lo_open=True),
                   help=f"the learning rate of a whole global batch (the loss is its mean); default per model: "
                        f"{describe('lr')}")
    p.add_argument("--lr-schedule", choices=SCHEDULES,
                   help="the learning rate over the run, after warmup: constant, linear (to zero at the end, as "
                        f"fastText), cosine (to zero), or step (x0.1 at 1/2, x0.01 at 3/4); default per model: "
                        f"{describe('lr_schedule')}")
    p.add_argument("--warmup", type=flags.number(0), metavar="STEPS",
                   help="steps over which the learning rate rises linearly to --lr; below 1, a fraction of the "
                        f"run's steps; default per model: {describe('warmup')}")
    p.add_argument("--clip-norm", type=flags.number(0, lo_open=True), metavar="N",
                   help="clip the reduced gradient to this global L2 norm (every rank clips alike)")
    p.add_argument("--early-stop", type=flags.non_negative, default=0, metavar="PATIENCE",
                   help="stop when --monitor has not improved for this many epochs (0: never)")
    p.add_argument("--monitor", choices=("val_loss", "val_accuracy"), default="val_loss",
                   help="what --early-stop and --keep-best judge an epoch by (default val_loss)")
    p.add_argument("--keep-best", action="store_true",
                   help="keep the checkpoint of the best epoch by --monitor as DIR/best.h5 (beside the newest "
                        "--keep; 'mpirt classify --checkpoint DIR/best')")
    p.add_argument("--optimizer", choices=("sgd", "adam"), help=f"default per model: {describe('optimizer')}")
    p.add_argument("--momentum", type=flags.number(0, 1, hi_open=True), default=0.9, help="SGD momentum, in [0, 1)")
    p.add_argument("--weight-decay", type=flags.number(0), default=0.0)
    p.add_argument("--seed", type=flags.seed, default=0, help="initial parameters and sample order")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--hidden", type=flags.size, help="mlp: hidden units (default 128)")
    p.add_argument("--embed-dim", type=flags.size, help="fasttext: embedding size (default 64)")
    p.add_argument("--channels", type=flags.size, help="cnn: channels of the first convolution (default 16)")
    p.add_argument("--depth", type=flags.size,
                   help="resnet: 10, 18 or 34 (default 18); vgg: 11, 13, 16 or 19 (default 11)")
    p.add_argument("--width", type=flags.size,
                   help="resnet, vgg: channels of the first layer, doubling per stage (default 64)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="images: a random crop of the image padded by 4 pixels and a left-right flip, drawn "
                        f"from (seed, epoch, row); default per model: {describe('augment')}")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction,
                   help="resnet, vgg: standardise each channel by the training pixels' mean and standard "
                        f"deviation (stored by prepare images/cifar); default per model: {describe('normalize')}")
    p.add_argument("--checkpoint-dir", metavar="DIR")
    p.add_argument("--checkpoint-every", type=flags.non_negative, default=0, metavar="STEPS", help="0: only at the end")
    p.add_argument("--checkpoint-sync", action="store_true",
                   help="save checkpoints blocking, as torch.distributed.checkpoint.save does (default: "
                        "as async_save, in the background; only the copy to host memory blocks)")
    p.add_argument("--keep", type=flags.positive, default=3, metavar="K", help="checkpoints kept")
    p.add_argument("--key-file", metavar="FILE",
                   help="the secret key (0600): HMAC-signs and checks checkpoints (or MPIRT_CHECKPOINT_KEY), "
                        "decrypts an encrypted --data and encrypts with --encrypt (or MPIRT_DATA_KEY)")
    p.add_argument("--no-verify", action="store_true", help="--resume from a signed checkpoint without its key")
    p.add_argument("--audit", metavar="FILE", help="JSON lines: the samples each committed step consumed")
    p.add_argument("--report", metavar="DIR", help="report.json and PNG plots")
    p.add_argument("--compress", choices=("bf16", "fp16"), help="compress gradients on the wire")
    p.add_argument("--no-overlap", action="store_true",
                   help="reduce the gradients after backward, not while it runs")
    p.add_argument("--embedding-grad", choices=("sparse", "dense"), default="sparse",
                   help="fasttext: the embedding's gradient as touched rows (optimizers update those rows "
                        "only) or dense (every row, as a dense layer) (default sparse)")
    p.add_argument("--sparse-exchange", choices=("auto", "allgather", "allreduce"), default="auto",
                   help="how sparse rows travel between ranks: chosen each step by bytes (default), or forced")
    p.add_argument("--exact", action="store_true",
                   help="bit-identical parameters on any number of ranks and through failures: fixed "
                        "micro-batches, an order-independent (fixed-point) sum, one intra-op thread")
    p.add_argument("--micro-batch", type=flags.positive, metavar="M",
                   help="--exact: rows a micro-batch, a divisor of --global-batch (default: its largest "
                        "divisor up to 16)")
    p.add_argument("--bucket-mb", type=flags.number(1 / 1024, 4096), default=16.0, help="gradient bucket size (MiB)")
    p.add_argument("--no-progress", action="store_true", help="plain lines even on a terminal")
    add_elastic_options(p)
    add_flags(p, key_file=False)


def config_from_args(args, dataset):
    """Validate the flags against the data set; a :class:`TrainConfig`."""
    from mpirt.checkpoint import resolve_key
    from mpirt.comm.faults import FaultPlan
    from mpirt.config import RESUME, env_flag
    from mpirt.errors import UsageError
    from mpirt.train.models import spec_for

    from mpirt.data.integrity import dataset_digest, hashing_params
    from mpirt.secure.sign import provenance

    fill(args)  # the model's defaults for the tuning flags left out (mpirt.train.defaults)
    if args.resume and not args.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir (the checkpoints to go on from)")
    if args.keep_best and not args.checkpoint_dir:
        raise UsageError("--keep-best needs --checkpoint-dir (where best.h5 is kept)")
    if (args.early_stop or args.keep_best) and dataset.split("val").n_rows == 0:
        raise UsageError(f"--{'early-stop' if args.early_stop else 'keep-best'} judges epochs on the val split, "
                         f"and {args.data} has none (prepare it with a val split)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA device here")
    if dataset.split("train").n_rows == 0:
        raise UsageError(f"{args.data}: the train split is empty")
    spec = spec_for(args.model, dataset, normalize=args.normalize and dataset.pixel_stats() is not None,
                    hidden=args.hidden, embed_dim=args.embed_dim, channels=args.channels, depth=args.depth,
                    width=args.width)
    if args.augment and not (dataset.feature_kind == "dense" and len(dataset.feature_shape or ()) >= 2):
        raise UsageError(f"--augment crops and flips images; {args.data} rows are not images")
    micro = exact_micro_batch(args)
    if getattr(args, "sweep", None):  # lr-find: enough epochs for --steps (the sweep stops there)
        from mpirt.train.order import Schedule

        per_epoch = Schedule(dataset.split("train").n_rows, args.global_batch, 1, args.seed).steps_per_epoch
        args.epochs = max(args.epochs, -(-args.steps // per_epoch))
    absolute = {k: os.path.abspath(getattr(args, k)) if getattr(args, k) else None
                for k in ("checkpoint_dir", "audit", "events", "report")}
    digest = dataset_digest(dataset)
    return TrainConfig(
        data=os.path.abspath(args.data), spec=spec, epochs=args.epochs, global_batch=args.global_batch,
        lr=args.lr, optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
        seed=args.seed, device=args.device, checkpoint_every=args.checkpoint_every,
        checkpoint_sync=args.checkpoint_sync, keep=args.keep,
        resume=args.resume or env_flag(RESUME), key=resolve_key(args.key_file), faults=FaultPlan(args.inject_fault),
        min_ranks=args.min_ranks, compress=args.compress, bucket_bytes=int(args.bucket_mb * (1 << 20)),
        overlap=not args.no_overlap and not args.exact, exact=args.exact, micro_batch=micro,
        embedding_grad=args.embedding_grad, sparse_exchange=args.sparse_exchange,
        lr_schedule=args.lr_schedule, warmup=args.warmup, clip_norm=args.clip_norm, augment=bool(args.augment),
        early_stop=args.early_stop, monitor=args.monitor, keep_best=args.keep_best,
        sweep=getattr(args, "sweep", None),
        progress=False if args.no_progress else None, spawn_argv=train_argv(args), verify=not args.no_verify,
        data_sha256=digest, features=hashing_params(dataset), provenance=provenance(dataset, digest), **absolute)


def exact_micro_batch(args):
    """``--exact``'s micro-batch size (None without it), or one line on what cannot go with it."""
    from mpirt.errors import UsageError
    from mpirt.train.exact import default_micro_batch

    if not args.exact:
        if args.micro_batch is not None:
            raise UsageError("--micro-batch is the unit of --exact's fixed micro-batches: add --exact")
        return None
    if args.compress:
        raise UsageError(f"--exact and --compress {args.compress}: compression rounds each rank's gradient "
                         "before the sum, so the model would depend on the number of ranks; drop one")
    micro = args.micro_batch or default_micro_batch(args.global_batch)
    if args.global_batch % micro:
        raise UsageError(f"--micro-batch {micro} does not divide --global-batch {args.global_batch}")
    return micro


def train_argv(args):
    """What a joiner runs: this command again, with absolute paths, never --resume (lr-find too)."""
    from mpirt.secure.policy import spawn_options

    options = [(f"--{k.replace('_', '-')}", getattr(args, k)) for k in (
        "model", "epochs", "global_batch", "lr", "optimizer", "momentum", "weight_decay", "seed", "device",
        "hidden", "embed_dim", "channels", "depth", "width", "table_shards", "checkpoint_every", "keep", "compress",
        "bucket_mb",
        "embedding_grad", "sparse_exchange", "min_ranks", "micro_batch", "lr_schedule", "warmup", "clip_norm",
        "early_stop", "monitor")]
    paths = [(f"--{k.replace('_', '-')}", os.path.abspath(getattr(args, k)) if getattr(args, k) else None)
             for k in ("data", "checkpoint_dir", "audit", "report", "events")] + spawn_options(args)
    if getattr(args, "out", None):  # lr-find
        options += [("--min-lr", args.min_lr), ("--max-lr", args.max_lr), ("--steps", args.steps)]
        paths += [("--out", os.path.abspath(args.out))]
    return spawn_argv(args, [], paths + options + [("--no-progress", True), ("--no-verify", args.no_verify),
                                                   ("--no-overlap", args.no_overlap),
                                                   ("--checkpoint-sync", args.checkpoint_sync),
                                                   ("--exact", args.exact), ("--keep-best", args.keep_best),
                                                   ("--augment", args.augment is True),
                                                   ("--no-augment", args.augment is False),
                                                   ("--normalize", args.normalize is True),
                                                   ("--no-normalize", args.normalize is False)])


def run_train(args):
    from mpirt.comm.faults import FaultPlan
    from mpirt.data.reader import open_dataset
    from mpirt.outputs import check_train_paths
    from mpirt.train.trainer import run_training, start_group

    from mpirt.secure.policy import configure

    configure(args)  # keys, before anything reads the data set or a checkpoint
    check_train_paths(args)  # a bad --checkpoint-dir or --report must not cost a training run
    group = start_group(os.path.abspath(args.events) if args.events else None, FaultPlan(args.inject_fault),
                        args.min_ranks, train_argv(args))
    try:
        with open_dataset(args.data) as dataset:
            if dataset.feature_kind == "ratings":
                return _run_recsys(args, dataset, group)
            cfg = config_from_args(args, dataset)
            cfg.faults = group.faults
            summary = run_training(cfg, dataset, group)
    except BaseException:
        group.close(failed=True)
        raise
    if summary is not None and "lr_find" in summary:
        f = summary["lr_find"]
        why = "the loss diverged" if f["stopped_on_divergence"] else "the last step"
        print(f"lr-find: {summary['steps']} steps from {f['min_lr']:g} to {f['max_lr']:g} (to {why}), "
              f"{summary['views']} view(s); lowest smoothed loss at lr {f['lr_at_min_loss']:.3g}; suggested "
              f"--lr {f['suggested_lr']:.3g}; plot in {os.path.join(cfg.sweep['out'], 'lr_find.png')}", flush=True)
    elif summary is not None:
        acc = summary["test_accuracy"]
        where = f", report in {cfg.report}" if cfg.report else ""
        best = summary.get("best")
        best = f", best epoch {best['best_epoch'] + 1} ({best['monitor']} {best['best']:.4f})" if best else ""
        print(f"train: {summary['steps']} steps, {summary['views']} view(s), {summary['ranks']} rank(s) at the end"
              + (f", test accuracy {100 * acc:.2f}%" if acc is not None else "") + best + where, flush=True)
    sys.stdout.flush()
    return 0


def _run_recsys(args, dataset, group):
    """``mpirt train --model mf|twotower`` on a ratings data set (mpirt.recsys.trainer)."""
    from mpirt.checkpoint import resolve_key
    from mpirt.errors import UsageError
    from mpirt.data.integrity import dataset_digest
    from mpirt.recsys.trainer import run_recsys, spec_for
    from mpirt.secure.sign import provenance

    if args.model not in ("mf", "twotower"):
        raise UsageError(f"{args.data} holds ratings: train it with --model mf or --model twotower")
    fill(args)
    unsupported = [f for f, on in (("--exact", args.exact), ("--compress", args.compress),
                                   ("--early-stop", args.early_stop), ("--keep-best", args.keep_best),
                                   ("--audit", args.audit),
                                   ("--clip-norm", args.clip_norm), ("--device cuda", args.device == "cuda"),
                                   ("--lr-schedule", args.lr_schedule != "constant"), ("--warmup", args.warmup))
                   if on]
    if unsupported:
        raise UsageError(f"--model {args.model} does not take {', '.join(unsupported)} yet")
    if args.resume and not args.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir (the checkpoints to go on from)")
    spec = spec_for(args.model, dataset, args.embed_dim, args.hidden, args.table_shards)
    digest = dataset_digest(dataset)
    cfg = TrainConfig(data=os.path.abspath(args.data), spec=spec, epochs=args.epochs, global_batch=args.global_batch,
                      lr=args.lr, optimizer=args.optimizer, seed=args.seed, keep=args.keep,
                      checkpoint_dir=os.path.abspath(args.checkpoint_dir) if args.checkpoint_dir else None,
                      resume=args.resume, key=resolve_key(args.key_file), min_ranks=args.min_ranks,
                      report=os.path.abspath(args.report) if args.report else None,
                      checkpoint_every=args.checkpoint_every, data_sha256=digest,
                      provenance=provenance(dataset, digest))
    cfg.faults = group.faults
    summary = run_recsys(cfg, dataset, group)
    if summary is not None:
        rmse = summary["test_rmse"]
        print(f"train: {summary['steps']} steps, {summary['views']} view(s), {summary['ranks']} rank(s) at the end"
              + (f", test rmse {rmse:.4f}" if rmse is not None else ""), flush=True)
    sys.stdout.flush()
    return 0


def run_lr_find(args):
    """``mpirt lr-find``: the train command's flags, an lr sweep in place of the schedule."""
    from mpirt.errors import UsageError

    fill(args)
    if args.checkpoint_dir or args.resume or args.early_stop or args.keep_best:
        raise UsageError("lr-find trains no model to keep: drop --checkpoint-dir, --resume, --early-stop and "
                         "--keep-best")
    if args.min_lr >= args.max_lr:
        raise UsageError(f"--min-lr {args.min_lr:g} must be below --max-lr {args.max_lr:g}")
    args.sweep = {"min": args.min_lr, "max": args.max_lr, "steps": args.steps, "out": os.path.abspath(args.out)}
    return run_train(args)
