"""Issue 10, outputs: what a careless or hostile user did to mpirt's outputs, as real commands.

Each test failed on cdcce81: an output written over an input, an unrelated file replaced, a
``.parts`` directory shared by two jobs or resumed by another one, a full disk (segfault), a
killed ``prepare`` (temporaries and orphaned workers), a FIFO (hang), a bad ``--checkpoint-dir``
found only after training, outputs into missing directories created silently.
"""

import hashlib
import os
import select
import signal
import subprocess
import sys
import time
import uuid

import h5py
import psutil
import pytest

from harness import MPIRT, base_env, kill_tagged, run, run_cli, tagged_processes

pytestmark = pytest.mark.cli


def refused(res, code, *words):
    """Exactly one line on stderr, naming ``words``, exit ``code``, no traceback."""
    assert not res.timed_out, res.output
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code and len(lines) == 1, (res.returncode, res.output)
    assert "Traceback" not in res.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def temporaries(directory):
    return [os.path.join(r, n) for r, _, names in os.walk(directory) for n in names if n.endswith(".tmp")]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    run_cli("prepare", "synth-text", d / "t.h5", "--rows", "3000", "--features", "1024", "--shard-rows", "128").check()
    run_cli("prepare", "synth-text", d / "u.h5", "--rows", "3000", "--features", "1024", "--shard-rows", "128",
            "--seed", "5").check()
    return d / "t.h5", d / "u.h5"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits")
    data = d / "digits.h5"
    run_cli("prepare", "digits", data, "--shard-rows", "64").check()
    ckpts = []
    for seed in (1, 2):
        run_cli("train", "--data", data, "--model", "linear", "--epochs", "1", "--seed", seed, "--no-progress",
                "--checkpoint-dir", d / f"ck{seed}").check()
        ckpts.append(next((d / f"ck{seed}").iterdir()))
    return data, ckpts


# -- 1. an output that is an input, or an unrelated file ---------------------------------------
def test_prepare_text_onto_its_input_is_refused_by_any_name(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(f'{{"text": "w{i} x", "label": {i % 2}}}\n' for i in range(50)))
    before = sha(src)
    os.link(src, tmp_path / "hard.h5")
    os.symlink(src, tmp_path / "soft.h5")
    for out in (src, tmp_path / "hard.h5", tmp_path / "soft.h5"):
        refused(run_cli("prepare", "text", src, out), 2, str(out), "same file", str(src))
        assert sha(src) == before
    refused(run_cli("prepare", "synth-text", tmp_path / "o.h5", "--rows", "10", "--jsonl", tmp_path / "o.h5"),
            2, "same file")


def test_wordcount_and_classify_onto_their_inputs_are_refused(tmp_path, text, digits):
    data = text[0]
    before = sha(data)
    refused(run_cli("wordcount", data, "--out", data), 2, "same file")
    os.link(data, tmp_path / "alias.h5")
    refused(run_cli("wordcount", data, "--out", tmp_path / "alias.h5"), 2, "same file")
    assert sha(data) == before
    dig, ckpts = digits
    keep = sha(dig), sha(ckpts[0])
    refused(run_cli("classify", "--data", dig, "--checkpoint", ckpts[0], "--out", dig), 2, "--data", "same file")
    refused(run_cli("classify", "--data", dig, "--checkpoint", ckpts[0], "--out", ckpts[0]), 2, "--checkpoint")
    assert (sha(dig), sha(ckpts[0])) == keep
    assert not os.path.exists(f"{dig}.parts") and not os.path.exists(f"{ckpts[0]}.parts")


def test_unrelated_file_is_replaced_only_with_force(tmp_path, text):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    refused(run_cli("wordcount", text[0], "--out", notes), 2, "not a wordcount output", "--force")
    refused(run_cli("prepare", "digits", notes), 2, "not a data set", "--force")
    assert notes.read_text() == "my notes\n"
    # a previous output of the same kind is replaced without --force; another kind is not
    out = tmp_path / "counts.h5"
    run_cli("wordcount", text[0], "--out", out).check()
    run_cli("wordcount", text[0], "--out", out).check()
    refused(run_cli("prepare", "digits", out), 2, "not a data set")
    run_cli("wordcount", text[0], "--out", notes, "--force").check()
    with h5py.File(notes) as f:
        assert f.attrs["mpirt_output"] == "wordcount"


