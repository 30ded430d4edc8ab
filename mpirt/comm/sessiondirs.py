"""Open MPI's session directories left behind by runtimes that were killed.

``mpiexec`` (PRRTE) makes ``$TMPDIR/ompi.<pid>`` and each host's daemon ``$TMPDIR/prted.<pid>``,
holding the PMIx server's rendezvous sockets, and removes them when it ends normally. A runtime
that is SIGKILLed (a lost host, a test's fault) leaves them. When the pid comes round again
(``pid_max`` is 32768 on many machines), the new runtime finds the old sockets and its PMIx
listener fails to start ("The PMIx server's listener thread failed to start"): nothing runs.
The launcher clears the directories of processes that no longer exist before it starts a job.
"""

import os
import re
import shutil
import tempfile

from mpirt.atomic import pid_alive

_SESSION = re.compile(r"^(ompi|prted|prterun|prte)\.(\d+)$")


def sweep(tmpdir=None):
    """Remove this user's session directories in ``tmpdir`` whose process is gone; return their paths.

    Only this user's: another user's directory is not ours to judge. Simulated hosts (network
    namespaces) share this machine's pids, so a pid that is not alive here is not alive anywhere.
    """
    tmpdir = tmpdir or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(tmpdir)
    except OSError:
        return removed
    uid = os.geteuid()
    for name in names:
        m = _SESSION.match(name)
        if not m:
            continue
        path = os.path.join(tmpdir, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != uid or not os.path.isdir(path) or os.path.islink(path) or pid_alive(int(m.group(2))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
