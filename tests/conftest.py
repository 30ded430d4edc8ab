"""Test tiers: unit (no MPI), ``mpi`` (real mpiexec), ``cli`` (commands as typed), ``slurm``, ``gpu``."""

import os
import shutil
import subprocess

import pytest

REQUIRE_SLURM = os.environ.get("MPIRT_REQUIRE_SLURM", "") not in ("", "0")
REQUIRE_HOSTS = os.environ.get("MPIRT_REQUIRE_HOSTS", "") not in ("", "0")
REQUIRE_GROFF = os.environ.get("MPIRT_REQUIRE_GROFF", "") not in ("", "0")
HOSTS_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "hosts",
                            "local-hosts.sh")


def pytest_configure(config):
    for name, doc in (
        ("mpi", "runs jobs under real mpiexec (1 to 8 ranks, oversubscribed)"),
        ("cli", "runs mpirt commands in a subprocess as a user types them"),
        ("slurm", "submits jobs to a real (local) Slurm"),
        ("hosts", "runs jobs over the simulated hosts of scripts/hosts/local-hosts.sh (root, network namespaces)"),
        ("gpu", "needs a CUDA GPU; MPIRT_REQUIRE_GPU=1 turns a skip into a failure"),
    ):
        config.addinivalue_line("markers", f"{name}: {doc}")


def _slurm_up():
    if not shutil.which("sinfo"):
        return "sinfo not found"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in states):
        return f"no usable Slurm node (sinfo: {out.stdout.strip() or out.stderr.strip()})"
    return None


@pytest.fixture(scope="session")
def slurm():
    """A running Slurm; skipped without one unless MPIRT_REQUIRE_SLURM=1 makes that a failure."""
    why = _slurm_up()
    if why:
        if REQUIRE_SLURM:
            pytest.fail(f"MPIRT_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    return True


@pytest.fixture(scope="session")
def groff():
    """groff with its HTML device (Debian's ``groff``; ``groff-base`` lacks it), which renders the man
    pages of the real-text corpus (bench/mancorpus.py); skipped without it unless MPIRT_REQUIRE_GROFF=1."""
    why = None
    if not shutil.which("groff"):
        why = "groff not found (apt-get install groff)"
    elif subprocess.run(["groff", "-Thtml"], input=b"", capture_output=True, timeout=30).returncode:
        why = "groff has no HTML device (apt-get install groff, not only groff-base)"
    if why:
        if REQUIRE_GROFF:
            pytest.fail(f"MPIRT_REQUIRE_GROFF=1 but {why}")
        pytest.skip(why)
    return True


@pytest.fixture(scope="session")
def hosts():
    """The simulated multi-host cluster (4 hosts: node4 is the one that joins): started here when it is
    not running, stopped after.

    Needs root and iproute2; without them the tests skip, unless MPIRT_REQUIRE_HOSTS=1 (CI) makes
    that a failure.
    """
    why = None
    if os.geteuid() != 0:
        why = "simulated hosts need root (network namespaces)"
    elif not shutil.which("ip"):
        why = "simulated hosts need iproute2 (ip)"
    if why:
        if REQUIRE_HOSTS:
            pytest.fail(f"MPIRT_REQUIRE_HOSTS=1 but {why}")
        pytest.skip(why)
    running = subprocess.run([HOSTS_SCRIPT, "status"], capture_output=True, text=True, timeout=30)
    started = running.returncode != 0 or not running.stdout.startswith("hosts: 4 ")
    if started:
        res = subprocess.run([HOSTS_SCRIPT, "start", "4"], capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            pytest.fail(f"local-hosts.sh start failed: {res.stderr.strip()}")
    yield True
    if started:
        subprocess.run([HOSTS_SCRIPT, "stop"], capture_output=True, timeout=60)
