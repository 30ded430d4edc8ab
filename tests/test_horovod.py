"""``mpirt.horovod.torch``: Horovod's PyTorch API on the elastic runtime, run as users run it.

- the semantics of Horovod's own torch tests, on 2 and 3 ranks (tests/jobs/hvd_api.py);
- N ranks train the model of one rank through ``DistributedOptimizer`` (1e-5);
- ``hvd.elastic.run`` through kills (the coordinator's too), a leave and a join, in place;
- Horovod's synthetic benchmarks (examples/horovod/) with the import line changed.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from harness import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = os.path.join(ROOT, "tests", "jobs")
EXAMPLES = os.path.join(ROOT, "examples", "horovod")


def views(path):
    return [e for e in map(json.loads, open(path)) if e["event"] == "view"]


def test_importing_has_no_side_effects_and_calls_before_init_are_refused():
    code = ("import sys; import mpirt.horovod.torch as hvd\n"
            "assert not any(m.startswith('mpi4py') for m in sys.modules), 'MPI imported'\n"
            "assert not hvd.is_initialized()\n"
            "try:\n    hvd.size()\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Horovod has not been initialized; use hvd.init()."


@pytest.mark.mpi
@pytest.mark.cli
@pytest.mark.parametrize("n", [2, 3])
def test_horovods_torch_test_semantics(n):
    sys.path.insert(0, JOBS)
    try:
        import hvd_api
    finally:
        sys.path.remove(JOBS)
    res = run_cli("launch", "-n", str(n), "--", sys.executable, os.path.join(JOBS, "hvd_api.py"), timeout=300).check()
    passed = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("PASSED ")]
    assert passed == [c.__name__ for c in hvd_api.CHECKS], res.output[-3000:]


@pytest.mark.mpi
@pytest.mark.cli
def test_n_ranks_with_distributed_optimizer_train_the_model_of_one_rank(tmp_path):
    job = [sys.executable, os.path.join(JOBS, "hvd_train.py"), "--steps", "40"]
    for n in (1, 2, 3):
        run_cli("launch", "-n", str(n), "--", *job, "--save", tmp_path / f"{n}.npz", timeout=200).check()
    one = np.load(tmp_path / "1.npz")
    for n in (2, 3):
        other = np.load(tmp_path / f"{n}.npz")
        for k in one.files:
            assert np.abs(one[k] - other[k]).max() <= 1e-5, (n, k)


@pytest.mark.mpi
@pytest.mark.cli
def test_elastic_run_goes_on_through_kills_a_leave_and_a_join(tmp_path):
    events = tmp_path / "events.jsonl"
    faults = "kill:member=1:step=10;join:count=1:step=25;leave:member=2:step=40;kill:member=coordinator:step=55"
    res = run_cli("launch", "-n", "3", "--spare", "1", "--", sys.executable, os.path.join(JOBS, "hvd_train.py"),
                  "--elastic", env={"MPIRT_FAULTS": faults, "MPIRT_EVENTS": events}, timeout=300).check()
    # The script itself asserted that every rank holds the same model and every epoch was covered.
    # The one left is the joiner: its reset callbacks fired after the leave (2 ranks), then the kill (1).
    assert "hvd_train: 3 epochs, 1 ranks at the end, resets at sizes [2, 1]" in res.stdout, res.output[-3000:]
    v = views(events)
    assert [x["members"] for x in v] == [[0, 1, 2], [0, 2], [0, 2, 3], [0, 3], [3]]
    assert [x["failed"] for x in v[1:]] == [[1], [], [], [0]]
    assert v[2]["joined"] == [3] and v[3]["left"] == [2]


@pytest.mark.mpi
@pytest.mark.cli
def test_horovods_synthetic_benchmark_runs_with_the_import_changed():
    res = run_cli("launch", "-np", "2", "--", sys.executable, os.path.join(EXAMPLES, "pytorch_synthetic_benchmark.py"),
                  "--model", "resnet18", "--batch-size", "4", "--num-warmup-batches", "1",
                  "--num-batches-per-iter", "2", "--num-iters", "2", timeout=300).check()
    assert "Number of CPUs: 2" in res.stdout and "Total img/sec on 2 CPU(s)" in res.stdout, res.output[-3000:]


@pytest.mark.mpi
@pytest.mark.cli
def test_horovods_elastic_synthetic_benchmark_survives_a_kill_a_join_and_a_leave(tmp_path):
    events = tmp_path / "events.jsonl"
    faults = "kill:member=1:step=4;join:count=1:step=8;leave:member=2:step=12"
    res = run_cli("launch", "-np", "3", "--spare", "1", "--", sys.executable,
                  os.path.join(EXAMPLES, "pytorch_synthetic_benchmark_elastic.py"), "--model", "resnet18",
                  "--batch-size", "2", "--num-warmup-batches", "2", "--num-batches-per-iter", "2", "--num-iters", "6",
                  env={"MPIRT_FAULTS": faults, "MPIRT_EVENTS": events}, timeout=400).check()
    assert "Total img/sec on 2 CPU(s)" in res.stdout, res.output[-3000:]
    v = views(events)
    assert [x["members"] for x in v] == [[0, 1, 2], [0, 2], [0, 2, 3], [0, 3]]
    assert v[1]["failed"] == [1] and v[2]["joined"] == [3] and v[3]["left"] == [2]


@pytest.mark.mpi
@pytest.mark.cli
def test_elastic_run_under_plain_mpirun_with_ulfm(tmp_path):
    """No mpirt launch, no driver: Open MPI's own mpirun with ULFM on, as a Horovod user would type it."""
    import os as _os

    from harness import MPIEXEC, run

    events = tmp_path / "events.jsonl"
    cmd = [MPIEXEC, "-n", "3", "--host", "localhost:3", "--oversubscribe", "--with-ft", "ulfm",
           "--mca", "btl", "tcp,self", "--mca", "coll", "^han"]
    if _os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    res = run(cmd + [sys.executable, os.path.join(JOBS, "hvd_train.py"), "--elastic"],
              env={"MPIRT_FAULTS": "kill:member=2:step=15;kill:member=coordinator:step=40", "MPIRT_EVENTS": events},
              timeout=300)
    res.check()
    assert "hvd_train: 3 epochs, 1 ranks at the end" in res.stdout, res.output[-3000:]
    assert [x["members"] for x in views(events)] == [[0, 1, 2], [0, 1], [1]]


@pytest.mark.slurm
@pytest.mark.mpi
def test_elastic_run_in_a_slurm_batch_job(slurm, tmp_path):
    """A Horovod-style elastic script in an sbatch script, launched with mpirt launch on the allocation."""
    from harness import VENV_BIN
    from test_slurm import sbatch

    events = tmp_path / "events.jsonl"
    res, logs = sbatch(tmp_path, f"""
export PATH={VENV_BIN}:$PATH
export MPIRT_EVENTS={events} MPIRT_FAULTS="kill:member=1:step=12"
mpirt launch -- {sys.executable} {os.path.join(JOBS, "hvd_train.py")} --elastic
""", ntasks=3)
    assert res.returncode == 0, logs + res.output
    assert "hvd_train: 3 epochs, 2 ranks at the end" in logs, logs
    assert [x["members"] for x in views(events)] == [[0, 1, 2], [0, 2]]