# -- 2. OUT.parts belongs to one job -------------------------------------------------------------
def test_resume_with_another_split_or_data_set_is_refused(tmp_path, text):
    data, other = text
    out = tmp_path / "c.h5"
    run_cli("wordcount", data, "--out", out, "--keep-parts").check()
    before = sha(out)
    line = refused(run_cli("wordcount", data, "--out", out, "--split", "val", "--resume"), 1,
                   f"{out}.parts", "another job", "--split")
    assert '"train" there, "val" here' in line
    refused(run_cli("wordcount", other, "--out", out, "--resume"), 1, "data set")
    assert sha(out) == before
    # without --resume the directory is simply this job's again; at the end only mpirt's files go
    (tmp_path / "c.h5.parts" / "notes.txt").write_text("mine")
    run_cli("wordcount", data, "--out", out, "--split", "val").check()
    assert os.listdir(f"{out}.parts") == ["notes.txt"]


def test_classify_resume_with_another_model_or_top_k_is_refused(tmp_path, digits):
    data, (a, b) = digits
    out = tmp_path / "p.h5"
    run_cli("classify", "--data", data, "--checkpoint", a, "--out", out, "--keep-parts").check()
    line = refused(run_cli("classify", "--data", data, "--checkpoint", b, "--out", out, "--top-k", "2",
                           "--resume"), 1, "checkpoints", "--top-k")
    assert "data set" not in line


def test_parts_symlink_is_refused_and_its_target_untouched(tmp_path, text):
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("shard-000000.h5", "ledger.jsonl", "x.tmp", "precious"):
        (victim / name).write_text(name)
    out = tmp_path / "c.h5"
    os.symlink(victim, f"{out}.parts")
    for extra in ([], ["--resume"]):
        refused(run_cli("wordcount", text[0], "--out", out, *extra), 1, "symbolic link")
    assert sorted(os.listdir(victim)) == ["ledger.jsonl", "precious", "shard-000000.h5", "x.tmp"]
    assert not out.exists()


