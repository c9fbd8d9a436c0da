#!/usr/bin/env bash
# Remove the lab built by netns-setup.sh (same environment knobs). Safe to run
# twice and on a half-built lab: every step tolerates a missing object.
set -uo pipefail

OUTER=${OUTER:-outer}
INNER_NS=${INNER_NS:-inner-ns}
OUTER_NS=${OUTER_NS:-}
CLIENT_NS=${CLIENT_NS:-client-ns}
ORIGIN_NS=${ORIGIN_NS:-origin-ns}

# Deleting a namespace deletes the veths inside it, and with them their peers.
for ns in "$CLIENT_NS" $OUTER_NS "$INNER_NS" "$ORIGIN_NS"; do
	[ -e "/run/netns/$ns" ] && ip netns del "$ns" 2>/dev/null
done
[ -n "$OUTER_NS" ] || ip link del "$OUTER" 2>/dev/null
true
