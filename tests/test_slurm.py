"""mpirt on a real Slurm (CI brings up a local one with scripts/slurm/local-cluster.sh).

Jobs are submitted with `sbatch --wait`, bounded by `--time` and a subprocess timeout,
in their own temporary directory; sbatch exports the test's environment, so the
harness's tag finds anything a job leaves behind.
"""

import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from harness import VENV_BIN, assert_no_leftovers, run, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts", "slurm")
VENV = os.path.dirname(VENV_BIN)
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def test_ci_and_cluster_scripts_parse():
    for script in (".ci/run", "scripts/slurm/local-cluster.sh", "scripts/test", "scripts/demo", "scripts/setup-venv",
                   "scripts/slurm/train.sbatch", "scripts/slurm/classify.sbatch", "scripts/slurm/scaling.sbatch",
                   "scripts/slurm/hosts-task-prolog"):
        subprocess.run(["bash", "-n", os.path.join(ROOT, script)], check=True, timeout=30)


def sbatch(tmp_path, body, ntasks, minutes=3, timeout=240):
    script = tmp_path / "job.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --ntasks={ntasks}\n#SBATCH --time={minutes}\n"
                      f"#SBATCH --output={tmp_path}/slurm-%j.out\n#SBATCH --chdir={tmp_path}\nset -e\n{body}\n")
    tag = f"slurm-{tmp_path.name}"
    res = run(["sbatch", "--parsable", "--wait", script], timeout=timeout, tag=tag, check_leftovers=False)
    job = res.stdout.strip().split(";")[0]
    try:
        logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
        return res, logs
    finally:
        if job:
            subprocess.run(["scancel", job], timeout=30, capture_output=True)
            left = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30)
            assert not left.stdout.strip(), f"job {job} still queued: {left.stdout}"
        assert_no_leftovers(tag)


@pytest.mark.slurm
def test_batch_job_recovers_a_killed_task_in_place(slurm, tmp_path):
    data = tmp_path / "text.h5"
    # 120 shards: workers lease in batches, so a step fault needs shards left when its count is reached.
    run_cli("prepare", "synth-text", data, "--rows", "3000", "--features", "1024", "--shard-rows", "25").check()
    run_cli("wordcount", data, "--out", tmp_path / "ref.h5").check()
    res, logs = sbatch(tmp_path, f"""
export PATH={VENV_BIN}:$PATH
mpirt launch --hang-timeout 3 -- mpirt wordcount {data} --out {tmp_path}/counts.h5 \\
    --events {tmp_path}/events.jsonl --inject-fault kill:member=2:step=4
""", ntasks=4)
    assert res.returncode == 0, logs + res.output
    with h5py.File(tmp_path / "counts.h5") as got, h5py.File(tmp_path / "ref.h5") as ref:
        assert got.attrs["sha256"] == ref.attrs["sha256"]
    events = (tmp_path / "events.jsonl").read_text()
    assert '"failed": [2]' in events and '"members": [0, 1, 3]' in events


@pytest.mark.slurm
def test_launch_inside_an_allocation_uses_it(slurm, tmp_path):
    res, logs = sbatch(tmp_path, f"""
export PATH={VENV_BIN}:$PATH
mpirt launch --dry-run -- mpirt info
mpirt launch -- {sys.executable} -c "from mpi4py import MPI; print('size', MPI.COMM_WORLD.Get_size())"
""", ntasks=3)
    assert res.returncode == 0, logs + res.output
    assert "--host" not in logs.splitlines()[0] and " -n 3 " in logs.splitlines()[0]
    assert logs.count("size 3") == 3


@pytest.mark.slurm
def test_srun_with_pmix_starts_mpi_ranks(slurm, tmp_path):
    res, logs = sbatch(tmp_path, f"""
srun --mpi=pmix -n 2 {sys.executable} -c "from mpi4py import MPI; c = MPI.COMM_WORLD; print('rank', c.Get_rank(), 'of', c.Get_size())"
""", ntasks=2)
    assert res.returncode == 0, logs + res.output
    assert "rank 0 of 2" in logs and "rank 1 of 2" in logs


