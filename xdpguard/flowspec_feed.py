"""``xdpguard flowspec-feed``: BGP FlowSpec routes from ExaBGP into the rules.

ExaBGP runs the feed as a process of its API (contrib/exabgp/exabgp.conf)
and writes it one JSON object per line: session states ("neighbor-changes")
and the UPDATE messages it receives, raw ("receive { packets; update; }").
The feed reads FlowSpec out of the UPDATEs itself (xdpguard.flowspec
decodes the NLRI; the extended communities give the action): ExaBGP's
parsed form loses what xdpguard must keep exact (a multi-bit TCP flags
value comes out as separate flags; an ICMP type it has no name for, as
prose).

Each peer is one source, ``bgp:ADDRESS``: an UPDATE becomes one atomic
``rule.update`` of that source's rules (its announcements and withdrawals),
so a withdrawal removes exactly the rule its announcement made and local
rules are never touched. Requests are bounded (REQUEST_RULES rules,
REQUEST_BYTES of rule text): a big UPDATE, or a whole RIB replayed, goes in
chunks, never in one line the control socket would refuse. A route whose
action the rule engine cannot carry out (redirect, traffic marking,
sampling, non-terminal) is rejected and logged, and withdrawn if an earlier
announcement of it was in place: never
half-applied. Sessions and the feed's liveness are leases on the daemon
(``rule.session``): up renews, down starts the hold time, and if the feed
or ExaBGP dies the renewals stop, so the rules go after the hold time all
the same. The feed keeps the routes of each peer that is up; when the
daemon restarted (it keeps no BGP rules) or the connection to it failed, it
replays them all, and the daemon drops whatever the replay did not name. A
request the daemon refuses (it answered) is logged and never replayed: a
replay would be refused alike, and would hold every later message back.

Nothing is written to stdout: ExaBGP would read it as commands. The log
goes to stderr, which ExaBGP logs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import struct
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from xdpguard import flowspec as F
from xdpguard.control import ControlClient, ControlError
from xdpguard.errors import XdpguardError

log = logging.getLogger("xdpguard.flowspec-feed")

SAFI_FLOWSPEC = 133
AFI_FAMILY = {1: 4, 2: 6}
ATTR_MP_REACH, ATTR_MP_UNREACH, ATTR_EXT_COMMUNITIES = 14, 15, 16
# Extended communities of FlowSpec actions (RFC 8955 7, and the IANA registry).
TRAFFIC_RATE_BYTES = 0x8006
TRAFFIC_ACTION = 0x8007
TRAFFIC_RATE_PACKETS = 0x800C
_REDIRECTS = {0x8008: "redirect", 0x8108: "redirect", 0x8208: "redirect", 0x0800: "redirect-to-ip"}
TRAFFIC_MARKING = 0x8009

# The most one request carries: well under the control socket's line limit
# (xdpguard.control.MAX_LINE), so that no RIB is ever too big to replay.
REQUEST_RULES = 2000
REQUEST_BYTES = 512 << 10


def chunks(texts: list[str]) -> Iterable[list[str]]:
    """``texts`` in runs of at most REQUEST_RULES and REQUEST_BYTES."""
    run: list[str] = []
    size = 0
    for t in texts:
        if run and (len(run) >= REQUEST_RULES or size + len(t) + 4 > REQUEST_BYTES):
            yield run
            run, size = [], 0
        run.append(t)
        size += len(t) + 4
    if run:
        yield run


class UpdateError(ValueError):
    """An UPDATE the feed cannot read at all."""


@dataclass
class Update:
    """What one UPDATE says about FlowSpec."""

    announce: list[tuple[F.Match, F.Action | None, str | None]] = field(default_factory=list)
    withdraw: list[F.Match] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # one line per route not taken
    eor: bool = False


def action_of(communities: Iterable[int]) -> tuple[F.Action | None, str | None]:
    """The action of a route's extended communities: (action, None), or
    (None, why) when the rule engine cannot carry it out."""
    rates: dict[int, float] = {}
    for c in communities:
        kind = c >> 48
        if kind in (TRAFFIC_RATE_BYTES, TRAFFIC_RATE_PACKETS):
            (rate,) = struct.unpack("!f", (c & 0xFFFFFFFF).to_bytes(4, "big"))
            if rate != rate or rate < 0:  # NaN or negative
                return None, f"traffic-rate {rate}: not a rate"
            rates[kind] = rate
        elif kind == TRAFFIC_ACTION:
            bits = c & 0xFF
            if bits & 0x01:
                return None, "traffic-action terminal=0: rules after this one would apply too"
            if bits & 0x02:
                return None, "traffic-action sample: xdpguard does not sample"
        elif kind in _REDIRECTS:
            return None, f"{_REDIRECTS[kind]}: xdpguard does not redirect"
        elif kind == TRAFFIC_MARKING:
            return None, "traffic-marking: xdpguard does not rewrite DSCP"
    if len(rates) > 1:
        return None, "both a byte and a packet rate"
    if not rates:
        return F.Action("accept"), None
    kind, rate = rates.popitem()
    if rate == 0:
        return F.Action("drop"), None
    name = "rate-limit" if kind == TRAFFIC_RATE_BYTES else "rate-limit-pps"
    return F.Action(name, max(1, round(rate))), None


def _nlris(data: bytes, family: int, out: Update, what: str) -> Iterable[F.Match]:
    while data:
        try:
            match, n = F.decode_nlri(data, family)
        except F.RuleError as exc:
            # The rest of the list cannot be framed without this one's length.
            out.rejected.append(f"{what}: {exc} (NLRI {data[:32].hex()})")
            if data[0] >= 0xF0 and len(data) >= 2:
                n = 2 + (((data[0] & 0x0F) << 8) | data[1])
            else:
                n = 1 + data[0]
        else:
            yield match
        data = data[n:]


def parse_update(body: bytes) -> Update:
    """The FlowSpec content of a BGP UPDATE message's body (RFC 4271 4.3)."""
    out = Update()
    try:
        (wlen,) = struct.unpack_from("!H", body, 0)
        (alen,) = struct.unpack_from("!H", body, 2 + wlen)
    except struct.error:
        raise UpdateError("truncated UPDATE") from None
    attrs, i = body[4 + wlen : 4 + wlen + alen], 0
    if len(attrs) != alen:
        raise UpdateError("truncated path attributes")
    reach = unreach = None
    communities: list[int] = []
    n_attrs = 0
    while i < len(attrs):
        if i + 3 > len(attrs):
            raise UpdateError("truncated path attribute")
        flags, kind = attrs[i], attrs[i + 1]
        if flags & 0x10:
            (n,) = struct.unpack_from("!H", attrs, i + 2)
            i += 4
        else:
            n = attrs[i + 2]
            i += 3
        value = attrs[i : i + n]
        if len(value) != n:
            raise UpdateError("truncated path attribute value")
        i += n
        n_attrs += 1
        if kind == ATTR_MP_REACH:
            reach = value
        elif kind == ATTR_MP_UNREACH:
            unreach = value
        elif kind == ATTR_EXT_COMMUNITIES:
            communities += [int.from_bytes(value[j : j + 8], "big") for j in range(0, n, 8)]
    if unreach is not None and len(unreach) >= 3:
        afi, safi = struct.unpack_from("!HB", unreach)
        if safi == SAFI_FLOWSPEC and afi in AFI_FAMILY:
            nlri = unreach[3:]
            if not nlri and n_attrs == 1 and reach is None:
                out.eor = True  # End-of-RIB (RFC 4724)
            out.withdraw += list(_nlris(nlri, AFI_FAMILY[afi], out, "withdrawal"))
    if reach is not None and len(reach) >= 5:
        afi, safi, nhlen = struct.unpack_from("!HBB", reach)
        if safi == SAFI_FLOWSPEC and afi in AFI_FAMILY:
            nlri = reach[4 + nhlen + 1 :]
            matches = list(_nlris(nlri, AFI_FAMILY[afi], out, "announcement"))
            action, why = action_of(communities)
            for m in matches:
                out.announce.append((m, action, why))
    return out


