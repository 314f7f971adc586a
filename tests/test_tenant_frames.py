"""A hostile tenant's frames against the policy: checksum-offload requests that would have the NI
write 16 bits of a header its checks already read (a port, an address, an ARP sender), a rogue DHCP
server, a quarantine's release dropping the rest of the policy, and later IP fragments that overlap
their first fragment (under another IPv6 next header, behind IPv4 AH or IPv6 destination options)."""
from __future__ import annotations

import socket
import struct

import pytest

from nibench import A_MAC, B_MAC, setup_features
from nikit import A_IP, B_IP, eth, ipv4, policy, write_policy
from vdriver import VIRTIO_NET_HDR_F_NEEDS_CSUM, VirtioNetHdr
from vhostni.vhost_user import proto as vu

NO_OFFLOAD_RX = [vu.VIRTIO_NET_F_GUEST_CSUM, vu.VIRTIO_NET_F_GUEST_TSO4, vu.VIRTIO_NET_F_GUEST_TSO6]


def osum(data: bytes, s: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    for (w,) in struct.iter_unpack("!H", data):
        s += w
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ip4_csum(ip: bytes) -> bytes:
    """The IPv4 datagram with its header checksum set (a 20-byte header)."""
    ip = ip[:10] + b"\0\0" + ip[12:]
    return ip[:10] + struct.pack("!H", ~osum(ip[:20]) & 0xFFFF) + ip[12:]


def tcp4(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """A TCP segment with a correct checksum."""
    seg = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(seg))
    c = ~osum(seg, osum(pseudo)) & 0xFFFF
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def valid_tcp4(frame: bytes) -> bool:
    ip = frame[14:34]
    seg = frame[34:14 + struct.unpack("!H", ip[2:4])[0]]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(seg))
    return osum(ip) == 0xFFFF and osum(seg, osum(pseudo)) == 0xFFFF


def bench_with(make_bench, tmp_path, doc, b_features=None):
    pol = write_policy(str(tmp_path / "a.json"), doc)
    bench = make_bench(policies={"a": pol})
    a = bench.connect("a")
    b = bench.connect("b", **({"features": b_features} if b_features is not None else {}))
    a.post_rx_buffers(16, 2048)
    b.post_rx_buffers(16, 2048)
    bench.step()
    return bench, a, b


def test_partial_checksum_cannot_rewrite_a_port_after_the_prevent_rule(make_bench, tmp_path):
    """A "checksum" whose field is the TCP destination port: completed late, the prevent rule
    would see dport != 22 and the peer without GUEST_CSUM get dport 22 with a valid checksum (the
    guest precomputes the result).  Not being the TCP checksum field, it is completed at ingress,
    before the rule reads the frame, and the rule sees port 22."""
    doc = policy(mac=A_MAC, addresses=[A_IP + "/32"],
                 prevent=[{"direction": "from_guest", "proto": "tcp", "dport": 22}])
    bench, a, b = bench_with(make_bench, tmp_path, doc,
                             b_features=setup_features(exclude=NO_OFFLOAD_RX))
    # what the peer must end up with: dport 22, checksum valid
    seg = tcp4(A_IP, B_IP, 40000, 22, b"SSH-2.0-evil\r\n")
    final = eth(B_MAC, A_MAC, 0x0800, ip4_csum(ipv4(A_IP, B_IP, 6, seg)))
    assert valid_tcp4(final)
    dport_at = 14 + 20 + 2
    # the value the policy sees in the dport field: the switch computes
    # ~fold(sum(frame[dport_at:])) and stores it there; choose v0 so that gives 22
    rest = osum(final[dport_at + 2:])
    v0 = (0xFFFF - 22 - rest) % 0xFFFF
    sent = final[:dport_at] + struct.pack("!H", v0) + final[dport_at + 2:]
    assert (~osum(sent[dport_at:])) & 0xFFFF == 22 and v0 != 22
    a.send_frame(sent, VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
                                     csum_start=dport_at, csum_offset=0))
    got = bench.recv(b, 1)
    delivered = [f for _, f in got]
    dports = [struct.unpack("!H", f[36:38])[0] for f in delivered]
    assert 22 not in dports, (
        f"prevent rule dport 22 bypassed: policy saw dport {v0}, peer got {dports}, "
        f"checksum valid={[valid_tcp4(f) for f in delivered]}")


