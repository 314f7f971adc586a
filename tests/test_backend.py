"""Functional tests of the vhostni backend against simulated virtio-net drivers.

Two (or three) drivers from tests/vdriver.py on NIs of one in-process ``Daemon``
(tests/nibench.py steps it: nothing moves behind the test's back), so a frame A puts on
its TX ring must come out of B's RX ring byte-exact, and interrupt/kick counts are exact.
"""
from __future__ import annotations

import socket
import struct

import pytest

from nibench import (
    A_MAC, B_MAC, BCAST, Bench, MiB, Request, SteppedFrontend, VirtioNetHdr, check_pair_works, ether,
    pattern, setup_features, vu,
)
from vdriver import (
    Chain, DEFAULT_PROTOCOL_FEATURES, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY,
)


def pair(bench: Bench, a_kw=None, b_kw=None, rx=32, rx_size=2048):
    a = bench.connect("a", **(a_kw or {}))
    b = bench.connect("b", **(b_kw or {}))
    if rx:
        a.post_rx_buffers(rx, rx_size)
        b.post_rx_buffers(rx, rx_size)
    bench.step()
    return a, b


# ---------------------------------------------------------------------------
# TX layouts
# ---------------------------------------------------------------------------

LAYOUTS = [
    pytest.param(dict(layout="combined"), id="combined"),
    pytest.param(dict(layout="separate"), id="header-own-descriptor"),
    pytest.param(dict(layout="split_header", header_pieces=(1, 5)), id="split-header"),
    pytest.param(dict(layout="scattered", chunk=100), id="several-descriptors"),
    pytest.param(dict(layout="scattered", chunk=16), id="many-small-descriptors"),
    pytest.param(dict(layout="separate", indirect=True), id="indirect"),
    pytest.param(dict(layout="scattered", chunk=16, indirect=True), id="indirect-many-small"),
    pytest.param(dict(layout="split_header", header_pieces=range(1, 12), indirect=True),
                 id="indirect-1-byte-header-pieces"),
]


