"""Jobs over several nodes of a real Slurm survive the loss of a node (issue 9, "a whole host").

The cluster is ``scripts/slurm/local-cluster.sh start --hosts``: slurmctld on the head of the
simulated hosts (scripts/hosts/local-hosts.sh), one slurmd per host, submitted to from the head
through the launch agent, as from a login node. Jobs are ``sbatch -N 3`` with 2 tasks per node:
members 0-1 on the first node (the batch host, where ``mpirt launch`` runs), 2-3 on the second,
4-5 on the third. The second node is crashed from inside member 2 at a given step (``host-crash``:
slurmd, slurmstepd, Open MPI's daemon and the ranks of that node SIGKILLed at once), so where it
lands does not depend on timing. Each job must end as an uninterrupted run does: training within
1e-5 of one rank's parameters, wordcount bit-identical; below ``--min-ranks`` the job stops with a
checkpoint, is requeued, and resumes on the nodes left to the same parameters.

Every job is bounded (``--time`` and a deadline on its state), runs in its own directory, and is
checked to leave nothing behind (the agent and sbatch pass the environment, so the harness's tag
reaches every process of the job on every node).
"""

import json
import os
import subprocess
import time

import psutil
import pytest

from conftest import REQUIRE_HOSTS, REQUIRE_SLURM
from harness import (VENV_BIN, assert_each_shard_once, assert_no_leftovers, assert_same_model, assert_same_output, run,
                     run_cli, tagged_processes, wordcount_reference)

pytestmark = [pytest.mark.slurm, pytest.mark.hosts, pytest.mark.mpi]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "scripts", "slurm", "local-cluster.sh")
TRAIN_SBATCH = os.path.join(ROOT, "scripts", "slurm", "train.sbatch")
AGENT = os.path.join(ROOT, "scripts", "hosts", "ssh")
CONF = os.path.join(os.environ.get("MPIRT_SLURM_HOSTS_DIR", "/tmp/mpirt-slurm-hosts"), "slurm.conf")
VENV = os.path.dirname(VENV_BIN)
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
NODES = ["-N", "3", "--ntasks=6", "--ntasks-per-node=2", "--time=4"]


