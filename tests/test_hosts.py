"""Jobs over several hosts survive the loss of one: crash, freeze, partition (scripts/hosts/local-hosts.sh).

Three simulated hosts (own hostname, own network namespace and address on a private bridge), two
ranks each, started with ``mpirt launch --hostfile`` from a fourth, the head, through the launch
agent ``scripts/hosts/ssh``, as on a real cluster. Each fault is struck from inside a rank of
node2 at a given step (``host-crash``, ``host-freeze``, ``host-cut``: every process of the host at
once), so that where it lands does not depend on timing. Each run must end as an uninterrupted
run does: training within 1e-5 of one rank's parameters, wordcount and classify bit-identical;
every step or shard committed once; and the lost host's processes must commit nothing afterwards.
"""

import contextlib
import json
import os
import re
import subprocess
import uuid

import psutil
import pytest

from harness import (MPIRT, TAG_VAR, assert_each_shard_once, assert_no_leftovers, assert_same_bits, assert_same_model,
                     assert_same_output, checkpoint_bits, run, run_cli, wordcount_reference)

pytestmark = [pytest.mark.mpi, pytest.mark.cli, pytest.mark.hosts]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTS = os.path.join(ROOT, "scripts", "hosts", "local-hosts.sh")
AGENT = os.path.join(ROOT, "scripts", "hosts", "ssh")
FAULT_HOST = "node2"  # members 2 and 3 (hostfile order, 2 slots each)


@pytest.fixture(scope="module")
def cluster(hosts, tmp_path_factory):
    hostfile = tmp_path_factory.mktemp("hosts") / "hostfile"
    hostfile.write_text("".join(f"node{i} slots=2\n" for i in (1, 2, 3)))
    return hostfile


def launch(hostfile, command, faults, *, timeout=180):
    """``mpirt launch`` 6 ranks over node1..node3 from the head host, with FAULTS (one or a list).
    Returns the result and the job's tag: what the faulted host leaves is checked after
    :func:`settle_fault_host` (the agent passes the environment, so every process carries the tag)."""
    tag = uuid.uuid4().hex
    faults = [faults] if isinstance(faults, str) else faults
    line = " ".join(f"'{a}'" for a in map(str, [MPIRT, "launch", "-n", "6", "--hostfile", hostfile, "--launch-agent",
                                               AGENT, "--hang-timeout", "3", "--", *command,
                                               *(x for f in faults for x in ("--inject-fault", f))]))
    res = run([AGENT, "head", line], timeout=timeout, tag=tag, check_leftovers=False)
    return res, tag


def job_processes(host, tag):
    """The processes of the job tagged ``tag`` on ``host`` (its network namespace). Nothing else there
    is touched: a host may run other daemons (the multi-node Slurm's slurmd)."""
    out = subprocess.run(["ip", "netns", "pids", f"mpirt-{host}"], capture_output=True, text=True).stdout
    procs = []
    for pid in map(int, out.split()):
        try:
            proc = psutil.Process(pid)
            if proc.environ().get(TAG_VAR) == tag:
                procs.append(proc)
        except psutil.Error:
            continue
    return procs


def command_of(proc):
    """The start of a process's command line ('' once it has ended, or is a zombie)."""
    try:
        return " ".join(proc.cmdline()[:4])
    except psutil.Error:
        return ""


def settle_fault_host(fault, tag, host=FAULT_HOST):
    """After the job: give the faulted host back, then require that no rank of the job is left there.

    A thawed host's processes find their lifelines closed and stop (fencing); a cut-off host's
    ranks stopped on their own when they lost the quorum. Open MPI's daemon on a healed host ends
    when its dead connection times out; the test ends it rather than wait.
    """
    if fault == "host-freeze":
        subprocess.run([HOSTS, "thaw", host], check=True, capture_output=True)
    if fault == "host-cut":
        subprocess.run([HOSTS, "heal", host], check=True, capture_output=True)
    ranks = [p for p in job_processes(host, tag) if "mpirt" in command_of(p) and "prted" not in command_of(p)]
    gone, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, f"ranks left on {host}: {[command_of(p) for p in alive]}"
    rest = job_processes(host, tag)
    for proc in rest:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(rest, timeout=10)
    return gone


