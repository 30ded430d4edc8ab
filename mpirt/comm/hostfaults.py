"""Host-level faults for the simulated hosts of ``scripts/hosts/local-hosts.sh``, struck from a rank.

A simulated host is a network namespace of its own; its processes (Open MPI's daemon, the shims,
the ranks) are the processes in that namespace. Struck from inside at a given step, a host fault
is deterministic where one struck from outside would race the job:

- ``host-crash``: SIGKILL every process of the host at once (this one last);
- ``host-freeze``: SIGSTOP every process of the host (thawed from outside: ``local-hosts.sh thaw``);
- ``host-cut``: take every link of the host down but loopback (a partition; ``local-hosts.sh heal``).

Refused outside a simulated host (the agent, ``scripts/hosts/ssh``, sets ``MPIRT_SIMULATED_HOST`` to
the host's name): on a real machine "every process of the host" is the machine.
"""

import fcntl
import os
import signal
import socket
import struct

from mpirt.config import SIMULATED_HOST as SIMULATED
from mpirt.errors import JobError

ACTIONS = ("host-crash", "host-freeze", "host-cut")

_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def _netns(pid="self"):
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def host_pids():
    """Every process in this process's network namespace (this one included)."""
    mine, pids = _netns(), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if _netns(name) == mine:
                    pids.append(int(name))
            except OSError:
                continue  # gone, or not ours to see
    return pids


def on_simulated_host():
    return bool(os.environ.get(SIMULATED)) and os.environ[SIMULATED] == socket.gethostname()


def refusal(action):
    return (f"fault {action}: this rank is not on a simulated host (scripts/hosts/local-hosts.sh); refusing to "
            f"act on the whole machine")


def strike(action):
    if not on_simulated_host():
        raise JobError(refusal(action))
    if action == "host-cut":
        _links_down()
        return
    sig = signal.SIGKILL if action == "host-crash" else signal.SIGSTOP
    me = os.getpid()
    for pid in host_pids():
        if pid != me:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    os.kill(me, sig)


def _links_down():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            if name == "lo":
                continue
            req = struct.pack("16sH14x", name.encode(), 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(s, _SIOCGIFFLAGS, req))[1]
            fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags & ~_IFF_UP))
