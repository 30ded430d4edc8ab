"""Run commands as a user would, under real ``mpiexec``, bounded and leaving nothing behind.

Every launched process tree is tagged through its environment (``MPIRT_TEST_TAG``):
mpiexec passes the environment on to prted, to the ranks and to ranks spawned
later, so after a job the tag finds every process it left, wherever it was
re-parented. :func:`assert_no_leftovers` kills those and fails the test.
"""

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field

import h5py
import numpy as np
import psutil

VENV_BIN = os.path.dirname(sys.executable)
MPIRT = os.path.join(VENV_BIN, "mpirt")
MPIEXEC = os.path.join(VENV_BIN, "mpiexec")
TAG_VAR = "MPIRT_TEST_TAG"
# Bound on every launched job: generous for a 2-core machine running 8 oversubscribed ranks.
DEFAULT_TIMEOUT = 120

_TAGGED_LINE = re.compile(r"^\[\d+,(\d+)\]<(stdout|stderr)>: ?(.*)$")


def base_env(tag, extra=None):
    env = dict(os.environ)
    env[TAG_VAR] = tag
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class Result:
    args: list
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    ranks: dict = field(default_factory=dict)  # rank -> its lines (with --output tag)

    @property
    def output(self):
        return self.stdout + self.stderr

    def check(self, code=0):
        assert not self.timed_out, f"timed out: {self.args}\n{self.output[-4000:]}"
        assert self.returncode == code, (
            f"exit {self.returncode} != {code}: {' '.join(map(str, self.args))}\n"
            f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}"
        )
        return self


def tagged_processes(tag):
    """Every live process whose environment carries ``tag``."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(TAG_VAR) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def kill_tagged(tag):
    """SIGKILL every process of the tag (SIGSTOPped ones included); return their command lines."""
    procs = tagged_processes(tag)
    names = []
    for proc in procs:
        try:
            names.append(" ".join(proc.cmdline()[:4]))
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(procs, timeout=10)
    return names


def assert_no_leftovers(tag):
    """Fail if anything the job started is still alive (after killing it, so the next test is clean)."""
    left = kill_tagged(tag)
    assert not left, f"processes left behind: {left}"


def run(args, *, timeout=DEFAULT_TIMEOUT, env=None, cwd=None, input=None, tag=None, check_leftovers=True):
    """Run ``args`` in a new session, bounded by ``timeout``; kill the whole tree on expiry."""
    tag = tag or uuid.uuid4().hex
    proc = subprocess.Popen(
        [str(a) for a in args], stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
        env=base_env(tag, env), start_new_session=True,
    )
    timed_out = False
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_tagged(tag)
        out, err = proc.communicate()
    result = Result(list(args), proc.returncode, out, err, timed_out)
    if check_leftovers:
        assert_no_leftovers(tag)
    return result


def run_cli(*args, **kwargs):
    """Run ``mpirt ARGS...`` exactly as a user types it."""
    return run([MPIRT, *args], **kwargs)


FT_FLAGS = ["--with-ft", "ulfm", "--mca", "btl", "tcp,self", "--mca", "coll", "^han"]


def mpirun(n, args, *, timeout=DEFAULT_TIMEOUT, ft=True, slots=None, env=None, cwd=None, **kwargs):
    """Run ``args`` on ``n`` ranks under the venv's real mpiexec, output tagged per rank.

    Args:
        n: number of ranks.
        args: the command each rank runs (e.g. ``[sys.executable, script]``).
        ft: add the ULFM flags that work on this machine (FACTS.md).
        slots: total slots on localhost (more than ``n`` leaves room for spawned ranks).
    """
    cmd = [MPIEXEC, "-n", str(n), "--oversubscribe", "--output", "tag"]
    if slots:
        cmd += ["--host", f"localhost:{slots}"]
    if ft:
        cmd += FT_FLAGS
    result = run(cmd + [str(a) for a in args], timeout=timeout, env=env, cwd=cwd, **kwargs)
    for stream in (result.stdout, result.stderr):
        for line in stream.splitlines():
            m = _TAGGED_LINE.match(line)
            if m:
                result.ranks.setdefault(int(m.group(1)), []).append(m.group(3))
    return result


def one_line_error(res, code, *words):
    """A refusal: exit ``code``, no traceback, one line on stderr besides mpirt's progress log, naming ``words``."""
    assert not res.timed_out, res.output
    assert res.returncode == code, res.output
    assert "Traceback" not in res.output, res.output
    # progress logs ("[mpirt r0/1 ...] checkpoint ...") may precede it; the refusal is one line
    lines = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith("[mpirt ")]
    assert len(lines) == 1 and lines[0].startswith("mpirt"), f"expected one line:\n{res.stderr}"
    for w in words:
        assert str(w) in lines[0], lines[0]
    return lines[0]


