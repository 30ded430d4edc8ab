"""The lifeline: one TCP connection from every rank to ``mpirt launch``, and the job's failure detector.

It carries what the launcher must know whatever happened to Open MPI's runtime, and binds the
ranks' lives to the launcher's:

- the job's status ("running", then its exit code) from the coordinator, and the host changes for
  the launcher's closing summary (under ULFM mpiexec's own exit status says little, and after a
  lost host mpiexec is gone while the job goes on: see :mod:`mpirt.comm.pmix_guard`);
- the ranks' output once the runtime that relayed it is gone, or from the start over several
  hosts (:class:`_Relay`);
- the job's signals (the stop request, SIGUSR1, that Slurm and Ctrl-C turn into), from the launcher
  to every rank, whether or not mpiexec is still there to forward them;
- over several hosts, heartbeats both ways (ranks every ``timeout / 4`` seconds, the launcher every
  ``timeout / 8``). A rank silent for ``timeout`` seconds (its
  host frozen or cut off, or the rank stopped) is declared failed: the launcher tells every other
  rank, which raises the failure in its MPI library (:func:`mpirt.comm.pmix_guard.declare_failed`),
  and closes that rank's lifeline, so that if it ever wakes up it stops before it can commit
  (fencing). A rank that hears nothing from the launcher for ``timeout`` seconds is on the far side
  of a partition: it stops, saying it lost the quorum. Ranks that can reach the launcher are the
  job; no two sides can both go on.
- the launcher's death: a rank whose lifeline reads end-of-file stops at once, so no rank outlives
  a SIGKILLed launcher.

The launcher waits for mpiexec *and* for every lifeline to close. A connection must present the
job's token first (``MPIRT_LIFELINE`` = host:port:token), so nothing else can speak for the job.
Messages are JSON lines.
"""

import atexit
import contextlib
import json
import os
import secrets
import select
import socket
import sys
import threading
import time

from mpirt.config import HANG_TIMEOUT, HOST_FT, LIFELINE, env_flag, env_float

# A rank whose launcher is gone exits with this (EX_UNAVAILABLE); one cut off from it, with 1.
LAUNCHER_GONE = 69
CUT_OFF = 1


class _Rank:
    def __init__(self, conn, hello):
        self.conn = conn
        self.proc = (hello.get("nspace", ""), int(hello.get("rank", -1)))
        self.host = hello.get("host", "?")
        self.last = time.monotonic()
        self.declared = False
        self.lock = threading.Lock()

    def send(self, data):
        try:
            with self.lock:
                self.conn.sendall(data)
        except OSError:
            pass


