#!/usr/bin/env bash
# A multi-host test cluster on this machine: N simulated hosts, each with its own hostname (a UTS
# namespace), its own network namespace and address on a private bridge, reached with `ssh HOST CMD`
# through the launch agent next to this script. What mpirt's host-failure tests and CI use, and a
# way to try `mpirt launch --hostfile` on a laptop.
#
#   scripts/hosts/local-hosts.sh start [N]        # N hosts (default $MPIRT_HOSTS or 3) plus the head
#   scripts/hosts/local-hosts.sh status           # hosts, addresses, links (exit 3 if not running)
#   scripts/hosts/local-hosts.sh run HOST -- CMD  # run CMD on HOST (head: the launch host)
#   scripts/hosts/local-hosts.sh crash HOST       # SIGKILL every process on HOST at once
#   scripts/hosts/local-hosts.sh freeze HOST      # SIGSTOP every process on HOST  (thaw: SIGCONT)
#   scripts/hosts/local-hosts.sh cut HOST         # take HOST's link down (a partition; heal: link up)
#   scripts/hosts/local-hosts.sh stop             # kill what runs on the hosts, remove the namespaces
#
# The network: namespace mpirt-head holds the bridge mpirtbr0 (10.77.0.254/24); host i (node1,
# node2, ...) is namespace mpirt-nodeI with eth0 = 10.77.0.I/24, joined to the bridge by a veth pair.
# There is no default route anywhere and no link to the machine's own network: nothing routes out,
# and the addresses are used only inside these namespaces. Run launchers on the head
# (`run head -- mpirt launch --hostfile ...`): it reaches every host, as a login node would.
# Host names resolve through $MPIRT_HOSTS_DIR/hosts, which the agent binds over /etc/hosts inside
# each host (ip netns exec does that for /etc/netns/NS/hosts).
#
# Files ($MPIRT_HOSTS_DIR, default /tmp/mpirt-hosts): hostfile (node1 slots=S ... for every host;
# S = $MPIRT_HOST_SLOTS, default 4), hosts (name -> address), count.
# Needs root (ip netns, unshare) and iproute2, util-linux.
set -euo pipefail

dir=${MPIRT_HOSTS_DIR:-/tmp/mpirt-hosts}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
slots=${MPIRT_HOST_SLOTS:-4}
head=mpirt-head
bridge=mpirtbr0
net=10.77.0

say() { echo "local-hosts: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (network and UTS namespaces)"
command -v ip >/dev/null || die "ip (iproute2) not found"

count() { cat "$dir/count" 2>/dev/null || echo 0; }
ns_of() {
    case "$1" in
        head) echo "$head" ;;
        node[0-9]*) echo "mpirt-$1" ;;
        *) die "unknown host '$1' (head, node1..node$(count))" ;;
    esac
}
exists() { ip netns list | awk '{print $1}' | grep -qx "$1"; }

start() {
    local n=${1:-${MPIRT_HOSTS:-3}} i ns
    [[ "$n" =~ ^[1-9][0-9]?$ ]] && [ "$n" -le 32 ] || die "host count must be 1..32 (got '$n')"
    if exists "$head" && [ "$(count)" = "$n" ]; then
        say "already running with $n hosts"
        return
    fi
    stop_all quiet
    mkdir -p "$dir"
    exists "$head" || ip netns add "$head"
    ip -n "$head" link set lo up
    ip -n "$head" link add "$bridge" type bridge
    ip -n "$head" addr add "$net.254/24" dev "$bridge"
    ip -n "$head" link set "$bridge" up
    : >"$dir/hostfile.tmp"
    printf '127.0.0.1 localhost\n%s.254 head\n' "$net" >"$dir/hosts.tmp"
    for i in $(seq 1 "$n"); do
        ns=mpirt-node$i
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # Both ends are made in the head namespace, then one moves into the host.
        ip -n "$head" link add "veth$i" type veth peer name "eth$i"
        ip -n "$head" link set "eth$i" netns "$ns"
        ip -n "$ns" link set "eth$i" name eth0
        ip -n "$ns" addr add "$net.$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$head" link set "veth$i" master "$bridge" up
        echo "node$i slots=$slots" >>"$dir/hostfile.tmp"
        echo "$net.$i node$i" >>"$dir/hosts.tmp"
    done
    mv "$dir/hosts.tmp" "$dir/hosts"
    mv "$dir/hostfile.tmp" "$dir/hostfile"
    for ns in "$head" $(seq -f "mpirt-node%g" 1 "$n"); do
        mkdir -p "/etc/netns/$ns"
        cp "$dir/hosts" "/etc/netns/$ns/hosts"
    done
    echo "$n" >"$dir/count"
    # Every host must reach every other before a job may count on it.
    for i in $(seq 1 "$n"); do
        # (bash's /dev/tcp: ping is not always installed) a refused connection is an answer.
        ip netns exec "$head" timeout 3 bash -c "exec 3<>/dev/tcp/$net.$i/9 || true" 2>/dev/null
        ip netns exec "$head" ip neigh show "$net.$i" | grep -qvE 'FAILED|INCOMPLETE' ||
            die "node$i does not answer on $net.$i"
    done
    say "$n hosts up: node1..node$n on $net.0/24; hostfile $dir/hostfile; agent $here/ssh"
}

# Every process whose network namespace is HOST's (the agent enters it before anything runs).
pids_of() { ip netns pids "$(ns_of "$1")" 2>/dev/null || true; }

signal_host() {
    local sig=$1 host=$2 pids
    pids=$(pids_of "$host")
    [ -n "$pids" ] || { say "nothing runs on $host"; return 0; }
    # One kill call for all of them: a host fails as a unit.
    kill -"$sig" $pids 2>/dev/null || true
    say "$host: SIG$sig to $(echo $pids | wc -w) processes"
}

link() {
    local host=$1 state=$2
    ip -n "$(ns_of "$host")" link set eth0 "$state"
    say "$host: link $state"
}

stop_all() {
    local ns
    for ns in $(ip netns list | awk '{print $1}' | grep -E '^mpirt-(head|node[0-9]+)$' || true); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    rm -f "$dir/count"
    [ "${1:-}" = quiet ] || say "stopped"
}

status() {
    exists "$head" || { say "not running"; exit 3; }
    local i
    echo "hosts: $(count) (hostfile $dir/hostfile)"
    for i in $(seq 1 "$(count)"); do
        printf 'node%s %s.%s link %s processes %s\n' "$i" "$net" "$i" \
            "$(ip -n "mpirt-node$i" -br link show eth0 | awk '{print $2}')" "$(pids_of "node$i" | wc -l)"
    done
}

cmd=${1:-}
shift || true
case "$cmd" in
    start) start "$@" ;;
    stop) stop_all ;;
    status) status ;;
    run)
        host=${1:?run HOST -- CMD}
        shift
        [ "${1:-}" = -- ] && shift
        exec "$here/ssh" "$host" "$@"
        ;;
    crash) signal_host KILL "${1:?crash HOST}" ;;
    freeze) signal_host STOP "${1:?freeze HOST}" ;;
    thaw) signal_host CONT "${1:?thaw HOST}" ;;
    cut) link "${1:?cut HOST}" down ;;
    heal) link "${1:?heal HOST}" up ;;
    *) die "usage: $0 start [N] | status | run HOST -- CMD | crash|freeze|thaw|cut|heal HOST | stop" ;;
esac