def osub(a: int, b: int) -> int:
    """a - b in one's complement 16-bit arithmetic."""
    return osum(struct.pack("!HH", a, ~b & 0xFFFF))


def test_partial_checksum_cannot_rewrite_the_source_address_after_anti_spoofing(make_bench, tmp_path):
    """The same against anti-spoofing: a "checksum" over the last 16 bits of the IPv6 source
    (two bytes of Ethernet padding steer the result to 3) would turn fd00::1, which the check
    saw, into fd00::3."""
    doc = policy(mac=A_MAC, addresses=["fd00::1/128"])
    bench, a, b = bench_with(make_bench, tmp_path, doc,
                             b_features=setup_features(exclude=NO_OFFLOAD_RX))
    forged_src, dst = "fd00::3", "fd00::2"
    seg = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + b"hello!"
    pseudo = (socket.inet_pton(socket.AF_INET6, forged_src) + socket.inet_pton(socket.AF_INET6, dst)
              + struct.pack("!IxxxB", len(seg), 6))
    seg = seg[:16] + struct.pack("!H", ~osum(seg, osum(pseudo)) & 0xFFFF) + seg[18:]
    ip6 = (struct.pack("!IHBB", 6 << 28, len(seg), 6, 64) + socket.inet_pton(socket.AF_INET6, forged_src)
           + socket.inet_pton(socket.AF_INET6, dst) + seg)
    at = 14 + 8 + 14                               # the source address's last 16 bits
    # padding word w such that ~fold(0x0001 + sum(rest) + w) == 0x0003
    body = eth(B_MAC, A_MAC, 0x86DD, ip6)
    s_rest = osum(body[at + 2:])
    w = osub(osub(~3 & 0xFFFF, 1), s_rest)
    final = body + struct.pack("!H", w)
    sent = final[:at] + struct.pack("!H", 1) + final[at + 2:]
    assert sent[22:38] == socket.inet_pton(socket.AF_INET6, "fd00::1")   # what anti-spoofing sees
    assert (~osum(sent[at:])) & 0xFFFF == 3
    a.send_frame(sent, VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=at, csum_offset=0))
    got = [f for _, f in bench.recv(b, 1)]
    srcs = [socket.inet_ntop(socket.AF_INET6, f[22:38]) for f in got]
    assert forged_src not in srcs, f"anti-spoofing bypassed: peer got a frame from {srcs}"



def test_partial_checksum_cannot_forge_the_sender_ip_of_an_arp_reply(make_bench, tmp_path):
    """ARP has no checksum at all: a "checksum" over the sender IP's last 16 bits, the
    padding chosen to make it 0x00fe, would teach b's ARP cache the gateway (10.0.0.254) at a's
    MAC after anti-spoofing saw 10.0.0.1."""
    doc = policy(mac=A_MAC, addresses=[A_IP + "/32"])
    bench, a, b = bench_with(make_bench, tmp_path, doc,
                             b_features=setup_features(exclude=NO_OFFLOAD_RX))
    arp = (struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + A_MAC + socket.inet_aton("10.0.0.254")
           + B_MAC + socket.inet_aton(B_IP))
    body = eth(B_MAC, A_MAC, 0x0806, arp) + b"\0" * 16
    at = 14 + 14 + 2                                # sender IP, bytes 3-4
    w = osub(osub(~0x00FE & 0xFFFF, struct.unpack("!H", socket.inet_aton(A_IP)[2:])[0]),
             osum(body[at + 2:]))
    final = body + struct.pack("!H", w)             # 60 bytes, the padding ends in w
    sent = final[:at] + socket.inet_aton(A_IP)[2:] + final[at + 2:]
    assert sent[28:32] == socket.inet_aton(A_IP) and (~osum(sent[at:])) & 0xFFFF == 0x00FE
    a.send_frame(sent, VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=at, csum_offset=0))
    got = [f for _, f in bench.recv(b, 1)]
    assert [socket.inet_ntoa(f[28:32]) for f in got] != ["10.0.0.254"], \
        "ARP anti-spoofing bypassed: b got an ARP reply for 10.0.0.254 at a's MAC"