class Server:
    """The launcher's end.

    Args:
        address: what ranks connect to (see :func:`advertised_address`).
        timeout: seconds of silence after which a rank is declared failed (0: never).
        log: a logger for the declarations.
    """

    def __init__(self, address="127.0.0.1", timeout=0.0, log=None):
        self.token = secrets.token_hex(16)
        self.sock = socket.create_server(("0.0.0.0" if address != "127.0.0.1" else address, 0), backlog=1024)
        self.env_value = f"{address}:{self.sock.getsockname()[1]}:{self.token}"
        self.timeout, self.log = timeout, log
        self.status = None  # None: no mpirt job reported; "running"; or the exit code
        self.hosts_lost, self.hosts_joined = [], []
        self.declared = []  # (host, proc) of ranks this launcher declared failed
        self.first_error = None  # the first unexpected error a rank reported (its one line)
        self.open = 0
        self.seen = 0  # lifelines ever opened: ranks of an mpirt job that got as far as its start
        self.byes = 0  # ranks whose interpreter ended normally (not killed): see connect()
        self.daemon_lost = False  # mpiexec reported a lost daemon (set by launch._relay)
        self.final_at = None  # when the job reported its exit code
        self.quiet_at = None  # when the last open lifeline closed
        self.cond = threading.Condition()
        self._ranks = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="mpirt-lifeline", daemon=True).start()
        if timeout > 0:
            threading.Thread(target=self._monitor, name="mpirt-detector", daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        f = conn.makefile("rb")
        try:
            hello = json.loads(f.readline() or b"{}")
        except ValueError:
            hello = {}
        if hello.get("token") != self.token:
            conn.close()
            return
        rank = _Rank(conn, hello)
        with self.cond:
            self.open += 1
            self.seen += 1
            self._ranks.append(rank)
        try:
            for line in f:
                rank.last = time.monotonic()
                self._handle(json.loads(line))
        except (OSError, ValueError):
            pass
        finally:
            with self.cond:
                self.open -= 1
                if self.open == 0:
                    self.quiet_at = time.monotonic()
                self._ranks.remove(rank)
                self.cond.notify_all()
            conn.close()

    def _handle(self, msg):
        kind = msg.get("t")
        with self.cond:
            if kind == "status":
                self.status = msg["code"]
                if self.status != "running":
                    self.final_at = self.final_at or time.monotonic()
            elif kind == "error" and self.first_error is None:
                self.first_error = msg.get("text")
            elif kind == "bye":
                self.byes += 1
            elif kind == "hosts":
                self.hosts_lost += [h for h in msg.get("lost", []) if h not in self.hosts_lost]
                self.hosts_joined += [h for h in msg.get("joined", []) if h not in self.hosts_joined]
            self.cond.notify_all()
        if kind == "out":
            stream = sys.stderr if msg.get("stream") == "stderr" else sys.stdout
            stream.write(msg.get("text", ""))
            stream.flush()

    def _monitor(self):
        """Heartbeats out; ranks silent for ``timeout`` declared failed (see the module's doc)."""
        # Ranks check, before a commit, that they heard from here within timeout/2: beat well inside it.
        period = self.timeout / 8.0
        beat = _line("hb")
        tick = time.monotonic()
        while not self._closed.wait(period):
            now = time.monotonic()
            # A launcher that did not run for a while (a loaded machine) has not read what the ranks
            # sent meanwhile: judge nobody on this round.
            late, tick = now - tick > 2 * period, now
            with self.cond:
                ranks = list(self._ranks)
                # After the job's end nothing is left to commit; ranks may be slow in MPI_Finalize.
                ended = self.final_at is not None
            silent = [] if ended or late else [r for r in ranks if not r.declared and now - r.last > self.timeout
                                               and not _pending(r.conn)]
            for r in silent:
                r.declared = True
                self.declared.append((r.host, r.proc))
                # Closed now: if it wakes up, its first read is end-of-file and it stops (fencing).
                with contextlib.suppress(OSError):
                    r.conn.shutdown(socket.SHUT_RDWR)
                if self.log:
                    self.log.warning("rank %s on %s silent for %.1f s: declared failed", r.proc[1], r.host,
                                     now - r.last)
            notice = _line("failed", procs=[r.proc for r in silent]) if silent else b""
            for r in ranks:
                if not r.declared:
                    r.send(notice + beat)

    def over(self, grace, settle=5.0):
        """True when the launcher has nothing more to wait for, though mpiexec may still run.

        The job reported its exit code and every lifeline closed ``settle`` seconds ago (mpiexec
        should have ended by itself), or ``grace`` seconds passed since the report: the ranks left
        are on a frozen or cut-off host and cannot hear the launcher; Open MPI's runtime would wait
        for them forever.
        """
        with self.cond:
            if self.final_at is None:
                return False
            now = time.monotonic()
            if self.open == 0 and self.quiet_at is not None:
                return now - max(self.quiet_at, self.final_at) >= settle
            return now - self.final_at >= grace

    def wait_ranks(self, grace):
        """After mpiexec ended: wait until every rank's lifeline closed.

        Ranks that reported nothing final yet are waited for without a bound (the job goes on
        headless after a lost host). Once the job reported its exit code, stragglers get ``grace``
        seconds (see :meth:`over`).
        """
        with self.cond:
            while self.open > 0 and not self.over(grace, settle=0):
                self.cond.wait(0.5)

    def signal_ranks(self, signum):
        """Deliver ``signum`` to every rank (each raises it on itself: its own handler decides)."""
        data = _line("signal", sig=int(signum))
        with self.cond:
            ranks = list(self._ranks)
        for r in ranks:
            r.send(data)

    def close(self):
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        with self.cond:
            for r in self._ranks:
                with contextlib.suppress(OSError):
                    r.conn.shutdown(socket.SHUT_RDWR)


def _pending(conn):
    """True when ``conn`` has bytes not read yet (the rank spoke; its reader thread is behind)."""
    try:
        return bool(conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return False


def _line(kind, **fields):
    return (json.dumps({"t": kind, **fields}) + "\n").encode()


def advertised_address(peers):
    """The address of this machine that ``peers`` (host names) reach; 127.0.0.1 without remote peers.

    A UDP ``connect`` picks the route without sending anything.
    """
    for peer in peers:
        try:
            addr = socket.gethostbyname(peer)
        except OSError:
            continue
        if addr.startswith("127."):
            continue
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))
            return s.getsockname()[0]
    return "127.0.0.1"