def events_of(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_host_lost(events, fault, res):
    views = [e for e in events if e["event"] == "view"]
    brief = [(v["view"], v["failed"], v["left"], v["hosts_lost"]) for v in views]
    assert any(sorted(v["failed"]) == [2, 3] and v["hosts_lost"] == [FAULT_HOST] for v in views), (brief, res.stderr)
    lost = [e for e in events if e["event"] == "host_lost"]
    assert [e["host"] for e in lost] == [FAULT_HOST] and sorted(lost[0]["members"]) == [2, 3]
    if fault == "host-cut":
        # The cut-off side said so, and stopped (the lifeline's watch writes this before the exit).
        quorum = sorted(e["member"] for e in events if e["event"] == "quorum_lost")
        assert quorum == [2, 3], events


FAULTS = ["host-crash", "host-freeze", "host-cut"]

# -- training ----------------------------------------------------------------------------------
TRAIN = ["--model", "mlp", "--epochs", "2", "--global-batch", "64", "--lr", "0.05", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("hdigits")
    data = d / "digits.h5"
    run_cli("prepare", "digits", data, "--shard-rows", "256").check()
    run_cli("train", "--data", data, *TRAIN, "--checkpoint-dir", d / "ref").check()
    return data, d / "ref"


def assert_one_rank_model(ckpt_dir, ref_dir):
    """The run's last checkpoint is step 46, within 1e-5 of one rank's parameters."""
    a, pos = final_params(ckpt_dir)
    assert pos["step"] == 46
    assert_same_model(a, final_params(ref_dir)[0], rtol=1e-5)


def final_params(ckpt_dir):
    from mpirt.checkpoint import CheckpointDir

    ckpt = CheckpointDir(ckpt_dir).load_latest()
    return ckpt.params, ckpt.position


@pytest.mark.parametrize("fault", FAULTS)
def test_training_goes_on_after_a_host_is_lost(tmp_path, cluster, digits, fault):
    data, ref = digits
    ckpt, audit, events = tmp_path / "ckpt", tmp_path / "audit.jsonl", tmp_path / "events.jsonl"
    res, tag = launch(cluster, ["mpirt", "train", "--data", data, *TRAIN, "--checkpoint-dir", ckpt, "--audit", audit,
                                "--events", events], f"{fault}:member=2:step=20")
    res.check()
    assert "46 steps, 2 view(s), 4 rank(s)" in res.stdout, res.output
    assert f"hosts lost: {FAULT_HOST}" in res.stderr
    steps_before = open(audit).read()
    settle_fault_host(fault, tag)
    assert_no_leftovers(tag)
    assert open(audit).read() == steps_before, "a lost host's rank committed after it was dropped"
    assert_host_lost(events_of(events), fault, res)
    steps = [json.loads(line)["step"] for line in steps_before.splitlines()]
    assert steps == list(range(46)), "every step exactly once"
    assert_one_rank_model(ckpt, ref)
    assert not [f for f in os.listdir(ckpt) if ".tmp" in f], "no temporaries"


def test_exact_training_is_byte_equal_to_one_rank_after_a_host_crash(tmp_path, cluster, digits):
    """--exact through the loss of a whole host (2 of 6 ranks): the parameters and optimizer state
    are the bits one rank trains (np.array_equal), not merely within 1e-5."""
    data, _ = digits
    run_cli("train", "--data", data, *TRAIN, "--exact", "--checkpoint-dir", tmp_path / "one").check()
    ckpt = tmp_path / "ckpt"
    res, tag = launch(cluster, ["mpirt", "train", "--data", data, *TRAIN, "--exact", "--checkpoint-dir", ckpt],
                      "host-crash:member=2:step=20")
    res.check()
    assert "46 steps, 2 view(s), 4 rank(s)" in res.stdout, res.output
    settle_fault_host("host-crash", tag)
    assert_no_leftovers(tag)
    a, b = checkpoint_bits(tmp_path / "one"), checkpoint_bits(ckpt)
    assert a[2]["step"] == b[2]["step"] == 46
    assert_same_bits(a, b)


def test_training_goes_on_after_a_hang_a_kill_and_a_frozen_host_at_once(tmp_path, cluster, digits):
    """Member 1 (node1) hangs, member 2 (node2) is killed and node3 freezes, in one step: members 0 and
    3 are left, on 2 of the 3 hosts (a quorum). Every neighbour through which a revoke would reach
    member 3 is dead or frozen, so it recovers only because the launcher's declaration revokes too."""
    data, ref = digits
    ckpt, audit, events = tmp_path / "ckpt", tmp_path / "audit.jsonl", tmp_path / "events.jsonl"
    res, tag = launch(cluster, ["mpirt", "train", "--data", data, *TRAIN, "--checkpoint-dir", ckpt, "--audit", audit,
                                "--events", events],
                      ["hang:member=1:step=20", "kill:member=2:step=20", "host-freeze:member=4:step=20"])
    res.check()
    assert "46 steps" in res.stdout and "2 rank(s)" in res.stdout, res.output
    steps_before = open(audit).read()
    settle_fault_host("host-freeze", tag, "node3")
    assert_no_leftovers(tag)
    assert open(audit).read() == steps_before, "a frozen rank committed after it was dropped"
    assert [json.loads(line)["step"] for line in steps_before.splitlines()] == list(range(46))
    views = [e for e in events_of(events) if e["event"] == "view"]
    assert sorted(m for v in views for m in v["failed"]) == [1, 2, 4, 5] and views[-1]["members"] == [0, 3]
    assert [v["hosts_lost"] for v in views if v["hosts_lost"]] == [["node3"]]
    assert_one_rank_model(ckpt, ref)


def test_a_new_host_joins_then_a_host_is_lost(tmp_path, cluster, digits):
    """Growth onto a host that had no member in the first view (node4, in the hostfile with free
    slots), then a crash of node2 with the joiners on board."""
    data, ref = digits
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(cluster.read_text() + "node4 slots=2\n")
    ckpt, events = tmp_path / "ckpt", tmp_path / "events.jsonl"
    res, tag = launch(hostfile, ["mpirt", "train", "--data", data, *TRAIN, "--checkpoint-dir", ckpt,
                                 "--events", events, "--inject-fault", "join:count=2:step=10"],
                      "host-crash:member=2:step=30")
    res.check()
    settle_fault_host("host-crash", tag)
    assert_no_leftovers(tag)
    assert "hosts lost: node2; hosts joined: node4" in res.stderr, res.stderr
    views = [e for e in events_of(events) if e["event"] == "view"]
    assert [(v["joined"], v["hosts_joined"], sorted(v["failed"]), v["hosts_lost"]) for v in views] == [
        ([], [], [], []), ([6, 7], ["node4"], [], []), ([], [], [2, 3], ["node2"])]
    assert [h.split(":")[0] for h in views[1]["hosts"][6:]] == ["node4", "node4"]
    assert_one_rank_model(ckpt, ref)


# -- wordcount ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return wordcount_reference(tmp_path_factory.mktemp("htext"))


@pytest.mark.parametrize("fault", FAULTS)
def test_wordcount_is_bit_identical_after_a_host_is_lost(tmp_path, cluster, text, fault):
    data, ref = text
    out, events = tmp_path / "counts.h5", tmp_path / "events.jsonl"
    res, tag = launch(cluster, ["mpirt", "wordcount", data, "--out", out, "--events", events, "--keep-parts"],
                      f"{fault}:member=2:step=6")
    res.check()
    ledger = open(f"{out}.parts/ledger.jsonl").read()
    settle_fault_host(fault, tag)
    assert_no_leftovers(tag)
    assert open(f"{out}.parts/ledger.jsonl").read() == ledger, "a lost host's rank committed after it was dropped"
    assert_same_output(ref, out)
    assert_each_shard_once(ledger, 38)
    assert_host_lost(events_of(events), fault, res)


def test_wordcount_goes_on_when_the_coordinators_host_freezes(tmp_path, cluster, text):
    """node1 (members 0 and 1: the coordinator) freezes while member 3 is killed: member 2 coordinates
    from then on and takes over the output's lock, which the frozen coordinator still holds."""
    data, ref = text
    out, events = tmp_path / "counts.h5", tmp_path / "events.jsonl"
    res, tag = launch(cluster, ["mpirt", "wordcount", data, "--out", out, "--events", events, "--keep-parts"],
                      ["host-freeze:member=1:step=6", "kill:member=3:step=6"])
    res.check()
    ledger = open(f"{out}.parts/ledger.jsonl").read()
    settle_fault_host("host-freeze", tag, "node1")
    assert_no_leftovers(tag)
    assert open(f"{out}.parts/ledger.jsonl").read() == ledger, "the frozen coordinator committed after it thawed"
    assert_same_output(ref, out)
    assert_each_shard_once(ledger, 38)
    views = [e for e in events_of(events) if e["event"] == "view"]
    assert views[-1]["coordinator"] in (2, 4, 5) and "node1" in [h for v in views for h in v["hosts_lost"]], views


# -- classify ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classify_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("hclassify")
    data = d / "digits.h5"
    # 34 shards of the test split: member 2 reaches its 4th (where the fault strikes) before the end.
    run_cli("prepare", "digits", data, "--shard-rows", "32", "--test-fraction", "0.6").check()
    run_cli("train", "--data", data, "--model", "mlp", "--epochs", "2", "--seed", "2", "--no-progress",
            "--checkpoint-dir", d / "mlp").check()
    ckpt = sorted((d / "mlp").glob("ckpt-*.h5"))[-1]
    run_cli("classify", "--data", data, "--checkpoint", ckpt, "--out", d / "ref.h5").check()
    return data, ckpt, d / "ref.h5"


@pytest.mark.parametrize("fault", FAULTS)
def test_classify_is_identical_after_a_host_is_lost(tmp_path, cluster, classify_setup, fault):
    data, ckpt, ref = classify_setup
    out, events = tmp_path / "pred.h5", tmp_path / "events.jsonl"
    res, tag = launch(cluster, ["mpirt", "classify", "--data", data, "--checkpoint", ckpt, "--out", out,
                                "--events", events], f"{fault}:member=2:step=4")
    res.check()
    settle_fault_host(fault, tag)
    assert_no_leftovers(tag)
    assert int(re.search(r"(\d+) view\(s\)", res.stdout).group(1)) >= 2, res.stdout
    assert_same_output(ref, out)
    assert_host_lost(events_of(events), fault, res)


def test_a_host_unreachable_at_the_start_is_one_line_and_a_failure(tmp_path, cluster):
    """PRRTE's lost-daemon block is not shown (a lost host mid-job is not an error), so a job that
    never started because of one must say so itself."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=2\nnode9 slots=2\n")  # node9 does not exist
    tag = uuid.uuid4().hex
    line = " ".join(map(str, [MPIRT, "launch", "-n", "4", "--hostfile", hostfile, "--launch-agent", AGENT, "--",
                              "mpirt", "info"]))
    res = run([AGENT, "head", line], timeout=120, tag=tag)
    assert res.returncode != 0, res.output
    assert "did not report back while the job was starting" in res.stderr and "nothing ran" in res.stderr, res.stderr
    assert "Traceback" not in res.output


def test_host_faults_are_refused_outside_a_simulated_host(tmp_path, digits):
    data, _ = digits
    res = run_cli("launch", "-n", "2", "--hang-timeout", "2", "--", "mpirt", "train", "--data", data, *TRAIN,
                  "--inject-fault", "host-crash:member=1:step=3", timeout=120)
    assert res.returncode != 0
    assert "not on a simulated host" in res.stderr and "Traceback" not in res.output


# -- a Horovod script, launched as horovodrun would be --------------------------------------------

def test_a_horovod_elastic_script_with_horovodrun_style_hosts_outlives_a_host_crash(tmp_path, cluster):
    """``mpirt launch -np 6 -H node1:2,node2:2,node3:2`` (horovodrun's flags) of a Horovod-style
    elastic script (tests/jobs/hvd_train.py, mpirt.horovod.torch); node2 crashes mid-run."""
    del cluster  # the hosts are named on the command line, as horovodrun takes them
    tag = uuid.uuid4().hex
    events = tmp_path / "events.jsonl"
    job = os.path.join(ROOT, "tests", "jobs", "hvd_train.py")
    line = " ".join(f"'{a}'" for a in map(str, [
        "env", f"MPIRT_EVENTS={events}", "MPIRT_FAULTS=host-crash:member=2:step=15", MPIRT, "launch", "-np", "6",
        "-H", "node1:2,node2:2,node3:2", "--launch-agent", AGENT, "--hang-timeout", "3", "--",
        __import__("sys").executable, job, "--elastic"]))
    res = run([AGENT, "head", line], timeout=240, tag=tag, check_leftovers=False)
    res.check()
    assert "hvd_train: 3 epochs, 4 ranks at the end" in res.stdout, res.output[-3000:]
    settle_fault_host("host-crash", tag)
    assert_no_leftovers(tag)
    views = [e for e in events_of(events) if e["event"] == "view"]
    assert [sorted(v["failed"]) for v in views] == [[], [2, 3]] and views[-1]["hosts_lost"] == [FAULT_HOST]
