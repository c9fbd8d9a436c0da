"""Turning the engine's cumulative counters into rates and text for people."""

from __future__ import annotations

from typing import Any

from xdpguard import defs

# XDP's verdicts on every frame (from the header's stage masks); the AF_XDP
# loop judges some of the "redirected" ones again, counted apart.
XDP_REASONS = frozenset(r.name for r in defs.XDP_REASONS)
XDP_PASS_REASONS = frozenset(
    {defs.Reason.redirected.name, defs.Reason.allowlist.name, defs.Reason.fast_path.name}
)


def si(value: float, unit: str) -> str:
    """1234567 -> '1.23 M' + unit."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def direction_totals(d: dict[str, Any]) -> dict[str, int]:
    """Frames seen, forwarded and dropped in one direction, from XDP and loop counters."""
    xdp = {name: p["packets"] for name, p in d["xdp"].items()}
    xdp_dropped = sum(n for name, n in xdp.items() if name not in XDP_PASS_REASONS)
    fast = d["xdp"].get("fast_path", {"packets": 0, "bytes": 0})
    return {
        "seen": sum(xdp.values()),
        "forwarded": d["tx_packets"] + fast["packets"],
        "forwarded_bytes": d["tx_bytes"] + fast["bytes"],
        "fast_path": fast["packets"],
        "dropped": xdp_dropped + d["tx_ring_full"] + d["dropped"],
    }


def rates(prev: dict[str, Any], cur: dict[str, Any]) -> dict[str, Any]:
    """Per-second rates between two stats snapshots."""
    dt = max(cur["time"] - prev["time"], 1e-9)
    out: dict[str, Any] = {"interval": dt, "directions": {}, "reasons": {}}
    for label, d in cur["directions"].items():
        a, b = direction_totals(prev["directions"][label]), direction_totals(d)
        out["directions"][label] = {
            "seen_pps": (b["seen"] - a["seen"]) / dt,
            "forwarded_pps": (b["forwarded"] - a["forwarded"]) / dt,
            "forwarded_bps": 8 * (b["forwarded_bytes"] - a["forwarded_bytes"]) / dt,
            "dropped_pps": (b["dropped"] - a["dropped"]) / dt,
        }
    for name, c in cur["reasons"].items():
        p = prev["reasons"].get(name, {"packets": 0, "bytes": 0})
        out["reasons"][name] = {
            "pps": (c["packets"] - p["packets"]) / dt,
            "bps": 8 * (c["bytes"] - p["bytes"]) / dt,
        }
    return out


def summary_line(prev: dict[str, Any], cur: dict[str, Any]) -> str:
    """One line per interval for the daemon's stderr."""
    parts = []
    for label, r in rates(prev, cur)["directions"].items():
        parts.append(
            f"{label}: {si(r['forwarded_pps'], 'pps')} {si(r['forwarded_bps'], 'bit/s')} "
            f"forwarded, {si(r['dropped_pps'], 'pps')} dropped"
        )
    return " | ".join(parts)