# -- the rank's end ---------------------------------------------------------------------------
_client = {}
_on_cut_off = []
_on_declared = []


def on_cut_off(callback):
    """Call ``callback(message)`` before this rank stops because it is cut off from the launcher."""
    _on_cut_off.append(callback)


def on_declared(callback):
    """Call ``callback(procs)`` (on the lifeline's thread) after the launcher declared ``procs`` failed
    and this rank's MPI library was told."""
    _on_declared.append(callback)


def connect(member=None):
    """Connect this rank (once) when ``mpirt launch`` gave it a lifeline; watch for the launcher's end."""
    if "sock" in _client or not os.environ.get(LIFELINE):
        return
    from mpirt.comm import pmix_guard

    host, port, token = os.environ[LIFELINE].rsplit(":", 2)
    sock = socket.create_connection((host, int(port)), timeout=30)
    # Heartbeats only over several hosts (see launch.py): one host has no partition to detect.
    timeout = env_float(HANG_TIMEOUT, 0.0) if env_flag(HOST_FT) else 0.0
    # Blocking sends: a send cut short by a timeout would leave half a line, which ends the
    # lifeline. The reader bounds its waits itself (see _watch).
    sock.settimeout(None)
    _client.update(sock=sock, lock=threading.Lock(), rlock=threading.Lock(), buf=b"", timeout=timeout,
                   heard=time.monotonic())
    nspace, rank = pmix_guard.identity()
    send("hello", token=token, host=socket.gethostname(), pid=os.getpid(), member=member, nspace=nspace, rank=rank)
    threading.Thread(target=_watch, args=(sock, timeout), name="mpirt-lifeline", daemon=True).start()
    # A normal end of the interpreter (any exit status) says so: the launcher tells a job whose ranks
    # all ended this way from one whose ranks were all killed while mpiexec said 0 (see launch.py).
    atexit.register(send, "bye")
    if timeout > 0:
        threading.Thread(target=_beat, args=(timeout / 4.0,), name="mpirt-heartbeat", daemon=True).start()
    # Over several hosts the output goes over the lifeline from the start: what sits in the pipe
    # to Open MPI's daemon when a lost host takes the runtime down is lost with it.
    _Relay.install(direct=env_flag(HOST_FT))


def send(kind, **fields):
    """Send one message to the launcher; False when there is no lifeline (or it broke)."""
    sock = _client.get("sock")
    if sock is None:
        return False
    try:
        with _client["lock"]:
            sock.sendall(_line(kind, **fields))
        return True
    except OSError:
        return False


def check_fence():
    """Stop this rank now if the launcher may have declared it failed; call it before a commit.

    Declared means: its lifeline was closed (it was frozen while the others went on: the launcher's
    end-of-file waits behind the heartbeats that queued up meanwhile, so this reads what has
    arrived, as the lifeline's thread would, to find it), or it has heard nothing from the launcher
    for half the timeout (it may be cut off: the launcher declares a rank after a whole timeout of
    silence, so a rank that heard from it within half of one was not declared yet). Without
    ``mpirt launch`` there is no fence.
    """
    sock = _client.get("sock")
    if sock is None:
        return
    try:
        eof = _drain(sock)
    except (OSError, ValueError):
        eof = True
    if eof:
        _stop(LAUNCHER_GONE, "declared failed by mpirt launch (this rank was unreachable): stopping without "
                             "committing")
    timeout = _client["timeout"]
    silent = time.monotonic() - _client["heard"]
    if timeout > 0 and silent > timeout / 2:
        _cut_off(f"lost the quorum: no word from mpirt launch for {silent:.1f} s (this host may be cut off from "
                 f"the job); stopping without committing anything")


