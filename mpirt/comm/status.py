"""The job's own exit status, handed from the ranks to ``mpirt launch``.

Under ULFM, mpiexec's exit status says little: it is 0 when ranks were
SIGKILLed (failures are tolerated) and non-zero when a joined rank (a spawned
job, which mpiexec does not treat as fault tolerant) dies, even though the job
recovered. So the coordinator writes what really happened to the file named by
``MPIRT_STATUS_FILE``: "running" when the job starts, then its exit code.
"""

import os

from mpirt.config import STATUS_FILE


def _write(text):
    path = os.environ.get(STATUS_FILE)
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def started():
    _write("running")


def finished(code):
    _write(str(int(code)))


def read(path):
    """None when no mpirt job wrote the file, "running" if it never finished, else the code."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return text if text == "running" else int(text)
