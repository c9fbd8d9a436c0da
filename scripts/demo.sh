#!/usr/bin/env bash
# The appliance's demo (make demo): a lab, xdpguard between its two halves,
# real traffic through it, then a clean stop. Uses lab names of its own so
# it never touches a lab you built by hand; everything is torn down on exit,
# failure included.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
PY=${PY:-$root/.venv/bin/python}
XG=$(dirname "$PY")/xdpguard
TRAFFIC=("$PY" "$here/labtraffic.py")

export QUEUES=${QUEUES:-2}
export OUTER=xgdemo-out INNER=xgdemo-in
export INNER_NS=xgdemo-inner CLIENT_NS=xgdemo-client ORIGIN_NS=xgdemo-origin
CONTROL=/run/xdpguard/demo.sock
METRICS=127.0.0.1:${METRICS_PORT:-9437}
LOG=$(mktemp /tmp/xdpguard-demo.XXXXXX)
STATE=$(mktemp -d /tmp/xdpguard-demo-state.XXXXXX)

xg_pid= srv_pid= trace_pid=
cleanup() {
	set +e
	if [ -n "$trace_pid" ]; then kill -INT "$trace_pid" 2>/dev/null; wait "$trace_pid" 2>/dev/null; fi
	if [ -n "$srv_pid" ]; then kill "$srv_pid" 2>/dev/null; wait "$srv_pid" 2>/dev/null; fi
	if [ -n "$xg_pid" ]; then
		# SIGTERM, and SIGKILL if it has not gone within 10 s: the demo
		# always returns, and leaves nothing running.
		kill -TERM "$xg_pid" 2>/dev/null
		for _ in $(seq 100); do kill -0 "$xg_pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$xg_pid" 2>/dev/null
		wait "$xg_pid" 2>/dev/null
	fi
	"$here/netns-teardown.sh"
	"$XG" flows forget --state-dir "$STATE" >/dev/null 2>&1
	rm -rf "$LOG" "$LOG.trace" "$STATE" "$CONTROL"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
client() { ip netns exec "$CLIENT_NS" "$@"; }

step "lab: $CLIENT_NS <-> $OUTER | xdpguard | $INNER ($INNER_NS) <-> $ORIGIN_NS, $QUEUES queues"
"$here/netns-setup.sh"

step "without xdpguard the client cannot reach the origin"
if client ping -c 2 -i 0.2 -W 1 169.254.0.2 >/dev/null; then
	echo "unexpected: the lab has a path around the appliance" >&2
	exit 1
fi
echo "ping 169.254.0.2: no answer (as it should be)"
# That ping left a failed neighbour resolution behind; a ping queued on it
# would fail with it, however well the appliance forwards.
client ip neigh flush dev eth0

step "xdpguard run --outer $OUTER --inner $INNER --inner-netns $INNER_NS"
# --learn 0: a fresh lab has no open connections to adopt, so TCP is fast at once.
"$XG" run --outer "$OUTER" --inner "$INNER" --inner-netns "$INNER_NS" --learn 0 \
	--control "$CONTROL" --state-dir "$STATE" --summary-interval 2 --metrics "$METRICS" 2>"$LOG" &
xg_pid=$!
# Ready means forwarding: no sleep, no polling loop.
"$XG" status --wait 30 --control "$CONTROL" || { cat "$LOG"; exit 1; }

step "ping through the appliance, IPv4 and IPv6"
client ping -c 3 -i 0.2 169.254.0.2 | tail -2
client ping -c 3 -i 0.2 2001:db8::2 | tail -2

step "TCP and UDP through the appliance (real Linux stacks on both ends)"
ip netns exec "$ORIGIN_NS" "${TRAFFIC[@]}" serve --port 5201 >/dev/null &
srv_pid=$!
for _ in $(seq 100); do  # until it listens (bounded)
	ip netns exec "$ORIGIN_NS" ss -Hltn 'sport = :5201' | grep -q . && break
	sleep 0.05
done
client "${TRAFFIC[@]}" send --text --to 169.254.0.2 --bytes 64M
client "${TRAFFIC[@]}" recv --text --to 2001:db8::2 --bytes 64M
client "${TRAFFIC[@]}" many --text --to 169.254.0.2 --conns 200
client "${TRAFFIC[@]}" udp --text --to 169.254.0.2 --count 200
client "${TRAFFIC[@]}" udp --text --to 2001:db8::2 --count 200

step "policy at runtime: block the client, then let it back in"
"$XG" block add 169.254.0.1 --comment "demo" --control "$CONTROL"
client ping -c 2 -i 0.2 -W 1 169.254.0.2 >/dev/null && { echo "block did not bite" >&2; exit 1; }
echo "ping 169.254.0.2: no answer while blocked"
"$XG" block del 169.254.0.1 --control "$CONTROL"
client ping -c 2 -i 0.2 -W 1 169.254.0.2 | tail -1

step "TCP protection: tcp mode on, a new client answers one SYN challenge"
"$XG" tcp mode on --control "$CONTROL"
client "${TRAFFIC[@]}" many --text --to 169.254.0.2 --conns 20
"$XG" tcp flows --top 3 --control "$CONTROL"
"$XG" tcp verified list --control "$CONTROL"

step "n-tuple rules (FlowSpec's components): drop ICMP echo requests to the origin, TCP untouched"
"$XG" rule add dst 169.254.0.2/32 proto icmp icmp-type 8 drop --comment "demo" --control "$CONTROL"
client ping -c 3 -i 0.2 -W 1 169.254.0.2 >/dev/null && { echo "the rule did not bite" >&2; exit 1; }
echo "ping 169.254.0.2: no answer while the rule holds"
client "${TRAFFIC[@]}" many --text --to 169.254.0.2 --conns 20
"$XG" rule list --control "$CONTROL"
"$XG" rule del dst 169.254.0.2/32 proto icmp icmp-type 8 --control "$CONTROL"
client ping -c 2 -i 0.2 -W 1 169.254.0.2 | tail -1

step "the fast path: verified flows and non-TCP traffic never leave XDP"
"$XG" fast-path status --control "$CONTROL"

step "Prometheus metrics at http://$METRICS/metrics (its non-zero packet, flow and challenge lines)"
"$PY" -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
	"http://$METRICS/metrics" | grep -E '^xdpguard_(packets_total|flows|verified_sources|challenges_total)' | grep -v ' 0.0$' | head -12

step "xdpguard trace: the origin's end loses its NAPI (gro off); the kernel's failed redirects show"
TRACE_ERR=$LOG.trace
"$XG" trace --count 2 --seconds 20 --control "$CONTROL" 2>"$TRACE_ERR" &
trace_pid=$!
for _ in $(seq 200); do  # until its programs are attached (bounded)
	grep -q attached "$TRACE_ERR" && break
	sleep 0.05
done
ip netns exec "$ORIGIN_NS" ethtool -K eth0 gro off
client ping -c 3 -i 0.2 -W 1 169.254.0.2 >/dev/null || true
wait "$trace_pid" || true
trace_pid=
rm -f "$TRACE_ERR"
ip netns exec "$ORIGIN_NS" ethtool -K eth0 gro on
"$XG" fast-path on --control "$CONTROL" >/dev/null
echo "gro back on; 'xdpguard fast-path on' brings the fast path back"
client ping -c 2 -i 0.2 -W 1 169.254.0.2 | tail -1

step "xdpguard stats"
"$XG" stats --control "$CONTROL"

step "what the daemon printed"
cat "$LOG"

step "SIGTERM: xdpguard detaches and exits"
kill -TERM "$xg_pid"
wait "$xg_pid" && echo "exit status 0"
xg_pid=
ip -d link show "$OUTER" | grep -q prog/xdp && { echo "XDP still on $OUTER" >&2; exit 1; }
echo "no XDP program left on $OUTER or $INNER; control socket gone: $([ -e "$CONTROL" ] && echo no || echo yes)"