@pytest.mark.parametrize("send_kw", LAYOUTS)
def test_frames_cross_both_ways_byte_exact(bench, send_kw):
    a, b = pair(bench)
    for i, (src, dst, s_mac, d_mac) in enumerate([(a, b, A_MAC, B_MAC), (b, a, B_MAC, A_MAC)] * 3):
        frame = ether(d_mac, s_mac, pattern(60 + 487 * i, seed=i))
        hdr, got = bench.send_recv(src, dst, frame, **send_kw)
        assert got == frame
        assert (hdr.flags, hdr.gso_type) == (0, VIRTIO_NET_HDR_GSO_NONE)
        assert hdr.num_buffers == -(-(12 + len(frame)) // 2048)
    for name, drv in (("a", a), ("b", b)):
        st = bench.stats(name)
        assert (st["in_frames"], st["out_frames"]) == (3, 3)
        assert bench.broken(name) is None
        assert drv.wait_tx_done(0)    # every TX buffer was given back


def test_largest_frame_and_a_long_scattered_chain(bench):
    """A 64 KiB frame over many descriptors in a 1024-entry ring, to a peer with mergeable buffers."""
    a, b = pair(bench, a_kw=dict(queue_size=1024), b_kw=dict(queue_size=1024), rx=0)
    b.post_rx_buffers(100, 1536)
    frame = ether(B_MAC, A_MAC, pattern(65550 - 14, seed=3))        # VN_MAX_FRAME
    hdr, got = bench.send_recv(a, b, frame, layout="scattered", chunk=97)
    assert got == frame
    assert hdr.num_buffers == -(-(len(frame) + 12) // 1536)
    # one byte more is refused at the sender and counted
    a.send_frame(frame + b"x", layout="scattered", chunk=97)
    bench.step(2)
    assert b.recv_frames(timeout=0) == []
    assert bench.stats("a")["drop_oversize"] == 1
    assert bench.broken("a") is None


def test_many_frames_wrap_the_rings(bench):
    a, b = pair(bench, a_kw=dict(queue_size=64), b_kw=dict(queue_size=64), rx=0)
    sent, received = [], []
    for i in range(300):            # > 65536/64: well, at least wraps both rings several times
        if len(b.queues[0].outstanding) < 8:
            b.post_rx_buffers(32, 2048)
        frame = ether(B_MAC, A_MAC, pattern(64 + i % 200, seed=i))
        sent.append(frame)
        a.send_frame(frame, layout="separate" if i % 2 else "combined", indirect=i % 3 == 0)
        if i % 5 == 4:
            received += [f for _, f in bench.recv(b, 5)]
    received += [f for _, f in bench.recv(b, len(sent) - len(received))]
    assert received == sent


# ---------------------------------------------------------------------------
# RX: mergeable and not
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [60, 244, 245, 1000, 1514, 9000])
def test_mergeable_rx_across_small_buffers(bench, size):
    a, b = pair(bench, rx=0)
    b.post_rx_buffers(64, 256)
    rxq = b.queues[0]
    before = rxq.used_idx()
    frame = ether(B_MAC, A_MAC, pattern(size - 14, seed=size))
    hdr, got = bench.send_recv(a, b, frame)
    assert got == frame
    expect = -(-(12 + size) // 256)
    assert hdr.num_buffers == expect
    assert (rxq.used_idx() - before) & 0xFFFF == expect
    # every buffer but the last is filled completely
    lens = [rxq.read_used_elem(before + i)[1] for i in range(expect)]
    assert lens[:-1] == [256] * (expect - 1) and sum(lens) == 12 + size


@pytest.mark.parametrize("legacy", [False, True], ids=["version1-12byte-hdr", "legacy-10byte-hdr"])
def test_non_mergeable_rx_one_big_chain(bench, legacy):
    drop = [vu.VIRTIO_NET_F_MRG_RXBUF] + ([vu.VIRTIO_F_VERSION_1] if legacy else [])
    feats = setup_features(exclude=drop)
    a, b = pair(bench, a_kw=dict(features=feats), b_kw=dict(features=feats), rx=0)
    hl = 10 if legacy else 12
    assert b.hdr_len == hl
    b.post_rx_buffers(4, 512, chain=4)                 # one receive buffer = 4 descriptors
    frame = ether(B_MAC, A_MAC, pattern(1800, seed=1))
    rxq = b.queues[0]
    hdr, got = bench.send_recv(a, b, frame)
    assert got == frame
    assert rxq.read_used_elem(0)[1] == hl + len(frame)
    if not legacy:
        assert hdr.num_buffers == 1
    # a frame bigger than one chain is dropped (not spread over chains), the buffer kept
    big = ether(B_MAC, A_MAC, pattern(2100, seed=2))
    a.send_frame(big)
    bench.step(3)
    assert b.recv_frames(timeout=0) == []
    assert bench.stats("b")["drop_oversize"] == 1
    hdr, got = bench.send_recv(a, b, frame)
    assert got == frame and rxq.used_idx() == 2


def test_rx_chain_with_legacy_split_header_buffer(bench):
    """Without ANY_LAYOUT a legacy driver puts the header in its own RX descriptor."""
    feats = setup_features(exclude=[vu.VIRTIO_NET_F_MRG_RXBUF, vu.VIRTIO_F_VERSION_1])
    a, b = pair(bench, a_kw=dict(features=feats), b_kw=dict(features=feats), rx=0)
    q = b.queues[0]
    hdr_buf, data_buf = b.arena.alloc(10), b.arena.alloc(1600)
    head = q.add_chain([(hdr_buf, 10, True), (data_buf, 1600, True)])
    q.make_available([head])
    q.kick()
    frame = ether(B_MAC, A_MAC, pattern(1000))
    _, got = bench.send_recv(a, b, frame)
    assert got == frame
    assert b.mem.read(hdr_buf, 10) == bytes(10)


# ---------------------------------------------------------------------------
# Notification suppression
# ---------------------------------------------------------------------------

def test_event_idx_rx_interrupts_honour_used_event(bench):
    a, b = pair(bench, rx=0)
    assert b.queues[0].event_idx
    rxq = b.queues[0]
    b.post_rx_buffers(32, 2048)
    bench.step()
    rxq.clear_call()
    calls = []
    # used_event = 4: interrupt when the used index moves past 4, i.e. with entry #5
    rxq.set_used_event(4)
    for i in range(8):
        a.send_frame(ether(B_MAC, A_MAC, pattern(100, seed=i)))
        bench.step(2)
        assert rxq.used_idx() == i + 1
        calls.append(rxq.clear_call())
    # (the first one after the ring was set up may be sent anyway: a spurious interrupt
    # is allowed, and vhost backends do that); then only when crossing used_event
    assert calls[1:] == [0, 0, 0, 1, 0, 0, 0] and calls[0] in (0, 1)
    st = bench.stats("b")
    assert st["calls_suppressed"] >= 6
    # the driver consumes and asks for the next one (what Linux does): every frame interrupts
    got = [f for _, f in b.recv_frames(timeout=0, count=8)]
    assert len(got) == 8
    for i in range(3):
        a.send_frame(ether(B_MAC, A_MAC, pattern(100, seed=i)))
        bench.step(2)
        assert rxq.clear_call() == 1
        assert len(b.recv_frames(timeout=0)) == 1


def test_event_idx_tx_interrupts_honour_used_event(bench):
    a, b = pair(bench)
    txq = a.queues[1]
    a.send_frame(ether(B_MAC, A_MAC, pattern(100)))
    bench.step(2)
    assert bench.recv(b, 1)
    a.reclaim_tx()
    txq.clear_call()
    target = (txq.used_idx() + 3) & 0xFFFF     # interrupt when used idx moves past this
    got = []
    for i in range(6):
        a.send_frame(ether(B_MAC, A_MAC, pattern(100, seed=i)))   # reclaims: rewrites used_event
        txq.set_used_event(target)
        bench.step(2)
        got.append(txq.clear_call())
    assert got == [0, 0, 0, 1, 0, 0]


def test_no_interrupt_flag_without_event_idx(bench):
    feats = setup_features(exclude=[vu.VIRTIO_RING_F_EVENT_IDX])
    a, b = pair(bench, a_kw=dict(features=feats), b_kw=dict(features=feats))
    rxq = b.queues[0]
    assert not rxq.event_idx
    rxq.clear_call()
    rxq.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    before = bench.stats("b")
    for i in range(3):
        a.send_frame(ether(B_MAC, A_MAC, pattern(90, seed=i)))
        bench.step(2)
    assert rxq.used_idx() == 3
    assert rxq.clear_call() == 0
    after = bench.stats("b")
    assert after["calls"] == before["calls"]
    assert after["calls_suppressed"] - before["calls_suppressed"] == 3
    rxq.set_avail_flags(0)
    a.send_frame(ether(B_MAC, A_MAC, pattern(90, seed=9)))
    bench.step(2)
    assert rxq.clear_call() == 1
    assert len(b.recv_frames(timeout=0, count=4)) == 4


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-notify-flag"])
def test_tx_kicks_suppressed_while_the_backend_is_busy(make_bench, event_idx):
    """More frames than one pass forwards: between passes the backend leaves notifications
    off (avail_event behind / VRING_USED_F_NO_NOTIFY), so the driver does not kick, and the
    backend still forwards everything; once drained it asks for kicks again."""
    bench = make_bench()
    feats = setup_features(exclude=[] if event_idx else [vu.VIRTIO_RING_F_EVENT_IDX])
    a = bench.connect("a", features=feats, queue_size=512)
    b = bench.connect("b", features=feats, queue_size=512)
    b.post_rx_buffers(400, 256, kick=False)
    txq = a.queues[1]
    frames = [ether(B_MAC, A_MAC, pattern(80, seed=i)) for i in range(300)]
    for f in frames:
        a.send_frame(f, layout="combined", kick=False)
    # no step since setup: the TX ring is still marked active; exactly one pass
    bench.service()
    done = txq.used_idx()
    assert 0 < done < 300, done
    if event_idx:
        assert txq.avail_event() != txq.avail_idx
    else:
        assert txq.used_flags() & VIRTQ_USED_F_NO_NOTIFY
    extra = ether(B_MAC, A_MAC, pattern(80, seed=999))
    a.send_frame(extra, layout="combined", kick=False)
    assert txq.kick() is False            # the backend said: do not kick me
    frames.append(extra)
    bench.service()
    bench.step(2)
    assert txq.used_idx() == 301
    assert [f for _, f in bench.recv(b, 301)] == frames
    # drained: notifications are back on, the next frame kicks
    if event_idx:
        assert txq.avail_event() == txq.avail_idx
    else:
        assert not txq.used_flags() & VIRTQ_USED_F_NO_NOTIFY
    a.reclaim_tx()
    a.send_frame(ether(B_MAC, A_MAC, pattern(80)), kick=False)
    assert txq.kick() is True


def test_event_idx_kick_once_for_several_frames(bench):
    a, b = pair(bench)
    txq = a.queues[1]
    kicks_before = bench.stats("a")["kicks"]
    frames = [ether(B_MAC, A_MAC, pattern(70, seed=i)) for i in range(5)]
    kicked = []
    for f in frames:
        a.send_frame(f, kick=False)
        kicked.append(txq.kick())
    # the backend armed avail_event for the first new entry only
    assert kicked == [True, False, False, False, False]
    assert [f for _, f in bench.recv(b, 5)] == frames
    assert bench.stats("a")["kicks"] - kicks_before == 1


def set_ring_indices(drv, value):
    """Stop drv's rings and restart them with every index at ``value`` (as after 65k frames)."""
    drv.stop()
    for q in drv.queues:
        q.avail_idx = q.kicked_idx = q.last_used = value
        q.set_avail_idx(value)
        q.mem.write_u16(q.used + 2, value)
        if q.event_idx:
            q.set_used_event(value)
    drv.start_queues([value] * len(drv.queues))


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_ring_indices_wrap_at_65536(bench, event_idx):
    feats = setup_features(exclude=[] if event_idx else [vu.VIRTIO_RING_F_EVENT_IDX])
    a, b = pair(bench, a_kw=dict(features=feats, queue_size=64), b_kw=dict(features=feats, queue_size=64), rx=0)
    set_ring_indices(a, 0xFFF0)
    set_ring_indices(b, 0xFFF5)
    a.post_rx_buffers(40, 2048)
    b.post_rx_buffers(40, 2048)
    for i in range(40):
        for src, dst, s_mac, d_mac in ((a, b, A_MAC, B_MAC), (b, a, B_MAC, A_MAC)):
            frame = ether(d_mac, s_mac, pattern(64 + i, seed=i))
            dst.queues[0].clear_call()
            _, got = bench.send_recv(src, dst, frame)
            assert got == frame
            assert dst.queues[0].clear_call() == 1      # the driver re-armed: every frame interrupts
    assert a.queues[1].used_idx() == (0xFFF0 + 40) & 0xFFFF
    assert b.queues[0].used_idx() == (0xFFF5 + 40) & 0xFFFF
    assert bench.broken("a") is None and bench.broken("b") is None


def test_legacy_and_modern_headers_meet(bench):
    """A legacy guest (10-byte header) and a modern one (12 bytes) exchange offloaded frames."""
    legacy = setup_features(exclude=[vu.VIRTIO_F_VERSION_1, vu.VIRTIO_NET_F_MRG_RXBUF])
    a, b = pair(bench, a_kw=dict(features=legacy), rx=0)
    assert (a.hdr_len, b.hdr_len) == (10, 12)
    a.post_rx_buffers(8, 8192)
    b.post_rx_buffers(16, 2048)
    frame = tcp_v4_frame(pattern(5000, seed=1))
    hdr, got = bench.send_recv(a, b, frame, vnet_hdr=tso_hdr(1448))
    assert got == frame
    assert (hdr.gso_type, hdr.gso_size, hdr.csum_start, hdr.csum_offset) == (VIRTIO_NET_HDR_GSO_TCPV4, 1448, 34, 16)
    assert hdr.num_buffers == 3
    back = tcp_v4_frame(pattern(3000, seed=2), dst=A_MAC, src=B_MAC)
    hdr, got = bench.send_recv(b, a, back, vnet_hdr=tso_hdr(1000))
    assert got == back and (hdr.gso_type, hdr.gso_size) == (VIRTIO_NET_HDR_GSO_TCPV4, 1000)


# ---------------------------------------------------------------------------
# Backlog
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_backlog_then_delivery_when_buffers_arrive(bench, event_idx):
    feats = setup_features(exclude=[] if event_idx else [vu.VIRTIO_RING_F_EVENT_IDX])
    a, b = pair(bench, a_kw=dict(features=feats), b_kw=dict(features=feats), rx=0)
    frames = [ether(B_MAC, A_MAC, pattern(100 + i, seed=i)) for i in range(5)]
    for f in frames:
        a.send_frame(f)
    bench.step(3)
    st = bench.stats("b")
    assert st["backlog_max"] == 5 and st["out_frames"] == 0
    assert a.wait_tx_done(0)           # the sender is not held up by a slow receiver
    rxq = b.queues[0]
    if event_idx:
        assert rxq.avail_event() == rxq.avail_idx   # "kick me when you post a buffer"
    else:
        assert not rxq.used_flags() & VIRTQ_USED_F_NO_NOTIFY
    kicks = bench.stats("b")["kicks"]
    b.post_rx_buffers(3, 2048, kick=False)
    assert rxq.kick() is True
    bench.step()
    assert bench.stats("b")["kicks"] == kicks + 1
    got = [f for _, f in bench.recv(b, 3)]
    assert got == frames[:3]
    b.post_rx_buffers(8, 2048)
    got += [f for _, f in bench.recv(b, 2)]
    assert got == frames
    assert bench.stats("b")["drop_no_rx_buffer"] == 0


def test_backlog_overflow_is_counted(bench):
    a, b = pair(bench, a_kw=dict(queue_size=512), rx=0)
    for i in range(300):
        a.send_frame(ether(B_MAC, A_MAC, pattern(64, seed=i)))
        if i % 100 == 99:
            bench.step(2)
    bench.step(3)
    st = bench.stats("b")
    assert st["backlog_max"] == 256
    assert st["drop_no_rx_buffer"] == 300 - 256
    b.post_rx_buffers(256, 256)
    got = bench.recv(b, 256, steps=300)
    assert len(got) == 256
    assert got[0][1] == ether(B_MAC, A_MAC, pattern(64, seed=0))


# ---------------------------------------------------------------------------
# Offloads: TSO and partial checksums
# ---------------------------------------------------------------------------

def inet_sum(data: bytes, start: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    s = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def inet_csum(data: bytes, start: int = 0) -> int:
    return ~inet_sum(data, start) & 0xFFFF


SRC_IP, DST_IP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


def tcp_v4_frame(payload: bytes, *, seq=1000, flags=0x18 | 0x01, ip_id=0x4321, partial=True,
                 dst=B_MAC, src=A_MAC) -> bytes:
    """Ether/IPv4/TCP as a Linux guest hands it to virtio-net with NEEDS_CSUM: IP checksum
    filled in, TCP checksum field holding the pseudo-header sum (not complemented)."""
    tcp_len = 20 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, ip_id, 0x4000, 64, 6, 0, SRC_IP, DST_IP)
    ip = ip[:10] + struct.pack("!H", inet_csum(ip)) + ip[12:]
    pseudo = SRC_IP + DST_IP + struct.pack("!BBH", 0, 6, tcp_len)
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, seq, 77, 5 << 4, flags, 65000, 0, 0)
    check = inet_sum(pseudo) if partial else inet_csum(pseudo + tcp + payload)
    tcp = tcp[:16] + struct.pack("!H", check) + tcp[18:]
    return ether(dst, src, ip + tcp + payload, ethertype=0x0800)


def check_ipv4_tcp(frame: bytes):
    """Asserts valid IPv4 and TCP checksums (own code and scapy); returns (ip_id, seq, flags, payload)."""
    ip = frame[14:34]
    assert inet_sum(ip) == 0xFFFF, "IPv4 header checksum"
    total = struct.unpack("!H", ip[2:4])[0]
    assert total == len(frame) - 14
    tcp = frame[34:]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
    assert inet_sum(pseudo + tcp) == 0xFFFF, "TCP checksum"
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    p = Ether(frame)
    ip_c, tcp_c = p[IP].chksum, p[TCP].chksum
    del p[IP].chksum
    del p[TCP].chksum
    q = Ether(bytes(p))
    assert (q[IP].chksum, q[TCP].chksum) == (ip_c, tcp_c)
    return (struct.unpack("!H", ip[4:6])[0], struct.unpack("!I", tcp[4:8])[0], tcp[13], tcp[20:])


def tso_hdr(mss: int, gso=VIRTIO_NET_HDR_GSO_TCPV4) -> VirtioNetHdr:
    return VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=gso, hdr_len=54, gso_size=mss,
                        csum_start=34, csum_offset=16)