def _dhcp_offer(server_ip: str, client_mac: bytes) -> bytes:
    """A BOOTREPLY (DHCPOFFER) naming the sender as router and DNS server."""
    ip = socket.inet_aton(server_ip)
    opts = (b"\x63\x82\x53\x63" + bytes([53, 1, 2]) + bytes([54, 4]) + ip + bytes([1, 4, 255, 255, 255, 0])
            + bytes([3, 4]) + ip + bytes([6, 4]) + ip + bytes([51, 4, 0, 1, 0x51, 0x80, 255]))
    return (struct.pack("!BBBBIHH", 2, 1, 6, 0, 0x1234, 0, 0) + b"\0" * 4
            + socket.inet_aton("10.0.0.2") + ip + b"\0" * 4 + client_mac.ljust(16, b"\0")
            + b"\0" * 192 + opts)


def test_guest_cannot_act_as_a_dhcp_server_when_it_cannot_send_router_advertisements(make_bench, tmp_path):
    """As Router Advertisements need [ni] ipv6_router, DHCP answers need [ni] dhcp_server:
    otherwise a guest makes itself its neighbours' gateway and resolver with a DHCPOFFER (UDP
    67 -> 68) or a DHCPv6 Advertise (547 -> 546) from its own address."""
    doc = policy(mac=A_MAC, addresses=[A_IP + "/32", "fd00::1/128"])
    bench, a, b = bench_with(make_bench, tmp_path, doc)
    bcast = b"\xff" * 6
    # RA from fd00::1: dropped (holds)
    ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    a.send_frame(eth(b"\x33\x33\x00\x00\x00\x01", A_MAC, 0x86DD,
                     struct.pack("!IHBB", 6 << 28, len(ra), 58, 255)
                     + socket.inet_pton(socket.AF_INET6, "fd00::1")
                     + socket.inet_pton(socket.AF_INET6, "ff02::1") + ra))
    assert bench.recv(b, 1, steps=10) == []
    assert bench.stats("a")["drop_spoofed"] == 1
    # DHCPOFFER from 10.0.0.1, broadcast: the NI passes it
    offer = eth(bcast, A_MAC, 0x0800, ip4_csum(ipv4(A_IP, "255.255.255.255", 17,
                                                     struct.pack("!HHHH", 67, 68, 8 + 300, 0)
                                                     + _dhcp_offer(A_IP, B_MAC).ljust(300, b"\0"))))
    a.send_frame(offer)
    got = [f for _, f in bench.recv(b, 1, steps=10)]
    assert got == [], "a guest's DHCP server reply (router/DNS = itself) reached its neighbour"
    # a DHCPv6 Advertise from fd00::1 to the clients' group
    body = struct.pack("!HHHH", 547, 546, 8 + 4, 0) + b"\x02\x00\x00\x01"
    adv = eth(b"\x33\x33\x00\x01\x00\x02", A_MAC, 0x86DD,
              struct.pack("!IHBB", 6 << 28, len(body), 17, 1)
              + socket.inet_pton(socket.AF_INET6, "fd00::1")
              + socket.inet_pton(socket.AF_INET6, "ff02::1:2") + body)
    a.send_frame(adv)
    assert bench.recv(b, 1, steps=10) == []
    st = bench.stats("a")
    assert st["drop_spoofed"] == 1 and st["drop_dhcp_answer"] == 2     # the RA; the two answers
    # a guest that is the network's DHCP server says so in its policy
    (tmp_path / "server").mkdir()
    bench, a, b = bench_with(make_bench, tmp_path / "server", dict(doc, ni=dict(doc["ni"], dhcp_server=True)))
    a.send_frame(offer)
    assert [f for _, f in bench.recv(b, 1, steps=10)] == [offer]


