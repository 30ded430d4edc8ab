#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine: what mpirt's CI (.ci/run) and its slurm tests
# use, and a way to try mpirt's batch jobs on a laptop.
#
#   scripts/slurm/local-cluster.sh start    # install if missing, configure, start, wait until the node is idle
#   scripts/slurm/local-cluster.sh status   # sinfo and squeue (exit 3 if the cluster is not running)
#   scripts/slurm/local-cluster.sh stop     # cancel the jobs, stop slurmctld and slurmd (and munged if we started it)
#
# Needs: Debian 12 / Ubuntu (apt-get), and root: run it as root (CI) or it uses sudo (laptop).
# `start` installs the packages slurm-wlm, munge, libpmix-dev if they are missing (apt-get update
# only when the install fails without it), creates /etc/munge/munge.key if missing, starts munged
# (unless a munged answers already), slurmctld and slurmd as plain daemons (no systemd), then polls
# sinfo until the node is idle (deadline $MPIRT_SLURM_WAIT s, default 60) and fails with the tail of
# the daemon logs if it does not come up. `start` is idempotent: a running cluster whose
# configuration is unchanged is left alone (its jobs keep running); a changed one is restarted.
# Every (re)start begins with an empty controller state: no jobs, job ids from 1.
#
# Files:
#   $MPIRT_SLURM_DIR (default /tmp/mpirt-slurm): slurm.conf and cgroup.conf (what the daemons read,
#     via -f), state/ (StateSaveLocation), spool/ (SlurmdSpoolDir), log/ (slurmctld.log,
#     slurmd.log, and the daemons' stderr), the pid files.
#   /etc/slurm/slurm.conf: a copy of that slurm.conf, so that sinfo, sbatch, srun, squeue, scancel,
#     scontrol run by anyone later find the cluster without SLURM_CONF (Debian's default path).
#     The script only overwrites a /etc/slurm/slurm.conf that it wrote itself (first line marks it);
#     with MPIRT_SLURM_ETC=0 it leaves /etc/slurm alone and you `export SLURM_CONF=$MPIRT_SLURM_DIR/slurm.conf`.
#
# The cluster: one node named $(hostname -s), addressed as 127.0.0.1 (no DNS needed), declaring
# $MPIRT_SLURM_CPUS CPUs (default: 8, or nproc if more). More CPUs than cores is deliberate: jobs of
# up to 8 tasks are allocated on a 2-core machine and their ranks oversubscribe the cores
# (SlurmdParameters=config_overrides keeps slurmd from draining the node for it).
# Partitions:
#   debug  (default) PriorityTier=1, OverSubscribe=FORCE:4 (up to 4 jobs share a CPU). Its jobs are
#          preempted by `urgent` jobs that need their CPUs, and requeued (JobRequeue=1): within ~1 s
#          the batch script gets SIGTERM (SIGKILL KillWait=5 s later), the job goes back to PENDING
#          (Reason=BeginTime) and runs again ~11 s later (AuthInfo=cred_expire=10; Slurm's default
#          is 120 s) with SLURM_RESTART_COUNT=1. No GraceTime: with one, the kill waits for
#          slurmctld's 30-s periodic time-limit check.
#   urgent PriorityTier=2, OverSubscribe=NO, not preemptable: submit here (-p urgent) to preempt.
# Time limits (--time) are enforced by that same 30-s periodic check: a job may overrun by up to ~30 s.
# There is no slurmdbd: sacct does not work. Learn job outcomes from files the job writes and from
# `scontrol show job ID` (MinJobAge=600 keeps finished jobs there for 10 minutes).
# MpiDefault=none: use `srun --mpi=pmix` (works) or, for fault tolerance, the venv's mpiexec inside
# the allocation.
# On a laptop with systemd, the Debian packages may also enable slurmctld/slurmd/munge services;
# this script does not use them (`systemctl disable --now slurmctld slurmd` if you do not want them).
#
# Multi-node mode (--hosts, or MPIRT_SLURM_HOSTS=1): a Slurm cluster over the simulated hosts of
# scripts/hosts/local-hosts.sh (start those first; without them `start --hosts` fails in one line),
# side by side with the single-node cluster above (separate files, controller and network namespaces):
#
#   scripts/slurm/local-cluster.sh start --hosts    # slurmctld on the head, one slurmd per host; idempotent
#   scripts/slurm/local-cluster.sh status --hosts   # sinfo and squeue (exit 3 if not running)
#   scripts/slurm/local-cluster.sh stop --hosts     # cancel the jobs, stop every daemon of this cluster
#   SLURM_CONF=/tmp/mpirt-slurm-hosts/slurm.conf scripts/hosts/ssh head sbatch -N 3 ...   # submit
#
#   - slurmctld runs inside the head's namespace (hostname head, 10.77.0.254) and one slurmd per host
#     inside that host's (NodeName=nodeI NodeAddr=10.77.0.I), all started through the launch agent
#     scripts/hosts/ssh, so `local-hosts.sh crash nodeI` kills that node's slurmd, its job steps and
#     ranks at once: a node crash. One munged serves every namespace (its socket is a file).
#   - Client commands (sbatch, squeue, scontrol, scancel) run on the head through the agent with
#     SLURM_CONF=$MPIRT_SLURM_HOSTS_DIR/slurm.conf; /etc/slurm is never touched in this mode.
#   - Nodes declare $MPIRT_SLURM_HOST_CPUS CPUs (default 4, as the hostfile's slots); one partition,
#     `hosts` (default), OverSubscribe=FORCE:4, JobRequeue=1, KillWait=5, cred_expire=10 as above.
#   - A lost node is noticed within SlurmdTimeout=10 s (slurmctld pings every 10/3 s) and set DOWN;
#     a job submitted with --no-kill keeps its allocation on the other nodes (without it Slurm ends
#     the job). ReturnToService=2: a node whose slurmd is started again registers and is idle again.
#     `start --hosts` on a running cluster starts the slurmd of any host that lost it (a crashed
#     node comes back) and waits until every node is idle: what the tests do between cases.
#   - Files: $MPIRT_SLURM_HOSTS_DIR (default /tmp/mpirt-slurm-hosts): slurm.conf, state/,
#     spool/nodeI/ (SlurmdSpoolDir=spool/%n), slurmctld.pid, slurmd-nodeI.pid, log/ (slurmctld.log,
#     slurmd-nodeI.log, the daemons' stderr).
#   - Needs root (as local-hosts.sh does).
set -eEuo pipefail

