"""A strict DNS message parser (RFC 1035, 3596), for messages that cross the NI and may be hostile.

Only what the Code-Red scanner needs: the header, the question section, and every resource record of the
answer, authority and additional sections, with A (4-byte), AAAA (16-byte), CNAME and PTR data decoded and
every other type kept as raw bytes.  Names may use compression pointers; a pointer must point past the header and
strictly before every octet of the name read so far, so each jump goes backwards and loops are impossible; a
name is limited to 255 octets on the wire (63 per label, the two high bits of a length byte say whether it is
a label or a pointer) and 64 pointers.  Bytes left over after the last record are an error.

Every malformed input raises :class:`DnsError`, a :class:`ValueError`; nothing else escapes (the fuzz tests in
``tests/test_dns_parse.py`` hold the parser to that).

    msg = parse_response(udp_payload)        # only QR=1, opcode QUERY, RCODE 0 (NOERROR)
    for a in msg.addresses():                # A/AAAA records of all three sections
        a.address, a.ttl, a.name, a.aliases  # aliases: names whose CNAME chain ends at a.name
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Iterator, Optional, Union

__all__ = [
    "DnsError", "Question", "Record", "Message", "AddressRecord", "parse_message", "parse_response",
    "parse_query", "TYPE_A", "TYPE_AAAA", "TYPE_CNAME", "TYPE_PTR", "CLASS_IN", "reverse_address",
]

HEADER = struct.Struct("!HHHHHH")
RR_FIXED = struct.Struct("!HHIH")   # type, class, ttl, rdlength (after the owner name)
Q_FIXED = struct.Struct("!HH")

TYPE_A = 1
TYPE_CNAME = 5
TYPE_PTR = 12
TYPE_AAAA = 28
TYPE_OPT = 41
CLASS_IN = 1
OPCODE_QUERY = 0
RCODE_NOERROR = 0

MAX_NAME = 255          # octets on the wire, length bytes and the root label included (RFC 1035 2.3.4)
MAX_POINTERS = 64       # backward-only pointers already terminate; this bounds the work per name
MAX_MESSAGE = 65535
MAX_CNAME_HOPS = 16     # when following chains in addresses()
TTL_MAX = 0x7FFFFFFF    # RFC 2181 8: a TTL with the top bit set is treated as zero


class DnsError(ValueError):
    """A DNS message that is malformed, or not the kind of message asked for."""


@dataclass(frozen=True)
class Question:
    name: str
    qtype: int
    qclass: int


@dataclass(frozen=True)
class Record:
    name: str
    rtype: int
    rclass: int
    ttl: int
    #: IPv4Address (A, class IN), IPv6Address (AAAA, class IN), a name (CNAME), else the raw RDATA.
    data: Union[ipaddress.IPv4Address, ipaddress.IPv6Address, str, bytes]


@dataclass(frozen=True)
class AddressRecord:
    address: Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
    ttl: int
    name: str                   # the owner name of the A/AAAA record
    aliases: tuple[str, ...]    # names on a question's CNAME chain in this message that reaches it
    section: str                # "answer", "authority" or "additional"


@dataclass(frozen=True)
class Message:
    id: int
    flags: int
    questions: tuple[Question, ...]
    answers: tuple[Record, ...]
    authority: tuple[Record, ...]
    additional: tuple[Record, ...]

    @property
    def qr(self) -> bool:
        return bool(self.flags & 0x8000)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def truncated(self) -> bool:
        return bool(self.flags & 0x0200)

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    def addresses(self) -> Iterator[AddressRecord]:
        """Every IN A/AAAA record, with the names that lead to it through CNAMEs of this message."""
        cnames: dict[str, str] = {}
        for rr in self.answers:
            if rr.rtype == TYPE_CNAME and rr.rclass == CLASS_IN and isinstance(rr.data, str):
                cnames.setdefault(rr.name, rr.data)
        # Follow each question's chain (loop- and length-bounded) to its final target; every name on it is
        # an alias of that target.  CNAMEs on no question's chain lead nowhere the guest asked for: they are
        # not followed (a response stuffed with them must not cost a walk per record).
        leads_to: dict[str, list[str]] = {}
        for q in self.questions:
            name, hops, chain = q.name, 0, []
            while name in cnames and hops < MAX_CNAME_HOPS:
                chain.append(name)
                name, hops = cnames[name], hops + 1
            if chain:
                got = leads_to.setdefault(name, [])
                got.extend(n for n in chain if n not in got and n != name)
        for section, records in (("answer", self.answers), ("authority", self.authority),
                                 ("additional", self.additional)):
            for rr in records:
                if rr.rclass == CLASS_IN and rr.rtype in (TYPE_A, TYPE_AAAA) and not isinstance(rr.data, bytes):
                    yield AddressRecord(rr.data, rr.ttl, rr.name, tuple(leads_to.get(rr.name, ())), section)


def _read_name(msg: bytes, pos: int, limit: Optional[int] = None) -> tuple[str, int]:
    """The name at ``pos`` in presentation form (lower case, no trailing dot, the root as ".") and the offset
    just after it where it was found.  ``limit`` is where the name must end (a record's data).

    A compression pointer must point before the start of the labels read so far (so before the name's first
    octet, or before the last pointer's target): every jump moves strictly backwards, so no loops.
    """
    n = len(msg) if limit is None else limit
    labels: list[str] = []
    wire_len = 0
    end: Optional[int] = None
    pointers = 0
    floor = pos              # no pointer may reach this octet or beyond
    while True:
        if pos >= n:
            raise DnsError("name runs past its end")
        length = msg[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= n:
                raise DnsError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | msg[pos + 1]
            if target < HEADER.size or target >= floor:
                raise DnsError(f"compression pointer at {pos} to {target} does not point backwards")
            pointers += 1
            if pointers > MAX_POINTERS:
                raise DnsError("too many compression pointers in one name")
            if end is None:
                end = pos + 2
            pos = floor = target
            continue
        if kind:
            raise DnsError(f"label type {kind:#x} is not supported")
        wire_len += length + 1
        if wire_len > MAX_NAME:
            raise DnsError("name longer than 255 octets")
        if length == 0:
            if end is None:
                end = pos + 1
            break
        if pos + 1 + length > n:
            raise DnsError("label runs past its end")
        labels.append(_label_text(msg[pos + 1:pos + 1 + length]))
        pos += 1 + length
    return (".".join(labels) if labels else "."), end


def _label_text(raw: bytes) -> str:
    """A label in presentation form: lower case ASCII; dots, backslashes and non-printables as \\DDD."""
    out = []
    for b in raw:
        if 0x41 <= b <= 0x5A:
            out.append(chr(b + 0x20))
        elif 0x21 <= b <= 0x7E and b not in (0x2E, 0x5C):
            out.append(chr(b))
        else:
            out.append("\\%03d" % b)
    return "".join(out)


def _read_question(msg: bytes, pos: int) -> tuple[Question, int]:
    name, pos = _read_name(msg, pos)
    if pos + Q_FIXED.size > len(msg):
        raise DnsError("truncated question")
    qtype, qclass = Q_FIXED.unpack_from(msg, pos)
    return Question(name, qtype, qclass), pos + Q_FIXED.size


def _read_record(msg: bytes, pos: int) -> tuple[Record, int]:
    name, pos = _read_name(msg, pos)
    if pos + RR_FIXED.size > len(msg):
        raise DnsError("truncated resource record")
    rtype, rclass, ttl, rdlength = RR_FIXED.unpack_from(msg, pos)
    pos += RR_FIXED.size
    end = pos + rdlength
    if end > len(msg):
        raise DnsError("record data runs past the end of the message")
    if ttl > TTL_MAX:
        ttl = 0
    data: Union[ipaddress.IPv4Address, ipaddress.IPv6Address, str, bytes]
    if rtype == TYPE_A and rclass == CLASS_IN:
        if rdlength != 4:
            raise DnsError(f"A record with {rdlength} bytes of data")
        data = ipaddress.IPv4Address(msg[pos:end])
    elif rtype == TYPE_AAAA and rclass == CLASS_IN:
        if rdlength != 16:
            raise DnsError(f"AAAA record with {rdlength} bytes of data")
        data = ipaddress.IPv6Address(msg[pos:end])
    elif rtype in (TYPE_CNAME, TYPE_PTR):
        # The name must fill RDATA exactly; pointers may reach back anywhere before it.
        data, after = _read_name(msg, pos, limit=end)
        if after != end:
            raise DnsError(f"{'CNAME' if rtype == TYPE_CNAME else 'PTR'} data longer than its name")
    else:
        data = bytes(msg[pos:end])
    return Record(name, rtype, rclass, ttl, data), end


def parse_message(msg: bytes) -> Message:
    """Parses any DNS message (query or response) strictly; raises DnsError on anything malformed."""
    if not isinstance(msg, (bytes, bytearray, memoryview)):
        raise DnsError("a DNS message is bytes")
    msg = bytes(msg)
    if len(msg) < HEADER.size:
        raise DnsError(f"message of {len(msg)} bytes is shorter than the header")
    if len(msg) > MAX_MESSAGE:
        raise DnsError("message longer than 65535 bytes")
    ident, flags, qd, an, ns, ar = HEADER.unpack_from(msg)
    # Cheap sanity first: a question takes at least 5 bytes, a record at least 11.
    if qd * 5 + (an + ns + ar) * 11 > len(msg) - HEADER.size:
        raise DnsError("section counts exceed what the message can hold")
    pos = HEADER.size
    questions = []
    for _ in range(qd):
        q, pos = _read_question(msg, pos)
        questions.append(q)
    sections: list[list[Record]] = [[], [], []]
    for records, count in zip(sections, (an, ns, ar)):
        for _ in range(count):
            rr, pos = _read_record(msg, pos)
            records.append(rr)
    if pos != len(msg):
        raise DnsError(f"{len(msg) - pos} bytes after the last record")
    return Message(ident, flags, tuple(questions), tuple(sections[0]), tuple(sections[1]), tuple(sections[2]))


def parse_response(msg: bytes) -> Message:
    """A standard-query response with RCODE NOERROR (anything else raises DnsError)."""
    m = parse_message(msg)
    if not m.qr:
        raise DnsError("not a response (QR=0)")
    if m.opcode != OPCODE_QUERY:
        raise DnsError(f"opcode {m.opcode} is not QUERY")
    if m.rcode != RCODE_NOERROR:
        raise DnsError(f"RCODE {m.rcode}")
    return m


def parse_query(msg: bytes) -> Message:
    """A standard query with exactly one question (what stub resolvers send)."""
    m = parse_message(msg)
    if m.qr:
        raise DnsError("not a query (QR=1)")
    if m.opcode != OPCODE_QUERY:
        raise DnsError(f"opcode {m.opcode} is not QUERY")
    if len(m.questions) != 1:
        raise DnsError(f"{len(m.questions)} questions, expected 1")
    return m


def reverse_address(name: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    """The address a reverse-lookup name stands for (``4.3.2.1.in-addr.arpa`` -> 1.2.3.4, the 32-nibble
    ``ip6.arpa`` form -> an IPv6 address), or None if ``name`` is not a whole one."""
    labels = name.lower().rstrip(".").split(".")
    try:
        if labels[-2:] == ["in-addr", "arpa"] and len(labels) == 6:
            octets = labels[3::-1]
            if all(o.isdigit() and len(o) <= 3 and int(o) <= 255 for o in octets):
                return ipaddress.IPv4Address(".".join(str(int(o)) for o in octets))
        if labels[-2:] == ["ip6", "arpa"] and len(labels) == 34:
            nibbles = labels[31::-1]
            if all(len(n) == 1 and n in "0123456789abcdef" for n in nibbles):
                h = "".join(nibbles)
                return ipaddress.IPv6Address(":".join(h[i:i + 4] for i in range(0, 32, 4)))
    except ValueError:
        return None
    return None
