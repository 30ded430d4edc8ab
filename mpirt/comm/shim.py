"""``python -m mpirt.comm.shim CMD...``: what Open MPI's daemon starts on each slot in a multi-host job.

It starts the rank (CMD) in a session of its own and stands in for it towards the daemon: it
passes on the signals the daemon forwards (SIGUSR1/SIGUSR2, the stop request), and ends as the
rank ended (same exit status, or the same signal, so that a killed rank is reported as one).

Why: when Open MPI's runtime loses a host's daemon it aborts the job, and every other daemon kills
its processes' process groups (PRRTE 3.0, ``errmgr_dvm.c``; see :mod:`mpirt.comm.pmix_guard`). That
kill reaches this shim, not the rank, which goes on with the survivors. A rank's life is bound to
``mpirt launch`` instead, through its lifeline (:mod:`mpirt.comm.lifeline`).

Kept to the standard library's os/signal/sys: it starts once per rank.
"""

import os
import signal
import sys

FORWARDED = (signal.SIGUSR1, signal.SIGUSR2)


def main(argv):
    if not argv:
        sys.stderr.write("mpirt.comm.shim: error: no command\n")
        return 2
    pid = os.fork()
    if pid == 0:
        os.setsid()
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            sys.stderr.write(f"mpirt.comm.shim: error: cannot run {argv[0]}: {exc.strerror}\n")
            os._exit(127)
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, _: _forward(pid, signum))
    # SIGTERM/SIGINT/SIGHUP keep their default: the daemon ending this shim must not end the rank.
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            return 1
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be caught: no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return os.waitstatus_to_exitcode(status)


def _forward(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
