#!/usr/bin/env bash
# Build the lab of docs/ARCHITECTURE.md section 1:
#
#   CLIENT_NS:eth0 <-veth-> OUTER (OUTER_NS)   INNER (INNER_NS) <-veth-> ORIGIN_NS:eth0
#
# OUTER and INNER carry no address and have no path between them: only a
# running xdpguard connects client and origin.
#
# Knobs (environment): QUEUES (default: number of CPUs), ANYPORT=1 (a service
# prefix for scripts/anyport-origin.py: 169.254.100.0/24 and 2001:db8:100::/64
# local at the origin, routed there by the client, and client addresses
# 169.254.0.11-14 and 2001:db8::11-14), INDEX (if set, OUTER
# and INNER are both created with this ifindex, the same-ifindex regression
# case), OUTER_NS (if set, OUTER lives in this extra "edge" namespace instead
# of the current one), OUTER, INNER, INNER_NS, CLIENT_NS, ORIGIN_NS (names,
# so that two labs can coexist). On any failure the partial lab is removed.
set -euo pipefail

QUEUES=${QUEUES:-$(nproc)}
INDEX=${INDEX:-}
OUTER=${OUTER:-outer}
INNER=${INNER:-inner}
INNER_NS=${INNER_NS:-inner-ns}
OUTER_NS=${OUTER_NS:-}
CLIENT_NS=${CLIENT_NS:-client-ns}
ORIGIN_NS=${ORIGIN_NS:-origin-ns}

here=$(cd "$(dirname "$0")" && pwd)