def _beat(period):
    # A send that fails once (a full buffer on a loaded machine) must not end the heartbeats: a rank
    # whose beats stopped would be declared failed. Only the process's end stops them.
    while True:
        send("hb")
        time.sleep(period)  # a heartbeat's period, not a synchronisation


def _watch(sock, timeout):
    try:
        while True:
            if not select.select([sock], [], [], timeout if timeout > 0 else None)[0]:
                raise TimeoutError
            if _drain(sock):
                break
    except TimeoutError:
        _cut_off(f"lost the quorum: mpirt launch unreachable for {timeout:g} s (this host is cut off from "
                 f"the job); stopping without committing anything")
    except OSError as exc:  # no route to the launcher (a link down): cut off as well
        _cut_off(f"lost the quorum: mpirt launch unreachable ({exc.strerror or exc}); stopping without "
                 f"committing anything")
    except ValueError:
        pass
    # End of file: the launcher closed this lifeline (it ended, or declared this rank failed).
    _stop(LAUNCHER_GONE, "mpirt launch is gone (or declared this rank failed): stopping this rank")


def _drain(sock):
    """Read what the launcher has sent so far, without waiting, and act on each whole line; True at
    its end of file. One reader at a time: the lifeline's thread, or :func:`check_fence`."""
    from mpirt.comm import pmix_guard

    with _client["rlock"]:
        while True:
            try:
                chunk = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            if not chunk:
                return True
            _client["heard"] = time.monotonic()
            *lines, _client["buf"] = (_client["buf"] + chunk).split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if msg.get("t") == "signal":
                    os.kill(os.getpid(), int(msg["sig"]))
                elif msg.get("t") == "failed":
                    procs = [tuple(p) for p in msg["procs"]]
                    pmix_guard.declare_failed(procs)
                    for callback in _on_declared:
                        with contextlib.suppress(Exception):  # the lifeline must keep reading
                            callback(procs)


def _cut_off(message):
    for callback in _on_cut_off:
        with contextlib.suppress(Exception):  # the stop must happen whatever a record does
            callback(message)
    _stop(CUT_OFF, message)


def _stop(code, message):
    line = f"mpirt [{socket.gethostname()} pid {os.getpid()}]: {message}\n"
    if code != LAUNCHER_GONE:
        send("out", stream="stderr", text=line)  # the launcher may still hear it
    with contextlib.suppress(OSError):
        os.write(2, line.encode())
    os._exit(code)


class _Relay:
    """stdout/stderr that go over the lifeline when the runtime's output pipe is gone (or from the start).

    Open MPI's daemon relays a rank's output; after a lost host it is gone (and this rank lives
    on), so a write would raise BrokenPipeError in the middle of the job.
    """

    def __init__(self, stream, name, direct=False):
        self._stream, self._name, self._broken = stream, name, direct
        self._pending = ""

    @classmethod
    def install(cls, direct=False):
        import logging

        sys.stdout = cls(sys.stdout, "stdout", direct)
        sys.stderr = cls(sys.stderr, "stderr", direct)
        for handler in logging.getLogger("mpirt").handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler.stream, cls):
                handler.setStream(sys.stderr)

    def write(self, text):
        if not self._broken:
            try:
                n = self._stream.write(text)
                self._stream.flush()
                return n
            except (OSError, ValueError):
                self._broken = True
        # Whole lines only, so that the launcher does not interleave two ranks inside a line.
        self._pending += text
        head, sep, self._pending = self._pending.rpartition("\n")
        if sep:
            send("out", stream=self._name, text=head + sep)
        return len(text)

    def flush(self):
        if not self._broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._broken = True
        elif self._pending:
            send("out", stream=self._name, text=self._pending)
            self._pending = ""

    def __getattr__(self, name):
        return getattr(self._stream, name)