action=${1:-}
hosts_mode=${MPIRT_SLURM_HOSTS:-0}
[ "${2:-}" = --hosts ] && hosts_mode=1
if [ "$hosts_mode" != 0 ]; then
    dir=${MPIRT_SLURM_HOSTS_DIR:-/tmp/mpirt-slurm-hosts}
else
    dir=${MPIRT_SLURM_DIR:-/tmp/mpirt-slurm}
fi
conf=$dir/slurm.conf
etc_conf=/etc/slurm/slurm.conf
write_etc=${MPIRT_SLURM_ETC:-1}
wait_s=${MPIRT_SLURM_WAIT:-60}
cpus=${MPIRT_SLURM_CPUS:-$(($(nproc) > 8 ? $(nproc) : 8))}
host=$(hostname -s)
marker="# Written by mpirt scripts/slurm/local-cluster.sh"
# This script's own client commands (sinfo, squeue, scancel, scontrol) read this file.
export SLURM_CONF=$conf
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo env SLURM_CONF=$conf"

say() { echo "local-cluster: $*" >&2; }
logs_tail() {
    local f
    for f in "$dir"/log/*; do
        [ -s "$f" ] || continue
        echo "--- $f (last 20 lines)" >&2
        $sudo tail -n 20 "$f" >&2 || true
    done
}
die() { say "error: $*"; logs_tail; exit 1; }
trap 'say "error: command failed at line $LINENO"; logs_tail' ERR

# The pid in pid file $1 if that process is alive and is $2; else nothing (and status 1).
alive() {
    local pid
    pid=$($sudo cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && echo "$pid"
}

running() { alive "$dir/slurmctld.pid" slurmctld >/dev/null && alive "$dir/slurmd.pid" slurmd >/dev/null; }

install_packages() {
    local pkgs=(slurm-wlm munge libpmix-dev) missing=() p
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} (Slurm with munge, PMIx) yourself"
    say "installing ${missing[*]}"
    # --no-install-recommends: slurm-wlm recommends a dozen plugin packages (hdf5, rrd, elasticsearch...) we do not use.
    local apt=($sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 -y -q)
    if ! "${apt[@]}" install --no-install-recommends "${missing[@]}" </dev/null >"$dir/log/apt.log" 2>&1; then
        say "apt-get install failed without a fresh package index; running apt-get update"
        "${apt[@]}" update </dev/null >>"$dir/log/apt.log" 2>&1 || die "apt-get update failed (see $dir/log/apt.log)"
        "${apt[@]}" install --no-install-recommends "${missing[@]}" </dev/null >>"$dir/log/apt.log" 2>&1 ||
            die "apt-get install ${missing[*]} failed (see $dir/log/apt.log)"
    fi
}

# What both clusters (this one and --hosts) are configured alike in: users and authentication, no
# cgroups, scheduling, requeue, and how long finished jobs stay visible.
shared_conf() {
    cat <<CONF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again cred_expire+1 s after the requeue (default 120 s).
AuthInfo=cred_expire=10
# No cgroups: containers and CI VMs often lack a usable cgroup hierarchy.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Backfill (which is what preempts here) every second, not every 30 s.
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
ReturnToService=2
# The node may declare more CPUs than the machine has cores.
SlurmdParameters=config_overrides
JobRequeue=1
# Seconds between SIGTERM and SIGKILL (time limit, scancel, end of a preemption's grace time).
KillWait=5
# No accounting database: finished jobs stay visible to scontrol show job for 10 minutes.
MinJobAge=600
MaxJobCount=20000
SlurmctldTimeout=30
InactiveLimit=0
CONF
}

# The configuration, on stdout (deterministic: a running cluster with the same one is left alone).
render_conf() {
    local mem
    # RealMemory a bit below the total, so that slurmd never finds less than declared.
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat <<CONF
$marker (do not edit: it is rewritten by 'start')
ClusterName=mpirt-local
SlurmctldHost=$host(127.0.0.1)
$(shared_conf)
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# Preemption: jobs of partition debug are requeued when an urgent job needs their CPUs.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmdTimeout=30
MessageTimeout=10
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4 PriorityTier=1 PreemptMode=REQUEUE
PartitionName=urgent Nodes=$host Default=NO MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=2 PreemptMode=OFF
CONF
}

configure() {
    $sudo mkdir -p "$dir"/{state,spool,log}
    render_conf | $sudo tee "$conf" >/dev/null
    $sudo tee "$dir/cgroup.conf" >/dev/null <<CONF
$marker
# Unused while ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no cgroup plugin is loaded);
# here so that switching to proctrack/cgroup + task/cgroup later has a starting point.
CgroupPlugin=autodetect
CONF
    if [ "$write_etc" != 0 ]; then
        if [ -e "$etc_conf" ] && ! head -n1 "$etc_conf" | grep -qF "scripts/slurm/local-cluster.sh"; then
            die "$etc_conf exists and was not written by this script: move it away, or run with MPIRT_SLURM_ETC=0 and export SLURM_CONF=$conf"
        fi
        $sudo mkdir -p /etc/slurm
        $sudo install -m 644 "$conf" "$etc_conf"
    fi
}

start_munge() {
    # A munged that answers (a system service, or ours from before) is good enough.
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        $sudo mkdir -p /etc/munge
        $sudo mungekey --create --force --keyfile=/etc/munge/munge.key
    fi
    $sudo chown munge:munge /etc/munge/munge.key
    $sudo chmod 400 /etc/munge/munge.key
    $sudo mkdir -p /run/munge /var/log/munge /var/lib/munge
    $sudo chown munge:munge /run/munge /var/log/munge /var/lib/munge
    # --force: a socket left by a munged that died is reused.
    $sudo runuser -u munge -- munged --force 2>>"$dir/log/munged.stderr" || die "munged did not start"
    $sudo cp /run/munge/munged.pid "$dir/munged.pid" 2>/dev/null || true  # ours: 'stop' stops it
    local deadline=$((SECONDS + 10))
    until munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "munged does not answer (see /var/log/munge/munged.log)"
        sleep 0.1
    done
}

start_daemons() {
    # A fresh controller state (no jobs; a node remembered as down would not come back by itself).
    $sudo rm -rf "$dir/state" "$dir/spool"
    $sudo mkdir -p "$dir/state" "$dir/spool"
    # Both daemonize themselves; errors before their log files open go to *.stderr.
    $sudo slurmctld -f "$conf" 2>>"$dir/log/slurmctld.stderr" || die "slurmctld did not start"
    $sudo slurmd -f "$conf" 2>>"$dir/log/slurmd.stderr" || die "slurmd did not start"
}

wait_idle() {
    local t0=$SECONDS deadline=$((SECONDS + wait_s)) state="" resumed=0
    while :; do
        state=$(sinfo -h -n "$host" -o %t 2>/dev/null | head -n1 || true)
        case "$state" in
            idle|mix|alloc) return 0 ;;
            down*|drain*)
                # ReturnToService=2 normally does this; a node drained for a reason needs a resume.
                if [ $resumed = 0 ]; then
                    $sudo scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        alive "$dir/slurmctld.pid" slurmctld >/dev/null || [ $SECONDS -lt $((t0 + 5)) ] || die "slurmctld is not running"
        [ $SECONDS -lt $deadline ] || die "node $host not idle after $wait_s s (sinfo state: '${state:-none}')"
        sleep 0.2  # polling a condition under a deadline
    done
}

stop_cluster() {
    local pid d deadline
    if alive "$dir/slurmctld.pid" slurmctld >/dev/null; then
        # Cancel every job first, so that slurmd takes its steps down before it goes.
        $sudo scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
        deadline=$((SECONDS + 20))
        while [ -n "$(squeue -h -o %i 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        $sudo scontrol shutdown >/dev/null 2>&1 || true
    fi
    deadline=$((SECONDS + 20))
    for d in slurmctld slurmd; do
        while pid=$(alive "$dir/$d.pid" "$d"); do
            if [ $SECONDS -ge $deadline ]; then
                say "$d ($pid) did not stop: SIGKILL"
                $sudo kill -9 "$pid" 2>/dev/null || true
                break
            fi
            $sudo kill "$pid" 2>/dev/null || true
            sleep 0.2
        done
    done
    # Steps that outlived slurmd (only when no other slurmd runs on this machine).
    if ! pgrep -x slurmd >/dev/null; then
        for pid in $(pgrep -x slurmstepd || true); do $sudo kill -9 "$pid" 2>/dev/null || true; done
    fi
    if pid=$(alive "$dir/munged.pid" munged); then
        $sudo kill "$pid" 2>/dev/null || true
        $sudo rm -f "$dir/munged.pid"
    fi
}

# -- multi-node mode (--hosts) ------------------------------------------------------------------
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
agent=$here/../hosts/ssh
hosts_dir=${MPIRT_HOSTS_DIR:-/tmp/mpirt-hosts}
host_cpus=${MPIRT_SLURM_HOST_CPUS:-4}

# A client command on the head (where slurmctld listens); words must not need quoting.
on_head() { "$agent" head "$@"; }
host_count() { cat "$hosts_dir/count" 2>/dev/null || echo 0; }
node_names() { seq -f "node%g" 1 "$(host_count)"; }

hosts_up() {
    [ "$(id -u)" = 0 ] || die "--hosts needs root (the simulated hosts are network namespaces)"
    [ "$(host_count)" -gt 0 ] && ip netns list 2>/dev/null | awk '{print $1}' | grep -qx mpirt-head ||
        { say "error: the simulated hosts are not running: start them first (scripts/hosts/local-hosts.sh start 4)"; exit 1; }
}

render_hosts_conf() {
    local i
    cat <<CONF
$marker --hosts (do not edit: it is rewritten by 'start --hosts')
ClusterName=mpirt-hosts
SlurmctldHost=head(10.77.0.254)
$(shared_conf)
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
# A crashed node is noticed (pinged every SlurmdTimeout/3 s) and set DOWN within ~10 s, not 5 min.
SlurmdTimeout=10
MessageTimeout=5
# Jobs get the submitter's environment, so MPIRT_SIMULATED_HOST would say head on every node: each
# task (the batch script too) is told the simulated host it runs on, as the agent tells its commands.
TaskProlog=$here/hosts-task-prolog
CONF
    for i in $(seq 1 "$(host_count)"); do
        echo "NodeName=node$i NodeAddr=10.77.0.$i NodeHostname=node$i CPUs=$host_cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$host_cpus ThreadsPerCore=1 RealMemory=1024 State=UNKNOWN"
    done
    echo "PartitionName=hosts Nodes=node[1-$(host_count)] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
}

slurmd_alive() { alive "$dir/slurmd-$1.pid" slurmd >/dev/null; }
hosts_running() { alive "$dir/slurmctld.pid" slurmctld >/dev/null; }

# ip netns exec mounts a fresh /sys without cgroups, and slurmd 22.05 refuses to start without a
# cgroup file system even with no cgroup plugin configured (proctrack/linuxproc, task/none): "No
# filesystem mounted on /sys/fs/cgroup", then "can't stat /sys/fs/cgroup/systemd/". Mounted in the
# agent command's own mount namespace, for slurmd only, like the machine's: cgroup2 where the
# machine has it there; else (cgroup v1; cgroup/v2 refuses a hybrid layout) a tmpfs with the
# name=systemd hierarchy, which is all slurmd looks at.
cgroup_mounts() {
    if [ "$(awk '$2 == "/sys/fs/cgroup" {fs = $3} END {print fs}' /proc/self/mounts)" = cgroup2 ]; then
        echo "mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup"
    else
        echo "mountpoint -q /sys/fs/cgroup || { mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup &&" \
            "mkdir -p /sys/fs/cgroup/systemd && mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd; }"
    fi
}

start_slurmd() {
    $sudo mkdir -p "$dir/spool/$1"
    "$agent" "$1" "$(cgroup_mounts); exec slurmd -f $conf -N $1" 2>>"$dir/log/slurmd-$1.stderr" ||
        die "slurmd on $1 did not start"
}

start_hosts_cluster() {
    local n
    if hosts_running && [ "$(render_hosts_conf)" = "$(cat "$conf" 2>/dev/null)" ]; then
        say "--hosts: already running ($conf)"
    else
        hosts_running && { say "--hosts: configuration changed: restarting"; stop_hosts_cluster; }
        mkdir -p "$dir/log"
        render_hosts_conf >"$conf"
        start_munge
        rm -rf "$dir/state" "$dir/spool"
        mkdir -p "$dir/state" "$dir/spool"
        on_head slurmctld -f "$conf" 2>>"$dir/log/slurmctld.stderr" || die "slurmctld did not start on the head"
    fi
    # A host that was crashed (or a slurmd that died) gets its slurmd back: ReturnToService=2 makes
    # the node idle again once it registers.
    for n in $(node_names); do
        slurmd_alive "$n" || start_slurmd "$n"
    done
    wait_hosts_idle
}

wait_hosts_idle() {
    local deadline=$((SECONDS + wait_s)) states="" want
    want=$(host_count)
    while :; do
        states=$(on_head sinfo -h -N -o %t 2>/dev/null || true)
        [ "$(grep -cE '^(idle|mix|alloc)$' <<<"$states")" = "$want" ] && return 0
        hosts_running || die "slurmctld is not running on the head"
        [ $SECONDS -lt $deadline ] || die "--hosts: not every node idle after $wait_s s (sinfo: $(tr '\n' ' ' <<<"$states"))"
        sleep 0.2  # polling a condition under a deadline
    done
}

stop_hosts_cluster() {
    local pid n deadline pids
    if hosts_running; then
        on_head scancel --full --quiet $(on_head squeue -h -o %i 2>/dev/null) 2>/dev/null || true
        deadline=$((SECONDS + 20))
        while [ -n "$(on_head squeue -h -o %i 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        on_head scontrol shutdown >/dev/null 2>&1 || true
    fi
    deadline=$((SECONDS + 20))
    for pidfile in "$dir/slurmctld.pid" "$dir"/slurmd-*.pid; do
        [ -e "$pidfile" ] || continue
        case "$pidfile" in *slurmctld.pid) d=slurmctld ;; *) d=slurmd ;; esac
        while pid=$(alive "$pidfile" "$d"); do
            if [ $SECONDS -ge $deadline ]; then
                say "$d ($pid) did not stop: SIGKILL"
                kill -9 "$pid" 2>/dev/null || true
                break
            fi
            kill "$pid" 2>/dev/null || true
            sleep 0.2
        done
        rm -f "$pidfile"
    done
    # Job steps that outlived their slurmd: only those in the hosts' namespaces are this cluster's.
    for n in $(node_names); do
        pids=$(ip netns pids "mpirt-$n" 2>/dev/null || true)
        for pid in $pids; do
            [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmstepd ] && kill -9 "$pid" 2>/dev/null || true
        done
    done
    # munged, if this mode started it and the single-node cluster does not use it.
    if pid=$(alive "$dir/munged.pid" munged) && ! alive "${MPIRT_SLURM_DIR:-/tmp/mpirt-slurm}/slurmctld.pid" slurmctld >/dev/null; then
        kill "$pid" 2>/dev/null || true
        rm -f "$dir/munged.pid"
    fi
}

if [ "$hosts_mode" != 0 ]; then
    case "$action" in
        start)
            t0=$SECONDS
            hosts_up
            mkdir -p "$dir/log"
            install_packages
            start_hosts_cluster
            say "--hosts: nodes $(node_names | paste -sd, -) idle with $host_cpus CPUs each; up in $((SECONDS - t0)) s; SLURM_CONF=$conf; logs in $dir/log"
            ;;
        stop)
            stop_hosts_cluster
            say "--hosts: stopped"
            ;;
        status)
            if ! hosts_running; then
                say "--hosts: not running (no live slurmctld under $dir)"
                exit 3
            fi
            on_head sinfo -N
            on_head squeue
            ;;
        *)
            echo "usage: $0 {start|stop|status} [--hosts]" >&2
            exit 2
            ;;
    esac
    exit 0
fi

case "$action" in
    start)
        t0=$SECONDS
        $sudo mkdir -p "$dir/log"
        # Without root, the log folder is the user's (this script writes there); the daemons run as root.
        [ -z "$sudo" ] || $sudo chown "$(id -u):$(id -g)" "$dir" "$dir/log"
        install_packages
        if running && [ "$(render_conf)" = "$($sudo cat "$conf" 2>/dev/null)" ] &&
            { [ "$write_etc" = 0 ] || cmp -s "$conf" "$etc_conf"; }; then
            say "already running ($conf)"
        else
            running && { say "configuration changed: restarting"; stop_cluster; }
            # Daemons of an earlier start that lost their pid files would hold the ports.
            alive "$dir/slurmctld.pid" slurmctld >/dev/null || alive "$dir/slurmd.pid" slurmd >/dev/null && stop_cluster
            configure
            start_munge
            start_daemons
        fi
        wait_idle
        say "node $host is $(sinfo -h -n "$host" -o %t) with $cpus CPUs; up in $((SECONDS - t0)) s; logs in $dir/log"
        ;;
    stop)
        stop_cluster
        say "stopped"
        ;;
    status)
        if ! running; then
            say "not running (no live slurmctld and slurmd under $dir)"
            exit 3
        fi
        sinfo
        squeue
        ;;
    *)
        echo "usage: $0 {start|stop|status} [--hosts]" >&2
        exit 2
        ;;
esac
