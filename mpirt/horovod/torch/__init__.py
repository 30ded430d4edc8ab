"""Horovod's PyTorch API on mpirt: ``import mpirt.horovod.torch as hvd`` in place of
``import horovod.torch as hvd``, then run the script with ``mpirt launch`` (or ``mpirun``, or
``srun``). See :mod:`mpirt.horovod` and README, "Coming from Horovod".
"""

from mpirt.horovod.torch import elastic
from mpirt.horovod.torch.compression import Compression
from mpirt.horovod.torch.functions import (allgather_object, broadcast_object, broadcast_optimizer_state,
                                           broadcast_parameters)
from mpirt.horovod.torch.mpi_ops import *  # noqa: F401,F403 - Horovod's flat namespace
from mpirt.horovod.common import HostsUpdatedInterrupt  # noqa: F401
from mpirt.horovod.torch.optimizer import DistributedOptimizer
