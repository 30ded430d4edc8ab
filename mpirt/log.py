"""Logging where every line says which rank, of how many, on which host.

The rank is read when a line is written, not at import, so that the prefix
follows the current view after a shrink or a merge.
"""

import logging
import os
import socket
import sys

from mpirt.config import LOG_LEVEL

_identity = {"rank": None, "size": None, "member": None}


def set_identity(rank=None, size=None, member=None):
    """Record this process's rank/size/member id for the log prefix."""
    _identity.update(rank=rank, size=size, member=member)


class _RankFilter(logging.Filter):
    host = socket.gethostname()

    def filter(self, record):
        rank, size, member = _identity["rank"], _identity["size"], _identity["member"]
        if rank is None:
            rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "-"))
            size = os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "-"))
        tag = f"r{rank}/{size}"
        if member is not None:
            tag += f" m{member}"
        record.mpirt_tag = f"{tag} {self.host}"
        return True


def get_logger(name: str = "mpirt") -> logging.Logger:
    logger = logging.getLogger(name)
    root = logging.getLogger("mpirt")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("[mpirt %(mpirt_tag)s] %(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get(LOG_LEVEL, "INFO").upper())
        root.propagate = False
    return logger


def escape(text):
    """``text`` with non-printable characters as Python escapes (``\\x1b``, ``\\n``, ``\\u202e``).

    For names read from files (class names) on their way to a terminal: raw, an escape sequence
    in a hostile data set recolours the terminal, moves the cursor or fakes whole lines.
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
