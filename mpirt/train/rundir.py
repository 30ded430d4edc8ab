"""A checkpoint directory that belongs to one run.

Before, a directory accepted any job: a new run in an old directory with ``--keep 1`` deleted its
own new checkpoint (the old one had the higher step), ``--resume`` with another data set,
``--global-batch`` or ``--seed`` went on from a state those samples never produced (the audit
showed samples consumed twice), and two jobs on one directory interleaved their files.

So the directory records the run's identity in ``run.json`` (:func:`identity`: what changes the
result of a step), every checkpoint carries it in its meta, a start is refused when it does not
fit (saying which flag differs), the directory is locked (:class:`mpirt.dirlock.DirLock`) while a job writes it,
and keep-K deletes only checkpoints of the same run.
"""

import json
import os

from mpirt.atomic import atomic_path
from mpirt.checkpoint import CheckpointDir
from mpirt.dirlock import DirLock
from mpirt.errors import UsageError
from mpirt.secure.policy import makedirs as private_makedirs

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
# identity key -> the flag a user changes to change it
FLAGS = {"data_sha256": "--data (another data set, or the same file changed)", "global_batch": "--global-batch",
         "seed": "--seed", "spec": "--model (or its sizes: --hidden, --embed-dim, --channels, --depth, --width; "
                                                  "or --normalize)",
         "optimizer": "--optimizer", "lr": "--lr", "momentum": "--momentum", "weight_decay": "--weight-decay",
         "compress": "--compress", "embedding_grad": "--embedding-grad", "exact": "--exact (its --micro-batch)",
         "lr_schedule": "--lr-schedule or --warmup (or --epochs, which sets the schedule's length)",
         "clip_norm": "--clip-norm", "augment": "--augment"}


def identity(cfg, data_sha256, total_steps=None):
    """What makes two runs the same run: every input of a step's result (not --epochs: more epochs
    continue the same sequence of steps, unless a schedule's length depends on them; not where or
    how often checkpoints are written)."""
    from mpirt.train.augment import PAD
    from mpirt.train.schedule import warmup_steps

    warmup = warmup_steps(cfg.warmup, total_steps or 0)
    schedule = None  # constant, no warmup: as runs made before schedules existed
    if cfg.lr_schedule != "constant" or warmup:
        schedule = {"name": cfg.lr_schedule, "warmup": warmup,
                    "total_steps": None if cfg.lr_schedule == "constant" else total_steps}
    return {"data_sha256": data_sha256, "global_batch": int(cfg.global_batch), "seed": int(cfg.seed),
            "spec": cfg.spec, "optimizer": cfg.optimizer, "lr": float(cfg.lr),
            "momentum": float(cfg.momentum) if cfg.optimizer == "sgd" else None,  # Adam ignores it
            "weight_decay": float(cfg.weight_decay), "compress": cfg.compress,
            # what an optimizer step does to untouched embedding rows (mpirt.train.sparse)
            "embedding_grad": cfg.embedding_grad if cfg.spec["name"] == "fasttext" else None,
            # another reduction is another sequence of models (mpirt.train.exact): the micro-batch, or None
            "exact": int(cfg.micro_batch) if cfg.exact else None,
            "lr_schedule": schedule, "clip_norm": float(cfg.clip_norm) if cfg.clip_norm else None,
            # None when off, so that runs made before --augment existed keep their identity
            "augment": {"pad": PAD, "flip": True} if getattr(cfg, "augment", False) else None}


def differences(recorded, ident):
    """The flags whose values differ between two identities, as 'FLAG (was A, now B)'."""
    out = []
    for key in FLAGS:
        if recorded.get(key) != ident.get(key):
            was, now = recorded.get(key), ident.get(key)
            if key in ("data_sha256", "spec"):
                out.append(FLAGS[key])
            else:
                out.append(f"{FLAGS[key]} (was {was}, now {now})")
    return out