NO_OFFLOAD_RX = [vu.VIRTIO_NET_F_GUEST_CSUM, vu.VIRTIO_NET_F_GUEST_TSO4, vu.VIRTIO_NET_F_GUEST_TSO6]


@pytest.mark.parametrize("payload_len,mss", [(3500, 1000), (4000, 1000), (1448 * 20 + 7, 1448), (500, 1000)])
def test_tso_segmented_for_a_peer_without_guest_tso(bench, payload_len, mss):
    a, b = pair(bench, b_kw=dict(features=setup_features(exclude=NO_OFFLOAD_RX)), rx=0)
    b.post_rx_buffers(64, 2048)
    payload = pattern(payload_len, seed=5)
    a.send_frame(tcp_v4_frame(payload, seq=0xFFFFF000), tso_hdr(mss))   # seq wraps
    n = -(-payload_len // mss)
    got = bench.recv(b, n)
    assert len(got) == n
    joined = b""
    for i, (hdr, frame) in enumerate(got):
        # no GUEST_CSUM: flags zero, no GSO (virtio 1.x 5.1.6.4.1), full checksums
        assert (hdr.flags, hdr.gso_type) == (0, VIRTIO_NET_HDR_GSO_NONE)
        ip_id, seq, flags, data = check_ipv4_tcp(frame)
        assert ip_id == 0x4321 + i
        assert seq == (0xFFFFF000 + i * mss) & 0xFFFFFFFF
        last = i == n - 1
        assert len(data) == (payload_len - i * mss if last else mss)
        assert flags == (0x18 | 0x01 if last else 0x10)    # PSH and FIN only on the last
        assert frame[:14] == tcp_v4_frame(b"")[:14]
        joined += data
    assert joined == payload
    assert bench.stats("b")["tso_segmented"] == 1


def tcp_v4_variant(payload: bytes, *, vlan=False, ip_opts=b"", tcp_opts=b"", flags=0x18, seq=1):
    """Like tcp_v4_frame (partial checksum), with an optional VLAN tag and IP/TCP options."""
    ihl, doff = 5 + len(ip_opts) // 4, 5 + len(tcp_opts) // 4
    tcp_len = doff * 4 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + tcp_len, 7, 0, 64, 6, 0, SRC_IP, DST_IP) + ip_opts
    ip = ip[:10] + struct.pack("!H", inet_csum(ip)) + ip[12:]
    pseudo = SRC_IP + DST_IP + struct.pack("!BBH", 0, 6, tcp_len)
    tcp = struct.pack("!HHIIBBHHH", 1234, 80, seq, 1, doff << 4, flags, 500, inet_sum(pseudo), 0) + tcp_opts
    l2 = B_MAC + A_MAC + (b"\x81\x00\x00\x05" if vlan else b"") + b"\x08\x00"
    return l2 + ip + tcp + payload, len(l2), ihl * 4, doff * 4


