"""The one command-line entry: ``mpirt`` and ``python -m mpirt``.

Thin on purpose: each command lives in the module that owns its logic, which
registers its sub-parser here; that module is imported only to build the parser
and must keep heavy imports (mpi4py, h5py, torch) inside its functions.
"""

import argparse
import importlib
import os
import sys

from mpirt import __version__
from mpirt.config import DEBUG
from mpirt.errors import MpirtError, Preempted

# Modules that register sub-commands, in the order `mpirt --help` lists them.
COMMAND_MODULES = (
    "mpirt.info",
    "mpirt.data.commands",
    "mpirt.comm.launch",
    "mpirt.train.commands",
    "mpirt.jobs.commands",
    "mpirt.secure.commands",
)


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mpirt", description="Elastic message-passing runtime (MPI/ULFM, HDF5, PyTorch).")
    parser.add_argument("--version", action="version", version=f"mpirt {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an unexpected error (every rank of a launched job: MPIRT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def _resolve(handler):
    if callable(handler):
        return handler
    module, _, func = handler.partition(":")
    return getattr(importlib.import_module(module), func)


def main(argv=None) -> int:
    code = _run(argv)
    from mpirt.comm import mpi

    mpi.exit_now_if_stopping(code)
    return code


def _run(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug:
        os.environ[DEBUG] = "1"  # ranks that `mpirt launch` starts inherit it
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        from mpirt.flags import reject_non_finite

        reject_non_finite(args)
        return int(_resolve(args.handler)(args) or 0)
    except Preempted as exc:
        if str(exc):  # the coordinator's one line; the other ranks stop silently
            sys.stderr.write(f"mpirt {args.command}: {exc}\n")
        return exc.exit_code
    except MpirtError as exc:
        if str(exc):  # ranks that only follow the coordinator's refusal stay silent
            sys.stderr.write(f"mpirt {args.command}: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"mpirt {args.command}: interrupted\n")
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # a bug, or something nobody anticipated: say it in one line, once
        return _unexpected(args.command, exc)


def _unexpected(command, exc):
    """One line naming the error and where it happened; the traceback with --debug (MPIRT_DEBUG=1).

    Under ``mpirt launch`` the line also goes to the launcher, which shows the first one instead of
    a generic "the job failed".
    """
    import socket
    import traceback

    from mpirt.comm import lifeline
    from mpirt.config import env_flag

    rank = os.environ.get("OMPI_COMM_WORLD_RANK")
    where = f" (rank {rank} on {socket.gethostname()})" if rank is not None else ""
    line = f"{type(exc).__name__}: {exc}{where}"
    if env_flag(DEBUG):
        traceback.print_exc()
    else:
        line += "; run with 'mpirt --debug' for the traceback"
    sys.stderr.write(f"mpirt {command}: error: {line}\n")
    lifeline.send("error", text=line)
    return 1