def test_releasing_quarantine_keeps_the_rest_of_the_policy(make_bench, tmp_path):
    """[ni] anti_spoof = false, guest_vlan = "drop", unparsed = "drop": after a quarantine and
    its release the policy is whole (its VLAN and unparsed handling, flows, signatures): only a
    policy that carried nothing but the isolation goes with it."""
    doc = {"ni": {"anti_spoof": False, "guest_vlan": "drop"}, "prevent": [], "scanner": []}
    bench, a, b = bench_with(make_bench, tmp_path, doc)
    tagged = eth(B_MAC, A_MAC, 0x0800, ipv4(A_IP, B_IP, 17, struct.pack("!HHHH", 1, 2, 8, 0)), vlan=5)
    mpls = eth(B_MAC, A_MAC, 0x8847, b"\x00\x01\x01\x40" + b"\x45" + b"\0" * 40)
    a.send_frame(tagged)
    a.send_frame(mpls)
    assert bench.recv(b, 2, steps=10) == []
    bench.daemon.quarantine("a", True, "test")        # or set_link("a", False) then True
    bench.daemon.quarantine("a", False)
    a.send_frame(tagged)
    a.send_frame(mpls)
    got = [f for _, f in bench.recv(b, 2, steps=10)]
    assert got == [], f"after quarantine was released, {len(got)} frame(s) the policy drops got through"


def test_partial_checksum_rewrite_also_reaches_peers_with_guest_csum_via_the_tcp_engine(make_bench, tmp_path):
    """With a TCP engine on the NI (here: a stream signature) partial TCP checksums are
    completed in place for every receiver, b with GUEST_CSUM too: a rewriting request must be
    refused before, at ingress."""
    rules = tmp_path / "t.rules"
    rules.write_text('drop tcp any any -> any any (msg:"x"; flow:to_server,established; '
                     'content:"NEVERSEEN"; sid:1; rev:1;)\n')
    pol = tmp_path / "a.toml"
    pol.write_text(f'[ni]\nmac = "02:00:00:00:0a:0a"\naddresses = ["{A_IP}/32"]\n'
                   f'[[prevent]]\ndirection = "from_guest"\nproto = "tcp"\ndport = 22\n'
                   f'[signatures]\nrules = ["{rules}"]\n')
    bench = make_bench(policies={"a": str(pol)})
    a = bench.connect("a")
    b = bench.connect("b")
    a.post_rx_buffers(16, 2048)
    b.post_rx_buffers(16, 2048)
    bench.step()
    seg = struct.pack("!HHIIBBHHH", 40000, 22, 1000, 0, 5 << 4, 0x02, 65535, 0, 0)
    pseudo = socket.inet_aton(A_IP) + socket.inet_aton(B_IP) + struct.pack("!BBH", 0, 6, len(seg))
    seg = seg[:16] + struct.pack("!H", ~osum(seg, osum(pseudo)) & 0xFFFF) + seg[18:]
    final = eth(B_MAC, A_MAC, 0x0800, ip4_csum(ipv4(A_IP, B_IP, 6, seg)))
    at = 36
    v0 = osub(~22 & 0xFFFF, osum(final[at + 2:]))
    sent = final[:at] + struct.pack("!H", v0) + final[at + 2:]
    assert (~osum(sent[at:])) & 0xFFFF == 22
    a.send_frame(sent, VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=at, csum_offset=0))
    got = bench.recv(b, 1, steps=20)
    dports = [(struct.unpack("!H", f[36:38])[0], h.flags) for h, f in got]
    assert not any(d == 22 for d, _ in dports), \
        f"SYN to port 22 delivered to a GUEST_CSUM peer (dport, virtio flags): {dports}; policy saw {v0}"


def test_ipv6_later_fragment_inside_the_tcp_header_is_refused_whatever_its_next_header(make_bench, tmp_path):
    """A later IPv6 fragment at offset < 20 could rewrite the TCP flags the first fragment
    showed; receivers take the first fragment's next header (RFC 8200 4.5), so the later one's
    own (here 17) must not exempt it."""
    doc = policy(mac=A_MAC, addresses=["fd00::1/128"],
                 prevent=[{"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn"}])
    bench, a, b = bench_with(make_bench, tmp_path, doc)
    src, dst = socket.inet_pton(socket.AF_INET6, "fd00::1"), socket.inet_pton(socket.AF_INET6, "fd00::2")

    def frag6(nh: int, off: int, more: int, data: bytes) -> bytes:
        fh = struct.pack("!BBHI", nh, 0, off | more, 0xABCD)
        return eth(B_MAC, A_MAC, 0x86DD, struct.pack("!IHBB", 6 << 28, 8 + len(data), 44, 64)
                   + src + dst + fh + data)
    tcph = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x10, 65535, 0, 0) + b"A" * 12
    a.send_frame(frag6(6, 0, 1, tcph))                       # ACK only: passes
    rewrite = struct.pack("!IBBHHH", 0, 5 << 4, 0x02, 65535, 0, 0) + b"B" * 12   # from offset 8
    a.send_frame(frag6(17, 8, 0, rewrite))                   # flags -> SYN
    got = [f for _, f in bench.recv(b, 2, steps=10)]
    assert len(got) < 2, "an IPv6 fragment overlapping the TCP header (nh=17) was forwarded"