@pytest.mark.parametrize("vlan,ip_opts,tcp_opts,flags", [
    (True, b"", b"", 0x18),
    (False, b"\x01\x01\x01\x00", b"", 0x18),                              # NOP NOP NOP EOL
    (False, b"", b"\x01\x01\x08\x0a" + bytes(range(8)), 0x18),            # timestamps
    (True, b"\x94\x04\x00\x00", b"\x02\x04\x05\xb4", 0x80 | 0x18 | 0x01),   # CWR, FIN
])
def test_tso_segmentation_keeps_vlan_and_options(bench, vlan, ip_opts, tcp_opts, flags):
    a, b = pair(bench, b_kw=dict(features=setup_features(exclude=NO_OFFLOAD_RX)), rx=64)
    payload = pattern(2600, seed=11)
    frame, l3, iphl, tcphl = tcp_v4_variant(payload, vlan=vlan, ip_opts=ip_opts, tcp_opts=tcp_opts,
                                            flags=flags, seq=0xFFFFFFFF)
    hdrs = l3 + iphl + tcphl
    a.send_frame(frame, VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_TCPV4,
                                     hdr_len=hdrs, gso_size=1000, csum_start=l3 + iphl, csum_offset=16))
    got = bench.recv(b, 3)
    assert len(got) == 3
    data = b""
    for i, (hdr, f) in enumerate(got):
        assert hdr.flags == 0
        ip, tcp = f[l3:l3 + iphl], f[l3 + iphl:]
        assert f[:l3] == frame[:l3]
        assert ip[20:] == ip_opts and tcp[20:tcphl] == tcp_opts
        assert inet_sum(ip) == 0xFFFF
        assert struct.unpack("!H", ip[2:4])[0] == len(f) - l3
        assert inet_sum(ip[12:20] + struct.pack("!BBH", 0, 6, len(tcp)) + tcp) == 0xFFFF
        assert struct.unpack("!I", tcp[4:8])[0] == (0xFFFFFFFF + 1000 * i) & 0xFFFFFFFF
        want = flags & ~(0x80 if i else 0) & ~(0x09 if i < 2 else 0)   # CWR first only; FIN/PSH last only
        assert tcp[13] == want
        data += tcp[tcphl:]
    assert data == payload