def format_stats(cur: dict[str, Any], prev: dict[str, Any] | None = None) -> str:
    lines = [f"uptime {cur['uptime']:.0f}s"]
    r = rates(prev, cur) if prev else None
    header = f"{'reason':<24}{'packets':>14}{'bytes':>16}"
    if r:
        header += f"{'pps':>14}{'bit/s':>14}"
    lines += ["", header]
    for name, c in cur["reasons"].items():
        row = f"{name:<24}{c['packets']:>14}{c['bytes']:>16}"
        if r:
            rr = r["reasons"][name]
            row += f"{si(rr['pps'], ''):>14}{si(rr['bps'], ''):>14}"
        lines.append(row)
    lines += [
        "",
        f"{'direction':<10}{'seen':>14}{'forwarded':>14}{'in XDP':>12}{'by loop':>12}"
        f"{'dropped':>12}{'ring full':>12}",
    ]
    for label, d in cur["directions"].items():
        t = direction_totals(d)
        lines.append(
            f"{label:<10}{t['seen']:>14}{t['forwarded']:>14}{t['fast_path']:>12}"
            f"{d['tx_packets']:>12}{t['dropped']:>12}{d['tx_ring_full']:>12}"
        )
        if r:
            rd = r["directions"][label]
            lines.append(
                f"{'':<10}{si(rd['seen_pps'], 'pps'):>14}{si(rd['forwarded_pps'], 'pps'):>14}"
                f"{si(rd['dropped_pps'], 'pps'):>12}"
            )
    lines += ["", f"{'queue':<7}{'in rx':>12}{'in tx':>12}{'out rx':>12}{'out tx':>12}"]
    for q in cur["queues"]:
        lines.append(
            f"{q['queue']:<7}{q['in']['rx_packets']:>12}{q['in']['tx_packets']:>12}"
            f"{q['out']['rx_packets']:>12}{q['out']['tx_packets']:>12}"
        )
    if cur.get("monitor"):
        would = ", ".join(f"{n} {v['packets']}" for n, v in cur["monitor"].items())
        lines += ["", f"monitor (passed, would have been dropped or challenged): {would}"]
    if cur.get("challenges"):
        c = cur["challenges"]
        lines.append(f"SYN challenges sent: {c['sent']} (answered in XDP)")
    f = cur.get("frames")
    if f:
        lines += [
            "",
            f"frames: {f['total']} total = {f['free']} free + {f['fill']} fill + {f['rx']} rx "
            f"+ {f['tx']} tx + {f['completion']} completion + {f['in_flight']} in flight "
            f"({f['in_flight_rx']} rx side, {f['in_flight_tx']} tx side; "
            f"{'consistent' if f['consistent'] else 'INCONSISTENT'})",
        ]
    return "\n".join(lines)


def format_status(st: dict[str, Any]) -> str:
    if st["state"] != "ready":
        return f"xdpguard pid {st['pid']}: {st['state']}"
    lines = [f"xdpguard {st['version']}, pid {st['pid']}, {st['state']}, up {st['uptime']:.0f}s"]
    for role, d in st["devices"].items():
        lines.append(
            f"{role:<6} {d['name']:<12} netns {d['netns']:<14} cookie {d['netns_cookie']:<6} "
            f"ifindex {d['ifindex']:<6} queues {d['queues']:<3} "
            f"xdp {d['xdp']['mode']} (prog {d['xdp']['prog_id']})"
        )
    fp = st.get("fast_path")
    if fp:
        for d, p in fp["directions"].items():
            lines.append(
                f"fast   {d:<4} {p['from']} -> {p['to']}: "
                f"{'active' if p['active'] else 'not active'} ({p['why']})"
            )
    ft = st.get("flow_table")
    if ft:
        lines.append(
            f"flows  {ft['buckets'] * 8} slots, "
            f"{'pinned in ' + ft['pinned'] if ft['pinned'] else 'not pinned'}"
            f"{', restored' if ft['restored'] else ''}"
        )
    rules = st.get("rules")
    if rules:
        by = ", ".join(f"{n} {src}" for src, n in sorted(rules["by_source"].items()))
        lines.append(
            f"rules  {rules['rules']}{' (' + by + ')' if by else ''}, "
            f"{rules['ratelimits']} rate limits"
        )
    u = st["umem"]
    lines.append(
        f"umem   {u['frames']} frames x {u['frame_size']} B ({u['bytes'] >> 20} MiB), "
        f"shared by {u['sockets']} sockets"
    )
    for s in st["sockets"]:
        lines.append(
            f"socket {s['device']:<6} {s['ifname']:<12} queue {s['queue']:<3} fd {s['fd']:<4} "
            f"netns cookie {s['netns_cookie']:<6} ifindex {s['ifindex']:<6} {s['mode']}"
            f"{', need_wakeup' if s['need_wakeup'] else ''}"
        )
    for w in st["workers"]:
        lines.append(
            f"worker queue {w['queue']:<3} {'running' if w['running'] else 'STOPPED'}, "
            f"frames {w['frames'][0]}..{w['frames'][1] - 1}"
        )
    return "\n".join(lines)
