"""N-tuple rules as FlowSpec defines them (RFC 8955 for IPv4, RFC 8956 for
IPv6): the one model of a rule that ``xdpguard rule``, the rule table and
the BGP feed share.

A rule is a match (a family, an optional destination and source prefix,
and operator-term lists for the other components, in FlowSpec's numbering)
and an action. Three forms, each exact, and round trips between them are
the identity:

- text, for people and files: ``dst 192.0.2.0/24 proto udp sport 123 drop``
  (``parse()``, ``Rule.text()``; the grammar is in ``RULE_SYNTAX``);
- FlowSpec's NLRI encoding (``Match.wire()``, ``decode_nlri()``), which
  is also what RFC 8955's order compares (``compare()``), and the key that
  names a rule: the same match from the same source is the same rule;
- the XDP program's terms (``Match.terms()``, bpf/xg_rules.h).

Values are encoded in the fewest octets that hold them, so that two
equal matches always have equal encodings (and so one place in the order).
What the XDP program cannot do is refused whole with the reason: a flow
label, an IPv6 prefix offset, TCP flags beyond the first 8, values larger
than their field, more than XG_RULE_TERMS terms.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from xdpguard import _bindings as B
from xdpguard.errors import XdpguardError


class RuleError(XdpguardError):
    """A rule that is not valid, or that the rule engine cannot express."""


class Comp(IntEnum):
    """FlowSpec component types (the IANA registry, RFC 8955 and RFC 8956)."""

    DST = 1
    SRC = 2
    PROTO = 3
    PORT = 4
    DPORT = 5
    SPORT = 6
    ICMP_TYPE = 7
    ICMP_CODE = 8
    TCP_FLAGS = 9
    LENGTH = 10
    DSCP = 11
    FRAGMENT = 12
    FLOW_LABEL = 13


# The text names of components: the first is the one printed.
NAMES: dict[Comp, tuple[str, ...]] = {
    Comp.DST: ("dst", "destination"),
    Comp.SRC: ("src", "source"),
    Comp.PROTO: ("proto", "protocol", "next-header"),
    Comp.PORT: ("port",),
    Comp.DPORT: ("dport", "destination-port"),
    Comp.SPORT: ("sport", "source-port"),
    Comp.ICMP_TYPE: ("icmp-type",),
    Comp.ICMP_CODE: ("icmp-code",),
    Comp.TCP_FLAGS: ("tcp-flags",),
    Comp.LENGTH: ("length", "packet-length"),
    Comp.DSCP: ("dscp", "traffic-class"),
    Comp.FRAGMENT: ("fragment", "frag"),
    Comp.FLOW_LABEL: ("flow-label",),
}
_BY_NAME = {name: comp for comp, names in NAMES.items() for name in names}

BITMASK = frozenset({Comp.TCP_FLAGS, Comp.FRAGMENT})
# The largest value the XDP program's field holds.
FIELD_MAX = {
    Comp.PROTO: 255,
    Comp.PORT: 65535,
    Comp.DPORT: 65535,
    Comp.SPORT: 65535,
    Comp.ICMP_TYPE: 255,
    Comp.ICMP_CODE: 255,
    Comp.TCP_FLAGS: 255,
    Comp.LENGTH: 65535,
    Comp.DSCP: 63,
    Comp.FRAGMENT: 15,
}

# Operator bits, as encoded (the end-of-list and length bits aside).
OP_EQ, OP_GT, OP_LT = 1, 2, 4
OP_MATCH, OP_NOT = 1, 2
OP_AND = 0x40
_OP_END = 0x80

MAX_TERMS = B.RULE_TERMS

PROTOCOLS = {
    "icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51,
    "icmpv6": 58, "ipv6-icmp": 58, "ospf": 89, "pim": 103, "sctp": 132,
}  # fmt: skip
_PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 47: "gre", 50: "esp", 51: "ah"}
TCP_FLAGS = {"fin": 1, "syn": 2, "rst": 4, "psh": 8, "ack": 16, "urg": 32, "ece": 64, "cwr": 128}
_TCP_ALIASES = {"push": 8, "urgent": 32}
FRAG_BITS = {"dont-fragment": 1, "is-fragment": 2, "first-fragment": 4, "last-fragment": 8}
_FRAG_ALIASES = {"df": 1, "isf": 2, "ff": 4, "lf": 8}

ACTIONS = ("drop", "accept", "rate-limit", "rate-limit-pps")
_ACTION_ALIASES = {"discard": "drop"}

RULE_SYNTAX = """\
A rule is its components, then its action, as FlowSpec has them:

  dst PREFIX / src PREFIX       destination / source prefix (IPv4 or IPv6)
  proto VALUES                  IP protocol (IPv6: the upper-layer one): tcp,
                                udp, icmp, icmpv6, gre, esp, ah or a number
  port / dport / sport VALUES   TCP or UDP port: either, destination, source
  icmp-type / icmp-code VALUES  ICMP (IPv4) or ICMPv6 (IPv6)
  tcp-flags FLAGS               fin syn rst psh ack urg ece cwr
  length VALUES                 the IP packet's length, its header included
  dscp VALUES                   0-63
  fragment FLAGS                dont-fragment is-fragment first-fragment
                                last-fragment
  ipv4 / ipv6                   the family, for a rule without a prefix

