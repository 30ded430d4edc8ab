"""The job's own exit status, handed from the coordinator to ``mpirt launch`` over the lifeline.

Under ULFM, mpiexec's exit status says little: it is 0 when ranks were SIGKILLed (failures are
tolerated), non-zero when a joined rank (a spawned job, which mpiexec does not treat as fault
tolerant) dies even though the job recovered, and mpiexec is gone altogether after a lost host
while the job goes on. So the coordinator reports what really happened: "running" when the job
starts, then its exit code (see :mod:`mpirt.comm.lifeline`). Without ``mpirt launch`` these do
nothing.
"""

from mpirt.comm import lifeline


def started():
    lifeline.send("status", code="running")


def finished(code):
    lifeline.send("status", code=int(code))


def hosts_changed(lost=(), joined=()):
    """For the launcher's closing summary: hosts lost and joined (the events log has the details)."""
    lifeline.send("hosts", lost=list(lost), joined=list(joined))
