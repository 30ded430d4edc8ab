"""Unit tests of the elastic core's pieces (no MPI)."""

import os
import socket
import subprocess
import sys

import pytest

from mpirt.cluster.ledger import CommitStore, ShardLedger
from mpirt.comm import faults, launch
from mpirt.comm.mpi import ft_launch_problem
from mpirt.errors import UsageError


def test_import_has_no_side_effects():
    code = ("import sys, mpirt, mpirt.cli, mpirt.comm.launch, mpirt.cluster.farm, mpirt.kernels;"
            "bad = [m for m in ('mpi4py.MPI', 'h5py', 'torch', 'cupy') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_fault_specs_parse():
    plan = faults.FaultPlan(["kill:member=2:step=3", "hang:member=coordinator:shard=5",
                             "join:count=2:step=4", "leave:member=1:step=0:phase=commit"], environ={})
    kinds = [(f.action, f.member, f.step, f.shard, f.count, f.phase) for f in plan.faults]
    assert kinds == [("kill", 2, 3, None, 1, "take"), ("hang", "coordinator", None, 5, 1, "take"),
                     ("join", None, 4, None, 2, "take"), ("leave", 1, 0, None, 1, "commit")]
    assert str(plan.faults[0]) == "kill:member=2:step=3"


def test_fault_specs_from_environment():
    plan = faults.FaultPlan([], environ={"MPIRT_FAULTS": "kill:member=1:step=2; join:count=1:step=3"})
    assert [f.action for f in plan.faults] == ["kill", "join"]


@pytest.mark.parametrize("spec, words", [
    ("explode:member=1:step=2", "action must be one of"),
    ("kill:member=1", "exactly one trigger"),
    ("kill:step=2", "needs member="),
    ("kill:member=x:step=2", "take integers"),
    ("kill:member=1:step=2:color=red", "is not member="),
    ("join:member=1:step=2", "join takes count"),
])
def test_bad_fault_specs_name_the_problem(spec, words):
    with pytest.raises(UsageError, match=words):
        faults.parse(spec)


def test_faults_fire_once_and_only_for_their_member():
    plan = faults.FaultPlan(["kill:member=2:step=3", "kill:member=coordinator:step=1", "join:count=1:step=2"],
                            environ={})
    assert plan.due(member=2, is_coordinator=False, step=2) == []
    assert [f.index for f in plan.due(member=2, is_coordinator=False, step=3)] == [0]
    assert [f.index for f in plan.due(member=0, is_coordinator=True, step=5)] == [1, 2]
    plan.fired.add(1)
    assert [f.index for f in plan.due(member=0, is_coordinator=True, step=5)] == [2]


def test_ledger_leases_largest_first_and_returns_leases_of_the_dead():
    ledger = ShardLedger([10, 30, 20, 30], done={3})
    assert ledger.lease(1) == 1 and ledger.lease(2) == 2
    ledger.release({1})
    assert ledger.lease(5) == 1, "a returned shard goes first"
    assert ledger.lease(5) == 0 and ledger.lease(5) is None
    assert ledger.commit(0) and ledger.commit(1) and ledger.commit(2)
    assert not ledger.commit(2), "second commit is reported"
    assert ledger.finished


def test_commit_store_is_create_if_absent(tmp_path):
    store = CommitStore(str(tmp_path / "parts"))
    first = store.temp_path(7)
    open(first, "w").write("a")
    assert store.commit(7, first)
    second = store.temp_path(7)
    open(second, "w").write("b")
    assert not store.commit(7, second), "a second commit must not replace the first"
    assert open(store.path(7)).read() == "a"
    assert store.committed() == {7}
    assert not [n for n in os.listdir(store.dir) if n.endswith(".tmp")]


@pytest.mark.parametrize("transport, flags", [
    (None, "--mca btl sm,tcp,self --mca smsc cma --mca coll ^han,cuda,sm"),  # one host: shared memory by default
    ("tcp", "--mca btl tcp,self --mca coll ^han"),
])
def test_launch_line_has_the_fault_tolerance_flags(transport, flags):
    cmd = launch.build_command(["mpirt", "wordcount", "d.h5"], n=4, spare=2, cores=2, environ={},
                               mpiexec="/x/mpiexec", hang_timeout=4, transport=transport)
    line = " ".join(cmd)
    assert cmd[:3] == ["/x/mpiexec", "-n", "4"]
    for part in ("--host localhost:6", "--oversubscribe", "--with-ft ulfm", flags,
                 "--mca mpi_ft_detector true", "--mca mpi_ft_detector_timeout 4", "--mca mpi_ft_detector_period 1"):
        assert part in line, part
    assert "mpi_ft_detector_thread" not in line, "the detector thread makes MPI_Finalize hang"
    assert cmd[-5:] == [sys.executable, "-m", "mpirt", "wordcount", "d.h5"]


@pytest.mark.parametrize("flag, env, multi, expected", [
    (None, {}, False, "sm"), (None, {}, True, "tcp"),  # over hosts sm+tcp was not put through host faults
    ("tcp", {"MPIRT_TRANSPORT": "sm"}, False, "tcp"), (None, {"MPIRT_TRANSPORT": "tcp"}, False, "tcp"),
    (None, {"MPIRT_TRANSPORT": "sm"}, True, "sm"),
])
def test_transport_is_the_flag_else_the_variable_else_sm_on_one_host(flag, env, multi, expected):
    from mpirt.comm import transport

    assert transport.choose(flag, multi_host=multi, environ=env) == expected


def test_an_unknown_transport_is_a_usage_error():
    from mpirt.comm import transport

    with pytest.raises(UsageError, match="MPIRT_TRANSPORT 'udp': choose one of sm, tcp"):
        transport.choose(environ={"MPIRT_TRANSPORT": "udp"})


def test_fewer_ranks_than_cores_get_their_share_of_cores_and_threads():
    cmd = " ".join(launch.build_command(["true"], n=2, spare=1, cores=8, environ={}, mpiexec="mpiexec"))
    assert "--map-by slot:PE=2 --bind-to core" in cmd and "-x OMP_NUM_THREADS=2" in cmd
    cmd = " ".join(launch.build_command(["true"], n=1, cores=8, environ={"OMP_NUM_THREADS": "3"}, mpiexec="mpiexec"))
    assert "PE=8" in cmd and "OMP_NUM_THREADS=" not in cmd  # the user's setting goes through as it is
    assert "PE=" not in " ".join(launch.build_command(["true"], n=2, cores=2, environ={}, mpiexec="mpiexec"))


def test_launch_inside_slurm_uses_the_allocation():
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "3"}
    cmd = launch.build_command(["true"], environ=env, mpiexec="mpiexec", cores=2)
    assert cmd[:3] == ["mpiexec", "-n", "3"] and "--host" not in cmd and "--oversubscribe" not in cmd