VALUES: terms joined by ',' (or) and '&' (and, binding tighter); a term
is a number, OP number (OP: = != < <= > >=) or a range LOW-HIGH.
FLAGS: terms joined the same way; a term is [!][=]flag[+flag...]:
'=syn+ack' both set, 'syn+ack' either set, '!' the opposite.

ACTION: drop | accept | rate-limit BYTES/S | rate-limit-pps PACKETS/S
(a number, or with k, M or G: 10M). 'accept' ends the rules for the frame;
the rest of xdpguard (TCP protection) still applies. The first rule that
matches in RFC 8955 order decides: more specific destinations first.

  dst 192.0.2.0/24 proto udp sport 53,123,1900 drop
  dst 2001:db8::/32 proto tcp dport 80,443 tcp-flags =syn rate-limit-pps 10k
  ipv4 proto icmp icmp-type 8 length >1000 drop"""


@dataclass(frozen=True)
class Term:
    op: int  # OP_* bits, OP_AND included
    value: int


@dataclass(frozen=True)
class Prefix:
    addr: bytes  # 4 or 16 bytes, host bits clear
    plen: int

    @property
    def family(self) -> int:
        return 4 if len(self.addr) == 4 else 6

    def text(self) -> str:
        ip = ipaddress.ip_address(self.addr)
        return f"{ip}/{self.plen}"

    def contains(self, other: Prefix) -> bool:
        if len(other.addr) != len(self.addr) or other.plen < self.plen:
            return False
        bits = len(self.addr) * 8
        a = int.from_bytes(self.addr, "big") >> (bits - self.plen) if self.plen else 0
        b = int.from_bytes(other.addr, "big") >> (bits - self.plen) if self.plen else 0
        return a == b


def parse_prefix(text: str, family: int | None = None) -> Prefix:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise RuleError(f"{text!r} is not a prefix ({exc})") from None
    if family is not None and net.version != family:
        raise RuleError(f"{text} is IPv{net.version} in an IPv{family} rule")
    return Prefix(net.network_address.packed, net.prefixlen)


@dataclass(frozen=True)
class Match:
    family: int  # 4 or 6
    dst: Prefix | None = None
    src: Prefix | None = None
    # (component, its terms), in component order; never DST or SRC
    comps: tuple[tuple[Comp, tuple[Term, ...]], ...] = ()

    def components(self) -> list[tuple[Comp, bytes]]:
        """(type, encoded data) of each component, in type order."""
        out: list[tuple[Comp, bytes]] = []
        for comp, pfx in ((Comp.DST, self.dst), (Comp.SRC, self.src)):
            if pfx is not None:
                n = (pfx.plen + 7) // 8
                data = bytes((pfx.plen,)) + (b"\0" if self.family == 6 else b"") + pfx.addr[:n]
                out.append((comp, data))
        for comp, terms in self.comps:
            out.append((comp, _encode_terms(terms)))
        return out

    def wire(self) -> bytes:
        """The NLRI's components (RFC 8955 4.1), without its length prefix."""
        return b"".join(bytes((c,)) + d for c, d in self.components())

    def key(self) -> str:
        """What names the match: the family and the encoding."""
        return f"{self.family}:{self.wire().hex()}"

    def nterms(self) -> int:
        return sum(len(t) for _, t in self.comps)

    def everything(self) -> bool:
        """Whether this matches every frame of its family: nothing narrows it."""
        return not self.comps and all(p is None or p.plen == 0 for p in (self.dst, self.src))

    def text(self) -> str:
        words: list[str] = []
        if self.dst is None and self.src is None:
            words.append(f"ipv{self.family}")
        if self.dst is not None:
            words += ["dst", self.dst.text()]
        if self.src is not None:
            words += ["src", self.src.text()]
        for comp, terms in self.comps:
            words += [NAMES[comp][0], _terms_text(comp, terms)]
        return " ".join(words)

    def xdp_terms(self) -> list[dict[str, int]]:
        """The terms as the XDP program evaluates them (struct xg_rule_term)."""
        return [
            {"comp": int(comp), "op": t.op, "value": t.value}
            for comp, terms in self.comps
            for t in terms
        ]


