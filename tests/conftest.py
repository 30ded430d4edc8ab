"""Test tiers: unit (no MPI), ``mpi`` (real mpiexec), ``cli`` (commands as typed), ``slurm``, ``gpu``."""

import os
import shutil
import subprocess

import pytest

REQUIRE_SLURM = os.environ.get("MPIRT_REQUIRE_SLURM", "") not in ("", "0")


def pytest_configure(config):
    for name, doc in (
        ("mpi", "runs jobs under real mpiexec (1 to 8 ranks, oversubscribed)"),
        ("cli", "runs mpirt commands in a subprocess as a user types them"),
        ("slurm", "submits jobs to a real (local) Slurm"),
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