def test_tso_with_tiny_mss_is_refused(bench):
    """gso_size 1 on a 64 KiB frame would ask for 60,000 segments: an MSS under 536 is
    refused at the source (drop_bad_offload), at once, and nothing reaches the receiver."""
    import time
    a, b = pair(bench, b_kw=dict(features=setup_features(exclude=NO_OFFLOAD_RX)), rx=64)
    payload = pattern(60000, seed=12)
    t0 = time.monotonic()
    a.send_frame(tcp_v4_frame(payload), tso_hdr(1))
    bench.step(2)
    assert time.monotonic() - t0 < 2
    assert bench.stats("a")["drop_bad_offload"] == 1
    assert bench.stats("b")["out_frames"] == 0
    assert b.recv_frames(timeout=0, count=100) == []
    # the smallest MSS accepted still segments correctly
    a.send_frame(tcp_v4_frame(payload[:2000]), tso_hdr(536))
    bench.step(2)
    got = b.recv_frames(timeout=1, count=4)
    assert [len(check_ipv4_tcp(f)[3]) for _, f in got] == [536, 536, 536, 392]
    assert bench.broken("a") is None and bench.broken("b") is None


def test_udp_checksum_that_computes_to_zero_is_sent_as_ffff(bench):
    a, b = pair(bench, b_kw=dict(features=setup_features(exclude=NO_OFFLOAD_RX)))
    body = bytearray(pattern(100, seed=13))
    udp_len = 8 + len(body)
    pseudo = SRC_IP + DST_IP + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", 53, 5353, udp_len, 0)
    body[-2:] = b"\0\0"
    s = inet_sum(pseudo + udp + bytes(body))
    body[-2:] = struct.pack("!H", 0xFFFF - s)                 # now the sum folds to 0xffff
    assert inet_csum(pseudo + udp + bytes(body)) == 0
    udp = udp[:6] + struct.pack("!H", inet_sum(pseudo))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, SRC_IP, DST_IP)
    ip = ip[:10] + struct.pack("!H", inet_csum(ip)) + ip[12:]
    frame = ether(B_MAC, A_MAC, ip + udp + bytes(body), ethertype=0x0800)
    hdr, got = bench.send_recv(a, b, frame, vnet_hdr=VirtioNetHdr(
        flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6))
    assert got[40:42] == b"\xff\xff"          # 0 would mean "no checksum" for UDP
    assert got[:40] == frame[:40] and got[42:] == frame[42:]


def test_tso_delivered_intact_to_a_peer_with_guest_tso(bench):
    a, b = pair(bench, rx=0)
    assert b.has(vu.VIRTIO_NET_F_GUEST_TSO4) and b.has(vu.VIRTIO_NET_F_GUEST_CSUM)
    b.post_rx_buffers(64, 2048)
    frame = tcp_v4_frame(pattern(6000, seed=2))
    hdr, got = bench.send_recv(a, b, frame, vnet_hdr=tso_hdr(1448))
    assert got == frame
    assert (hdr.flags, hdr.gso_type, hdr.gso_size, hdr.csum_start, hdr.csum_offset) == \
        (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 1448, 34, 16)
    assert hdr.num_buffers == -(-(12 + len(frame)) // 2048)
    assert bench.stats("b")["tso_segmented"] == 0


def test_tso_with_a_peer_that_has_guest_csum_only(bench):
    a, b = pair(bench, b_kw=dict(features=setup_features(
        exclude=[vu.VIRTIO_NET_F_GUEST_TSO4, vu.VIRTIO_NET_F_GUEST_TSO6])), rx=64)
    payload = pattern(3000, seed=4)
    a.send_frame(tcp_v4_frame(payload), tso_hdr(1400))
    got = bench.recv(b, 3)
    assert len(got) == 3
    assert b"".join(check_ipv4_tcp(f)[3] for _, f in got) == payload
    for hdr, _ in got:
        assert hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE
        assert hdr.flags in (0, VIRTIO_NET_HDR_F_DATA_VALID)


@pytest.mark.parametrize("length", [1, 100, 1459])
def test_partial_checksum_completed_for_a_peer_without_guest_csum(bench, length):
    a, b = pair(bench, b_kw=dict(features=setup_features(exclude=NO_OFFLOAD_RX)))
    frame = tcp_v4_frame(pattern(length, seed=length))
    hdr, got = bench.send_recv(a, b, frame, vnet_hdr=VirtioNetHdr(
        flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16))
    assert hdr.flags == 0 and hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE
    check_ipv4_tcp(got)
    assert got[:50] == frame[:50] and got[52:] == frame[52:]   # only the checksum changed
    assert got == tcp_v4_frame(pattern(length, seed=length), partial=False)
    assert bench.stats("b")["csum_completed"] == 1


def test_partial_checksum_passed_to_a_peer_with_guest_csum(bench):
    a, b = pair(bench)
    frame = tcp_v4_frame(pattern(300))
    hdr, got = bench.send_recv(a, b, frame, vnet_hdr=VirtioNetHdr(
        flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16))
    assert got == frame
    assert (hdr.flags, hdr.csum_start, hdr.csum_offset) == (VIRTIO_NET_HDR_F_NEEDS_CSUM, 34, 16)


def test_flooded_partial_checksum_reaches_each_peer_right(make_bench):
    """One partial-checksum frame flooded to a peer with GUEST_CSUM and one without."""
    bench = make_bench(("a", "b", "c"))
    a = bench.connect("a")
    b = bench.connect("b", features=setup_features(exclude=NO_OFFLOAD_RX))
    c = bench.connect("c")
    for d in (a, b, c):
        d.post_rx_buffers(8, 2048)
    frame = tcp_v4_frame(pattern(200), dst=BCAST)
    a.send_frame(frame, VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16))
    (hb, fb), = bench.recv(b, 1)
    (hc, fc), = bench.recv(c, 1)
    check_ipv4_tcp(fb)
    assert hb.flags == 0
    # c either got the partial checksum with NEEDS_CSUM, or a completed one
    if hc.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        assert fc == frame
    else:
        check_ipv4_tcp(fc)


