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
import re
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


def _read_name(msg: bytes, pos: int, limit: Optional[int] = None,
               cache: Optional[dict] = None) -> tuple[str, int]:
    """The name at ``pos`` in presentation form (lower case, no trailing dot, the root as ".") and the offset
    just after it where it was found.  ``limit`` is where the name must end (a record's data).

    A compression pointer must point before the start of the labels read so far (so before the name's first
    octet, or before the last pointer's target): every jump moves strictly backwards, so no loops.

    ``cache`` (one dict per message) keeps what was read from each offset (see :func:`_name_at`), so a
    name that points into one read before costs a look-up, not a walk of its labels again.  Without it,
    a message of 4,000 records pointing at a 255-octet name cost 0.2 s (a guest's query over TCP too:
    ~2 us per byte, a core for 4 Mbit/s).
    """
    text, wire, pointers, top, end, _ = _name_at(msg, pos, {} if cache is None else cache)
    if limit is not None and top >= limit:
        raise DnsError("name runs past its end")
    return (text or "."), end


def _name_at(msg: bytes, pos: int, cache: dict) -> tuple[str, int, int, int, int, int]:
    """(text, wire octets, pointers, highest offset read, offset just after the name where it was found,
    target of the first pointer or -1) of the name read from ``pos`` on (text "" for the root).  Every
    offset read on the way that starts a label or a pointer is cached with the same for the name from
    there.  The name from an offset is the same whatever led there but for one thing: its first pointer
    must point before the floor of the name it is part of, which may be before that offset."""
    hit = cache.get(pos)
    if hit is not None:
        return hit
    n = len(msg)
    segments = []            # (label offsets, labels, label octets, pointer ending it and its target, or None)
    offs: list = []
    labels: list = []
    sizes: list = []
    wire = pointers = 0
    p = floor = pos          # no pointer may reach the floor or beyond
    while True:
        hit = cache.get(p)
        if hit is not None:                      # the rest was read before, from another name
            if hit[5] >= floor:                  # (its first pointer, read from here, must point below the floor)
                raise DnsError(f"compression pointer to {hit[5]} does not point backwards")
            segments.append((offs, labels, sizes, None))
            tail = hit
            break
        if p >= n:
            raise DnsError("name runs past its end")
        length = msg[p]
        kind = length & 0xC0
        if kind == 0xC0:
            if p + 1 >= n:
                raise DnsError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | msg[p + 1]
            if target < HEADER.size or target >= floor:
                raise DnsError(f"compression pointer at {p} to {target} does not point backwards")
            pointers += 1
            if pointers > MAX_POINTERS:
                raise DnsError("too many compression pointers in one name")
            segments.append((offs, labels, sizes, (p, target)))
            offs, labels, sizes = [], [], []
            p = floor = target
            continue
        if kind:
            raise DnsError(f"label type {kind:#x} is not supported")
        if length == 0:
            segments.append((offs, labels, sizes, None))
            tail = cache[p] = ("", 1, 0, p, p + 1, -1)
            break
        wire += length + 1
        if wire > MAX_NAME:
            raise DnsError("name longer than 255 octets")
        if p + 1 + length > n:
            raise DnsError("label runs past its end")
        offs.append(p)
        labels.append(_label_text(msg[p + 1:p + 1 + length]))
        sizes.append(length + 1)
        p += 1 + length
    text, w, ptrs, top, end, first = tail
    if wire + w > MAX_NAME:
        raise DnsError("name longer than 255 octets")
    if pointers + ptrs > MAX_POINTERS:
        raise DnsError("too many compression pointers in one name")
    # the name is whole and within bounds, so is the name from each offset on its way: cache them
    for offs, labels, sizes, pointer in reversed(segments):
        if pointer is not None:
            at, first = pointer
            ptrs += 1
            top = max(top, at + 1)
            end = at + 2
            cache[at] = (text, w, ptrs, top, end, first)
        for off, label, size in zip(reversed(offs), reversed(labels), reversed(sizes)):
            text = label + "." + text if text else label
            w += size
            top = max(top, off + size - 1)
            cache[off] = (text, w, ptrs, top, end, first)
    return cache[pos]


_PLAIN_LABEL = re.compile(rb"[\x21-\x2d\x2f-\x5b\x5d-\x7e]*")


def _label_text(raw: bytes) -> str:
    """A label in presentation form: lower case ASCII; dots, backslashes and non-printables as \\DDD."""
    if _PLAIN_LABEL.fullmatch(raw):
        return raw.decode("ascii").lower()        # (only A-Z change: the string is ASCII)
    out = []
    for b in raw:
        if 0x41 <= b <= 0x5A:
            out.append(chr(b + 0x20))
        elif 0x21 <= b <= 0x7E and b not in (0x2E, 0x5C):
            out.append(chr(b))
        else:
            out.append("\\%03d" % b)
    return "".join(out)


def _read_question(msg: bytes, pos: int, cache: Optional[dict] = None) -> tuple[Question, int]:
    name, pos = _read_name(msg, pos, cache=cache)
    if pos + Q_FIXED.size > len(msg):
        raise DnsError("truncated question")
    qtype, qclass = Q_FIXED.unpack_from(msg, pos)
    return Question(name, qtype, qclass), pos + Q_FIXED.size


def _read_record(msg: bytes, pos: int, cache: Optional[dict] = None) -> tuple[Record, int]:
    name, pos = _read_name(msg, pos, cache=cache)
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
        data, after = _read_name(msg, pos, limit=end, cache=cache)
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
    cache: dict = {}          # offset -> the name read from there (see _read_name)
    questions = []
    for _ in range(qd):
        q, pos = _read_question(msg, pos, cache)
        questions.append(q)
    sections: list[list[Record]] = [[], [], []]
    for records, count in zip(sections, (an, ns, ar)):
        for _ in range(count):
            rr, pos = _read_record(msg, pos, cache)
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
