#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for mpirt's slurm tests and for trying the
# batch scripts on a laptop. Debian/Ubuntu; needs root (or sudo) to install packages and start
# the daemons.
#   scripts/slurm/local-cluster.sh start    # install slurm-wlm, munge, libpmix-dev if missing; start; wait until idle
#   scripts/slurm/local-cluster.sh status   # sinfo
#   scripts/slurm/local-cluster.sh stop     # stop the daemons
# The configuration goes to /etc/slurm/slurm.conf (where sinfo, sbatch, srun look by default); state,
# spool and logs to $MPIRT_SLURM_DIR (default /tmp/mpirt-slurm). The node declares
# $MPIRT_SLURM_CPUS CPUs (default 8) so that jobs of up to 8 tasks fit on a small machine;
# mpirt's jobs oversubscribe the real cores.
set -euo pipefail
dir=${MPIRT_SLURM_DIR:-/tmp/mpirt-slurm}
cpus=${MPIRT_SLURM_CPUS:-8}
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo

die() { echo "local-cluster: error: $*" >&2; exit 1; }
trap 'echo "local-cluster: error: line $LINENO failed; daemon logs in $dir/log" >&2; tail -n 5 "$dir"/log/*.log >&2 2>/dev/null' ERR

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null && [ -e /usr/include/pmix.h ]; then
        return
    fi
    command -v apt-get >/dev/null || die "apt-get not found: install slurm-wlm, munge and libpmix-dev yourself"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >/dev/null
    $sudo apt-get install -y -qq slurm-wlm munge libpmix-dev >/dev/null
}

configure() {
    local host mem
    host=$(hostname -s)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    # A fresh controller state each start: a node remembered as drained or down would not come back.
    $sudo rm -rf "$dir/state"
    $sudo mkdir -p "$dir"/{state,spool,log} /etc/slurm
    $sudo tee /etc/slurm/slurm.conf >/dev/null <<CONF
# Written by mpirt's scripts/slurm/local-cluster.sh
ClusterName=mpirt-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# Declared CPUs may exceed the real cores (jobs of 8 tasks on a 2-core machine oversubscribe).
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=5
MinJobAge=600
MaxJobCount=10000
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
    # No cgroup.conf: with proctrack/linuxproc and task/none slurmd needs none (and Debian 12's
    # Slurm 22.05 rejects CgroupPlugin=disabled).
}

start_daemons() {
    if [ ! -s /etc/munge/munge.key ]; then
        $sudo mungekey -c -f -k /etc/munge/munge.key 2>/dev/null || \
            $sudo dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        $sudo chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        $sudo chmod 400 /etc/munge/munge.key
    fi
    $sudo mkdir -p /run/munge && $sudo chown munge:munge /run/munge 2>/dev/null || true
    pgrep -x munged >/dev/null || $sudo runuser -u munge -- munged 2>/dev/null || $sudo munged --force
    pgrep -x slurmctld >/dev/null || $sudo slurmctld
    pgrep -x slurmd >/dev/null || $sudo slurmd
}

wait_idle() {
    local deadline=$((SECONDS + 60)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state=$(sinfo -h -o %t 2>/dev/null | head -n1 || true)
        case "$state" in
            idle|mix|alloc) echo "local-cluster: node $(hostname -s) is $state"; return 0 ;;
            down*|drain*) $sudo scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        # Polling a condition under a deadline; the daemons need a moment to register.
        sleep 0.5
    done
    echo "local-cluster: error: node not idle after 60 s (state: ${state:-none})" >&2
    tail -n 20 "$dir"/log/*.log >&2 2>/dev/null || true
    return 1
}

stop() {
    $sudo scontrol shutdown >/dev/null 2>&1 || true
    for d in slurmctld slurmd slurmstepd; do $sudo pkill -x "$d" 2>/dev/null || true; done
    local deadline=$((SECONDS + 15))
    while pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; do
        [ $SECONDS -lt $deadline ] || { $sudo pkill -9 -x slurmctld slurmd 2>/dev/null || true; break; }
        sleep 0.2
    done
    $sudo pkill -x munged 2>/dev/null || true
}

case "${1:-}" in
    start)
        if pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && [ -f /etc/slurm/slurm.conf ]; then
            wait_idle; exit  # already up: leave its state alone
        fi
        install; configure; start_daemons; wait_idle ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 {start|stop|status}" >&2; exit 2 ;;
esac