def test_tso_ipv6(bench):
    a, b = pair(bench, b_kw=dict(features=setup_features(exclude=NO_OFFLOAD_RX)), rx=64)
    src6, dst6 = bytes(15) + b"\x01", bytes(15) + b"\x02"
    payload = pattern(2500, seed=6)
    tcp = struct.pack("!HHIIBBHHH", 1, 2, 5, 0, 5 << 4, 0x18, 100, 0, 0)
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, 20 + len(payload), 6, 64, src6, dst6)
    frame = ether(B_MAC, A_MAC, ip6 + tcp + payload, ethertype=0x86DD)
    a.send_frame(frame, VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_TCPV6,
                                     hdr_len=74, gso_size=1000, csum_start=54, csum_offset=16))
    got = bench.recv(b, 3)
    assert len(got) == 3
    data = b""
    for i, (_, f) in enumerate(got):
        seg_tcp = f[54:]
        assert struct.unpack("!H", f[18:20])[0] == len(seg_tcp)
        pseudo = f[22:54] + struct.pack("!IxxxB", len(seg_tcp), 6)
        assert inet_sum(pseudo + seg_tcp) == 0xFFFF
        assert struct.unpack("!I", seg_tcp[4:8])[0] == 5 + 1000 * i
        data += seg_tcp[20:]
    assert data == payload


# ---------------------------------------------------------------------------
# Guest memory layouts
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("shared_fd", [False, True], ids=["two-fds", "one-fd-two-offsets"])
def test_buffers_straddling_two_regions(bench, shared_fd):
    regions = [(0, 8 * MiB), (8 * MiB, 8 * MiB)]
    a, b = pair(bench, a_kw=dict(regions=regions, shared_fd=shared_fd),
                b_kw=dict(regions=regions, shared_fd=shared_fd), rx=0)
    edge = 8 * MiB
    # RX buffer across the boundary
    q = b.queues[0]
    head = q.add_chain([(edge - 700, 2048, True)])
    q.make_available([head])
    q.kick()
    # TX: the header itself straddles, then a frame across it in pieces
    frame = ether(B_MAC, A_MAC, pattern(1500, seed=7))
    hdr, got = bench.send_recv(a, b, frame, layout="combined", addr=edge - 5)
    assert got == frame
    assert b.mem.read(edge - 700 + 12, len(frame)) == frame
    # the other way, with the TX in an indirect table that itself straddles
    a_rx = a.queues[0]
    head = a_rx.add_chain([(edge - 3, 2048, True)])
    a_rx.make_available([head])
    a_rx.kick()
    txq = b.queues[1]
    table = edge - 16          # two 16-byte descriptors: one in each region
    data_at = edge + 4096
    data = VirtioNetHdr().pack(12) + ether(A_MAC, B_MAC, pattern(900, seed=8))
    b.mem.write(data_at, data)
    txq.write_desc(0, data_at, 12, 1, 1, table=table)
    txq.write_desc(1, data_at + 12, len(data) - 12, 0, 0, table=table)
    d = txq._take_descs(1)[0]
    txq.write_desc(d, table, 32, 4, 0)
    txq.outstanding[d] = Chain(d, [d], [(data_at, len(data), False)], [])
    txq.make_available([d])
    txq.kick()
    got = bench.recv(a, 1)
    assert got and got[0][1] == data[12:]


def test_region_above_a_hole(bench):
    regions = [(0, 4 * MiB), (1 << 32, 8 * MiB)]
    a, b = pair(bench, a_kw=dict(regions=regions), b_kw=dict(regions=regions), rx=0)
    high = (1 << 32) + 4 * MiB
    q = b.queues[0]
    head = q.add_chain([(high, 4096, True)])
    q.make_available([head])
    q.kick()
    frame = ether(B_MAC, A_MAC, pattern(3000, seed=9))
    _, got = bench.send_recv(a, b, frame, layout="scattered", chunk=700, addr=high + 8192)
    assert got == frame


# ---------------------------------------------------------------------------
# Stop, GET_VRING_BASE, reconnect
# ---------------------------------------------------------------------------

def reattach(bench: Bench, drv, name: str, bases) -> None:
    """A new connection for an existing guest (same memory and rings), as QEMU makes one."""
    drv.frontend.close()
    bench.control()           # the daemon sees EOF and forgets the old session
    drv.frontend = bench.frontend(name)
    drv.negotiate()
    drv.start_queues(bases)


@pytest.mark.parametrize("clean", [True, False], ids=["get-vring-base-then-reconnect", "abrupt-close"])
def test_get_vring_base_and_reconnect(bench, clean):
    a, b = pair(bench, rx=16)
    frames = [ether(B_MAC, A_MAC, pattern(100, seed=i)) for i in range(5)]
    for f in frames:
        a.send_frame(f)
    assert [f for _, f in bench.recv(b, 5)] == frames
    back = [ether(A_MAC, B_MAC, pattern(100, seed=50 + i)) for i in range(3)]
    for f in back:
        b.send_frame(f)
    assert [f for _, f in bench.recv(a, 3)] == back
    a.reclaim_tx()
    b.reclaim_tx()
    # two frames the backend has not seen yet (no kick): they must survive the reconnect
    pending = [ether(B_MAC, A_MAC, pattern(150, seed=70 + i)) for i in range(2)]
    for f in pending:
        a.send_frame(f, kick=False)
    if clean:
        bases_a, bases_b = a.stop(), b.stop()
        assert bases_a == [3, 5]       # RX buffers used, TX chains consumed
        assert bases_b == [5, 3]
        assert not bench.port("a").vring_started(1)
    else:
        bases_a = [q.used_idx() for q in a.queues]
        bases_b = [q.used_idx() for q in b.queues]
    reattach(bench, a, "a", bases_a)
    reattach(bench, b, "b", bases_b)
    assert bench.device("a").counters.sessions == 2
    # the rings go on from where they were: nothing replayed, nothing lost
    for q in (a.queues[0], b.queues[0], a.queues[1]):
        q.kick(force=True)
    assert [f for _, f in bench.recv(b, 2)] == pending
    check_pair_works(bench, a, b, seed=1)
    b.post_rx_buffers(20, 2048)
    more = [ether(B_MAC, A_MAC, pattern(200, seed=90 + i)) for i in range(20)]
    for f in more:
        a.send_frame(f)
    got = [f for _, f in bench.recv(b, 20)]
    assert got == more
    assert bench.broken("a") is None and bench.broken("b") is None


