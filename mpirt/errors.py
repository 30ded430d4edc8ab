"""The exception hierarchy of mpirt.

Recovery is decided by exception type (as in Horovod's ``HorovodInternalError``
vs ``HostsUpdatedInterrupt``): the elastic loops catch :class:`RecoverableError`
in one place and rebuild the membership; everything else is fatal.

Errors a user can cause carry an exit status: 2 for usage, 1 for bad data or a
failed run. The CLI prints them as one line, never a traceback.
"""


class MpirtError(Exception):
    """Base of every error mpirt raises on purpose."""

    exit_code = 1
    # True where every member raises it after the same committed step (a decision read from the
    # step's summed stats): the members then end as a finished job does (ElasticGroup.end), waiting
    # for the coordinator's save, so that none exits first, and has the launcher kill the rest,
    # before the coordinator's save in flight is on disk and its one line printed.
    ends_together = False


class UsageError(MpirtError):
    """A wrong flag, a missing argument, an inconsistent option set."""

    exit_code = 2


class DataError(MpirtError):
    """An input or data-set file is missing, unreadable, or fails validation."""


class CheckpointError(MpirtError):
    """A checkpoint is missing, truncated, foreign, or fails its checks."""


class TamperedCheckpointError(CheckpointError):
    """A checkpoint's checksum or HMAC signature does not match its contents."""


class JobError(MpirtError):
    """A job cannot go on (for example fewer ranks than ``--min-ranks``)."""


class NotFinite(JobError):
    """A step's loss or a gradient is NaN or inf: every member saw the same sums and stops before
    applying it; the last checkpoint written stays the newest."""

    ends_together = True


class QuorumLost(JobError):
    """After a change, this side holds no strict majority of the last view (an exact half only with
    its coordinator): another side may be the job, so this one stops and commits nothing.

    It reports no status to the launcher: the side that holds the quorum speaks for the job.
    """

    reports_status = False


class Preempted(MpirtError):
    """The job was asked to stop (SIGUSR1: Slurm's ``--signal``, ``scancel --signal``) and did so
    at a unit boundary, its state saved: run it again with ``--resume`` to go on.

    Exit status 75 (EX_TEMPFAIL, "try again later"), which a batch script turns into a requeue.
    Only the coordinator carries a message; the other ranks stop silently.
    """

    exit_code = 75
    ends_together = True


class Terminated(MpirtError):
    """SIGTERM to a command that cleans up on the way out (``prepare``); exit status 128 + 15."""

    exit_code = 143


class RecoverableError(MpirtError):
    """The membership changed under a collective; survivors can recover in place."""


class ProcessFailure(RecoverableError):
    """A peer died or was declared hung (ULFM ``ERR_PROC_FAILED``/``ERR_REVOKED``)."""


class MembershipChange(RecoverableError):
    """Ranks are leaving or joining at a unit boundary; re-sync, do not redo."""