class RunDir(CheckpointDir):
    """A :class:`CheckpointDir` owned by one run: locked, with its identity recorded and checked.

    Args:
        directory, keep, key, verify, background: as for :class:`CheckpointDir`.
        ident: this run's :func:`identity`.
    """

    def __init__(self, directory, keep=3, key=None, ident=None, verify=True, background=False):
        super().__init__(directory, keep=keep, key=key, verify=verify, background=background)
        self.ident = ident
        self.lock = DirLock(directory, LOCK_FILE, "--checkpoint-dir")

    def claim(self, resume):
        """At the start of a run (coordinator): lock, check the recorded identity, record ours.

        Raises:
            UsageError: the directory is a file, or holds another run (or, without ``--resume``,
                any checkpoints). JobError: another job holds the lock.
        """
        d = self.directory
        if os.path.exists(d) and not os.path.isdir(d):
            raise UsageError(f"--checkpoint-dir {d}: exists and is not a directory")
        try:
            private_makedirs(d)
        except OSError as exc:
            raise UsageError(f"--checkpoint-dir {d}: cannot create it ({exc.strerror})") from None
        self.lock.take()
        recorded = self.recorded()
        ours = self.paths(mine=False)
        if resume and recorded is not None and recorded != self.ident:
            raise UsageError(f"--resume: {d} holds another run: {'; '.join(differences(recorded, self.ident))} "
                             f"differs")
        if not resume and ours:
            raise UsageError(f"{d}: holds checkpoints of an earlier run (newest {os.path.basename(ours[-1])}): "
                             f"give --resume to go on from it, or another --checkpoint-dir")
        with atomic_path(os.path.join(d, RUN_FILE)) as tmp, open(tmp, "w") as f:
            json.dump(self.ident, f, sort_keys=True, indent=1)

    def take_over(self, gone):
        """A coordinator taking over after a failure: lock (see :meth:`DirLock.take`)."""
        private_makedirs(self.directory)
        self.lock.take(gone)

    def recorded(self):
        """The identity in ``run.json``, or None (a new directory, or one of an older mpirt)."""
        try:
            with open(os.path.join(self.directory, RUN_FILE)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise UsageError(f"{self.directory}/{RUN_FILE}: unreadable ({exc}); remove it only if the "
                             f"checkpoints there are this run's") from None

    def save(self, step, **fields):
        assert self.lock.held, "save() before claim() or take_over()"
        fields["meta"] = dict(fields.get("meta") or {}, run=self.ident)
        return super().save(step, **fields)

    def paths(self, mine=True):
        """Checkpoint paths in step order; ``mine``: only this run's (keep-K deletes from these)."""
        paths = super().paths()
        return [p for p in paths if _run_of(p) == self.ident] if mine and self.ident is not None else paths

    def latest(self):
        """The newest checkpoint of any run: a resume checks that it is this run's (:func:`check_resume`)."""
        paths = self.paths(mine=False)
        return paths[-1] if paths else None

    def close(self):
        """Wait for the save in flight, then unlock: the next job must find it whole under its name."""
        super().close()
        self.lock.release()


def check_resume(ckpt, ident):
    """Refuse to resume from a checkpoint of another run (its recorded identity, or for checkpoints
    of an older mpirt, the seed and global batch its position records)."""
    run = ckpt.meta.get("run")
    if run is None:
        pos = ckpt.position
        run = dict(ident, **{k: pos[k] for k in ("seed", "global_batch") if k in pos})
    diff = differences(run, ident)
    if diff:
        raise UsageError(f"--resume: {ckpt.path} is of another run: {'; '.join(diff)} differs")


def _run_of(path):
    """The run identity a checkpoint records (its meta attribute; read, not verified: this only
    decides what keep-K may delete, and a file that does not say it is ours is kept). An encrypted
    one is read with the policy's key; without it, it is kept."""
    from mpirt.secure.container import DecryptError
    from mpirt.secure.h5 import File

    try:
        with File(path, "r") as f:
            return json.loads(f.attrs["meta"]).get("run")
    except (OSError, KeyError, ValueError, TypeError, AttributeError, DecryptError):
        return None
