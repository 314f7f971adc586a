"""Just enough of Ethernet, IPv4, IPv6, UDP and TCP to find addresses, ports, TCP flags and UDP payloads in a
frame the NI handed over.  Frames are hostile: every length is checked against the bytes actually present, and
anything malformed raises :class:`PacketError` (a ValueError).

    p = parse_frame(frame_bytes)
    p.src, p.dst           # ipaddress.IPv4Address / IPv6Address
    p.proto                # 6 (TCP), 17 (UDP), ...
    p.sport, p.dport       # TCP/UDP ports
    p.tcp_flags            # TCP flag byte (0 for UDP)
    p.seq, p.ack           # TCP sequence and acknowledgement numbers (0 for UDP and ICMP)
    p.icmp_type, p.icmp_code   # ICMP / ICMPv6 (-1 for TCP and UDP)
    p.inner                # an ICMP error's quoted packet: (dst, proto, sport, dport) of the offending
                           # datagram (ports 0 if not quoted), or None
    p.payload              # UDP payload (bounded by the UDP length), TCP payload (bounded by the IP length)

Up to two VLAN tags (802.1Q, 802.1ad) are skipped.  IPv6 extension headers (hop-by-hop, routing, destination
options, fragment, AH) are walked to the transport header.  A fragment other than the first one has no
transport header, so it raises PacketError: the transport fields of a fragmented datagram come only from its
first fragment.  That error is a :class:`FragmentError` (with the addresses and the IP protocol), and so is
a first fragment too short to hold its whole TCP header: a scanner that cuts such a frame can say what it cut.
Checksums are not verified (the guest may leave them to offload).
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Optional, Union

__all__ = ["PacketError", "FragmentError", "Packet", "parse_frame", "PROTO_TCP", "PROTO_UDP",
           "PROTO_ICMP", "PROTO_ICMPV6",
           "TCP_FIN", "TCP_SYN", "TCP_RST", "TCP_PSH", "TCP_ACK"]

ETH_HLEN = 14
ETH_P_IPV4 = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_VLAN = (0x8100, 0x88A8)
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128
ICMP_UNREACHABLE = 3
ICMPV6_UNREACHABLE = 1
IPV6_EXT_HEADERS = {0, 43, 60}      # hop-by-hop, routing, destination options: (next, len in 8-octet units - 1)
IPV6_FRAGMENT = 44
IPV6_AH = 51
MAX_IPV6_EXT = 8

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10


class PacketError(ValueError):
    """A frame that is not a well-formed IPv4/IPv6 TCP or UDP packet."""


IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class FragmentError(PacketError):
    """An IP fragment without a usable transport header (a later fragment, or a first one cut inside the TCP
    header): what the NI's own parser let through only because it matched its datagram's first fragment."""

    def __init__(self, msg: str, src: IPAddress, dst: IPAddress, proto: int):
        super().__init__(msg)
        self.src, self.dst, self.proto = src, dst, proto


@dataclass(frozen=True)
class Packet:
    src: IPAddress
    dst: IPAddress
    proto: int
    sport: int
    dport: int
    tcp_flags: int
    payload: bytes
    seq: int = 0
    ack: int = 0
    icmp_type: int = -1
    icmp_code: int = -1
    inner: Optional[tuple] = None

    @property
    def is_tcp_syn(self) -> bool:
        """A connection request: SYN set, ACK clear (and no RST, which no stack sets together with SYN)."""
        return self.proto == PROTO_TCP and self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN

    @property
    def is_echo_request(self) -> bool:
        return ((self.proto == PROTO_ICMP and self.icmp_type == ICMP_ECHO_REQUEST)
                or (self.proto == PROTO_ICMPV6 and self.icmp_type == ICMPV6_ECHO_REQUEST))

    @property
    def is_unreachable(self) -> bool:
        """An ICMP destination-unreachable error that quotes the datagram it answers (``inner``)."""
        return self.inner is not None and (
            (self.proto == PROTO_ICMP and self.icmp_type == ICMP_UNREACHABLE)
            or (self.proto == PROTO_ICMPV6 and self.icmp_type == ICMPV6_UNREACHABLE))


def parse_frame(frame: bytes) -> Packet:
    """Parses an Ethernet frame down to its TCP or UDP header; raises PacketError for anything else."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise PacketError("a frame is bytes")
    frame = bytes(frame)
    if len(frame) < ETH_HLEN:
        raise PacketError(f"frame of {len(frame)} bytes is shorter than an Ethernet header")
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    pos = ETH_HLEN
    for _ in range(2):
        if ethertype not in ETH_P_VLAN:
            break
        if len(frame) < pos + 4:
            raise PacketError("truncated VLAN tag")
        ethertype = struct.unpack_from("!H", frame, pos + 2)[0]
        pos += 4
    if ethertype == ETH_P_IPV4:
        return _parse_ipv4(frame, pos)
    if ethertype == ETH_P_IPV6:
        return _parse_ipv6(frame, pos)
    raise PacketError(f"ethertype {ethertype:#06x} is not IPv4 or IPv6")