def test_restart_mode_has_no_ulfm_flags():
    cmd = launch.build_command(["true"], n=2, ft="restart", environ={}, mpiexec="mpiexec", cores=4)
    assert "--with-ft" not in cmd and "tcp,self" not in cmd


@pytest.mark.parametrize("env, expected", [
    ({}, "not launched"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "without '--with-ft ulfm'"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_mpi_ft_enable": "1"}, "shared-memory BTL"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_mpi_ft_enable": "1", "OMPI_MCA_btl": "sm,tcp,self"}, "shared-memory"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_mpi_ft_enable": "1", "OMPI_MCA_btl": "tcp,self"}, None),
    # shared memory only with the single-copy mechanism and collectives measured under faults
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_mpi_ft_enable": "1", "OMPI_MCA_btl": "sm,self",
      "OMPI_MCA_coll": "^han"}, "smsc cma"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_mpi_ft_enable": "1", "OMPI_MCA_btl": "sm,self", "OMPI_MCA_smsc": "cma",
      "OMPI_MCA_coll": "^han,cuda,sm"}, None),
])
def test_fault_tolerance_problems_are_named(env, expected):
    problem = ft_launch_problem(env)
    assert (problem is None) if expected is None else (expected in problem)


def test_quorum_is_a_strict_majority_of_hosts_or_half_with_the_coordinator():
    from mpirt.cluster.membership import View, has_quorum

    three = View(id=0, members=[0, 1, 2, 3, 4, 5], hosts=[("n1", 1), ("n1", 2), ("n2", 3), ("n2", 4), ("n3", 5),
                                                          ("n3", 6)], next_member=6)
    assert has_quorum(three, [0, 1, 4, 5]) and not has_quorum(three, [2, 3])  # a partition: one side only
    assert has_quorum(three, [0, 4])  # processes failed, but on hosts that are there
    assert not has_quorum(three, [0, 1])  # two hosts gone at once: no side may assume it is the job
    assert has_quorum(three, [0, 1], left={2, 3})  # a host whose members all left is not a side
    one = View(id=0, members=[0, 1, 2, 3], hosts=[("vm", 1)] * 4, next_member=4)
    assert has_quorum(one, [2, 3]) and has_quorum(one, [3])  # one host: crashes never cost the quorum
    two = View(id=0, members=[0, 1, 2, 3], hosts=[("a", 1), ("a", 2), ("b", 1), ("b", 2)], next_member=4)
    assert has_quorum(two, [0, 1]) and not has_quorum(two, [2, 3])  # exact half: the coordinator's host


