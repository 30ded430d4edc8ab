"""`mpirt launch` and `mpirt info` run as a user types them."""

import json
import os
import sys

import pytest

from harness import MPIEXEC, MPIRT, run, run_cli

JOB = os.path.join(os.path.dirname(__file__), "jobs", "squares.py")


@pytest.mark.cli
def test_info_reports_mpi_and_ulfm():
    res = run_cli("info", "--json", timeout=60).check()
    facts = json.loads(res.stdout)
    assert "Open MPI" in facts["mpi_library"]
    assert facts["ulfm_compiled"] is True
    assert facts["ulfm_active"] is False and "not launched" in facts["ulfm_inactive_reason"]


@pytest.mark.cli
@pytest.mark.mpi
def test_info_under_launch_says_ulfm_is_active():
    res = run_cli("launch", "-n", "1", "--", "mpirt", "info", "--json", timeout=60).check()
    facts = json.loads(res.stdout)
    assert facts["ulfm_active"] is True, facts


@pytest.mark.cli
def test_launch_dry_run_prints_the_mpiexec_line():
    res = run_cli("launch", "-n", "3", "--spare", "1", "--dry-run", "--", "mpirt", "info", timeout=60).check()
    line = res.stdout.strip()
    assert line.startswith(MPIEXEC) and "-n 3" in line and "--with-ft ulfm" in line
    assert "--host localhost:4" in line and line.endswith("-m mpirt info")


@pytest.mark.cli
@pytest.mark.parametrize("args, words", [
    (["launch", "--bogus", "--", "true"], "unrecognized arguments: --bogus"),
    (["launch", "-n", "0", "--", "true"], "need -n >= 1"),
    (["launch", "--hostfile", "/nonexistent/hosts", "--", "true"], "hostfile not found"),
    (["launch", "-n", "two", "--", "true"], "invalid int value"),
    (["launch"], "required: COMMAND"),
])
def test_launch_usage_errors_are_one_line_exit_2(args, words):
    res = run_cli(*args, timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], res.stderr
    assert "Traceback" not in res.output


@pytest.mark.mpi
def test_plain_mpiexec_without_ft_flags_warns_once(tmp_path):
    out = tmp_path / "out.npy"
    res = run([MPIEXEC, "-n", "2", "--oversubscribe", sys.executable, JOB, out, "--shards", "4"], timeout=60).check()
    warnings = [line for line in res.stderr.splitlines() if "fault tolerance is off" in line]
    assert len(warnings) == 1 and "--with-ft ulfm" in warnings[0], res.stderr


@pytest.mark.mpi
def test_restart_mode_relaunches_and_resumes(tmp_path):
    out = tmp_path / "out.npy"
    res = run([MPIRT, "launch", "-n", "2", "--ft", "restart", "--max-restarts", "2", "--",
               sys.executable, JOB, out, "--shards", "12", "--inject-fault", "kill:member=coordinator:step=5"],
              timeout=120).check()
    assert "restart mode: relaunching" in res.stderr
    with open(f"{out}.parts/ledger.jsonl") as f:
        shards = sorted(json.loads(line)["shard"] for line in f)
    assert shards == list(range(12)), "every shard committed exactly once across the restart"
