"""``python -m bench SUITE [args]``: run one benchmark suite (each is bench/<suite>.py with main(argv))."""

import importlib
import sys

SUITES = ("kernels", "io", "recovery", "ledger", "chaos", "allreduce", "train", "checkpoint", "scaling", "model",
          "sparse", "text", "defaults", "images", "recsys", "transport", "exact", "horovod", "security", "report")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUITES:
        sys.stderr.write(f"usage: python -m bench {{{','.join(SUITES)}}} [options]\n")
        return 2
    return importlib.import_module(f"bench.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
