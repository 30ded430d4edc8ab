"""Horovod's API on mpirt's elastic runtime: ``import mpirt.horovod.torch as hvd``.

A pure-Python layer: no compiled extension, nothing built against the installed torch. The
collectives are MPI's (mpi4py), run on the job's fault-tolerant communicator; a failed member
raises :class:`HorovodInternalError` as in Horovod, and ``hvd.elastic.run`` recovers in place
(ULFM Revoke and Shrink) instead of restarting workers through a driver. See README, "Coming from
Horovod", for what is the same and what differs.
"""