die() { echo "netns-setup: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
[[ "$QUEUES" =~ ^[1-9][0-9]*$ ]] || die "QUEUES must be a positive integer, got '$QUEUES'"
[ -z "$INDEX" ] || [[ "$INDEX" =~ ^[1-9][0-9]*$ ]] || die "INDEX must be a positive integer, got '$INDEX'"
for ns in $OUTER_NS "$INNER_NS" "$CLIENT_NS" "$ORIGIN_NS"; do
	[ ! -e "/run/netns/$ns" ] || die "namespace $ns already exists (run netns-teardown.sh first)"
done
if [ -z "$OUTER_NS" ] && ip link show "$OUTER" >/dev/null 2>&1; then
	die "device $OUTER already exists (run netns-teardown.sh first)"
fi

# Tear down whatever was built if a later step fails.
trap 'rc=$?; if [ $rc -ne 0 ]; then "$here/netns-teardown.sh" >/dev/null 2>&1 || true; fi' EXIT

idx() { [ -n "$INDEX" ] && echo "index $INDEX"; true; }

for ns in $OUTER_NS "$INNER_NS" "$CLIENT_NS" "$ORIGIN_NS"; do
	ip netns add "$ns"
	ip -n "$ns" link set lo up
done

# Run a command in OUTER's namespace (the current one unless OUTER_NS is set).
on_outer() { if [ -n "$OUTER_NS" ]; then ip netns exec "$OUTER_NS" "$@"; else "$@"; fi; }

# Client side: eth0 in CLIENT_NS, OUTER here (or in OUTER_NS).
on_outer ip link add "$OUTER" $(idx) numtxqueues "$QUEUES" numrxqueues "$QUEUES" type veth \
	peer name eth0 netns "$CLIENT_NS" numtxqueues "$QUEUES" numrxqueues "$QUEUES"

# Origin side: INNER in INNER_NS, eth0 in ORIGIN_NS. The veth is created
# directly inside INNER_NS so that INDEX can repeat the ifindex of OUTER.
ip -n "$INNER_NS" link add "$INNER" $(idx) numtxqueues "$QUEUES" numrxqueues "$QUEUES" type veth \
	peer name eth0 netns "$ORIGIN_NS" numtxqueues "$QUEUES" numrxqueues "$QUEUES"

# Frames must cross AF_XDP with finished checksums: no TX checksum offload
# (and so no TSO) on any end that sends into the appliance.
ip netns exec "$CLIENT_NS" ethtool -K eth0 tx off >/dev/null
ip netns exec "$ORIGIN_NS" ethtool -K eth0 tx off >/dev/null
on_outer ethtool -K "$OUTER" tx off >/dev/null
ip netns exec "$INNER_NS" ethtool -K "$INNER" tx off >/dev/null

# xdpguard's fast path redirects frames in XDP straight into OUTER and INNER;
# a veth takes redirected frames only if its peer runs NAPI, which GRO (or
# an XDP program) turns on. The hosts' ends get GRO.
ip netns exec "$CLIENT_NS" ethtool -K eth0 gro on >/dev/null
ip netns exec "$ORIGIN_NS" ethtool -K eth0 gro on >/dev/null

# A host's NIC queues what its link cannot take yet; a veth with its default
# noqueue drops it instead. When the peer's receive ring (256 frames) is
# full, a veth stops its queue only if a qdisc sits on it (Linux 6.16 and
# later); without one, a bulk TCP sender with a few streams loses
# hundreds of thousands of segments a second at its own eth0, before the
# appliance sees them. The hosts' ends get the plain FIFO a NIC would.
ip netns exec "$CLIENT_NS" tc qdisc replace dev eth0 root pfifo_fast
ip netns exec "$ORIGIN_NS" tc qdisc replace dev eth0 root pfifo_fast

# The bump in the wire must stay invisible to IPv6 on its own ports.
ip netns exec "$INNER_NS" sysctl -qw "net.ipv6.conf.$INNER.disable_ipv6=1"
on_outer sysctl -qw "net.ipv6.conf.$OUTER.disable_ipv6=1"

# The hosts' link is private to the lab: no duplicate address detection,
# and no random start-up delay. Linux joins an address's solicited-node
# group in its DAD work, which after link-up waits up to router_solicitation_delay
# (1 s) even for nodad addresses; until then the host ignores neighbour
# solicitations for it. Links go up before addresses are added for the
# same reason.
for ns in "$CLIENT_NS" "$ORIGIN_NS"; do
	ip netns exec "$ns" sysctl -qw net.ipv6.conf.eth0.accept_dad=0
	ip netns exec "$ns" sysctl -qw net.ipv6.conf.eth0.router_solicitation_delay=0
done

on_outer ip link set "$OUTER" up
ip -n "$INNER_NS" link set "$INNER" up
ip -n "$CLIENT_NS" link set eth0 up
ip -n "$ORIGIN_NS" link set eth0 up

ip -n "$CLIENT_NS" addr add 169.254.0.1/24 dev eth0
ip -n "$CLIENT_NS" addr add 2001:db8::1/64 dev eth0 nodad
ip -n "$ORIGIN_NS" addr add 169.254.0.2/24 dev eth0
ip -n "$ORIGIN_NS" addr add 2001:db8::2/64 dev eth0 nodad

if [ "${ANYPORT:-}" = 1 ]; then
	ip -n "$ORIGIN_NS" route add local 169.254.100.0/24 dev lo
	ip -n "$ORIGIN_NS" -6 route add local 2001:db8:100::/64 dev lo
	ip -n "$CLIENT_NS" route add 169.254.100.0/24 via 169.254.0.2
	ip -n "$CLIENT_NS" -6 route add 2001:db8:100::/64 via 2001:db8::2
	for i in 11 12 13 14; do
		ip -n "$CLIENT_NS" addr add "169.254.0.$i/24" dev eth0
		ip -n "$CLIENT_NS" addr add "2001:db8::$i/64" dev eth0 nodad
	done
fi

# Ready means ready: wait (bounded) until no IPv6 address of the hosts is
# still tentative (link-local DAD), so the first packets do not wait on it.
for ns in "$CLIENT_NS" "$ORIGIN_NS"; do
	for _ in $(seq 50); do
		[ -z "$(ip -n "$ns" -6 addr show tentative)" ] && break
		sleep 0.1
	done
done

echo "lab up: $CLIENT_NS:eth0 <-> ${OUTER_NS:+$OUTER_NS:}$OUTER | $INNER_NS:$INNER <-> $ORIGIN_NS:eth0 (queues=$QUEUES${INDEX:+, ifindex=$INDEX})"