@pytest.mark.parametrize("order", ["close-then-connect", "connect-then-close"])
def test_reconnect_right_after_close_is_accepted(bench, order):
    """A frontend that closes its connection and connects again at once must get the new
    one, whichever of the two events the daemon sees first."""
    a, b = pair(bench)
    old = a.frontend.sock
    new = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if order == "close-then-connect":
        old.close()
        new.connect(bench.sock_path("a"))
    else:
        new.connect(bench.sock_path("a"))
        old.close()
    bench.control()
    fe = SteppedFrontend(new, bench)
    bench.frontends.append(fe)
    assert not fe.peer_closed(0.05), "the daemon refused the new connection"
    a.frontend = fe
    a.negotiate()
    a.start_queues([q.used_idx() for q in a.queues])
    assert bench.device("a").counters.sessions == 2
    check_pair_works(bench, a, b)


def test_rx_buffers_posted_before_the_ring_starts(bench):
    """A driver may fill its RX ring before the backend starts it (QEMU does)."""
    a = bench.connect("a")
    b = bench.connect("b")
    b.stop()
    b.post_rx_buffers(8, 2048, kick=False)
    bench.step()
    b.start_queues([0, 0])
    frame = ether(B_MAC, A_MAC, pattern(333))
    _, got = bench.send_recv(a, b, frame)
    assert got == frame


# ---------------------------------------------------------------------------
# Multi-queue, RARP, REPLY_ACK
# ---------------------------------------------------------------------------

def test_multiqueue_second_tx_queue_is_forwarded(bench):
    a = bench.connect("a", queue_pairs=2)
    b = bench.connect("b", queue_pairs=2)
    for d in (a, b):
        d.post_rx_buffers(32, 2048, queue=0)
        d.post_rx_buffers(32, 2048, queue=2)
    bench.step()
    for i in range(10):
        frame = ether(B_MAC, A_MAC, pattern(120, seed=i))
        a.send_frame(frame, queue=3 if i % 2 else 1)
        got = bench.recv(b, 1, queue=0) or bench.recv(b, 1, queue=2)
        if not got:
            got = b.recv_frames(timeout=0, queue=0) + b.recv_frames(timeout=0, queue=2)
        assert [f for _, f in got] == [frame]
    assert a.wait_tx_done(0, queue=1) and a.wait_tx_done(0, queue=3)
    # the other way, only on the second pair
    frame = ether(A_MAC, B_MAC, pattern(400))
    b.send_frame(frame, queue=3)
    bench.step(3)
    got = a.recv_frames(timeout=0, queue=0) + a.recv_frames(timeout=0, queue=2)
    assert [f for _, f in got] == [frame]
    assert bench.stats("a")["in_frames"] == 10


def test_multiqueue_disabled_pair_gets_nothing(bench):
    """Linux starts with one pair enabled (QEMU disables the others with SET_VRING_ENABLE 0):
    nothing may be delivered into a disabled pair's RX ring."""
    a = bench.connect("a", queue_pairs=2)
    b = bench.connect("b", queue_pairs=2)
    for q in (2, 3):
        b.set_vring_enable(q, False)
    b.post_rx_buffers(64, 2048, queue=0)
    b.post_rx_buffers(64, 2048, queue=2)
    for i in range(40):
        a.send_frame(tcp_v4_frame(pattern(10), partial=False)[:26] + bytes([10, 0, 0, i, 10, 0, 1, 1])
                     + tcp_v4_frame(pattern(10), partial=False)[34:])
    bench.step(5)
    assert len(b.recv_frames(timeout=0, queue=0, count=40)) == 40
    assert b.queues[2].used_idx() == 0


def test_ring_without_kick_fd_is_polled(bench):
    """SET_VRING_KICK with the no-fd flag: the frontend will not kick, the backend polls."""
    a, b = pair(bench)
    a.frontend.call(Request.SET_VRING_KICK, vu.VringFile(1, invalid=True))
    for i in range(3):
        frame = ether(B_MAC, A_MAC, pattern(90, seed=i))
        a.send_frame(frame, kick=False)
        got = bench.recv(b, 1, steps=5)
        assert got and got[0][1] == frame


def test_multiqueue_flows_spread_over_rx_queues(bench):
    a = bench.connect("a", queue_pairs=2)
    b = bench.connect("b", queue_pairs=2)
    b.post_rx_buffers(64, 2048, queue=0)
    b.post_rx_buffers(64, 2048, queue=2)
    for i in range(40):
        a.send_frame(tcp_v4_frame(pattern(10), partial=False)[:26] + bytes([10, 0, 0, i, 10, 0, 1, 1])
                     + tcp_v4_frame(pattern(10), partial=False)[34:])
    bench.step(5)
    n0 = len(b.recv_frames(timeout=0, queue=0, count=40))
    n2 = len(b.recv_frames(timeout=0, queue=2, count=40))
    assert n0 + n2 == 40
    assert n0 and n2


def test_send_rarp_broadcast_reaches_the_other_ni(bench):
    a, b = pair(bench, a_kw=dict(protocol_features=DEFAULT_PROTOCOL_FEATURES | vu.ProtocolFeature.RARP))
    mac = bytes.fromhex("52540012abcd")
    a.frontend.call(Request.SEND_RARP, vu.U64(int.from_bytes(mac + b"\0\0", "little")))
    got = bench.recv(b, 1)
    assert len(got) == 1
    _, f = got[0]
    assert f[:6] == BCAST and f[6:12] == mac and f[12:14] == b"\x80\x35"
    assert struct.unpack("!HHBBH", f[14:22]) == (1, 0x0800, 6, 4, 3)
    assert f[22:28] == mac and f[32:38] == mac
    assert a.recv_frames(timeout=0) == []     # not echoed to the guest that announced itself


