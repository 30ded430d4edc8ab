"""Every ``MPIRT_*`` environment variable, named once.

CLI flags override these; the variables exist so that batch scripts and
``mpiexec -x`` can configure ranks that mpirt did not start itself.
"""

import os

ENV_PREFIX = "MPIRT_"

FAULTS = "MPIRT_FAULTS"  # fault-injection specs, ';'-separated
REQUIRE_GPU = "MPIRT_REQUIRE_GPU"  # tests: "no GPU, skipped" becomes a failure
REQUIRE_SLURM = "MPIRT_REQUIRE_SLURM"  # tests: "no Slurm, skipped" becomes a failure
CHECKPOINT_KEY = "MPIRT_CHECKPOINT_KEY"  # HMAC key for signed checkpoints
KERNEL_BACKEND = "MPIRT_KERNEL_BACKEND"  # cupy | torch | numpy | auto
HANG_TIMEOUT = "MPIRT_HANG_TIMEOUT"  # seconds without progress before a rank is declared hung
MPIEXEC = "MPIRT_MPIEXEC"  # the mpiexec to launch with (default: next to sys.executable)
LOG_LEVEL = "MPIRT_LOG_LEVEL"
DEBUG = "MPIRT_DEBUG"  # 1: an unexpected error in a rank prints its traceback (mpirt --debug)
FT_MODE = "MPIRT_FT"  # set by `mpirt launch`: "ulfm" or "restart"
LIFELINE = "MPIRT_LIFELINE"  # set by `mpirt launch`: host:port:token of its lifeline (mpirt.comm.lifeline)
HOST_FT = "MPIRT_HOST_FT"  # set by `mpirt launch` for jobs over several hosts: ranks outlive a lost host
LAUNCH_AGENT = "MPIRT_LAUNCH_AGENT"  # the command that reaches another host (default: ssh)
SIMULATED_HOST = "MPIRT_SIMULATED_HOST"  # set by scripts/hosts/ssh on a simulated host: its name
FSYNC = "MPIRT_FSYNC"  # 0: commit shard results without fsync (survives process kills, not node crashes)
LEASE_S = "MPIRT_LEASE_S"  # seconds of work a shard job's lease aims at (mpirt.cluster.ledger.batch_size)
RUN = "MPIRT_RUN"  # set by `mpirt launch`: 1, then 2, 3... when the job is run again (requeue, restart)
MAX_PARAMS = "MPIRT_MAX_PARAMS"  # the most parameters a model may have (default 2^30)
RESUME = "MPIRT_RESUME"  # set by `mpirt launch` in restart mode: jobs resume from their commits
TRANSPORT = "MPIRT_TRANSPORT"  # sm | tcp: how ranks talk under ULFM (mpirt.comm.transport); set for the ranks
EVENTS = "MPIRT_EVENTS"  # the JSON-lines events log of a job run through mpirt.horovod (views, faults)
DATA_KEY = "MPIRT_DATA_KEY"  # the secret key of encrypted files (mpirt.secure), when no --key-file is given

KNOWN = {
    FAULTS, REQUIRE_GPU, REQUIRE_SLURM, CHECKPOINT_KEY, KERNEL_BACKEND,
    HANG_TIMEOUT, MPIEXEC, LOG_LEVEL, DEBUG, FT_MODE, LIFELINE, HOST_FT, LAUNCH_AGENT, SIMULATED_HOST, RUN, RESUME,
    FSYNC, LEASE_S, MAX_PARAMS, TRANSPORT, EVENTS, DATA_KEY,
}

# Facts about the host a process runs on: never carried to other hosts (mpiexec -x).
HOST_LOCAL = {SIMULATED_HOST}


def env_flag(name: str, default: bool = False) -> bool:
    """The variable as a boolean: '0', 'no', 'false', 'off' are false; unset or empty gives ``default``."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    return raw not in ("0", "no", "false", "off")


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    import math

    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # NaN compares false with everything: it would disable what it sets
        from mpirt.errors import UsageError

        raise UsageError(f"{name}={raw!r} is not a finite number")
    return value
