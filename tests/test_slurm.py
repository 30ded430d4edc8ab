"""mpirt on a real Slurm (CI brings up a local one with scripts/slurm/local-cluster.sh).

Jobs are submitted with `sbatch --wait`, bounded by `--time` and a subprocess timeout,
in their own temporary directory; sbatch exports the test's environment, so the
harness's tag finds anything a job leaves behind.
"""

import os
import subprocess
import sys

import h5py
import pytest

from harness import VENV_BIN, assert_no_leftovers, run, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_and_cluster_scripts_parse():
    for script in (".ci/run", "scripts/slurm/local-cluster.sh", "scripts/test", "scripts/demo", "scripts/setup-venv"):
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
    run_cli("prepare", "synth-text", data, "--rows", "3000", "--features", "1024", "--shard-rows", "128").check()
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