# -- the batch scripts of scripts/slurm, submitted as a user would ------------------------------

def job_info(job):
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_for(condition, what, deadline_s):
    """Poll ``condition()`` until it returns something true; fail after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")


def wait_job(job, deadline_s):
    """``scontrol show job`` of ``job`` (an id, or ARRAYID_TASK) once it has ended."""
    return wait_for(lambda: (i := job_info(job)).get("JobState") in TERMINAL and i, f"job {job} to end", deadline_s)


class Submitted:
    """A job submitted with ``sbatch`` from ``cwd``, cancelled and checked for leftovers at exit."""

    def __init__(self, cwd, script, *args, env=None, sbatch_args=()):
        self.cwd, self.tag = cwd, f"slurm-{cwd.name}"
        res = run(["sbatch", "--parsable", *sbatch_args, script, *args], cwd=cwd, env=env, tag=self.tag,
                  timeout=60, check_leftovers=False)
        assert res.returncode == 0, res.output
        self.job = res.stdout.strip().split(";")[0]

    def finished(self, deadline_s=240):
        return wait_job(self.job, deadline_s)

    def logs(self):
        return "".join(p.read_text() for p in sorted(self.cwd.glob("*.out")))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        subprocess.run(["scancel", self.job], timeout=30, capture_output=True)
        wait_for(lambda: job_info(self.job).get("JobState") in TERMINAL + (None,), f"job {self.job} gone", 60)
        assert_no_leftovers(self.tag)


def audit_steps(path):
    try:
        with open(path) as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


# 1,380 steps (about 7 s here): the stop request lands seconds before the end, whatever the load.
TRAIN = ["--model", "mlp", "--epochs", "60", "--global-batch", "64", "--lr", "0.05", "--seed", "3",
         "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "digits.h5"
    run_cli("prepare", "digits", out, "--shard-rows", "256").check()
    return out


@pytest.mark.slurm
def test_train_script_preempted_requeues_and_resumes_to_the_uninterrupted_model(slurm, tmp_path, digits):
    from mpirt.checkpoint import CheckpointDir

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()  # outputs into a missing directory are refused (issue 10)
    run_cli("launch", "-n", "2", "--", "mpirt", "train", "--data", digits, *TRAIN, "--no-progress",
            "--checkpoint-dir", ref_dir / "ckpt", timeout=240).check()
    run_dir = tmp_path / "run"
    env = {"MPIRT_VENV": VENV, "DATA": digits, "RUN_DIR": run_dir}
    with Submitted(tmp_path, os.path.join(SCRIPTS, "train.sbatch"), *TRAIN, env=env,
                   sbatch_args=["--ntasks=2", "--time=5"]) as sub:
        # Preempt by hand once the job is well under way (what --signal=B:USR1@T does before the end).
        wait_for(lambda: audit_steps(run_dir / "audit.jsonl") >= 40, "40 committed steps", 120)
        subprocess.run(["scancel", "--batch", "--signal=USR1", sub.job], check=True, timeout=30)
        info = sub.finished(deadline_s=300)
        logs = sub.logs()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, logs)
    assert "run 1 on 2 tasks" in logs and "run 2 on 2 tasks" in logs, logs
    assert "stopped on request (SIGUSR1)" in logs and "requeued" in logs, logs
    events = [json.loads(line) for line in open(run_dir / "events.jsonl")]
    stops = [e for e in events if e["event"] == "preempted"]
    assert len(stops) == 1 and 40 <= stops[0]["step"] < 60 * 23, stops
    got, ref = CheckpointDir(run_dir / "ckpt").load_latest(), CheckpointDir(ref_dir / "ckpt").load_latest()
    assert got.position["step"] == ref.position["step"]
    for name, value in ref.params.items():
        np.testing.assert_allclose(got.params[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    steps = [json.loads(line)["step"] for line in open(run_dir / "audit.jsonl")]
    assert steps == list(range(ref.position["step"])), "every step committed exactly once across the runs"


@pytest.mark.slurm
def test_classify_script_recovers_a_killed_task_stops_requeues_and_finishes_identically(slurm, tmp_path):
    data = tmp_path / "digits.h5"
    run_cli("prepare", "digits", data, "--shard-rows", "64").check()
    run_cli("launch", "-n", "2", "--", "mpirt", "train", "--data", data, "--model", "mlp", "--epochs", "1",
            "--global-batch", "64", "--checkpoint-dir", tmp_path / "ckpt", "--no-progress").check()
    ckpt = sorted((tmp_path / "ckpt").glob("ckpt-*.h5"))[-1]
    run_cli("classify", "--data", data, "--split", "train", "--checkpoint", ckpt, "--out", tmp_path / "ref.h5").check()
    out = tmp_path / "pred.h5"
    env = {"MPIRT_VENV": VENV, "DATA": data, "SPLIT": "train", "CHECKPOINTS": ckpt, "OUT": out}
    # Run 1: the coordinator's task is killed (recovered in place: member 1 takes over), then a stop
    # request: exit 75, requeued. Run 2 (the requeued job, same id) takes only the shards not committed
    # yet. Both faults are the coordinator's, which sees every commit, so both fire in every interleaving.
    faults = ["kill:member=coordinator:step=3:run=1", "stop:member=coordinator:step=8:run=1"]
    with Submitted(tmp_path, os.path.join(SCRIPTS, "classify.sbatch"), "--keep-parts",
                   *[a for f in faults for a in ("--inject-fault", f)], env=env,
                   sbatch_args=["--ntasks=3", "--time=5"]) as sub:
        info = sub.finished(deadline_s=300)
        logs = sub.logs()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, logs)
    assert "run 2 on 3 tasks" in logs and "requeued" in logs, logs
    with h5py.File(out) as got, h5py.File(tmp_path / "ref.h5") as ref:
        assert got.attrs["sha256"] == ref.attrs["sha256"]
        np.testing.assert_array_equal(got["row_index"][()], ref["row_index"][()])
    events = [json.loads(line) for line in open(f"{out}.events.jsonl")]
    assert [v["failed"] for v in events if v["event"] == "view" and v["failed"]] == [[0]], events
    assert sum(e["event"] == "preempted" for e in events) == 1
    with open(f"{out}.parts/ledger.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert sorted(r["shard"] for r in records) == list(range(len(records)))
    assert not any(r.get("duplicate") for r in records)


@pytest.mark.slurm
def test_scaling_script_runs_one_array_task_per_rank_count_and_merges(slurm, tmp_path):
    out = tmp_path / "results"
    env = {"MPIRT_VENV": VENV, "MPIRT_REPO": ROOT, "MPIRT_BENCH_OUT": out}
    with Submitted(tmp_path, os.path.join(SCRIPTS, "scaling.sbatch"), "--models", "cnn", "--epochs", "2",
                   env=env, sbatch_args=["--array=1,2", "--ntasks=2", "--time=5"]) as sub:
        # An array job: wait for each task (JOBID_1, JOBID_2) to end.
        infos = [wait_job(f"{sub.job}_{t}", deadline_s=300) for t in (1, 2)]
        logs = sub.logs()
    assert all(i["JobState"] == "COMPLETED" for i in infos), (infos, logs)
    assert "task 1: 1 rank(s)" in logs and "task 2: 2 rank(s)" in logs, logs
    assert sorted(p.name for p in out.glob("scaling-*.json")) == ["scaling-n1.json", "scaling-n2.json"]
    doc = json.loads((out / "scaling.json").read_text())
    points = doc["results"]["points"]
    got = sorted((p["mode"], p["ranks"]) for p in points if not p["one_core"])
    assert got == [("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)]
    # The per-core baseline: each 1-rank point again on one core (OMP_NUM_THREADS=1), on a multi-core node.
    one = sorted((p["mode"], p["ranks"], p["threads"]) for p in points if p["one_core"])
    assert one == ([("strong", 1, 1), ("weak", 1, 1)] if points[0]["cores"] > 1 else [])
    assert all(min(p["samples_per_s"]) > 0 and p["model"] == "cnn" for p in doc["results"]["points"])
    assert doc["machine"]["git"] and doc["machine"]["cpus"]
