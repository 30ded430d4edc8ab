"""Keep a rank alive when its launcher daemon dies (a host elsewhere was lost).

Open MPI's runtime (PRRTE 3.0) aborts the whole job when it loses one host's
daemon: it orders every other daemon to kill its ranks, then the daemons exit.
mpirt's ranks on hosts that survive are out of reach of that kill (they run in a
session of their own under :mod:`mpirt.comm.shim`) and go on over the
connections MPI already has: ULFM's failure detection, Revoke, Shrink and Agree
work inside MPI, without the runtime.

What remains is Open MPI's reaction to the runtime's last words: when the PMIx
connection to the local daemon drops (``PMIX_ERR_LOST_CONNECTION``), or the job
is declared ended, its default event handler calls MPI_Abort
(``ompi/errhandler/errhandler.c``: "my daemon died thus I need to go away").
PMIx runs event handlers in order and stops at one that says the event is
handled, so a handler registered *first* for exactly those codes keeps the rank
alive. Failures of processes (``PMIX_ERR_PROC_*``) are left to ULFM, which turns
them into ``MPI_ERR_PROC_FAILED``.

It also lets mpirt declare a process failed (:func:`declare_failed`): a frozen host's or a cut-off
host's processes are alive to TCP and, as measured, Open MPI's own heartbeat detector does not
always turn them into failures (survivors were seen waiting in Allreduce for 10 minutes). The
launcher, which hears every rank's heartbeat on its lifeline, decides; each survivor then raises
the process-failure event locally, exactly as the runtime would, and ULFM fails the pending
operations and excludes the process from Shrink.

No import of mpi4py here: :func:`install` is called after MPI is initialised.
"""

import ctypes
import functools
import os

from mpirt.log import get_logger

log = get_logger("mpirt.comm")

# pmix_common.h (PMIx 5)
PMIX_ERR_UNREACH = -25
PMIX_ERR_LOST_CONNECTION = -61
PMIX_EVENT_JOB_END = -145
PMIX_ERR_JOB_ABORTED = -182
PMIX_ERR_JOB_ABORTED_BY_SIG = -184
PMIX_ERR_JOB_TERM_WO_SYNC = -185
PMIX_ERR_EXIT_NONZERO_TERM = -404
PMIX_EVENT_ACTION_COMPLETE = -334
PMIX_ERR_PROC_TERM_WO_SYNC = -200
PMIX_BOOL = 1
PMIX_PROC = 22
PMIX_RANGE_PROC_LOCAL = 7
PMIX_EVENT_HDLR_FIRST = b"pmix.evfirst"
PMIX_EVENT_AFFECTED_PROC = b"pmix.evproc"

# The runtime going away, or the job or a node declared ended by it, as opposed to a process failing
# (PMIX_ERR_PROC_TERM_WO_SYNC -200, PMIX_ERR_PROC_ABORTED_BY_SIG -402: ULFM's). Open MPI's default
# handler would abort on any of these.
RUNTIME_GONE = (PMIX_ERR_LOST_CONNECTION, PMIX_ERR_UNREACH, PMIX_EVENT_JOB_END, PMIX_ERR_JOB_ABORTED,
                PMIX_ERR_JOB_ABORTED_BY_SIG, PMIX_ERR_JOB_TERM_WO_SYNC, PMIX_ERR_EXIT_NONZERO_TERM,
                -49,  # PMIX_ERR_COMM_FAILURE
                -180, -183, -186, -187, -189,  # PMIX_ERR_JOB_ CANCELED, KILLED_BY_CMD, SENSOR_BOUND_EXCEEDED,
                #                                NON_ZERO_TERM, ABORTED_BY_SYS_EVENT
                -201,  # PMIX_EVENT_PROC_TERMINATED (a shim ended by the runtime's abort)
                -230, -231, -232, -330)  # PMIX_EVENT_ SYS_BASE, NODE_DOWN, NODE_OFFLINE, SYS_OTHER