@dataclass(frozen=True)
class Action:
    kind: str  # one of ACTIONS
    rate: int = 0  # bytes or packets per second, for the rate kinds

    def text(self) -> str:
        return f"{self.kind} {self.rate}" if self.kind.startswith("rate") else self.kind


@dataclass(frozen=True)
class Rule:
    match: Match
    action: Action
    comment: str | None = field(default=None, compare=False)

    def text(self) -> str:
        return f"{self.match.text()} {self.action.text()}"


# ---- terms ----


def _len_code(value: int) -> tuple[int, int]:
    if value < 0x100:
        return 0, 1
    if value < 0x10000:
        return 1, 2
    return 2, 4


def _encode_terms(terms: Sequence[Term]) -> bytes:
    out = bytearray()
    for i, t in enumerate(terms):
        code, n = _len_code(t.value)
        op = t.op | (code << 4) | (_OP_END if i == len(terms) - 1 else 0)
        out.append(op)
        out += t.value.to_bytes(n, "big")
    return bytes(out)


def _check_terms(comp: Comp, terms: Sequence[Term], family: int) -> None:
    if comp == Comp.FLOW_LABEL:
        raise RuleError("flow-label: the rule engine does not match flow labels")
    if not terms:
        raise RuleError(f"{NAMES[comp][0]}: no terms")
    if terms[0].op & OP_AND:
        raise RuleError(f"{NAMES[comp][0]}: the first term cannot be ANDed")
    top = FIELD_MAX[comp]
    for t in terms:
        if t.value > top:
            raise RuleError(f"{NAMES[comp][0]}: {t.value} is more than the field holds ({top})")
        if comp in BITMASK and t.op & ~(OP_AND | OP_MATCH | OP_NOT):
            raise RuleError(f"{NAMES[comp][0]}: reserved operator bits set")
    if comp == Comp.FRAGMENT and family == 6 and any(t.value & 1 for t in terms):
        raise RuleError("fragment: IPv6 has no dont-fragment bit (RFC 8956)")


def _num_text(comp: Comp, v: int) -> str:
    if comp == Comp.PROTO and v in _PROTO_NAMES:
        return _PROTO_NAMES[v]
    return str(v)


_NUM_OPS = {OP_EQ: "=", OP_GT: ">", OP_LT: "<", OP_GT | OP_EQ: ">=", OP_LT | OP_EQ: "<=",
            OP_LT | OP_GT: "!=", 0: "false", OP_LT | OP_GT | OP_EQ: "true"}  # fmt: skip