def assert_same_model(a, b, rtol=1e-5):
    """Parameters ``a`` within ``rtol`` of ``b``, relative to each tensor's largest magnitude.

    The default mode's promise (no ``--exact``) for short runs: its callers train at most 46 steps.
    Long runs drift apart (test_train's statistical test); ``--exact`` is compared with
    ``np.array_equal`` instead (test_exact).
    """
    assert a.keys() == b.keys()
    for k in a:
        scale = max(float(np.max(np.abs(a[k]))), 1e-12)
        err = float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) / scale
        assert err <= rtol, f"{k}: relative difference {err:.3g} > {rtol}"


def checkpoint_bits(ckpt_dir):
    """The newest checkpoint in ``ckpt_dir`` (or the checkpoint file it names): (params, optimizer
    state by (param, name), position)."""
    from mpirt.checkpoint import CheckpointDir, load

    ckpt = load(ckpt_dir) if os.path.isfile(ckpt_dir) else CheckpointDir(ckpt_dir).load_latest()
    opt = {(i, k): np.asarray(v) for i, s in ckpt.optimizer["state"].items() for k, v in s.items()}
    return ckpt.params, opt, ckpt.position


def assert_same_bits(a, b):
    """``--exact``'s promise: byte-equal (np.array_equal) parameters and optimizer state, given as
    :func:`checkpoint_bits` gives them."""
    (pa, oa, _), (pb, ob, _) = a, b
    assert pa.keys() == pb.keys() and oa.keys() == ob.keys()
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), f"parameter {k} differs"
    for k in oa:
        assert np.array_equal(oa[k], ob[k]), f"optimizer state {k} differs"


def wordcount_reference(d, shard_rows=128):
    """A synthetic text data set in ``d`` (38 shards of 128 rows, or of ``shard_rows``) and its one-rank
    wordcount: (data path, reference output path), for jobs that must end bit-identical to it."""
    data = d / "text.h5"
    run_cli("prepare", "synth-text", data, "--rows", "6000", "--features", "2048", "--shard-rows",
            str(shard_rows)).check()
    run_cli("wordcount", data, "--out", d / "ref.h5").check()
    return data, d / "ref.h5"


def assert_same_output(ref, out):
    """Two result files of mpirt (wordcount, classify) are the same result: the digest each records,
    and every data set, bit for bit."""
    with h5py.File(ref) as a, h5py.File(out) as b:
        assert a.attrs["sha256"] == b.attrs["sha256"]
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k][()], b[k][()])


def assert_each_shard_once(ledger, shards=None):
    """A shard job's commit log (the text of ``OUT.parts/ledger.jsonl``): shards 0..n-1 (``shards``
    of them, when given), each committed exactly once, none recorded as a duplicate."""
    records = [json.loads(line) for line in ledger.splitlines()]
    done = sorted(r["shard"] for r in records)
    assert done == list(range(len(done) if shards is None else shards)), done
    assert not any(r.get("duplicate") for r in records), records
