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
set -eEuo pipefail

dir=${MPIRT_SLURM_DIR:-/tmp/mpirt-slurm}
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

# The configuration, on stdout (deterministic: a running cluster with the same one is left alone).
render_conf() {
    local mem
    # RealMemory a bit below the total, so that slurmd never finds less than declared.
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat <<CONF
$marker (do not edit: it is rewritten by 'start')
ClusterName=mpirt-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again cred_expire+1 s after the requeue (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
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
# Preemption and requeue: jobs of partition debug are requeued when an urgent job needs their CPUs.
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# Seconds between SIGTERM and SIGKILL (time limit, scancel, end of a preemption's grace time).
KillWait=5
# No accounting database: finished jobs stay visible to scontrol show job for 10 minutes.
MinJobAge=600
MaxJobCount=20000
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
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

case "${1:-}" in
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
        echo "usage: $0 {start|stop|status}" >&2
        exit 2
        ;;
esac
