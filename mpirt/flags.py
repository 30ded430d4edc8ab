"""Argument types for numeric flags: each value is checked where it is parsed, so a bad one is a
usage error (one line, exit 2) instead of a traceback deep in torch or numpy, or worse, a silent
nonsense run (``--lr nan`` trained to an all-NaN model, ``--hidden 0`` to a constant one).

Import-light: only argparse and math, since ``mpirt --help`` builds every parser.
"""

import argparse
import math

SEED_MAX = 2**63 - 1  # numpy's PCG64 and torch.manual_seed both take it; beyond, they raise
# Sizes a model flag (--hidden, --embed-dim, --channels) may take: larger ones only ever meant
# allocating gigabytes for nothing (the parameter cap in mpirt.train.models still applies).
SIZE_MAX = 1 << 16


def integer(lo=None, hi=None):
    """An int within [lo, hi] (either bound may be None)."""
    def parse(text):
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(_range(value, lo, hi))
        return value
    return parse


def number(lo=None, hi=None, *, lo_open=False, hi_open=False):
    """A finite float within the bounds (``lo_open``: strictly above ``lo``; ``hi_open``: below ``hi``)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(_range(value, lo, hi, lo_open, hi_open))
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(_range(value, lo, hi, lo_open, hi_open))
        return value
    return parse


def _range(value, lo, hi, lo_open=False, hi_open=False):
    if hi is None:
        return f"{value:g} is not {'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"{value:g} is not {'<' if hi_open else '<='} {hi:g}"
    return f"{value:g} is not in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


seed = integer(0, SEED_MAX)
positive = integer(1)
non_negative = integer(0)
size = integer(1, SIZE_MAX)


def reject_non_finite(args):
    """Raise UsageError for any float option that is NaN or infinite.

    A net under the typed flags above, for float options registered without them (``mpirt
    launch --hang-timeout nan`` silently turned the hang detector off: every comparison with NaN
    is false).
    """
    from mpirt.errors import UsageError

    for name, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} {value}: not a finite number")
