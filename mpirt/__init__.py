"""mpirt: an elastic message-passing runtime on MPI (ULFM), HDF5 and PyTorch.

Importing this package has no side effects: MPI is initialised only when a job
asks for a communicator, and heavy modules (mpi4py, h5py, torch) are imported
where they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