_NOTIFY_DONE = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t,
                                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p)

# What the handler saw (status codes), for the events log and tests.
seen = []


def _on_event(_ref, status, _source, _info, _ninfo, _results, _nresults, cbfunc, cbdata):
    # Runs on PMIx's progress thread: record, and end the chain (Open MPI's default handler is last).
    seen.append(status)
    if cbfunc:
        _NOTIFY_DONE(cbfunc)(PMIX_EVENT_ACTION_COMPLETE, None, 0, None, None, cbdata)


_handler = _HANDLER(_on_event)  # kept alive for the process's life: PMIx holds the pointer
_installed = []


@functools.lru_cache(maxsize=None)
def _libpmix():
    """The libpmix the MPI library loaded: dlopen by its soname finds the copy already in the process."""
    for name in ("libpmix.so.2", "libpmix.so"):
        try:
            return ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    return None


def install():
    """Register the handler (once). Returns True when it is in place."""
    if _installed:
        return _installed[0]
    lib = _libpmix()
    ok = False
    if lib is not None and hasattr(lib, "PMIx_Register_event_handler"):
        lib.PMIx_Info_create.restype = ctypes.c_void_p
        info = lib.PMIx_Info_create(ctypes.c_size_t(1))
        first = ctypes.c_bool(True)
        lib.PMIx_Info_load(ctypes.c_void_p(info), PMIX_EVENT_HDLR_FIRST, ctypes.byref(first),
                           ctypes.c_uint16(PMIX_BOOL))
        codes = (ctypes.c_int * len(RUNTIME_GONE))(*RUNTIME_GONE)
        # Without a completion callback the call blocks and returns the handler's id (>= 0).
        rc = lib.PMIx_Register_event_handler(codes, ctypes.c_size_t(len(RUNTIME_GONE)), ctypes.c_void_p(info),
                                             ctypes.c_size_t(1), _handler, None, None)
        ok = rc >= 0
        if not ok:
            log.warning("PMIx event handler not registered (status %d): losing a host ends the job", rc)
    else:
        log.warning("libpmix not found: losing a host ends the job")
    _installed.append(ok)
    return ok


class _Proc(ctypes.Structure):  # pmix_proc_t
    _fields_ = [("nspace", ctypes.c_char * 256), ("rank", ctypes.c_uint32)]


def runtime_gone():
    """True once this process heard that Open MPI's runtime went away (no more spawning)."""
    return PMIX_ERR_LOST_CONNECTION in seen


def identity():
    """This process's PMIx name (namespace, rank in its job): how the launcher names it."""
    return os.environ.get("PMIX_NAMESPACE", ""), int(os.environ.get("PMIX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", -1)))


def declare_failed(procs):
    """Tell this process's MPI library that ``procs`` [(namespace, rank)] failed. Returns the count told."""
    lib = _libpmix()
    if lib is None or not hasattr(lib, "PMIx_Notify_event"):
        return 0
    lib.PMIx_Info_create.restype = ctypes.c_void_p
    me = _Proc(*(lambda ns, r: (ns.encode(), max(r, 0)))(*identity()))
    told = 0
    for nspace, rank in procs:
        proc = _Proc(nspace.encode(), rank)
        info = lib.PMIx_Info_create(ctypes.c_size_t(1))
        lib.PMIx_Info_load(ctypes.c_void_p(info), PMIX_EVENT_AFFECTED_PROC, ctypes.byref(proc),
                           ctypes.c_uint16(PMIX_PROC))
        rc = lib.PMIx_Notify_event(ctypes.c_int(PMIX_ERR_PROC_TERM_WO_SYNC), ctypes.byref(me),
                                   ctypes.c_int(PMIX_RANGE_PROC_LOCAL), ctypes.c_void_p(info), ctypes.c_size_t(1),
                                   None, None)
        told += rc >= 0
    return told
