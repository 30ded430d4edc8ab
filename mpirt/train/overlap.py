"""Gradient buckets reduced on a thread while backward still runs.

Hooks on the parameters (``register_post_accumulate_grad_hook``) count down each bucket as autograd
completes its gradients; a thread of this process reduces the buckets in bucket order (the same on
every rank, whatever order the hooks fire in), packing each as soon as it is complete. mpi4py
releases the GIL inside MPI calls and torch inside its kernels, and MPI was initialised with
``MPI_THREAD_MULTIPLE`` (:mod:`mpirt.comm.mpi`), so the collective and backward run together.

The last bucket (the first layers, whose gradients come last) is not the thread's: it carries the
step's stats, known only after backward, and :meth:`GradAllreduce.allreduce` reduces it on the
calling thread after :meth:`finish`. Only one thread calls MPI on the communicator at a time.

A failure on the thread (a member died, the view was revoked) is kept and re-raised by
:meth:`finish` on the main thread, so the step ends in its ``Agree`` and recovery as without overlap;
the buckets after it are not reduced (the step is redone).
"""

import threading


class Overlap:
    """The thread and hooks of one :class:`mpirt.train.allreduce.GradAllreduce`."""

    def __init__(self, reducer):
        self.reducer = reducer
        self.n = len(reducer.groups) - 1  # buckets the thread reduces
        self.cv = threading.Condition()
        self.left = [0] * self.n  # gradients still to come, per bucket
        self.armed = False  # between begin() and finish()
        self.flushed = False  # backward is over: whatever is not complete will not be (unused params)
        self.generation = 0  # steps begun
        self.finished = 0  # steps whose buckets the thread is done with
        self.reduced = 0  # buckets reduced in the current step
        self.error = None
        self.fired, self.twice = set(), False
        self.closed = False
        self.thread = None
        self._handles = []
        for i, group in enumerate(reducer.groups[:self.n]):
            for p in group:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(i)))

    def _hook(self, i):
        def ready(param):
            with self.cv:
                if self.armed:
                    if id(param) in self.fired:  # a second backward before the step: see finish()
                        self.twice = True
                    self.fired.add(id(param))
                    self.left[i] -= 1
                    if self.left[i] <= 0:
                        self.cv.notify_all()
        return ready

    def begin(self):
        """Before backward; every begin() is followed by finish() (GradAllreduce.allreduce)."""
        with self.cv:
            if self.armed and not self.fired:  # zero_grad() twice before a backward: still armed
                return
            self.left = [len(g) for g in self.reducer.groups[:self.n]]
            self.flushed, self.error, self.reduced, self.armed = False, None, 0, True
            self.fired, self.twice = set(), False
            self.generation += 1
            self.cv.notify_all()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="mpirt-overlap", daemon=True)
            self.thread.start()

    def finish(self):
        """After backward: wait for the thread's buckets; the index of the first bucket left to reduce.

        Raises:
            ProcessFailure: the thread's reduction failed (or MPI's error, re-raised as is).
        """
        if not self.armed:  # begin() was not called this step: nothing went ahead
            return 0
        with self.cv:
            self.flushed = True
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.finished == self.generation)
            self.armed = False
            error = self.error
        if error is not None:
            with self.reducer.ec.guard():
                raise error
        if self.twice:  # the same on every rank (same program): all raise, no collective left hanging
            raise RuntimeError("a gradient was accumulated by two backward passes in one step, but buckets "
                               "went out after the first: with overlap, run one backward per step (or "
                               "turn overlap off to accumulate)")
        return self.n

    def _run(self):
        done = 0
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.closed or self.generation > done)
                if self.closed:
                    return
                done = self.generation
            for i in range(self.n):
                with self.cv:
                    self.cv.wait_for(lambda: self.left[i] <= 0 or self.flushed or self.closed)
                    if self.closed:
                        return
                try:
                    self.reducer.pack_bucket(i)
                    self.reducer.reduce_bucket(i)
                except Exception as exc:  # noqa: BLE001 - re-raised by finish() on the main thread
                    with self.cv:
                        self.error = exc
                    break
            with self.cv:
                self.finished = done
                self.cv.notify_all()

    def close(self):
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        for h in self._handles:
            h.remove()
