"""Shared plumbing for the bench suites: timing, machine facts, JSON results."""

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

# Committed: RESULTS.md and the model read them (MPIRT_BENCH_OUT elsewhere for scratch runs).
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latest")


def timeit(fn, repeat=5, warmup=1):
    """Run ``fn`` warmup+repeat times; return the list of wall seconds of the counted runs."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def summary(samples):
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": list(samples)}


def machine():
    """What ran the benchmark: enough to tell two result files apart."""
    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for mod in ("numpy", "h5py", "torch", "mpi4py", "cupy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as absent
            info[mod] = None
    try:
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(OUT_DIR),
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


def free_port():
    """A free TCP port on the loopback (a gloo rendezvous beside the MPI job)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mpirt_launch(n, *flags):
    """The command that starts a worker on ``n`` ranks under ``mpirt launch`` (this interpreter)."""
    return [sys.executable, "-m", "mpirt", "launch", "-n", str(n), *flags, "--"]


def mpi_env(**extra):
    """This environment plus ``extra``, for a child that runs mpiexec (which refuses root unless told)."""
    env = dict(os.environ, **extra)
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def run_worker(launcher, worker, cfg, *, what, env=None, timeout=1800):
    """Run ``worker`` (a script's text) under ``launcher`` with ``cfg`` (JSON) as its argument; return
    the JSON its rank 0 printed after ``RESULT``. ``env``: variables added to this environment."""
    import tempfile

    env = mpi_env(**(env or {}))
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "worker.py")
        with open(script, "w") as f:
            f.write(worker)
        res = subprocess.run(launcher + [sys.executable, script, json.dumps(cfg)], capture_output=True, text=True,
                             timeout=timeout, env=env)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"{what} worker failed: {res.stdout[-1000:]}{res.stderr[-2000:]}")
    return json.loads(line[0][7:])


def write_results(suite, results, command=None, out_dir=None):
    """Write ``{machine, command, results}`` to ``<out_dir>/<suite>.json``; return the path."""
    out_dir = out_dir or os.environ.get("MPIRT_BENCH_OUT", OUT_DIR)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{suite}.json")
    doc = {"suite": suite, "machine": machine(), "command": command or " ".join(sys.argv), "results": results}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    from bench.report import plot_suite

    try:
        plot_suite(suite, out_dir)
    except Exception as exc:  # noqa: BLE001 - the JSON is written; a plot must not lose it
        print(f"bench: {suite}: no plot ({type(exc).__name__}: {exc})", file=sys.stderr)
    return path


def table(rows, headers):
    """A GitHub-markdown table, for the console and RESULTS.md."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def save_png(fig, out_dir, name):
    """Save a matplotlib figure as ``out_dir/name`` (written aside, then renamed); return the path."""
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return path


def log2_axes(ax, xlabel, ylabel, *, logy=False, legend=7):
    """The suites' plots: x on a log2 scale, labels, a light grid, a small legend."""
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both" if logy else "major")
    ax.legend(fontsize=legend)


def fmt_bytes(b):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024:
            return f"{b} {unit}"
        b //= 1024
    return f"{b} TiB"


def load_results(name, out_dir=None):
    """The ``{machine, command, results}`` document of suite ``name``, or None if it was not run."""
    path = os.path.join(out_dir or os.environ.get("MPIRT_BENCH_OUT", OUT_DIR), f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