def test_a_second_job_on_the_same_out_is_refused_while_the_first_runs(tmp_path, text):
    out = tmp_path / "c.h5"
    tag = uuid.uuid4().hex
    # The first job stops itself (SIGSTOP) after two shards, holding the parts directory.
    first = subprocess.Popen([MPIRT, "wordcount", text[0], "--out", out, "--inject-fault", "hang:member=0:step=2"],
                             env=base_env(tag), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        parts = tmp_path / "c.h5.parts"
        # Wait until the first job has stopped itself: the process state says so (no timing guess).
        proc = psutil.Process(first.pid)
        deadline = time.monotonic() + 60
        while proc.status() != psutil.STATUS_STOPPED:
            assert time.monotonic() < deadline and first.poll() is None, "the first job never stopped itself"
            select.select([], [], [], 0.05)
        committed = sorted(os.listdir(parts))
        for extra in ([], ["--resume"]):
            refused(run_cli("wordcount", text[1], "--out", out, *extra), 1, "in use by another job",
                    f"pid {first.pid}")
        assert sorted(os.listdir(parts)) == committed, "the refused job touched nothing"
    finally:
        kill_tagged(tag)
        first.wait(10)
    # the lock died with its holder: the killed job resumes
    run_cli("wordcount", text[0], "--out", out, "--resume").check()
    assert not os.path.exists(f"{out}.parts")


# -- 10. a full disk -----------------------------------------------------------------------------
_FSIZE_WRAPPER = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                  "n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
                  "os.execv(sys.argv[2], sys.argv[2:])")


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (as root), else a file size limit (EFBIG, a real errno path too).

    Yields (directory, cmd(limit, *args) -> argv, mounted); ``limit`` is the file size limit.
    """
    d = tmp_path / "small"
    d.mkdir()
    mounted = os.environ.get("MPIRT_TEST_NO_MOUNT") != "1" and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", d], capture_output=True).returncode == 0

    def cmd(limit, *args):
        return [MPIRT, *args] if mounted else [sys.executable, "-c", _FSIZE_WRAPPER, str(limit), MPIRT, *args]
    try:
        yield d, cmd, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", d], check=True)


def _full(mounted, line, target):
    assert (f"no space left on {target.parent}" if mounted else "file too large") in line, line


def test_prepare_on_a_full_disk_is_one_line_and_keeps_the_old_output(small_disk):
    d, cmd, mounted = small_disk
    out = d / "t.h5"
    run_cli("prepare", "synth-text", out, "--rows", "200", "--features", "1024").check()
    before = sha(out)
    res = run(cmd(1 << 20, "prepare", "synth-text", out, "--rows", "30000", "--features", "4096", "--workers", "2"))
    _full(mounted, refused(res, 1, f"writing {out}"), out)
    assert sha(out) == before and temporaries(d) == []


def test_a_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_one_before(small_disk, digits):
    d, cmd, mounted = small_disk
    ckpt = d / "ckpt"
    # An MLP of ~300k parameters: a checkpoint with its momentum is ~2.4 MB; the second does not fit.
    res = run(cmd(3 << 20, "train", "--data", digits[0], "--model", "mlp", "--hidden", "512", "--epochs", "2",
                  "--checkpoint-dir", ckpt, "--checkpoint-every", "5", "--keep", "10", "--no-progress"))
    assert res.returncode == 1 and "Traceback" not in res.output, res.output
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]  # besides the log of the first save
    assert len(errors) == 1 and "writing" in errors[0] and str(ckpt) in errors[0], res.stderr
    _full(mounted, errors[0], ckpt)
    names = sorted(os.listdir(ckpt))
    saved = [n for n in names if n.startswith("ckpt-")]
    assert saved == ["ckpt-00000005.h5"] and temporaries(d) == [], names
    from mpirt.checkpoint import load

    assert load(ckpt / saved[0]).position["step"] == 5  # the one before is whole


def test_shard_jobs_on_a_full_disk_are_one_line(small_disk, text, digits):
    d, _, mounted = small_disk
    if not mounted:  # a file size limit small enough to matter here breaks Open MPI's own start
        pytest.skip("needs a small tmpfs (mount as root)")
    out = d / "c.h5"
    run_cli("wordcount", text[0], "--out", out).check()
    before = sha(out)
    st = os.statvfs(d)  # leave a few KiB: the parts fit no longer
    with open(d / "filler", "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize - 12 * 1024))
    line = refused(run_cli("wordcount", text[0], "--out", out, "--force"), 1, f"no space left on {d} writing")
    assert ".parts/shard-" in line or str(out) in line
    assert sha(out) == before and temporaries(d) == []
    refused(run_cli("classify", "--data", digits[0], "--checkpoint", digits[1][0], "--out", d / "p.h5"), 1,
            f"no space left on {d} writing")
    # Under launch too: a worker that meets the full disk hands its line to the coordinator, which
    # stops every rank with it (before, the worker died and the launcher said "every rank ... lost").
    refused(run_cli("launch", "-n", "3", "--", "mpirt", "wordcount", text[0], "--out", out, "--force"), 1,
            f"no space left on {d} writing")
    assert sha(out) == before and temporaries(d) == []
    assert temporaries(d) == []


# -- 11. prepare killed --------------------------------------------------------------------------
def _foreground_signals():
    # As a shell starts a foreground job: SIGINT at its default. A test run started in the background
    # of a non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_prepare(tmp_path, tag):
    proc = subprocess.Popen([MPIRT, "prepare", "synth-text", tmp_path / "big.h5", "--rows", "400000",
                             "--features", "4096", "--workers", "2"], env=base_env(tag), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_foreground_signals)
    deadline = time.time() + 60
    while not (temporaries(tmp_path) and len(tagged_processes(tag)) >= 3):  # the parent and 2 workers
        assert time.time() < deadline and proc.poll() is None, "prepare never got going"
        time.sleep(0.1)
    return proc


def _gone(tag, timeout=10):
    """True when every process of the tag ended by itself within ``timeout``; kills what is left."""
    psutil.wait_procs(tagged_processes(tag), timeout=timeout)
    return not kill_tagged(tag)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupt")])
def test_prepare_stopped_by_a_signal_cleans_up(tmp_path, sig, code, word):
    tag = uuid.uuid4().hex
    try:  # whatever fails below, the job's processes do not outlive the test
        proc = _start_prepare(tmp_path, tag)
        # SIGTERM as `kill PID` sends it, to prepare alone; SIGINT as Ctrl-C does, to the process group.
        proc.send_signal(sig) if sig == signal.SIGTERM else os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code and word in err and "Traceback" not in err, (proc.returncode, err)
        assert len(err.strip().splitlines()) == 1, err
        assert _gone(tag), "worker processes outlived prepare"
    finally:
        kill_tagged(tag)
    assert temporaries(tmp_path) == [] and not (tmp_path / "big.h5").exists()


def test_prepare_sigkilled_workers_die_and_the_next_run_removes_its_temporary(tmp_path):
    tag = uuid.uuid4().hex
    try:
        proc = _start_prepare(tmp_path, tag)
        stale = temporaries(tmp_path)
        assert str(proc.pid) in os.path.basename(stale[0]), "the temporary names its owner"
        proc.kill()
        proc.communicate(timeout=30)
        assert _gone(tag), "worker processes outlived a SIGKILLed prepare"
    finally:
        kill_tagged(tag)
    live = tmp_path / f"small.h5.{os.getpid()}@{os.uname().nodename}.abcdefgh.tmp"
    live.write_text("a live process's temporary")  # this test's own pid: alive, so not stale
    run_cli("prepare", "synth-text", tmp_path / "big.h5", "--rows", "300", "--features", "1024").check()
    run_cli("prepare", "synth-text", tmp_path / "small.h5", "--rows", "300", "--features", "1024").check()
    assert temporaries(tmp_path) == [str(live)]


# -- 13. paths checked before any work -----------------------------------------------------------
def test_bad_checkpoint_dir_or_report_is_refused_before_training(tmp_path, digits):
    data = digits[0]
    afile = tmp_path / "afile"
    afile.write_text("x")
    for flag in ("--checkpoint-dir", "--report"):
        t0 = time.time()
        res = run_cli("train", "--data", data, "--model", "mlp", "--epochs", "50", "--no-progress", flag, afile)
        refused(res, 2, flag, "not a directory")
        assert time.time() - t0 < 30, "refused only after training"
        refused(run_cli("train", "--data", data, "--model", "linear", flag, tmp_path / "no" / "dir"), 2,
                f"directory {tmp_path / 'no'} does not exist")
    assert afile.read_text() == "x" and not (tmp_path / "no").exists()
    copy = tmp_path / "copy.h5"
    copy.write_bytes(data.read_bytes())
    refused(run_cli("train", "--data", copy, "--model", "linear", "--audit", copy), 2, "--audit", "same file")
    assert sha(copy) == sha(data)


def test_a_fifo_as_data_or_checkpoint_is_refused_not_waited_on(tmp_path, digits):
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)
    data, ckpts = digits
    for args in (["inspect", fifo], ["wordcount", fifo, "--out", tmp_path / "c.h5"],
                 ["train", "--data", fifo, "--model", "linear"],
                 ["classify", "--data", fifo, "--checkpoint", ckpts[0], "--out", tmp_path / "p.h5"],
                 ["classify", "--data", data, "--checkpoint", fifo, "--out", tmp_path / "p.h5"]):
        refused(run_cli(*args, timeout=60), 1, str(fifo), "FIFO")


def test_outputs_into_a_missing_directory_are_refused_by_every_command(tmp_path, text, digits):
    missing = tmp_path / "missing"
    data, ckpts = digits
    for args in (["prepare", "digits", missing / "d.h5"],
                 ["wordcount", text[0], "--out", missing / "c.h5"],
                 ["wordcount", text[0], "--out", tmp_path / "c.h5", "--events", missing / "e.jsonl"],
                 ["classify", "--data", data, "--checkpoint", ckpts[0], "--out", missing / "p.h5"],
                 ["train", "--data", data, "--model", "linear", "--audit", missing / "a.jsonl"]):
        refused(run_cli(*args), 2, f"directory {missing} does not exist")
        assert not missing.exists()