def _frag_bench(make_bench, tmp_path, addresses):
    doc = policy(mac=A_MAC, addresses=addresses,
                 prevent=[{"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn"}])
    return bench_with(make_bench, tmp_path, doc)


def _tcp_hdr(flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, flags, 65535, 0, 0)


def test_ipv6_later_fragment_overlapping_a_tcp_header_behind_destination_options_is_refused(make_bench, tmp_path):
    """With 64 bytes of destination options in the fragmentable part the TCP header lies at
    64..84 of it: a later fragment at offset 64 rewrites its flags for a receiver that takes
    the newer copy, though it starts well past 20 bytes."""
    bench, a, b = _frag_bench(make_bench, tmp_path, ["fd00::1/128"])
    src, dst = socket.inet_pton(socket.AF_INET6, "fd00::1"), socket.inet_pton(socket.AF_INET6, "fd00::2")

    def frag6(nh: int, off: int, more: int, data: bytes) -> bytes:
        fh = struct.pack("!BBHI", nh, 0, off | more, 0x5EED)
        return eth(B_MAC, A_MAC, 0x86DD, struct.pack("!IHBB", 6 << 28, 8 + len(data), 44, 64)
                   + src + dst + fh + data)
    # destination options: next header TCP, 64 bytes (length 7), PadN filling it
    dstopts = bytes([6, 7, 1, 60]) + bytes(60)
    first = dstopts + _tcp_hdr(0x10) + b"A" * 16                 # carries 100 bytes
    a.send_frame(frag6(60, 0, 1, first))
    a.send_frame(frag6(6, 64, 0, _tcp_hdr(0x02) + b"B" * 8))     # rewrites the flags: SYN
    got = [f for _, f in bench.recv(b, 2, steps=10)]
    assert len(got) == 1, f"{len(got)} frames: the overlapping later fragment was forwarded"
    assert bench.stats("a")["drop_unparsed_fragment"] == 1
    # the same datagram fragmented honestly: the later piece starts where the first ended
    a.send_frame(frag6(60, 0, 1, dstopts + _tcp_hdr(0x10) + b"A" * 20))     # 104 bytes
    a.send_frame(frag6(6, 104, 0, b"C" * 16))
    assert len(bench.recv(b, 2, steps=10)) == 2


def test_ipv4_later_fragment_overlapping_a_tcp_header_behind_ah_is_refused(make_bench, tmp_path):
    """IPv4 AH (24 bytes) before TCP: the protocol field says 51, so 'a later TCP fragment at
    offset < 20' never applied; the overlap with the first fragment does."""
    bench, a, b = _frag_bench(make_bench, tmp_path, [f"{A_IP}/32"])

    def frag4(off: int, more: int, data: bytes) -> bytes:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(data), 0x4242, (more << 13) | (off // 8),
                         64, 51, 0, socket.inet_aton(A_IP), socket.inet_aton(B_IP))
        return eth(B_MAC, A_MAC, 0x0800, ip4_csum(ip) + data)
    ah = bytes([6, 4, 0, 0]) + struct.pack("!II", 0x1000, 1) + bytes(12)      # (4 + 2) * 4 = 24 bytes
    a.send_frame(frag4(0, 1, ah + _tcp_hdr(0x10) + b"A" * 20))              # 64 bytes
    a.send_frame(frag4(24, 0, _tcp_hdr(0x02) + b"B" * 4))                   # over the TCP header
    got = [f for _, f in bench.recv(b, 2, steps=10)]
    assert len(got) == 1, f"{len(got)} frames: the overlapping later fragment was forwarded"
    assert bench.stats("a")["drop_unparsed_fragment"] == 1
    a.send_frame(frag4(0, 1, ah + _tcp_hdr(0x10) + b"A" * 20))
    a.send_frame(frag4(64, 0, b"C" * 8))
    assert len(bench.recv(b, 2, steps=10)) == 2
