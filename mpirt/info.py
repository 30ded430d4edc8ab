"""``mpirt info``: the MPI library, fault tolerance, CUDA and package versions of this machine."""

import json
import os
import sys


def add_parser(sub):
    p = sub.add_parser("info", help="show MPI, ULFM, CUDA and package versions")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler="mpirt.info:run")


def _version(module):
    try:
        return __import__(module).__version__
    except Exception as exc:  # noqa: BLE001 - any import failure is reported, not raised
        return f"not available ({type(exc).__name__})"


def collect():
    from mpirt import __version__
    from mpirt.comm import mpi

    facts = {"mpirt": __version__, "python": sys.version.split()[0], "mpi4py": _version("mpi4py")}
    try:
        facts["mpi_library"] = mpi.library_version()
    except Exception as exc:  # noqa: BLE001
        facts["mpi_library"] = f"not available ({exc})"
    facts["ulfm_compiled"] = mpi.ulfm_compiled()
    problem = mpi.ft_launch_problem()
    facts["ulfm_active"] = problem is None
    facts["ulfm_inactive_reason"] = problem
    facts["cuda_aware_mpi"] = mpi.cuda_aware()
    facts["mpiexec"] = mpi.venv_tool("mpiexec")
    facts["h5py"] = _version("h5py")
    try:
        import h5py

        facts["hdf5"] = h5py.version.hdf5_version
    except ImportError:
        facts["hdf5"] = None
    facts["numpy"] = _version("numpy")
    facts["torch"] = _version("torch")
    try:
        import torch

        facts["torch_cuda_gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        facts["torch_cuda_gpus"] = 0
    facts["cupy"] = _version("cupy")
    try:
        import cupy

        facts["cupy_gpus"] = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no cupy, or no driver: zero GPUs
        facts["cupy_gpus"] = 0
    facts["slurm_job"] = os.environ.get("SLURM_JOB_ID")
    return facts


def run(args):
    facts = collect()
    if args.json:
        print(json.dumps(facts, indent=1))
        return 0
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if key == "ulfm_inactive_reason" and value is None:
            continue
        print(f"{key:<{width}}  {value}")
    return 0