def _terms_text(comp: Comp, terms: Sequence[Term]) -> str:
    out = ""
    i = 0
    while i < len(terms):
        t = terms[i]
        if i:
            out += "&" if t.op & OP_AND else ","
        if comp in BITMASK:
            names = FRAG_BITS if comp == Comp.FRAGMENT else TCP_FLAGS
            bits = "+".join(n for n, b in names.items() if t.value & b) or "0"
            out += ("!" if t.op & OP_NOT else "") + ("=" if t.op & OP_MATCH else "") + bits
        else:
            nxt = terms[i + 1] if i + 1 < len(terms) else None
            lo, hi = t.value, nxt.value if nxt else 0
            if (
                t.op & ~OP_AND == OP_GT | OP_EQ
                and nxt is not None
                and nxt.op == OP_AND | OP_LT | OP_EQ
                and lo < hi
            ):
                out += f"{_num_text(comp, lo)}-{_num_text(comp, hi)}"
                i += 2
                continue
            op = _NUM_OPS[t.op & 7]
            if op in ("true", "false"):
                raise RuleError(f"{NAMES[comp][0]}: a {op} term has no text form")
            out += ("" if op == "=" else op) + _num_text(comp, t.value)
        i += 1
    return out


def _number(comp: Comp, text: str) -> int:
    names: dict[str, int] = PROTOCOLS if comp == Comp.PROTO else {}
    if text in names:
        return names[text]
    if not text.isdigit() or len(text) > 10:
        raise RuleError(f"{NAMES[comp][0]}: {text!r} is not a number")
    return int(text)


_NUM_ATOM = re.compile(r"^(==|=|!=|<=|>=|<|>)?([^<>=!]+)$")
_OPS_BY_TEXT = {"=": OP_EQ, "==": OP_EQ, "!=": OP_LT | OP_GT, "<": OP_LT, "<=": OP_LT | OP_EQ,
                ">": OP_GT, ">=": OP_GT | OP_EQ}  # fmt: skip


def parse_terms(comp: Comp, text: str) -> tuple[Term, ...]:
    """One component's value text -> its terms (module docstring's grammar)."""
    terms: list[Term] = []
    for alt in text.split(","):
        for j, atom in enumerate(alt.split("&")):
            join = OP_AND if j else 0
            if not atom:
                raise RuleError(f"{NAMES[comp][0]}: an empty term in {text!r}")
            if comp in BITMASK:
                terms.append(_bitmask_atom(comp, atom, join))
                continue
            rng = re.fullmatch(r"([^-<>=!]+)-([^-<>=!]+)", atom)
            if rng:
                lo, hi = _number(comp, rng.group(1)), _number(comp, rng.group(2))
                if lo > hi:
                    raise RuleError(f"{NAMES[comp][0]}: range {atom} runs backwards")
                terms.append(Term(join | OP_GT | OP_EQ, lo))
                terms.append(Term(OP_AND | OP_LT | OP_EQ, hi))
                continue
            m = _NUM_ATOM.match(atom)
            if not m:
                raise RuleError(f"{NAMES[comp][0]}: cannot read term {atom!r}")
            terms.append(Term(join | _OPS_BY_TEXT[m.group(1) or "="], _number(comp, m.group(2))))
    return tuple(terms)


def _bitmask_atom(comp: Comp, atom: str, join: int) -> Term:
    op = join
    if atom.startswith("!"):
        op |= OP_NOT
        atom = atom[1:]
    if atom.startswith("="):
        op |= OP_MATCH
        atom = atom[1:]
    names = (
        {**FRAG_BITS, **_FRAG_ALIASES} if comp == Comp.FRAGMENT else {**TCP_FLAGS, **_TCP_ALIASES}
    )
    value = 0
    for name in atom.split("+"):
        if name.isdigit() and len(name) <= 5:
            value |= int(name)  # a bitmask as a number (0 and unnamed bits)
            continue
        if name not in names:
            raise RuleError(f"{NAMES[comp][0]}: unknown flag {name!r} (known: {', '.join(names)})")
        value |= names[name]
    return Term(op, value)


def _intervals(op: int, value: int, top: int) -> list[tuple[int, int]]:
    """The values of [0, top] a numeric term holds for, as intervals."""
    out = []
    if op & OP_LT and value > 0:
        out.append((0, min(value - 1, top)))
    if op & OP_EQ and value <= top:
        out.append((value, value))
    if op & OP_GT and value < top:
        out.append((value + 1, top))
    return _merge(out)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return _merge([(max(x, u), min(y, v)) for x, y in a for u, v in b if max(x, u) <= min(y, v)])


