"""Lazy access to mpi4py and what the MPI library can do about faults.

Nothing here runs at import: ``MPI()`` imports mpi4py (which initialises MPI)
only when a job asks for it.
"""

import atexit
import functools
import os
import shutil
import signal
import subprocess
import sys


def MPI():  # noqa: N802 - reads like the module it returns
    """Import and return ``mpi4py.MPI`` (initialises MPI on first call)."""
    import mpi4py

    # mpi4py's default, explicitly: the progress pump (ElasticComm) calls MPI
    # from a second thread while the main thread computes.
    mpi4py.rc.thread_level = "multiple"
    # Finalize ourselves, bounded (see _bounded_finalize), instead of mpi4py's atexit.
    mpi4py.rc.finalize = False
    if "torch" in sys.modules and "mpi4py.MPI" not in sys.modules:
        # Before MPI_Init starts Open MPI's heartbeat detector: a torch optimizer's first
        # construction imports torch._dynamo, about 1 s of CPU (several with 4 ranks on 2 cores),
        # and the progress pump that keeps heartbeats flowing lost the GIL for up to 0.7 s at a time
        # inside it; CI saw a rank declared dead (a false positive) in exactly that window.
        import torch._dynamo  # noqa: F401
    from mpi4py import MPI as _MPI

    if not _finalizer_registered:
        atexit.register(_bounded_finalize, _MPI)
        _finalizer_registered.append(True)
    return _MPI


_finalizer_registered = []
_skip_finalize = []
_before_finalize = []
FINALIZE_GRACE = 5


def before_finalize(fn):
    """Call ``fn()`` before MPI_Finalize at exit: a thread that calls MPI (the progress pump) must be
    stopped first, or its next call aborts the process ("MPI_Iprobe() called after MPI_FINALIZE":
    CI saw a finished Horovod job exit 14 so, whenever nothing had closed its communicator)."""
    if fn not in _before_finalize:
        _before_finalize.append(fn)


def skip_finalize():
    """Exit without MPI_Finalize: for a job stopping on an error after failures.

    Finalize after failures can spin until the grace period ends, and the launcher
    does not wait for such a rank: it would outlive the job by seconds.
    """
    _skip_finalize.append(True)


def exit_now_if_stopping(code):
    """After :func:`skip_finalize`, end the process at once with ``code``.

    The launcher stops waiting for a job once a rank exits non-zero without
    Finalize, and a normal interpreter exit then runs libtorch's static
    destructors for a second or two: the rank would outlive ``mpiexec``.
    ``os._exit`` skips them; every output was closed before this point.
    """
    if not _skip_finalize:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _bounded_finalize(MPI):
    """MPI_Finalize, or the kernel ends the process after FINALIZE_GRACE seconds.

    After failures MPI_Finalize has been seen to hang in Open MPI 5 while holding
    the GIL, so no Python-level watchdog could fire; SIGALRM's default action can.
    Every result is committed, and the job's status written, before exit.
    """
    for fn in _before_finalize:
        fn()
    if _skip_finalize or MPI.Is_finalized() or not MPI.Is_initialized():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(FINALIZE_GRACE)
    try:
        MPI.Finalize()
    except MPI.Exception:
        pass
    signal.alarm(0)


def library_version():
    """The MPI library's version string, without initialising MPI."""
    import mpi4py

    mpi4py.rc.initialize = False
    from mpi4py import MPI as _MPI

    return _MPI.Get_library_version().strip().splitlines()[0]


def venv_tool(name):
    """``name`` (mpiexec, ompi_info) next to the running interpreter, else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.access(here, os.X_OK) else shutil.which(name)


@functools.lru_cache(maxsize=None)
def ompi_info():
    """``ompi_info --parsable`` as a dict of its first value per key ({} when not Open MPI)."""
    tool = venv_tool("ompi_info")
    if not tool:
        return {}
    try:
        out = subprocess.run([tool, "--parsable"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    info = {}
    for line in out.splitlines():
        key, _, value = line.rpartition(":")
        info.setdefault(key, value)
    return info


def ulfm_compiled():
    """True when the MPI library was built with ULFM (Open MPI's ``ft_mpi_support``)."""
    return ompi_info().get("options:ft_mpi_support") == "yes"


def cuda_aware():
    """True when Open MPI reports CUDA support compiled in."""
    info = ompi_info()
    return "--with-cuda" in info.get("config:cli", "") and "--without-cuda" not in info.get("config:cli", "")


def ft_launch_problem(environ=None):
    """Why fault tolerance is off in this process, or None when it is on.

    Open MPI passes ``--with-ft ulfm`` to the ranks as ``OMPI_MCA_mpi_ft_enable=1``, and
    ``--mca`` flags as ``OMPI_MCA_*``; the transport must be one measured to survive a dead rank
    (:func:`mpirt.comm.transport.ft_problem`).
    """
    from mpirt.comm import transport

    env = os.environ if environ is None else environ
    if "OMPI_COMM_WORLD_SIZE" not in env and "PMIX_RANK" not in env:
        return "not launched by Open MPI's mpiexec"
    if env.get("OMPI_MCA_mpi_ft_enable", "0") not in ("1", "true"):
        return "mpiexec was run without '--with-ft ulfm' (use 'mpirt launch')"
    return transport.ft_problem(env)
