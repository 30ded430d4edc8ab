"""How the ranks' bytes travel under ULFM: shared memory (``sm``) or ``tcp``, and Open MPI's flags for each.

``sm`` is Open MPI's shared-memory BTL between ranks of one host, with the ``cma`` single-copy
mechanism (process_vm_readv) and without the shared-memory collectives (``coll sm``, and ``han``,
which builds on it): collectives then run as point-to-point messages over the BTL, whose waits
ULFM interrupts when a peer fails. Measured against the whole fault matrix (docs/transport.md):
kill, coordinator kill, hang, leave, join, join after a shrink, 64 MiB and small messages. It is
the default for a job on one host: a 64 MiB Allreduce ran 3.2x (2 ranks) and 2.5x (4 ranks) faster than
over tcp (bench/results/transport-2core.md).

``sm`` lists tcp too (``sm,tcp,self``): Open MPI uses shared memory between ranks of a host and
tcp where it cannot (ranks spawned by a join, other hosts). Over several hosts that mix could not
be put through host faults here, so a job over hosts keeps ``tcp`` unless ``--transport sm`` asks
for it.
"""

import os

from mpirt.config import TRANSPORT
from mpirt.errors import UsageError

TRANSPORTS = ("sm", "tcp")
# ``cuda`` too: a CUDA build's coll/cuda wraps the host collectives, and was not measured under ULFM.
COLL_EXCLUDED = ("han", "cuda", "sm")


def choose(flag=None, *, multi_host=False, environ=None):
    """The transport of a job: ``flag`` (``--transport``), else ``$MPIRT_TRANSPORT``, else ``sm`` on
    one host and ``tcp`` over several.

    Raises:
        UsageError: an unknown transport.
    """
    env = os.environ if environ is None else environ
    value = flag or env.get(TRANSPORT, "").strip()
    if not value:
        return "tcp" if multi_host else "sm"
    if value not in TRANSPORTS:
        source = "--transport" if flag else TRANSPORT
        raise UsageError(f"{source} {value!r}: choose one of {', '.join(TRANSPORTS)}")
    return value


def mca_flags(transport):
    """The mpiexec flags of ``transport`` under ULFM (``--with-ft ulfm`` itself is the caller's)."""
    if transport == "tcp":
        # coll ^han: Merge after Shrink deadlocks in han (ompi #11724).
        return ["--mca", "btl", "tcp,self", "--mca", "coll", "^han"]
    # tcp even on one host: ranks spawned later (joins) see the launched ones on host "unknown", so
    # sm cannot reach them and, with "sm,self", Merge failed ("unable to reach each other"). Between
    # ranks that share memory, Open MPI picks sm (the more exclusive BTL) all the same.
    return ["--mca", "btl", "sm,tcp,self", "--mca", "smsc", "cma",
            "--mca", "coll", "^" + ",".join(COLL_EXCLUDED)]


def ft_problem(environ):
    """Why the transport the ranks were started with is not fault tolerant, or None.

    ``tcp,self`` is; shared memory is only with the flags of :func:`mca_flags` (``smsc cma``, and the
    shared-memory collectives off): with Open MPI's defaults a killed rank was seen to hang every
    survivor inside Allreduce (FACTS.md).
    """
    btl = [b for b in environ.get("OMPI_MCA_btl", "").split(",") if b and b != "self"]
    if btl and "sm" not in btl:
        return None
    coll = environ.get("OMPI_MCA_coll", "")
    excluded = set(coll[1:].split(",")) if coll.startswith("^") else set()
    if btl and environ.get("OMPI_MCA_smsc") == "cma" and {"han", "sm"} <= excluded:
        return None
    return ("the shared-memory BTL is on without '--mca smsc cma --mca coll ^han,cuda,sm'; a dead rank could hang "
            "the others (use 'mpirt launch', or '--mca btl tcp,self')")


def ulfm_flags(transport, hang_timeout):
    """Every mpiexec flag of a fault-tolerant job: ULFM, ``transport``'s, and the failure detector.

    The detector is Open MPI's heartbeat, which turns a stopped or hung rank into a failure within
    ``hang_timeout`` seconds (0: off). It runs in MPI's progress engine, not in its own thread: with
    ``mpi_ft_detector_thread`` MPI_Finalize hangs in Open MPI 5.0 (seen with C programs too).
    """
    cmd = ["--with-ft", "ulfm", *mca_flags(transport)]
    if hang_timeout > 0:
        # period < timeout/3 is Open MPI's own constraint on the detector.
        period = max(hang_timeout / 4.0, 0.05)
        cmd += ["--mca", "mpi_ft_detector", "true", "--mca", "mpi_ft_detector_period", f"{period:g}",
                "--mca", "mpi_ft_detector_timeout", f"{hang_timeout:g}"]
    return cmd