def single_range(comp: Comp, terms: Sequence[Term]) -> tuple[int, int] | None:
    """(low, high) if a numeric component's terms hold for exactly one range
    of its field's values, else None: interval arithmetic, AND before OR."""
    top = FIELD_MAX[comp]
    held: list[tuple[int, int]] = []
    group: list[tuple[int, int]] = [(0, top)]
    for i, t in enumerate(terms):
        if i and not t.op & OP_AND:
            held = _merge(held + group)
            group = [(0, top)]
        group = _intersect(group, _intervals(t.op & 7, t.value, top))
    held = _merge(held + group)
    return held[0] if len(held) == 1 else None


# ---- rules from text ----


def _rate(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKMG]?)", text)
    if not m:
        raise RuleError(f"rate {text!r} is not a number (like 1000, 10k, 2.5M)")
    scale = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2)]
    return round(float(m.group(1)) * scale)


def parse(words: Sequence[str] | str, comment: str | None = None) -> Rule:
    """A rule from its text (RULE_SYNTAX), as words or one string."""
    if isinstance(words, str):
        words = words.split()
    words = list(words)
    if words and words[0] == "then":
        raise RuleError("no components before the action")
    family: int | None = None
    dst = src = None
    comps: dict[Comp, tuple[Term, ...]] = {}
    action: Action | None = None
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("ipv4", "ipv6"):
            f = int(w[-1])
            if family not in (None, f):
                raise RuleError(f"{w} in an IPv{family} rule")
            family = f
            i += 1
            continue
        if w == "then":
            i += 1
            continue
        kind = _ACTION_ALIASES.get(w, w)
        if kind in ACTIONS:
            if action is not None:
                raise RuleError("one action per rule")
            if kind.startswith("rate-limit"):
                if i + 1 >= len(words):
                    raise RuleError(f"{w} needs a rate")
                action = Action(kind, _rate(words[i + 1]))
                i += 2
            else:
                action = Action(kind)
                i += 1
            if i < len(words):
                raise RuleError(f"{' '.join(words[i:])!r} after the action")
            break
        comp = _BY_NAME.get(w)
        if comp is None:
            raise RuleError(f"unknown component {w!r} (see 'xdpguard rule --help')")
        if i + 1 >= len(words):
            raise RuleError(f"{w} needs a value")
        value = words[i + 1]
        if comp in (Comp.DST, Comp.SRC):
            if (dst if comp == Comp.DST else src) is not None:
                raise RuleError(f"{w} given twice")
            pfx = parse_prefix(value, family)
            family = pfx.family
            if comp == Comp.DST:
                dst = pfx
            else:
                src = pfx
        else:
            if comp in comps:
                raise RuleError(f"{w} given twice")
            comps[comp] = parse_terms(comp, value)
        i += 2
    if action is None:
        raise RuleError(f"no action: end the rule with one of {', '.join(ACTIONS)}")
    if family is None:
        raise RuleError("a rule without a prefix needs its family: add ipv4 or ipv6")
    return make_rule(family, dst, src, comps, action, comment)


def make_rule(
    family: int,
    dst: Prefix | None,
    src: Prefix | None,
    comps: dict[Comp, tuple[Term, ...]],
    action: Action,
    comment: str | None = None,
) -> Rule:
    """A checked rule: everything the XDP program can do, nothing more."""
    for pfx in (dst, src):
        if pfx is not None and pfx.family != family:
            raise RuleError(f"{pfx.text()} is IPv{pfx.family} in an IPv{family} rule")
    for comp, terms in comps.items():
        _check_terms(comp, terms, family)
    match = Match(family, dst, src, tuple(sorted(comps.items())))
    if match.nterms() > MAX_TERMS:
        raise RuleError(f"{match.nterms()} terms: a rule holds at most {MAX_TERMS}")
    if action.kind.startswith("rate") and action.rate < 0:
        raise RuleError("a rate cannot be negative")
    if action.kind.startswith("rate") and action.rate == 0:
        action = Action("drop")  # FlowSpec: a rate of 0 discards
    return Rule(match, action, comment)


# ---- the NLRI encoding ----


