"""`mpirt launch` and `mpirt info` run as a user types them."""

import json
import os
import signal
import sys
import time

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
def test_launch_takes_horovodrun_style_np_and_hosts():
    """``horovodrun -np 4 -H node1:2,node2 python train.py`` needs one word changed."""
    res = run_cli("launch", "-np", "3", "-H", "node1:2,node2", "--dry-run", "python", "train.py", timeout=60).check()
    line = res.stdout.strip()
    assert " -n 3 " in line and "--host node1:2,node2:1" in line, line
    # Two hosts: the host-fault-tolerant path, as with a hostfile.
    assert "-m mpirt.comm.shim python train.py" in line and "--mca btl tcp,self" in line, line


def test_launch_clears_session_dirs_of_runtimes_that_are_gone(tmp_path):
    """A killed mpiexec leaves ``ompi.<pid>``; a runtime started later under that pid would fail to start."""
    import subprocess

    from mpirt.comm import sessiondirs

    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process now
    for name in (f"ompi.{gone.pid}", f"prted.{gone.pid}", f"ompi.{os.getpid()}", "ompi.notapid", "other.1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pmix.head.tool").write_text("")
    removed = sessiondirs.sweep(str(tmp_path))
    assert sorted(removed) == sorted(str(tmp_path / n) for n in (f"ompi.{gone.pid}", f"prted.{gone.pid}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"ompi.{os.getpid()}", "ompi.notapid", "other.1"])


@pytest.mark.cli
@pytest.mark.parametrize("args, words", [
    (["launch", "--bogus", "--", "true"], "unrecognized arguments: --bogus"),
    (["launch", "-n", "0", "--", "true"], "need -n >= 1"),
    (["launch", "--hostfile", "/nonexistent/hosts", "--", "true"], "hostfile not found"),
    (["launch", "-n", "two", "--", "true"], "invalid int value"),
    (["launch"], "required: COMMAND"),
    (["launch", "-H", "node1:two", "--", "true"], "slots of node1 must be a positive integer"),
    (["launch", "-H", "node1,,node2", "--", "true"], "an empty host name"),
    (["launch", "-H", "node1,node1:2", "--", "true"], "host node1 is listed twice"),
    (["launch", "-H", "node1", "--hostfile", "/etc/hosts", "--", "true"], "-H and --hostfile both name the hosts"),
])
def test_launch_usage_errors_are_one_line_exit_2(args, words):
    res = run_cli(*args, timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], res.stderr
    assert lines[0].startswith(("mpirt launch: error:", "mpirt: error:")), lines[0]
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


def _start_training(tmp_path, digits_args, tag):
    """`mpirt launch -n 2 -- mpirt train` long enough to be signalled mid-run; returns (proc, audit, ckpt)."""
    import subprocess

    from harness import base_env

    data = tmp_path / "digits.h5"
    run_cli("prepare", "digits", data, "--shard-rows", "256").check()
    audit, ckpt = tmp_path / "audit.jsonl", tmp_path / "ckpt"
    proc = subprocess.Popen([MPIRT, "launch", "-n", "2", "--hang-timeout", "2", "--", "mpirt", "train", "--data",
                             data, "--model", "mlp", "--epochs", "200", "--no-progress", "--checkpoint-dir", ckpt,
                             "--audit", audit, *digits_args],
                            env=base_env(tag), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return proc, audit, ckpt


def _wait_for_steps(proc, audit, steps, timeout=120):
    """Block until the audit log has ``steps`` committed steps (it is written as they commit)."""
    import select

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if audit.exists() and sum(1 for _ in open(audit)) >= steps:
            return
        assert proc.poll() is None, proc.communicate()
        select.select([], [], [], 0.05)  # poll the file: the job gives no other signal of progress
    raise AssertionError(f"fewer than {steps} steps in {timeout} s")


@pytest.mark.mpi
@pytest.mark.cli
def test_ranks_die_with_a_killed_launcher(tmp_path):
    import uuid

    import psutil

    from harness import kill_tagged, tagged_processes

    tag = uuid.uuid4().hex
    proc, audit, _ = _start_training(tmp_path, [], tag)
    try:
        _wait_for_steps(proc, audit, 20)
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone, not its process group
        proc.wait()
        # Each rank's lifeline reads end-of-file and the rank stops; then mpiexec has nothing to wait for.
        _, alive = psutil.wait_procs(tagged_processes(tag), timeout=30)
        assert not alive, [p.cmdline()[:4] for p in alive]
    finally:
        kill_tagged(tag)


@pytest.mark.mpi
@pytest.mark.cli
@pytest.mark.parametrize("sig, group", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)])
def test_sigterm_or_ctrl_c_to_the_launcher_is_a_clean_stop(tmp_path, sig, group):
    """SIGTERM or SIGINT to `mpirt launch`, or Ctrl-C at its terminal (its whole process group)."""
    import uuid

    from harness import assert_no_leftovers

    tag = uuid.uuid4().hex
    proc, audit, ckpt = _start_training(tmp_path, [], tag)
    try:
        _wait_for_steps(proc, audit, 20)
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        assert_no_leftovers(tag)
    assert proc.returncode == 75, err
    assert "saves its state and stops" in err and "stopped on request" in err, err
    # The launcher returned only after the checkpoint was in place: no temporary left.
    names = sorted(os.listdir(ckpt))
    saved = [n for n in names if n.startswith("ckpt-")]
    assert saved and all(n.endswith(".h5") for n in saved) and not [n for n in names if ".tmp" in n], names
    assert "Traceback" not in err


@pytest.mark.mpi
@pytest.mark.cli
@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_error_in_every_rank_is_shown_not_hidden(tmp_path, debug):
    """A bug that every rank hits: the launcher repeats the first rank's own line, not 'ranks lost'."""
    data = tmp_path / "digits.h5"
    run_cli("prepare", "digits", data, "--shard-rows", "256").check()
    job = ["mpirt", *(["--debug"] if debug else []), "train", "--data", data, "--model", "linear", "--epochs", "1",
           "--no-progress", "--inject-fault", "raise:member=0:step=3", "--inject-fault", "raise:member=1:step=3"]
    res = run_cli("launch", "-n", "2", "--hang-timeout", "2", "--", *job, timeout=120)
    assert res.returncode == 1, res.output
    assert "the job failed: RuntimeError: injected fault raise:member=" in res.stderr, res.stderr
    assert "every rank that could coordinate it was lost" not in res.stderr
    assert ("Traceback" in res.stderr) == debug
    if not debug:
        assert "run with 'mpirt --debug' for the traceback" in res.stderr


@pytest.mark.mpi
@pytest.mark.cli
def test_a_job_whose_ranks_were_all_killed_is_a_failure_though_mpiexec_says_0():
    """Under ULFM mpiexec exits 0 when its ranks are killed (failures are tolerated); the launcher
    knows better: no rank reported a status and none ended normally (the lifeline's 'bye')."""
    killed = "import os; from mpirt.comm import lifeline; lifeline.connect(); os.kill(os.getpid(), 9)"
    res = run_cli("launch", "-n", "2", "--", sys.executable, "-c", killed, timeout=120)
    assert res.returncode == 1 and "its ranks were lost while starting" in res.stderr, res.output
    ended = "from mpirt.comm import lifeline; lifeline.connect()"  # a program that ends normally
    run_cli("launch", "-n", "2", "--", sys.executable, "-c", ended, timeout=120).check()