def _parse_ipv4(frame: bytes, pos: int) -> Packet:
    if len(frame) < pos + 20:
        raise PacketError("truncated IPv4 header")
    vihl = frame[pos]
    if vihl >> 4 != 4:
        raise PacketError(f"IP version {vihl >> 4} in an IPv4 frame")
    ihl = (vihl & 0xF) * 4
    if ihl < 20:
        raise PacketError(f"IPv4 header length {ihl}")
    total = struct.unpack_from("!H", frame, pos + 2)[0]
    if total < ihl or pos + total > len(frame):
        raise PacketError(f"IPv4 total length {total} does not fit the frame")
    frag = struct.unpack_from("!H", frame, pos + 6)[0]
    proto = frame[pos + 9]
    src = ipaddress.IPv4Address(frame[pos + 12:pos + 16])
    dst = ipaddress.IPv4Address(frame[pos + 16:pos + 20])
    if frag & 0x1FFF:
        raise FragmentError("IPv4 fragment without the transport header", src, dst, proto)
    # Ethernet padding after the datagram is not part of it.
    return _parse_transport(frame[pos + ihl:pos + total], proto, src, dst, fragment=bool(frag & 0x2000))


def _parse_ipv6(frame: bytes, pos: int) -> Packet:
    if len(frame) < pos + 40:
        raise PacketError("truncated IPv6 header")
    if frame[pos] >> 4 != 6:
        raise PacketError(f"IP version {frame[pos] >> 4} in an IPv6 frame")
    plen = struct.unpack_from("!H", frame, pos + 4)[0]
    if plen == 0:
        raise PacketError("IPv6 jumbograms are not supported")
    nxt = frame[pos + 6]
    src = ipaddress.IPv6Address(frame[pos + 8:pos + 24])
    dst = ipaddress.IPv6Address(frame[pos + 24:pos + 40])
    body = frame[pos + 40:pos + 40 + plen]
    if len(body) != plen:
        raise PacketError(f"IPv6 payload length {plen} does not fit the frame")
    off = 0
    fragment = False
    for _ in range(MAX_IPV6_EXT):
        if nxt in IPV6_EXT_HEADERS or nxt == IPV6_FRAGMENT or nxt == IPV6_AH:
            if len(body) < off + 8:
                raise PacketError("truncated IPv6 extension header")
            if nxt == IPV6_FRAGMENT:
                if struct.unpack_from("!H", body, off + 2)[0] & 0xFFF8:
                    raise FragmentError("IPv6 fragment without the transport header", src, dst, body[off])
                fragment = True
                hlen = 8
            elif nxt == IPV6_AH:
                hlen = (body[off + 1] + 2) * 4
            else:
                hlen = (body[off + 1] + 1) * 8
            nxt = body[off]
            off += hlen
            if off > len(body):
                raise PacketError("IPv6 extension header runs past the payload")
        else:
            break
    else:
        raise PacketError("too many IPv6 extension headers")
    return _parse_transport(body[off:], nxt, src, dst, fragment=fragment)


def _parse_transport(seg: bytes, proto: int, src: IPAddress, dst: IPAddress, fragment: bool = False) -> Packet:
    if proto == PROTO_TCP:
        if len(seg) < 20:
            if fragment:
                raise FragmentError("first fragment cut inside the TCP header", src, dst, proto)
            raise PacketError("truncated TCP header")
        sport, dport, seq, ack = struct.unpack_from("!HHII", seg, 0)
        doff = (seg[12] >> 4) * 4
        if doff < 20 or doff > len(seg):
            if fragment:
                raise FragmentError("first fragment cut inside the TCP options", src, dst, proto)
            raise PacketError(f"TCP data offset {doff} does not fit the segment")
        return Packet(src, dst, proto, sport, dport, seg[13], seg[doff:], seq, ack)
    if proto == PROTO_UDP:
        if len(seg) < 8:
            raise PacketError("truncated UDP header")
        sport, dport, ulen = struct.unpack_from("!HHH", seg, 0)
        if ulen < 8 or ulen > len(seg):
            raise PacketError(f"UDP length {ulen} does not fit the datagram")
        return Packet(src, dst, proto, sport, dport, 0, seg[8:ulen])
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        if len(seg) < 8:
            raise PacketError("truncated ICMP header")
        itype, code = seg[0], seg[1]
        inner = None
        if (proto, itype) in ((PROTO_ICMP, ICMP_UNREACHABLE), (PROTO_ICMPV6, ICMPV6_UNREACHABLE)):
            inner = _quoted(seg[8:], 4 if proto == PROTO_ICMP else 6)
        return Packet(src, dst, proto, 0, 0, 0, seg[8:], icmp_type=itype, icmp_code=code, inner=inner)
    raise PacketError(f"IP protocol {proto} is not TCP, UDP or ICMP")


def _quoted(q: bytes, version: int) -> Optional[tuple]:
    """(dst, proto, sport, dport) of the datagram an ICMP error quotes, or None if it is not there whole
    enough (ports are 0 when fewer than 4 bytes of the transport header are quoted)."""
    if version == 4:
        if len(q) < 20 or q[0] >> 4 != 4 or (q[0] & 0xF) < 5:
            return None
        ihl = (q[0] & 0xF) * 4
        proto, dst, rest = q[9], ipaddress.IPv4Address(q[16:20]), q[ihl:]
    else:
        if len(q) < 40 or q[0] >> 4 != 6:
            return None
        proto, dst, rest = q[6], ipaddress.IPv6Address(q[24:40]), q[40:]
    sport, dport = struct.unpack_from("!HH", rest, 0) if len(rest) >= 4 and proto in (PROTO_TCP, PROTO_UDP) \
        else (0, 0)
    return (dst, proto, sport, dport)