def test_a_lock_held_by_a_gone_member_is_taken_over_and_any_other_holder_refused(tmp_path):
    from mpirt.dirlock import DirLock
    from mpirt.errors import JobError

    # The holder: a real process that takes the lock and then waits (as a frozen coordinator would).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from mpirt.dirlock import DirLock; l = DirLock(sys.argv[1], 'lock', '--out');"
         " l.take(); print('locked', flush=True); sys.stdin.read()", str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(JobError, match=f"in use by another job \\(pid {holder.pid} on .*\\); .* --out"):
            DirLock(tmp_path, "lock", "--out").take()
        with pytest.raises(JobError, match="in use by another job"):  # a holder this job never had
            DirLock(tmp_path, "lock", "--out").take({(socket.gethostname(), holder.pid + 1)})
        mine = DirLock(tmp_path, "lock", "--out")
        mine.take({(socket.gethostname(), holder.pid)})
        assert mine.held and (tmp_path / "lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        with pytest.raises(JobError, match=f"pid {os.getpid()} on"):  # a later second job meets the new lock
            DirLock(tmp_path, "lock", "--out").take()
        mine.release()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lock"]
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_element_in_small_and_large_tensors(bad):
    import torch

    from mpirt.train.trainer import all_finite

    grads = [torch.randn(9), torch.randn(16, 3), torch.randn(1 << 17), torch.zeros(0)]
    assert all_finite(grads)
    assert all_finite([torch.full((4,), 3e38), torch.full((1 << 17,), -3e38)])  # max-abs, no sum to overflow
    for j in range(3):
        broken = [g.clone() for g in grads]
        broken[j].view(-1)[-1] = bad
        assert not all_finite(broken)
    assert not all_finite([torch.tensor([1.0, bad], dtype=torch.float16)])


def test_the_dense_optimizer_is_fused_and_a_resumed_one_keeps_the_kernel_it_started_with():
    """mpirt.train.optim: torch's fused SGD and Adam on the CPU; a state written by an unfused
    optimizer (an older mpirt's checkpoint) brings its param_groups back, and with them its kernel,
    so the resumed run goes on bit for bit as the unfused one would."""
    import torch

    from mpirt.train import optim

    def params():
        g = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(50, 7, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]

    def steps(opt, ps, n, g):
        for _ in range(n):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()

    for kind, ref in (("adam", lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True)),
                      ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True))):
        ps, qs = params(), params()
        opt = optim.build(kind, ps, lr=0.1, momentum=0.9)
        assert opt.param_groups[0]["fused"] is True
        steps(opt, ps, 3, torch.Generator().manual_seed(1))
        steps(ref(qs), qs, 3, torch.Generator().manual_seed(1))
        assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    ps, qs = params(), params()
    old, ref = torch.optim.Adam(ps, lr=0.1), torch.optim.Adam(qs, lr=0.1)
    g = torch.Generator().manual_seed(2)
    steps(old, ps, 2, g)
    steps(ref, qs, 4, torch.Generator().manual_seed(2))
    resumed = optim.build("adam", ps, lr=0.1)
    resumed.load_state_dict(old.state_dict())
    assert not resumed.param_groups[0]["fused"]
    steps(resumed, ps, 2, g)  # the gradients of ref's steps 3 and 4
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