class Feed:
    """The feed's state: each peer's routes, and the daemon it talks to."""

    def __init__(self, control: str, hold: float, client: Any = ControlClient) -> None:
        self.control = control
        self.hold = hold
        self._client_factory = client
        self._client: Any = None
        self.ribs: dict[str, dict[str, str]] = {}  # source -> match key -> rule text
        self.up: set[str] = set()
        self.instance: str | None = None
        self.resync = False  # replay everything at the next chance
        self._lock = threading.Lock()

    # -- talking to the daemon --

    def _call(self, cmd: str, **args: Any) -> Any:
        if self._client is None:
            self._client = self._client_factory(self.control)
        try:
            return self._client.call(cmd, **args)
        except ControlError:
            raise  # xdpguard answered: the connection is fine
        except (OSError, XdpguardError):
            # A connection that failed is not used again; the caller decides.
            client, self._client = self._client, None
            with contextlib.suppress(Exception):  # closing a broken connection
                client.close()
            raise

    def _session(self, source: str, state: str) -> None:
        r = self._call("rule.session", source=source, state=state, hold=self.hold)
        instance = r.get("instance") if isinstance(r, dict) else None
        if self.instance is not None and instance != self.instance:
            log.info("xdpguard restarted: replaying every route")
            self.resync = True
        self.instance = instance

    def _replay(self) -> None:
        """Every up peer's routes again; the daemon drops the ones not named.
        A peer the daemon refuses is logged and skipped: the others still
        come back. A broken connection stops the replay (resync stays)."""
        for source in sorted(self.up):
            try:
                self._call("rule.session", source=source, state="down", hold=self.hold)
                self._session(source, "up")
                rib = self.ribs.get(source, {})
                if rib:
                    self._apply(source, list(rib.values()), [])
                self._call("rule.session", source=source, state="eor", hold=self.hold)
            except ControlError as exc:
                log.error("%s: xdpguard refused its replay: %s", source, exc)
        self.resync = False

    def _guarded(self, what: str, fn: Any) -> None:
        try:
            if self.resync:
                self._replay()
            fn()
        except ControlError as exc:
            # xdpguard answered: the connection works, and the same request
            # would be refused again. Logged, never replayed.
            log.error("%s: xdpguard refused it: %s", what, exc)
        except (OSError, XdpguardError) as exc:
            log.error("%s: %s (will replay every route at the next chance)", what, exc)
            self.resync = True

    # -- ExaBGP's messages --

    def handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        try:
            peer = str(ipaddress.ip_address(msg["neighbor"]["address"]["peer"]))
        except (KeyError, TypeError, ValueError):
            log.error("a message from ExaBGP without a peer address, skipped: %.80s", msg)
            return
        source = f"bgp:{peer}"
        with self._lock:
            if kind == "state":
                self._state(source, str(msg["neighbor"].get("state")))
            elif kind == "update":
                if source not in self.up:
                    # No 'state up' first: ExaBGP's api lacks neighbor-changes.
                    # An UPDATE means the session is up; keep its lease alive.
                    log.warning("%s: an UPDATE before its session was said up", source)
                    self._state(source, "up")
                self._update(source, msg)

    def _state(self, source: str, state: str) -> None:
        if state == "up":
            log.info("%s: session up", source)
            self.up.add(source)
            self.ribs[source] = {}
            self._guarded(f"{source} up", lambda: self._session(source, "up"))
        elif state == "down":
            log.info(
                "%s: session down: its rules go in %gs unless it comes back", source, self.hold
            )
            self.up.discard(source)
            self.ribs.pop(source, None)
            self._guarded(f"{source} down", lambda: self._session(source, "down"))

    def _update(self, source: str, msg: dict[str, Any]) -> None:
        message = msg["neighbor"].get("message")
        body_hex = message.get("body") if isinstance(message, dict) else None
        if not isinstance(body_hex, str):
            log.error(
                "%s: an UPDATE without its raw body: ExaBGP needs 'receive { packets; }'", source
            )
            return
        try:
            update = parse_update(bytes.fromhex(body_hex.removeprefix("0x")))
        except (UpdateError, ValueError) as exc:
            log.error("%s: cannot read an UPDATE (%s); nothing changed", source, exc)
            return
        rib = self.ribs.setdefault(source, {})
        announce, withdraw = [], []
        for match, action, why in update.announce:
            if action is None:
                log.error("%s: rejected %s: %s", source, match.text(), why)
                if rib.pop(match.key(), None) is not None:
                    withdraw.append(match.text())  # the route it replaces is gone too
                continue
            text = F.Rule(match, action).text()
            rib[match.key()] = text
            announce.append(text)
        for match in update.withdraw:
            rib.pop(match.key(), None)
            withdraw.append(match.text())
        for line in update.rejected:
            log.error("%s: rejected %s", source, line)
        if announce or withdraw:
            self._guarded(f"{source} update", lambda: self._apply(source, announce, withdraw))
        if update.eor:
            self._guarded(
                f"{source} end-of-rib",
                lambda: self._call("rule.session", source=source, state="eor", hold=self.hold),
            )

    def _apply(self, source: str, announce: list[str], withdraw: list[str]) -> None:
        """One UPDATE's changes: in one request if they fit one (REQUEST_RULES,
        REQUEST_BYTES), else withdrawals first, then announcements, in
        bounded chunks. xdpguard holds each route it can (partial) and says
        which it refused (no room, too many on one destination): those are
        left out of the RIB, and said in one line."""
        size = (
            sum(map(len, announce)) + sum(map(len, withdraw)) + 4 * (len(announce) + len(withdraw))
        )
        if len(announce) + len(withdraw) <= REQUEST_RULES and size <= REQUEST_BYTES:
            requests = [(announce, withdraw)]
        else:
            requests = [([], part) for part in chunks(withdraw)]
            requests += [(part, []) for part in chunks(announce)]
        refused: list[list[str]] = []
        for ann, wd in requests:
            r = self._call(
                "rule.update", source=source, announce=ann, withdraw=wd, hold=self.hold,
                partial=True,
            )  # fmt: skip
            refused += r.get("refused", []) if isinstance(r, dict) else []
        if refused:
            rib = self.ribs.get(source, {})
            texts = {text for text, _ in refused}
            for key in [k for k, t in rib.items() if t in texts]:
                del rib[key]
            log.error(
                "%s: xdpguard refused %d route(s), e.g. %s: %s",
                source,
                len(refused),
                refused[0][0],
                refused[0][1],
            )

    def keepalive(self) -> None:
        """Renew every up peer's lease (and replay, if due)."""
        with self._lock:
            for source in sorted(self.up):
                self._guarded(f"{source} keepalive", lambda s=source: self._session(s, "up"))


def run(control: str, hold: float, stdin: TextIO = sys.stdin) -> int:
    feed = Feed(control, hold)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(hold / 3):
            feed.keepalive()

    threading.Thread(target=beat, name="keepalive", daemon=True).start()
    try:
        for line in stdin:
            line = line.strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                log.error("not JSON from ExaBGP (is 'encoder json' set?): %.80s", line)
                continue
            if not isinstance(msg, dict):
                log.error("not a message from ExaBGP: %.80s", line)
                continue
            try:
                feed.handle(msg)
            except Exception as exc:  # one odd message must not end the feed
                log.error(
                    "a message from ExaBGP the feed cannot read (%s: %s), skipped: %.80s",
                    type(exc).__name__,
                    exc,
                    line,
                )
    finally:
        stop.set()
    # ExaBGP went away: the leases run out by themselves.
    log.info("ExaBGP closed the pipe; the rules of its peers go after their hold time")
    return 0