def test_reply_ack(bench):
    # every setup message with NEED_REPLY gets an ack (the driver raises on a nack)
    a = bench.connect("a", ack_all=True)
    fe = a.frontend
    assert fe.protocol_features & vu.ProtocolFeature.REPLY_ACK
    reply = fe.call(Request.SET_VRING_ENABLE, vu.VringState(1, 1), need_reply=True)
    assert reply == vu.U64(0)
    # a refused request with NEED_REPLY gets a nack and the session goes on
    fe.send(Request.SET_VRING_NUM, vu.VringState(0, 100), need_reply=True)   # not a power of two
    header, body = fe.recv_reply()
    assert header.request == Request.SET_VRING_NUM and body == vu.U64(1)
    fe.send(Request.SET_VRING_BASE, vu.VringState(1, 0x10000), need_reply=True)
    assert fe.recv_reply()[1] == vu.U64(1)
    assert not fe.peer_closed(0.05)
    b = bench.connect("b")
    b.post_rx_buffers(8, 2048)
    a.post_rx_buffers(8, 2048)
    check_pair_works(bench, a, b)


def test_no_reply_without_reply_ack_negotiated(bench):
    a = bench.connect("a", protocol_features=vu.ProtocolFeature.MQ)
    fe = a.frontend
    assert not fe.protocol_features & vu.ProtocolFeature.REPLY_ACK
    fe.send(Request.SET_VRING_ENABLE, vu.VringState(1, 1), need_reply=True)
    fe.sock.settimeout(0.05)
    with pytest.raises(OSError):      # timeout: nothing to read
        fe.sock.recv(1)
    fe.sock.settimeout(2)
    assert fe.call(Request.GET_FEATURES).value == bench.device("a").features_offered


def test_without_protocol_features_rings_start_enabled(bench):
    feats = setup_features(exclude=[vu.VHOST_USER_F_PROTOCOL_FEATURES])
    a, b = pair(bench, a_kw=dict(features=feats), b_kw=dict(features=feats))
    check_pair_works(bench, a, b)


def test_stats_file_lists_every_ni(bench):
    a, b = pair(bench)
    check_pair_works(bench, a, b)
    st = bench.stats_json()
    assert set(st["nis"]) == {"a", "b"}
    for name in "ab":
        ni = st["nis"][name]
        assert ni["connected"] and ni["broken"] is None
        assert ni["in_frames"] == 1 and ni["out_frames"] == 1


def test_tap_uplink_frames_arrive_whole_after_their_virtio_net_header():
    """A TAP opened with IFF_VNET_HDR hands each frame after a 12-byte virtio-net header, in
    one read; the switch reads the two into their own fields (readv), and the frame arrives
    byte for byte, however long."""
    import os
    import time

    from vhostni import tap
    from vhostni.fastpath import Switch

    name = f"vnt{os.getpid() % 1000000}"
    with Switch() as sw:
        sw.add_tap_port(tap.open_tap(name), tap.VNET_HDR_LEN)
        sw.add_sink_port()
        frames = [b"\xff" * 6 + bytes.fromhex("02000000a001") + b"\x88\xb5" + bytes([n % 251]) * n
                  for n in (46, 1000, 1500)]
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((name, 0))
            for f in frames:
                s.send(f)
        got: list[bytes] = []
        end = time.monotonic() + 5
        while len(got) < len(frames) and time.monotonic() < end:
            sw.run(20)
            got += [f for _, f in sw.sink_frames() if f[12:14] == b"\x88\xb5"]
        assert got == frames


def test_a_frame_for_the_port_it_came_from_is_dropped_and_counted(bench):
    """A switch never sends a frame back out of the port it came in by; that drop counts."""
    a, b = pair(bench)
    a.send_frame(ether(BCAST, A_MAC, b"learn me"))       # A_MAC now sits behind a's port
    assert len(bench.recv(b, 1)) == 1
    a.send_frame(ether(A_MAC, A_MAC, b"to myself"))
    bench.step()
    assert bench.recv(b, 1, steps=10) == [] and bench.recv(a, 1, steps=10) == []
    assert bench.stats("a")["drop_same_port"] == 1


# ---------------------------------------------------------------------------
# Frames whose bytes past the first VN_COPY_HEAD (128) go from the sender's buffers
# straight into the receiver's (csrc/vring.c): every path that takes a frame whole
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("send_kw", [
    pytest.param(dict(), id="one-descriptor"),
    pytest.param(dict(layout="scattered", chunk=300), id="few-pieces"),
    pytest.param(dict(layout="scattered", chunk=60), id="more-pieces-than-kept"),
])
def test_long_frames_byte_exact_unicast_flooded_and_merged(make_bench, send_kw):
    bench = make_bench(("a", "b", "c"))
    a, b, c = (bench.connect(n) for n in "abc")
    a.post_rx_buffers(16, 2048)
    c.post_rx_buffers(16, 2048)
    b.post_rx_buffers(64, 256)          # merged buffers: a 1000-byte frame takes five
    bench.step()
    b.send_frame(ether(BCAST, B_MAC, b"learn me"))   # B_MAC sits behind b's port now
    assert len(bench.recv(a, 1)) == 1 and len(bench.recv(c, 1)) == 1
    for i, size in enumerate((129, 130, 700, 1000, 1500)):
        frame = ether(B_MAC, A_MAC, pattern(size, seed=i))
        hdr, got = bench.send_recv(a, b, frame, **send_kw)
        assert got == frame and hdr.num_buffers == -(-(12 + len(frame)) // 256)
    # flooded to b and c: read once into the switch, then to both
    frame = ether(BCAST, A_MAC, pattern(1200, seed=9))
    a.send_frame(frame, **send_kw)
    assert [f for _, f in bench.recv(b, 1)] == [frame]
    assert [f for _, f in bench.recv(c, 1)] == [frame]
    assert a.wait_tx_done(0)            # every TX buffer given back, once delivered
    assert bench.broken("a") is None and bench.broken("b") is None


def test_long_frames_wait_whole_in_the_backlog(bench):
    """No receive buffer: a long frame is taken whole into the backlog, and the sender gets
    its buffers back before the receiver posts any."""
    a, b = pair(bench, rx=0)
    frames = [ether(B_MAC, A_MAC, pattern(900 + 300 * i, seed=20 + i)) for i in range(3)]
    for f in frames:
        a.send_frame(f)
    bench.step(3)
    assert bench.stats("b")["backlog_max"] == 3
    assert a.wait_tx_done(0)
    for i in range(3):          # the sender reuses its buffers: the backlog has its own copy
        a.send_frame(ether(B_MAC, A_MAC, bytes(900)), layout="scattered", chunk=300)
    b.post_rx_buffers(32, 2048)
    got = [f for _, f in bench.recv(b, 6)]
    assert got[:3] == frames
