"""A shard job's parts directory (``OUT.parts``): which job it belongs to, and who is using it.

Committed parts are reused by ``--resume`` and by a new coordinator, so they must come from the
same job: the same inputs (by digest), split and result-changing options. The coordinator records
that identity in ``job.json`` when the job starts, and a resume with any other identity is refused,
naming what differs (before this, a resume on another split or data set mixed the two outputs).

The coordinator holds ``lock`` (:class:`mpirt.dirlock.DirLock`) for the job's life: a second job
with the same ``--out`` is refused; a coordinator that takes over after a failure takes it again.

Nothing here follows a symbolic link: a ``.parts`` that is one is refused, and files inside are
removed by name (``unlink`` removes a link, never its target).
"""

import json
import os
import re
import stat

from mpirt.dirlock import DirLock
from mpirt.errors import JobError
from mpirt.secure.policy import private_dir_mode

JOB_FILE = "job.json"
LOCK_FILE = "lock"
# What a fresh (not --resume) start removes: committed parts, their temporaries, the commit log and
# the default events log (whose fired faults a new job must not inherit). Nothing else is touched.
_OURS = re.compile(r"^(shard-\d{6}\.h5|shard-\d{6}\..*\.tmp|ledger\.jsonl|events\.jsonl|faults\.jsonl)$")
_LABELS = {"data": "data set", "split": "--split", "checkpoints": "checkpoints", "top_k": "--top-k",
           "device": "--device", "job": "command", "shard_sizes": "shards"}


def check_not_link(directory):
    """Refuse a parts path that is a symlink or not a directory (every rank checks alike, at once)."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise JobError(f"{directory}: is a symbolic link; per-shard results need a directory of their own "
                       f"(remove the link, or give another --out)")
    if not stat.S_ISDIR(st.st_mode):
        raise JobError(f"{directory}: exists and is not a directory (remove it, or give another --out)")


class PartsDir:
    """The coordinator's hold on a parts directory."""

    def __init__(self, directory):
        self.dir = os.fspath(directory)
        self.lock = DirLock(self.dir, LOCK_FILE, "--out")

    def claim(self, identity, resume):
        """At job start, on the coordinator: lock the directory and make it this job's.

        Args:
            identity: the job's identity (:meth:`ShardJob.identity`), JSON-able.
            resume: keep the committed parts (they must be this job's); else start empty.

        Raises:
            JobError: a symlink, another job holds the lock, or (resume) another job's parts.
        """
        check_not_link(self.dir)
        try:
            os.mkdir(self.dir, mode=private_dir_mode())
        except FileExistsError:
            check_not_link(self.dir)  # raced with someone making it a link
        self.lock.take()
        identity = json.loads(json.dumps(identity))  # as it will read back (tuples become lists)
        recorded = self._recorded()
        if resume:
            if recorded is None and any(_OURS.match(n) for n in os.listdir(self.dir)):
                raise JobError(f"{self.dir}: holds results with no record of their job; run without --resume "
                               f"to start over")
            if recorded is not None and recorded != identity:
                raise JobError(f"{self.dir}: belongs to another job ({_differences(recorded, identity)}); "
                               f"run without --resume to start over, or give another --out")
        else:
            for name in os.listdir(self.dir):
                if _OURS.match(name):
                    os.unlink(os.path.join(self.dir, name))
        if recorded != identity:
            tmp = os.path.join(self.dir, f"{JOB_FILE}.{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                json.dump(identity, f, sort_keys=True, indent=1)
            os.replace(tmp, os.path.join(self.dir, JOB_FILE))

    def remove(self):
        """Remove the directory at the job's end, under the lock: only what mpirt put there (a file of
        the user's in it keeps the directory)."""
        for name in os.listdir(self.dir):
            if _OURS.match(name) or name in (JOB_FILE, LOCK_FILE) or name.startswith(f"{JOB_FILE}."):
                os.unlink(os.path.join(self.dir, name))
        try:
            os.rmdir(self.dir)
        except OSError:
            pass  # not empty: someone else's files are in it

    def release(self):
        self.lock.release()

    def _recorded(self):
        try:
            with open(os.path.join(self.dir, JOB_FILE)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            raise JobError(f"{self.dir}/{JOB_FILE}: unreadable; remove {self.dir} to start over") from None


def _differences(old, new):
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            diffs.append(f"{_LABELS.get(key, key)}: {_short(old.get(key))} there, {_short(new.get(key))} here")
    return "; ".join(diffs)


def _short(value):
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return f"sha256 {value[:12]}"
    return json.dumps(value)