def cluster(action, timeout=150):
    return subprocess.run([CLUSTER, action, "--hosts"], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_hosts(hosts):
    """The multi-node Slurm: started here when it is not running (and stopped after), else left
    running, its nodes given back. Skipped when it cannot start, unless MPIRT_REQUIRE_SLURM=1 or
    MPIRT_REQUIRE_HOSTS=1 (CI) makes that a failure."""
    started = cluster("status").returncode != 0
    res = cluster("start")
    if res.returncode != 0:
        why = f"local-cluster.sh start --hosts failed: {res.stderr.strip()[-2000:]}"
        if REQUIRE_SLURM or REQUIRE_HOSTS:
            pytest.fail(why)
        pytest.skip(why)
    yield
    cluster("stop" if started else "start")


@pytest.fixture
def nodes(slurm_hosts):
    """Every node idle before a case: a node crashed before (by a case, or by anyone sharing the
    hosts) gets its slurmd back and registers again (ReturnToService=2)."""
    res = cluster("start")
    assert res.returncode == 0, res.stderr


def on_head(*words, timeout=30):
    """A Slurm client command on the head (words must not need quoting)."""
    return subprocess.run([AGENT, "head", " ".join(map(str, words))], env=dict(os.environ, SLURM_CONF=CONF),
                          capture_output=True, text=True, timeout=timeout)


def job_info(job):
    out = on_head("scontrol", "show", "job", "-o", job).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


class Job:
    """``sbatch`` on the head from ``cwd``; at exit cancelled, waited for, and checked for leftovers."""

    def __init__(self, cwd, *sbatch_args, env=None):
        self.cwd, self.tag = cwd, f"slurmh-{cwd.name}"
        line = " ".join(["sbatch", "--parsable", *map(str, sbatch_args)])
        res = run([AGENT, "head", line], cwd=cwd, env=dict(env or {}, SLURM_CONF=CONF), tag=self.tag, timeout=60,
                  check_leftovers=False)
        assert res.returncode == 0, res.output
        self.job = res.stdout.strip().split(";")[0]

    def finished(self, deadline_s=180):
        """``scontrol show job`` once the job has ended (polled: Slurm has no event to wait on)."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            info = job_info(self.job)
            if info.get("JobState") in TERMINAL:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {self.job} not ended after {deadline_s} s: {job_info(self.job)}\n{self.logs()}")

    def logs(self):
        return "".join(p.read_text(errors="replace") for p in sorted(self.cwd.glob("*.out")))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        on_head("scancel", self.job)
        end = time.monotonic() + 60
        while job_info(self.job).get("JobState") not in TERMINAL + (None,) and time.monotonic() < end:
            time.sleep(0.5)
        # The srun that started Open MPI's daemons outlives a lost node's job by seconds: it waits
        # for the dead node's tasks until Slurm ends the step (proctrack/linuxproc does not reach it
        # once mpiexec, its parent, is gone). Wait for the job's processes to end on their own.
        psutil.wait_procs(tagged_processes(self.tag), timeout=60)
        assert_no_leftovers(self.tag)


def events_of(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def node_list(info):
    return on_head("scontrol", "show", "hostnames", info["NodeList"]).stdout.split()


def assert_second_node_lost(run_dir, logs):
    """Members 2 and 3 (the second node of the first run) were lost together, as a host."""
    lost = [e for e in events_of(run_dir / "events.jsonl") if e["event"] == "host_lost"]
    assert len(lost) == 1 and sorted(lost[0]["members"]) == [2, 3], (lost, logs)
    host = lost[0]["host"]
    assert f"hosts lost: {host}" in logs, logs
    return host


# -- training ----------------------------------------------------------------------------------
TRAIN = ["--model", "mlp", "--epochs", "2", "--global-batch", "64", "--lr", "0.05", "--seed", "3",
         "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdigits")
    data = d / "digits.h5"
    run_cli("prepare", "digits", data, "--shard-rows", "256").check()
    run_cli("train", "--data", data, *TRAIN, "--no-progress", "--checkpoint-dir", d / "ref").check()
    return data, d / "ref"


def assert_one_rank_model(run_dir, ref_dir):
    from mpirt.checkpoint import CheckpointDir

    got, ref = CheckpointDir(run_dir / "ckpt").load_latest(), CheckpointDir(ref_dir).load_latest()
    assert got.position["step"] == ref.position["step"] == 46
    assert_same_model(got.params, ref.params, rtol=1e-5)
    steps = [json.loads(line)["step"] for line in open(run_dir / "audit.jsonl")]
    assert steps == list(range(46)), "every step committed exactly once"


def test_training_finishes_on_the_nodes_left_after_a_node_crash(tmp_path, nodes, digits):
    data, ref = digits
    run_dir = tmp_path / "run"
    env = {"MPIRT_VENV": VENV, "DATA": data, "RUN_DIR": run_dir}
    with Job(tmp_path, *NODES, TRAIN_SBATCH, *TRAIN, "--inject-fault", "host-crash:member=2:step=20",
             env=env) as job:
        info = job.finished()
        logs = job.logs()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, logs)
    assert "train: 46 steps, 2 view(s), 4 rank(s) at the end" in logs, logs
    host = assert_second_node_lost(run_dir, logs)
    assert host == node_list(info)[1]
    assert_one_rank_model(run_dir, ref)


def test_training_below_min_ranks_is_requeued_and_resumes_on_the_nodes_left(tmp_path, nodes, digits):
    """Losing a node leaves 4 ranks, fewer than --min-ranks 6: the survivors save step 20 and stop
    (exit 75), `mpirt launch --requeue` requeues the job, and Slurm runs it again, once the lost node
    is DOWN, on 3 nodes without it (node4 is free); it resumes and ends with the uninterrupted model."""
    data, ref = digits
    run_dir = tmp_path / "run"
    env = {"MPIRT_VENV": VENV, "DATA": data, "RUN_DIR": run_dir}
    with Job(tmp_path, *NODES, TRAIN_SBATCH, *TRAIN, "--min-ranks", "6",
             "--inject-fault", "host-crash:member=2:step=20:run=1", env=env) as job:
        info = job.finished(deadline_s=240)
        logs = job.logs()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, logs)
    assert "only 4 rank(s) remain, fewer than --min-ranks 6, after step 20" in logs, logs
    assert "requeued" in logs and "run 2 on 6 tasks" in logs, logs
    host = assert_second_node_lost(run_dir, logs)
    assert host not in node_list(info), "the requeued run ran on the nodes left"
    stops = [e for e in events_of(run_dir / "events.jsonl") if e["event"] == "preempted"]
    assert [e["step"] for e in stops] == [20], stops
    assert "resuming from" in logs and "step 20, saved by 4 ranks" in logs, logs
    assert_one_rank_model(run_dir, ref)


# -- wordcount ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return wordcount_reference(tmp_path_factory.mktemp("stext"))


def test_wordcount_is_bit_identical_after_a_node_crash(tmp_path, nodes, text):
    data, ref = text
    out, events = tmp_path / "counts.h5", tmp_path / "events.jsonl"
    script = tmp_path / "wordcount.sbatch"
    # --no-kill: without it Slurm ends the whole job once it sets the lost node DOWN.
    script.write_text(f"""#!/bin/bash
#SBATCH --no-kill
#SBATCH --output={tmp_path}/wordcount-%j.out
export PATH={VENV_BIN}:$PATH
exec mpirt launch --hang-timeout 3 -- mpirt wordcount {data} --out {out} --events {events} --keep-parts \\
    --inject-fault host-crash:member=2:step=6
""")
    with Job(tmp_path, *NODES, script) as job:
        info = job.finished()
        logs = job.logs()
    assert info["JobState"] == "COMPLETED", (info, logs)
    lost = [e for e in events_of(events) if e["event"] == "host_lost"]
    assert len(lost) == 1 and sorted(lost[0]["members"]) == [2, 3] and lost[0]["host"] == node_list(info)[1], lost
    assert_same_output(ref, out)
    assert_each_shard_once(open(f"{out}.parts/ledger.jsonl").read(), 38)


# -- classify ----------------------------------------------------------------------------------
CLASSIFY_SBATCH = os.path.join(ROOT, "scripts", "slurm", "classify.sbatch")


def test_classify_script_is_identical_after_a_node_crash(tmp_path, nodes, digits):
    """scripts/slurm/classify.sbatch over 3 nodes, the second crashed at member 2's 4th shard: the
    predictions equal one rank's, every shard committed once."""
    from mpirt.checkpoint import CheckpointDir

    ckpt = CheckpointDir(digits[1]).latest()
    data = tmp_path / "digits32.h5"  # the same rows in shards of 32: enough shards for 6 ranks
    run_cli("prepare", "digits", data, "--shard-rows", "32").check()
    ref, out = tmp_path / "ref.h5", tmp_path / "pred.h5"
    run_cli("classify", "--data", data, "--split", "train", "--checkpoint", ckpt, "--out", ref).check()
    env = {"MPIRT_VENV": VENV, "DATA": data, "SPLIT": "train", "CHECKPOINTS": ckpt, "OUT": out}
    with Job(tmp_path, *NODES, "--output", f"{tmp_path}/classify-%j.out", CLASSIFY_SBATCH, "--keep-parts",
             "--inject-fault", "host-crash:member=2:step=4", env=env) as job:
        info = job.finished()
        logs = job.logs()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, logs)
    lost = [e for e in events_of(f"{out}.events.jsonl") if e["event"] == "host_lost"]
    assert len(lost) == 1 and sorted(lost[0]["members"]) == [2, 3] and lost[0]["host"] == node_list(info)[1], lost
    assert_same_output(ref, out)
    assert_each_shard_once(open(f"{out}.parts/ledger.jsonl").read())