def decode_nlri(data: bytes, family: int) -> tuple[Match, int]:
    """One FlowSpec NLRI at the start of ``data``: its match and its length.
    Raises RuleError for what is malformed or cannot be expressed."""
    if not data:
        raise RuleError("empty NLRI")
    if data[0] >= 0xF0:
        if len(data) < 2:
            raise RuleError("truncated NLRI length")
        n, off = ((data[0] & 0x0F) << 8) | data[1], 2
    else:
        n, off = data[0], 1
    body, total = data[off : off + n], off + n
    if len(body) != n:
        raise RuleError("truncated NLRI")
    dst = src = None
    comps: dict[Comp, tuple[Term, ...]] = {}
    last = 0
    i = 0
    while i < len(body):
        t = body[i]
        i += 1
        if t <= last:
            raise RuleError("components out of order (RFC 8955 4.2)")
        last = t
        try:
            comp = Comp(t)
        except ValueError:
            raise RuleError(f"unknown component type {t}") from None
        if comp in (Comp.DST, Comp.SRC):
            if i >= len(body):
                raise RuleError("truncated prefix")
            plen = body[i]
            i += 1
            if family == 6:
                if i >= len(body):
                    raise RuleError("truncated prefix")
                if body[i]:
                    raise RuleError("IPv6 prefix offsets are not supported")
                i += 1
            nbytes = (plen + 7) // 8
            width = 4 if family == 4 else 16
            if plen > width * 8 or i + nbytes > len(body):
                raise RuleError("bad prefix")
            addr = int.from_bytes(body[i : i + nbytes].ljust(width, b"\0"), "big")
            addr &= ((1 << width * 8) - 1) ^ ((1 << (width * 8 - plen)) - 1)
            i += nbytes
            pfx = Prefix(addr.to_bytes(width, "big"), plen)
            if comp == Comp.DST:
                dst = pfx
            else:
                src = pfx
            continue
        terms = []
        while True:
            if i >= len(body):
                raise RuleError("truncated operator list")
            op = body[i]
            nv = 1 << ((op >> 4) & 3)
            if i + 1 + nv > len(body):
                raise RuleError("truncated operator value")
            value = int.from_bytes(body[i + 1 : i + 1 + nv], "big")
            i += 1 + nv
            if op & 0x08 or (comp in BITMASK and op & 0x0C):
                raise RuleError(f"{NAMES[comp][0]}: reserved operator bits set")
            terms.append(Term(op & (OP_AND | 7), value))
            if op & _OP_END:
                break
        comps[comp] = tuple(terms)
    return make_rule(family, dst, src, comps, Action("accept")).match, total


def encode_nlri(match: Match) -> bytes:
    body = match.wire()
    if len(body) < 0xF0:
        return bytes((len(body),)) + body
    return struct.pack("!H", 0xF000 | len(body)) + body


# ---- RFC 8955 5.1: the order ----


def _cmp_prefix(a: bytes, b: bytes, family: int) -> int:
    skip = 2 if family == 6 else 1
    pa, pb = (
        Prefix(a[skip:].ljust(16 if family == 6 else 4, b"\0"), a[0]),
        Prefix(b[skip:].ljust(16 if family == 6 else 4, b"\0"), b[0]),
    )
    if pa == pb:
        return 0
    if pa.contains(pb):
        return 1  # b is more specific: b first
    if pb.contains(pa):
        return -1
    return -1 if pa.addr < pb.addr else 1


def compare(a: Match, b: Match) -> int:
    """RFC 8955 5.1: negative if ``a`` comes first (has precedence)."""
    ca, cb = a.components(), b.components()
    for (ta, da), (tb, db) in zip(ca, cb, strict=False):
        if ta != tb:
            return -1 if ta < tb else 1
        if ta in (Comp.DST, Comp.SRC):
            c = _cmp_prefix(da, db, a.family)
        else:
            n = min(len(da), len(db))
            c = (da[:n] > db[:n]) - (da[:n] < db[:n])
            if not c and len(da) != len(db):
                c = -1 if len(da) > len(db) else 1
        if c:
            return c
    if len(ca) != len(cb):
        return -1 if len(ca) > len(cb) else 1
    return 0


precedence = functools.cmp_to_key(compare)


def ordered(matches: Iterable[Match]) -> list[Match]:
    return sorted(matches, key=precedence)
