"""The C stream reassembly engine (csrc/tcp.c) through simulated guests.

Guest a connects to guest b (port 25 unless a test says otherwise); a's NI carries stream
subscriptions installed straight into the fast path, and the test plays the NI kernel's
part (tests/tcpkit.py ``Engine``): it sees what a scanner would be handed, and passes or
kills.  Every test checks both sides of the promise: what the scanner side saw and what
the receiving guest got, so that the two can never disagree.

Ptacek & Newsham's insertion and evasion attacks map onto the rules tested here: a segment
the receiver would drop (bad checksum, outside its window, data on SYN or RST, ACK of
unsent data, beyond a FIN) is dropped by the NI too, so it cannot be *inserted* into the
scanners' view; data the receiver would take differently (conflicting overlaps in either
order, urgent data, overlapping fragments) is made unambiguous or dropped, so nothing *evades*
it; fragments are reassembled before inspection.
TTL-based insertion is not visible to us and needs no rule: the NI sits on the guest's
virtual NIC with no router between it and the guest, so every frame it sends the guest
arrives with the TTL it had; towards the network, a segment that expires on the way only
makes the remote receiver miss bytes the scanners saw, never see bytes they did not (the
first copy of a byte wins, and records stay until the receiver acknowledges them).
Stale-timestamp (PAWS) insertion is closed the receiver's way: an old TSval is dropped.
"""
from __future__ import annotations

import struct

import pytest

from nikit import time_limit
from tcpkit import ACK, FIN, PSH, RST, URG, Conn, Engine, checksum, segments
from vdriver import VirtioNetHdr
from vhostni._fastpath import lib as fplib

FROM, TO = 1, 2


@pytest.fixture(autouse=True)
def _limit():
    with time_limit(60, "the test"):
        yield


def opened(kit, **kw) -> tuple[Engine, Conn]:
    eng_kw = {k: kw.pop(k) for k in list(kw) if k in ("subs", "auto_pass") or k.startswith("tcp_")}
    e = Engine(kit, **eng_kw)
    c = Conn(kit, **kw)
    c.open()
    kit.step()
    return e, c


def payloads(segs) -> list[bytes]:
    return [s.payload for s in segs if s.payload]


# ---------------------------------------------------------------------------
# The stream interface
# ---------------------------------------------------------------------------

def test_new_connection_is_a_new_stream_with_its_five_tuple(kit):
    e, c = opened(kit)
    st = e.only()
    ev = st.event
    assert ev["what"] & fplib.VN_STREAM_OPEN
    assert (ev["client"], ev["guest_port"], ev["remote_port"], ev["family"]) == (FROM, 40000, 25, 4)
    assert ev["read"] == (1, 1) and ev["hold"] == (1, 1)
    assert e.flows() == 1
    assert kit.stats("a")["tcp_flows_opened"] == 1


def test_in_order_data_is_held_until_passed_and_a_boundary_inside_a_segment_waits(kit):
    e, c = opened(kit)
    f1, f2 = c.data("a", b"MAIL FROM:<x>\r\n"), c.data("a", b"RCPT TO:<y>\r\n")
    c.send("a", f1, f2)
    st = e.only()
    assert bytes(st.data[FROM]) == b"MAIL FROM:<x>\r\nRCPT TO:<y>\r\n"
    assert c.recv("b") == []                       # held
    e.pass_(FROM, 10)                              # inside the first segment: it waits
    assert c.recv("b") == []
    e.pass_(FROM, 20)                              # all of the first, part of the second
    assert payloads(c.recv("b", 1.0, 1)) == [b"MAIL FROM:<x>\r\n"]
    e.pass_(FROM, 28)
    assert payloads(c.recv("b", 1.0, 1)) == [b"RCPT TO:<y>\r\n"]
    st_ = kit.stats("a")
    assert (st_["tcp_held_segments"], st_["tcp_released_segments"]) == (2, 2)


def test_both_directions_and_acks_free_what_the_receiver_has(kit):
    e, c = opened(kit, auto_pass=True)
    c.send("a", c.data("a", b"EHLO a\r\n"))
    assert payloads(c.recv("b", 1.0, 1)) == [b"EHLO a\r\n"]
    assert e.bytes_kept() > 0                      # kept until b acknowledges it
    c.send("b", c.data("b", b"250 hi\r\n"))        # acknowledges a's bytes
    assert payloads(c.recv("a", 1.0, 1)) == [b"250 hi\r\n"]
    c.send("a", c.segment("a", ACK))               # a acknowledges b's
    kit.step()
    assert e.bytes_kept() == 0
    st = e.only()
    assert (bytes(st.data[FROM]), bytes(st.data[TO])) == (b"EHLO a\r\n", b"250 hi\r\n")


def test_read_only_subscription_forwards_at_once(kit):
    e, c = opened(kit, subs=((25, "both", False),))
    f = c.data("a", b"just looking")
    c.send("a", f)
    assert payloads(c.recv("b", 1.0, 1)) == [b"just looking"]
    assert bytes(e.only().data[FROM]) == b"just looking"
    assert e.only().event["hold"] == (0, 0)


def test_one_direction_subscription_leaves_the_other_alone(kit):
    e, c = opened(kit, subs=((25, "from_guest", True),))
    c.send("b", c.data("b", b"220 banner\r\n"))
    assert payloads(c.recv("a", 1.0, 1)) == [b"220 banner\r\n"]   # to_guest: not held
    assert bytes(e.only().data[TO]) == b""                         # nor read
    c.send("a", c.data("a", b"HELO"))
    assert c.recv("b") == []


def test_unsubscribed_port_is_not_tracked(kit):
    e = Engine(kit)
    c = Conn(kit, sport=80)
    c.open()
    c.send("a", c.data("a", b"GET / HTTP/1.0\r\n\r\n"))
    assert payloads(c.recv("b", 1.0, 1)) == [b"GET / HTTP/1.0\r\n\r\n"]
    assert e.flows() == 0 and e.streams == {}


def test_port_range_subscription_and_server_side_guest(kit):
    # a's guest is the server here: b connects to it
    e = Engine(kit, subs=(((8000, 8100), "both", True),))
    c = Conn(kit, client="b", server="a", cport=50000, sport=8080)
    c.open()
    kit.step()
    st = e.only()
    assert st.event["client"] == TO and st.event["guest_port"] == 8080
    c.send("b", c.data("b", b"request"))
    assert bytes(st.data[TO]) == b"request"
    assert c.recv("a") == []
    e.pass_(TO, 7)
    assert payloads(c.recv("a", 1.0, 1)) == [b"request"]


# ---------------------------------------------------------------------------
# Reassembly: order, gaps, retransmissions, overlaps
# ---------------------------------------------------------------------------

def test_out_of_order_segments_wait_for_the_gap(kit):
    e, c = opened(kit)
    f1 = c.data("a", b"0123456789")
    f2 = c.data("a", b"abcdefghij")
    f3 = c.data("a", b"KLMNOPQRST")
    c.send("a", f3, f2)
    st = e.only()
    assert bytes(st.data[FROM]) == b""             # nothing in order yet: gaps are not bridged
    e.pass_(FROM, 1 << 40)                          # even passed ahead, nothing beyond a gap goes
    assert c.recv("b") == []
    c.send("a", f1)
    assert bytes(st.data[FROM]) == b"0123456789abcdefghijKLMNOPQRST"
    assert payloads(c.recv("b", 1.0, 3)) == [b"0123456789", b"abcdefghij", b"KLMNOPQRST"]


def test_identical_retransmission_of_held_data_waits_for_the_held_copy(kit):
    e, c = opened(kit)
    f1 = c.data("a", b"hello world")
    c.send("a", f1, f1, f1)
    assert kit.stats("a")["tcp_retransmit"] == 2
    e.pass_(FROM, 11)
    assert payloads(c.recv("b", 1.0, 5)) == [b"hello world"]   # once
    # the receiver lost it (say): a retransmission of released, unacknowledged bytes goes on
    c.send("a", f1)
    assert payloads(c.recv("b", 1.0, 1)) == [b"hello world"]
    assert bytes(e.only().data[FROM]) == b"hello world"


def test_retransmission_with_new_bytes_is_accepted(kit):
    e, c = opened(kit, auto_pass=True)
    c.send("a", c.data("a", b"abcdef", off=0, advance=False))
    c.send("a", c.data("a", b"abcdefghijkl", off=0))            # same start, more bytes
    assert bytes(e.only().data[FROM]) == b"abcdefghijkl"
    got = b"".join(payloads(c.recv("b", 1.0, 2)))
    assert got == b"abcdef" + b"abcdefghijkl"                     # identical overlap is harmless


@pytest.mark.parametrize("order", ["first_then_later", "later_then_first"])
def test_conflicting_overlap_keeps_the_first_copy(kit, order):
    """Ptacek & Newsham: overlapping segments with different bytes, either order.  The NI
    keeps whichever it saw first and drops the other: scanner and receiver agree."""
    e, c = opened(kit)
    a = c.data("a", b"AAAAAAAAAA", off=0, advance=False)       # bytes 0-9
    b = c.data("a", b"BBBBBBBBBB", off=5, advance=False)       # bytes 5-14, overlapping 5-9
    c.ends["a"].sent = 15
    first, second = (a, b) if order == "first_then_later" else (b, a)
    c.send("a", first, second)
    st = e.only()
    assert kit.stats("a")["tcp_conflict"] == 1
    if order == "first_then_later":
        assert bytes(st.data[FROM]) == b"AAAAAAAAAA"            # b's bytes never arrive
        e.pass_(FROM, 10)
        assert payloads(c.recv("b", 1.0, 2)) == [b"AAAAAAAAAA"]
        c.send("a", c.data("a", b"CCCCC", off=10))               # the rest, consistent
        assert bytes(st.data[FROM]) == b"AAAAAAAAAACCCCC"
    else:
        assert bytes(st.data[FROM]) == b""                       # b waits beyond the gap
        c.send("a", c.data("a", b"AAAAA", off=0, advance=False))  # a consistent filler
        assert bytes(st.data[FROM]) == b"AAAAABBBBBBBBBB"
        e.pass_(FROM, 15)
        got = segments(kit.recv("b", 1.0, 2))
        assert sorted(s.payload for s in got) == [b"AAAAA", b"BBBBBBBBBB"]


def test_conflicting_copy_of_sent_but_unacknowledged_bytes_is_dropped(kit):
    """The receiver may not have taken bytes the NI sent on (lost, or refused by PAWS): a
    different copy of them must not reach it."""
    e, c = opened(kit, auto_pass=True)
    c.send("a", c.data("a", b"innocent", off=0))
    assert payloads(c.recv("b", 1.0, 1)) == [b"innocent"]
    c.send("a", c.data("a", b"EVIL!!!!", off=0, advance=False))
    assert c.recv("b") == []
    assert kit.stats("a")["tcp_conflict"] == 1
    # once b acknowledged the bytes, their records go; old data is then forwarded as is
    # (b drops a duplicate of bytes it has)
    c.send("b", c.segment("b", ACK))
    kit.step()
    assert e.bytes_kept() == 0
    c.send("a", c.data("a", b"whatever", off=0, advance=False))
    assert payloads(c.recv("b", 1.0, 1)) == [b"whatever"]
    assert bytes(e.only().data[FROM]) == b"innocent"


def test_overlap_spanning_several_segments(kit):
    e, c = opened(kit)
    parts = [c.data("a", bytes([65 + i]) * 4) for i in range(4)]   # AAAABBBBCCCCDDDD
    c.send("a", *parts)
    same = c.data("a", b"AABBBBCCCCDD", off=2, advance=False)
    differ = c.data("a", b"AABBXBCCCCDD", off=2, advance=False)
    c.send("a", same, differ)
    st_ = kit.stats("a")
    assert (st_["tcp_retransmit"], st_["tcp_conflict"]) == (1, 1)
    assert bytes(e.only().data[FROM]) == b"AAAABBBBCCCCDDDD"


# ---------------------------------------------------------------------------
# What the receiver would drop, the NI drops
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["tcp", "ip"])
def test_bad_checksum_is_dropped(kit, bad):
    e, c = opened(kit, auto_pass=True)
    kw = {"bad_tcp_csum": True} if bad == "tcp" else {"bad_ip_csum": True}
    c.send("a", c.data("a", b"XXXXXXXX", off=0, advance=False, **kw))
    assert c.recv("b") == [] and bytes(e.only().data[FROM]) == b""
    assert kit.stats("a")["tcp_bad_csum"] == 1
    c.send("a", c.data("a", b"goodgood", off=0))
    assert payloads(c.recv("b", 1.0, 1)) == [b"goodgood"]
    assert bytes(e.only().data[FROM]) == b"goodgood"


def test_checksums_of_long_and_odd_payloads(kit):
    """The engine's checksum check (vn_sum16 sums long runs 16 bytes a step in four sums, the
    rest 4 and then 2 bytes a step): every length and alignment around those steps, right sums
    pass and a sum off by one bit anywhere is dropped."""
    import random
    rng = random.Random(7)
    e, c = opened(kit, auto_pass=True)
    sent = b""
    for n in list(range(60, 72)) + list(range(75, 82)) + [127, 128, 129, 1000, 1459, 1460]:
        body = bytes(rng.getrandbits(8) for _ in range(n))
        c.send("a", c.data("a", body, advance=False, bad_tcp_csum=True))
        c.send("a", c.data("a", body))
        sent += body
    assert b"".join(payloads(c.recv("b", 1.0, 100))) == sent
    assert kit.stats("a")["tcp_bad_csum"] == 25


def test_data_beyond_the_receivers_window_is_dropped(kit):
    e, c = opened(kit, auto_pass=True, win=100)                 # b: 100 bytes of room
    c.send("a", c.data("a", b"x" * 101, off=0, advance=False))
    assert c.recv("b") == []
    assert kit.stats("a")["tcp_out_of_window"] == 1
    c.send("a", c.data("a", b"y" * 100, off=0))
    assert payloads(c.recv("b", 1.0, 1)) == [b"y" * 100]
    c.send("a", c.data("a", b"z", off=100, advance=False))       # b has not opened more
    assert c.recv("b") == [] and kit.stats("a")["tcp_out_of_window"] == 2


def test_window_scale_from_the_handshake(kit):
    e, c = opened(kit, auto_pass=True, cwscale=7, swscale=3, win=1000)
    # b's window: 1000 unscaled in its SYN-ACK, 1000 << 3 = 8000 bytes from its next segment
    c.send("a", c.data("a", b"w" * 1001, off=0, advance=False))
    assert c.recv("b") == [] and kit.stats("a")["tcp_out_of_window"] == 1
    c.send("b", c.segment("b", ACK))
    kit.step()
    c.send("a", c.data("a", b"w" * 7999, off=0))
    assert len(b"".join(payloads(c.recv("b", 1.0, 1)))) == 7999
    c.send("a", c.data("a", b"w" * 10, off=7999, advance=False))
    assert c.recv("b") == [] and kit.stats("a")["tcp_out_of_window"] == 2


def test_syn_with_data_is_dropped(kit):
    """Dropped rather than stripped: no stack we serve sends data on a SYN without TCP Fast
    Open, and a Fast Open client retries with a plain SYN."""
    e = Engine(kit)
    c = Conn(kit)
    c.send("a", c.syn(payload=b"data on SYN"))
    assert c.recv("b") == [] and kit.stats("a")["tcp_syn_data"] == 1
    assert e.flows() == 0
    c.send("a", c.syn())
    assert len(c.recv("b", 1.0, 1)) == 1 and e.flows() == 1
    c.send("b", c.synack(payload=b"and on SYN-ACK"))
    assert c.recv("a") == [] and kit.stats("a")["tcp_syn_data"] == 2


def test_removing_a_port_frees_its_flows_announced_or_not(kit):
    """A port going away ends every flow of its table: one still in its handshake (never
    announced: freed at once) and one announced (kept for its report).  The C code read
    the first after freeing it; `make test-sanitize` (ASan) caught that here."""
    e = Engine(kit)
    half_open = Conn(kit, cport=40001)
    half_open.send("a", half_open.syn())
    assert len(half_open.recv("b", 1.0, 1)) == 1
    c = Conn(kit)
    c.open()
    kit.step()
    c.send("a", c.data("a", b"held bytes"))
    assert bytes(e.only().data[FROM]) == b"held bytes"
    assert e.flows() == 2
    kit.daemon.remove_ni("a")
    kit.step()
    assert c.recv("b") == []                       # the held bytes went with the port


def test_rst_inside_the_window_resets_the_stream_and_drops_held_data(kit):
    e, c = opened(kit)
    c.send("a", c.data("a", b"held bytes"))
    st = e.only()
    assert bytes(st.data[FROM]) == b"held bytes"
    rst = c.segment("b", RST | ACK)
    c.send("b", rst)
    assert [s.flags & RST for s in c.recv("a", 1.0, 1)] == [RST]
    assert st.closed == fplib.VN_CLOSE_RST
    assert e.flows() == 0
    assert c.recv("b") == []                                    # the held bytes never go
    # a's further data has no connection any more: never forwarded unseen (the midstream
    # policy, reset by default, answers it with RSTs: tests below)
    c.send("a", c.data("a", b"after the reset"))
    assert payloads(c.recv("b")) == [] and kit.stats("a")["tcp_no_flow"] == 1


def test_rst_outside_the_window_and_rst_with_data_are_dropped(kit):
    e, c = opened(kit, auto_pass=True)
    far = c.segment("b", RST | ACK, seq=c.seq("b", 10_000_000))
    behind = c.segment("b", RST | ACK, seq=c.seq("b", 0) - 5000)
    with_data = c.segment("b", RST | ACK, payload=b"diagnostic text")
    c.send("b", far, behind, with_data)
    assert c.recv("a") == []
    st_ = kit.stats("a")
    assert (st_["tcp_rst_out_of_window"], st_["tcp_rst_data"]) == (2, 1)
    assert e.only().closed is None and e.flows() == 1
    c.send("a", c.data("a", b"still open"))
    assert payloads(c.recv("b", 1.0, 1)) == [b"still open"]


def test_urgent_data_stays_in_the_stream(kit):
    """Without SO_OOBINLINE a receiver takes the urgent byte out of the stream, where a
    scanner would still see it: the NI clears URG and the pointer (checksum fixed)."""
    e, c = opened(kit, auto_pass=True)
    c.send("a", c.data("a", b"abc!def", flags=ACK | PSH | URG, urg=4))
    got = c.recv("b", 1.0, 1)
    assert len(got) == 1 and got[0].payload == b"abc!def"
    assert not got[0].flags & URG and got[0].urg == 0 and got[0].csum_ok
    assert bytes(e.only().data[FROM]) == b"abc!def"
    assert kit.stats("a")["tcp_urg_cleared"] == 1


def test_ack_of_unsent_data_is_dropped_with_its_data(kit):
    e, c = opened(kit, auto_pass=True)
    c.send("a", c.data("a", b"sneaky", ack=c.seq("b", 5000)))
    assert c.recv("b") == [] and bytes(e.only().data[FROM]) == b""
    assert kit.stats("a")["tcp_out_of_window"] == 1


def test_data_without_handshake_or_after_fin_is_dropped(kit):
    e, c = opened(kit, auto_pass=True)
    c.send("a", c.data("a", b"bye", flags=ACK | FIN))
    assert [s.has(FIN) for s in c.recv("b", 1.0, 1)] == [True]
    c.send("a", c.data("a", b"more after FIN", off=3, advance=False))
    assert c.recv("b") == [] and kit.stats("a")["tcp_after_fin"] == 1
    # a connection the NI never saw start (established before the subscription)
    old = Conn(kit, cport=41000)
    c.send("a", old.data("a", b"mid-stream", off=5000))
    assert payloads(c.recv("b")) == [] and kit.stats("a")["tcp_no_flow"] == 1


# ---------------------------------------------------------------------------
# Connections picked up mid-stream ([ni] tcp_midstream): after a daemon restart, say
# ---------------------------------------------------------------------------

def midstream_conn(kit, **engine_keys):
    """An Engine over a's NI and a connection a -> b:25 it never saw open; a sends a data
    segment at offset 5000 acknowledging b's byte 7000."""
    e = Engine(kit, **engine_keys)
    c = Conn(kit)
    c.ends["a"].sent, c.ends["b"].sent = 5000, 7000
    return e, c


@pytest.mark.parametrize("client", ["a", "b"])
def test_midstream_reset_answers_both_ends_with_rsts_they_accept(kit, client):
    """The default (fail closed): instead of a black hole the sender retries into until it
    gives up, both ends get an RST at the exact point each expects (RFC 5961 stacks take
    only that), so applications see a reset at once.  Either end may send first."""
    e = Engine(kit)
    server = "b" if client == "a" else "a"
    c = Conn(kit, client=client, server=server)
    c.ends[client].sent, c.ends[server].sent = 5000, 7000
    frm, to = client, server
    seg = c.data(frm, b"resumed after a restart")
    c.send(frm, seg)
    got_to = c.recv(to, 1.0, 1)
    got_frm = c.recv(frm, 1.0, 1)
    # the receiver: an RST from the sender at the segment's sequence number
    assert [(s.flags, s.seq, s.ack, s.payload) for s in got_to] == \
        [(RST | ACK, c.seq(frm, 5000), c.seq(to, 7000), b"")]
    assert (got_to[0].sport, got_to[0].dport) == (c.ends[frm].port, c.ends[to].port) and got_to[0].csum_ok
    # the sender: an RST from its peer at the sender's own ACK, acknowledging the segment
    assert [(s.flags, s.seq, s.ack, s.payload) for s in got_frm] == \
        [(RST | ACK, c.seq(to, 7000), c.seq(frm, 5000 + 23), b"")]
    assert (got_frm[0].sport, got_frm[0].dport) == (c.ends[to].port, c.ends[frm].port) and got_frm[0].csum_ok
    st = kit.stats("a")
    assert (st["tcp_no_flow"], st["tcp_midstream_reset"], st["tcp_midstream_pass"]) == (1, 1, 0)
    assert e.flows() == 0 and e.streams == {}


def test_midstream_drop_is_the_old_black_hole(kit):
    e, c = midstream_conn(kit, tcp_midstream="drop")
    c.send("a", c.data("a", b"resumed"))
    assert c.recv("b") == [] and c.recv("a") == []
    st = kit.stats("a")
    assert (st["tcp_no_flow"], st["tcp_midstream_reset"], st["tcp_midstream_pass"]) == (1, 0, 0)


def test_midstream_pass_lets_the_connection_through_uninspected_counted_once(kit):
    e, c = midstream_conn(kit, tcp_midstream="pass")
    frames = [c.data("a", b"one"), c.data("a", b"two")]
    c.send("a", *frames)
    assert payloads(c.recv("b", 1.0, 2)) == [b"one", b"two"]
    c.send("b", c.data("b", b"reply"))
    assert payloads(c.recv("a", 1.0, 1)) == [b"reply"]
    st = kit.stats("a")
    assert (st["tcp_midstream_pass"], st["tcp_midstream_reset"]) == (1, 0)   # one connection
    assert e.streams == {} and e.flows() == 1                                 # bypassed: no stream
    # a new connection on the port is still inspected
    n = Conn(kit, cport=41000)
    n.open()
    kit.step()
    assert len(e.streams) == 1


@pytest.mark.parametrize("client", ["a", "b"])
def test_midstream_adopt_asks_the_receiver_and_inspects_from_where_it_stands(kit, client):
    """adopt: the first data segment is dropped and its receiver is asked where it stands (a
    bare ACK far behind its window, which a stack answers with its own ACK); that answer
    starts a stream, flagged mid-stream, at the byte each end expects next.  Either end may
    be the first to send, and the guest either client or server."""
    e = Engine(kit, tcp_midstream="adopt")
    server = "b" if client == "a" else "a"
    c = Conn(kit, client=client, server=server)
    c.ends[client].sent, c.ends[server].sent = 5000, 7000
    p, o = client, server                       # the prober (sends first) and the other end
    d_p = FROM if p == "a" else TO
    d_o = TO if d_p == FROM else FROM
    c.send(p, c.data(p, b"resumed", advance=False))
    probe = c.recv(o, 1.0, 1)
    assert [(s.flags, s.seq, s.ack, s.payload) for s in probe] == \
        [(ACK, (c.seq(p, 5000) - 0x40000000) & 0xFFFFFFFF, c.seq(o, 7000), b"")]
    assert probe[0].csum_ok and e.streams == {}
    assert kit.stats("a")["tcp_midstream_adopt"] == 1
    c.send(p, c.data(p, b"resumed", advance=False))              # retransmitted at once
    assert c.recv(o) == []                                       # dropped; no second probe yet
    # the other end's answer: where it stands (p's byte 5000), forwarded, and the stream opens
    c.send(o, c.segment(o, ACK, ack=c.seq(p, 5000)))
    assert [s.flags for s in c.recv(p, 1.0, 1)] == [ACK]
    st = e.only()
    assert st.event["midstream"] and st.event["hold"] == (1, 1)
    assert st.event["client"] == (FROM if client == "a" else TO)
    # the sender's retransmission is now inspected from offset 0, and held until passed
    c.send(p, c.data(p, b"resumed"))
    assert bytes(st.data[d_p]) == b"resumed" and c.recv(o) == []
    e.pass_(d_p, 7)
    assert payloads(c.recv(o, 1.0, 1)) == [b"resumed"]
    c.send(o, c.data(o, b"ok"))
    assert bytes(st.data[d_o]) == b"ok" and c.recv(p) == []
    e.pass_(d_o, 2)
    assert payloads(c.recv(p, 1.0, 1)) == [b"ok"]
    # windows: the scale was never seen, so the largest is assumed (no good byte dropped)
    c.send(p, c.data(p, b"far", off=5007 + 70000, advance=False))
    assert kit.stats("a")["tcp_out_of_window"] == 0
    # edits and `more` rewrite windows and sequence numbers: refused on an adopted stream
    lib = fplib
    assert e.cut(d_p, 7, 8) == lib.VN_ESTATE and e.more(d_p) == lib.VN_ESTATE


def test_midstream_adopt_without_an_answer_is_forgotten_and_rsts_end_it(kit):
    e, c = midstream_conn(kit, tcp_midstream="adopt")
    c.send("a", c.data("a", b"resumed", advance=False))
    assert len(c.recv("b", 1.0, 1)) == 1 and e.flows() == 1
    c.send("b", c.segment("b", RST | ACK, ack=c.seq("a", 5000)))   # b knows nothing of it
    assert [s.flags & RST for s in c.recv("a", 1.0, 1)] == [RST]
    assert e.flows() == 0 and e.streams == {}


def test_midstream_policy_key_is_validated():
    from vhostni.policy import PolicyError, parse_policy
    assert parse_policy({}).tcp_midstream == "reset"
    assert parse_policy({"ni": {"default_decision": "pass"}}).tcp_midstream == "pass"
    assert parse_policy({"ni": {"tcp_midstream": "drop"}}).tcp_midstream == "drop"
    assert parse_policy({"ni": {"tcp_midstream": "adopt"}}).tcp_midstream == "adopt"
    for bad in ("adopted", "RESET", 1, True):
        with pytest.raises(PolicyError):
            parse_policy({"ni": {"tcp_midstream": bad}})


def test_handshake_that_does_not_fit_is_dropped(kit):
    e = Engine(kit)
    c = Conn(kit)
    c.send("a", c.syn())
    assert len(c.recv("b", 1.0, 1)) == 1
    c.send("b", c.synack(ack=12345))                            # acknowledges another SYN
    assert c.recv("a") == [] and kit.stats("a")["tcp_bad_handshake"] == 1
    c.send("b", c.synack())
    assert len(c.recv("a", 1.0, 1)) == 1
    c.send("b", c.synack(seq=77))                                # a second, different ISN
    assert c.recv("a") == [] and kit.stats("a")["tcp_bad_handshake"] == 2
    c.send("a", c.data("a", b"early", ack=c.seq("b", 0) + 9))    # the final ACK must fit
    assert c.recv("b") == [] and kit.stats("a")["tcp_bad_handshake"] == 3
    assert e.streams == {}


def _ts(val: int, ecr: int = 0) -> bytes:
    return b"\x01\x01\x08\x0a" + struct.pack("!II", val, ecr)


def test_stale_timestamps_are_dropped_as_the_receiver_drops_them(kit):
    # PAWS: with timestamps on, a segment whose TSval is older than the sender's last
    # in-order one never reaches the receiver's stream, so it must not reach the scanners'
    e = Engine(kit, auto_pass=True)
    c = Conn(kit)
    a_isn, b_isn = c.ends["a"].isn, c.ends["b"].isn
    for frm, frame in (("a", c.segment("a", 0x02, seq=a_isn, ack=0, options=_ts(100))),
                       ("b", c.segment("b", 0x12, seq=b_isn, ack=c.seq("a", 0), options=_ts(5000, 100))),
                       ("a", c.segment("a", ACK, options=_ts(101, 5000)))):
        c.send(frm, frame)
        assert len(kit.recv(c.other(frm).name, 1.0, 1)) == 1
    kit.step()
    c.send("a", c.data("a", b"new", options=_ts(200, 5000)))
    assert payloads(c.recv("b", 1.0, 1)) == [b"new"]
    c.send("a", c.data("a", b"old", options=_ts(150, 5000)))     # stale: the receiver drops it
    assert c.recv("b", 0.3) == [] and bytes(e.only().data[FROM]) == b"new"
    assert kit.stats("a")["tcp_paws"] == 1
    c.send("a", c.data("a", b"NEW", off=3, options=_ts(201, 5000)))   # the fresh copy goes
    assert payloads(c.recv("b", 1.0, 1)) == [b"NEW"] and bytes(e.only().data[FROM]) == b"newNEW"
    # a connection without timestamps is not affected
    c2 = Conn(kit, cport=40001)
    c2.open()
    kit.step()
    c2.send("a", c2.data("a", b"plain"))
    assert payloads(c2.recv("b", 1.0, 1)) == [b"plain"]


# ---------------------------------------------------------------------------
# Fragments, TSO, IPv6, sequence wrap
# ---------------------------------------------------------------------------

def _ip_parts(frame: bytes) -> tuple[bool, bytes, bytes]:
    """(IPv4?, IP header, IP payload) of an Ethernet frame."""
    v4 = frame[12:14] == b"\x08\x00"
    if v4:
        ihl = (frame[14] & 15) * 4
        return True, frame[14:14 + ihl], frame[14 + ihl:14 + struct.unpack_from("!H", frame, 16)[0]]
    return False, frame[14:54], frame[54:54 + struct.unpack_from("!H", frame, 18)[0]]


def ip_fragment(frame: bytes, off: int, data: bytes, more: bool, ident: int = 7) -> bytes:
    """One IP fragment of ``frame``'s datagram: ``data`` at payload offset ``off``."""
    v4, hdr, _ = _ip_parts(frame)
    h = bytearray(hdr)
    if v4:
        struct.pack_into("!HHH", h, 2, len(h) + len(data), ident, (0x2000 if more else 0) | (off // 8))
        h[10:12] = b"\0\0"
        h[10:12] = struct.pack("!H", checksum(bytes(h)))
        return frame[:14] + bytes(h) + data
    nh, h[6] = h[6], 44
    struct.pack_into("!H", h, 4, 8 + len(data))
    return frame[:14] + bytes(h) + struct.pack("!BBHI", nh, 0, off | int(more), ident) + data


def fragments(frame: bytes, sizes, ident: int = 7, order=None) -> list[bytes]:
    """``frame``'s datagram as IP fragments of the payload ``sizes`` (multiples of 8; the
    rest in a last one), in ``order`` (indexes; default as cut)."""
    body = _ip_parts(frame)[2]
    cuts, off = [], 0
    for n in list(sizes) + [len(body)]:
        n = min(n, len(body) - off)
        if n > 0:
            cuts.append((off, n))
            off += n
    out = [ip_fragment(frame, o, body[o:o + n], k < len(cuts) - 1, ident) for k, (o, n) in enumerate(cuts)]
    return [out[i] for i in order] if order is not None else out


@pytest.mark.parametrize("family", [4, 6])
def test_fragmented_segment_is_reassembled_then_inspected_whole(kit, family):
    e, c = opened(kit, auto_pass=True, family=family)
    seg = c.data("a", bytes(range(100)))
    frs = fragments(seg, [32, 32], order=[2, 0, 1])       # out of order
    c.send("a", frs[0], frs[1])
    assert kit.recv("b", 0.3) == [] and bytes(e.only().data[FROM]) == b""    # not whole yet
    c.send("a", frs[2])
    assert bytes(e.only().data[FROM]) == bytes(range(100))
    got = c.recv("b", 1.0, 1)
    assert [s.payload for s in got] == [bytes(range(100))] and got[0].csum_ok
    assert kit.stats("a")["tcp_frag_reassembled"] == 1


def test_overlapping_fragments_drop_the_whole_datagram(kit):
    # Ptacek & Newsham: overlapping fragments with different bytes; the receiver could keep
    # either copy, so no copy goes, nor any later fragment of that datagram
    e, c = opened(kit, auto_pass=True)
    seg = c.data("a", b"A" * 64)
    frs = fragments(seg, [32, 24])                         # 0-32, 32-56, 56-84 of IP payload
    evil = ip_fragment(seg, 24, b"B" * 16, True)          # 24-40: across the first two
    c.send("a", frs[0], evil, frs[1], frs[2])
    assert kit.recv("b", 0.5) == [] and bytes(e.only().data[FROM]) == b""
    assert kit.stats("a")["tcp_frag_overlap"] >= 1
    # an identical duplicate is not an overlap: a new datagram with one goes through
    frs = fragments(c.data("a", b"C" * 64, off=0, advance=False), [32], ident=8)
    c.send("a", frs[0], frs[0], frs[1])
    assert [s.payload for s in c.recv("b", 1.0, 1)] == [b"C" * 64]


def test_a_fragment_alone_is_kept_not_forwarded_and_other_ports_are_normalised(kit):
    e, c = opened(kit, auto_pass=True)
    later = fragments(c.data("a", b"g" * 64, off=0, advance=False), [32])[1]
    c.send("a", later)
    assert kit.recv("b", 0.5) == []                      # alone it is nothing: kept, then expired
    other = Conn(kit, sport=80, cport=42000)
    frs = fragments(other.data("a", b"h" * 64, off=0), [32], ident=9)
    c.send("a", *frs)                                    # an unsubscribed port: one frame now
    got = segments(kit.recv("b", 1.0, 1))
    assert [s.payload for s in got] == [b"h" * 64] and got[0].dport == 80
    assert kit.stats("a")["tcp_frag_reassembled"] == 1


def test_a_whole_datagram_too_short_for_a_tcp_header_is_dropped_and_counted(kit):
    e, c = opened(kit, auto_pass=True)
    seg = c.data("a", b"x" * 64, off=0, advance=False)
    body = _ip_parts(seg)[2]
    # two 8-byte fragments: a whole datagram of 16 bytes, short of any TCP header
    frs = [ip_fragment(seg, 0, body[:8], True, 11), ip_fragment(seg, 8, body[8:16], False, 11)]
    c.send("a", *frs)
    assert kit.recv("b", 0.3) == []
    st = kit.stats("a")
    # the parser already refuses a first fragment that does not hold the whole TCP header
    # (RFC 7112), and a later one that starts inside it (RFC 1858): neither reaches reassembly
    assert st["drop_unparsed_fragment"] == 2 and st["tcp_frag_reassembled"] == 0


def test_frames_produced_past_the_emit_queue_are_dropped_and_counted(kit):
    """What the engine produces (a reassembled datagram, forged RSTs) waits in the switch's
    emit queue; a frame that finds it full is dropped and says so in drop_emit_queue_full,
    never silently.  The queue's limit is lowered (0 frames) to reach that path."""
    e, c = opened(kit, auto_pass=True)
    lib = fplib
    assert lib.vn_switch_set_emit_max(e.sw, lib.VN_EMIT_FRAMES + 1) == lib.VN_ERANGE
    assert lib.vn_switch_set_emit_max(e.sw, 0) == 0
    frs = fragments(c.data("a", b"y" * 64), [32])
    c.send("a", *frs)                                    # whole, but no room to send it on
    assert kit.recv("b", 0.3) == []
    st = kit.stats("a")
    assert st["drop_emit_queue_full"] == 1 and st["tcp_frag_reassembled"] == 1
    assert e.kill() == 0                                 # its RSTs find no room either
    assert kit.recv("a", 0.3) == [] and kit.recv("b", 0.3) == []
    assert kit.stats("a")["drop_emit_queue_full"] >= 3   # one RST each way at least
    assert kit.stats("a")["tcp_emit_dropped"] == 0       # not for want of an Ethernet header
    assert lib.vn_switch_set_emit_max(e.sw, lib.VN_EMIT_FRAMES) == 0   # the default
    d = Conn(kit, cport=40002)
    d.open()
    kit.step()
    d.send("a", *fragments(d.data("a", b"z" * 64), [32], ident=12))
    assert payloads(d.recv("b", 1.0, 1)) == [b"z" * 64]
    assert kit.stats("a")["tcp_frag_reassembled"] == 2


def test_a_release_larger_than_the_emit_queue_sends_what_fits_and_counts_the_rest(kit):
    """One pass releases three held segments into an emit queue with room for one: the
    first goes to the receiver, the other two are dropped and counted, and a retransmission
    of them (the sender never heard them acknowledged) goes through once there is room."""
    e, c = opened(kit)
    segs = [c.data("a", b"one "), c.data("a", b"two "), c.data("a", b"three ")]
    c.send("a", *segs)
    assert c.recv("b") == []                             # held
    assert fplib.vn_switch_set_emit_max(e.sw, 1) == 0
    e.pass_(FROM, 14)
    assert payloads(c.recv("b", 1.0, 1)) == [b"one "]
    assert c.recv("b", 0.3) == []
    assert kit.stats("a")["drop_emit_queue_full"] == 2
    assert fplib.vn_switch_set_emit_max(e.sw, fplib.VN_EMIT_FRAMES) == 0
    c.send("a", segs[1], segs[2])                        # resent: identical bytes, passed already
    assert payloads(c.recv("b", 1.0, 2)) == [b"two ", b"three "]


def test_reassembled_datagram_larger_than_a_frame_goes_as_tso(kit):
    e, c = opened(kit, auto_pass=True)
    body = bytes(range(256)) * 12                        # 3072 bytes
    frs = fragments(c.data("a", body), [1480, 1480])
    c.send("a", *frs)
    assert bytes(e.only().data[FROM]) == body
    got = c.recv("b", 1.0, 10)
    assert b"".join(s.payload for s in got) == body
    # cut into segments for a receiver without TSO; a TSO receiver takes it whole, its
    # checksum partial (the virtio header says so) as from a guest's own stack
    assert all(s.csum_ok for s in got if len(s.frame) <= 1514)


def test_tso_frame_is_one_segment_of_many_mss(kit):
    e, c = opened(kit, auto_pass=True)
    body = bytes(range(256)) * 40                               # 10240 bytes
    frame = c.data("a", body)
    # what a guest's TSO looks like: partial checksum (pseudo-header sum), gso_type set
    tcp_off = 34
    f = bytearray(frame)
    struct.pack_into("!H", f, tcp_off + 16, 0)
    seglen = len(f) - tcp_off
    pseudo = bytes(f[26:34]) + struct.pack("!BBH", 0, 6, seglen)
    struct.pack_into("!H", f, tcp_off + 16, ~checksum(pseudo) & 0xFFFF)
    hdr = VirtioNetHdr(flags=1, gso_type=1, hdr_len=54, gso_size=1448, csum_start=tcp_off,
                       csum_offset=16)
    kit.drivers["a"].send_frame(bytes(f), hdr)
    kit.step()
    assert bytes(e.only().data[FROM]) == body
    got = c.recv("b", 2.0, 8)
    assert b"".join(s.payload for s in got) == body


def test_ipv6_connection(kit):
    e, c = opened(kit, auto_pass=True, family=6)
    assert e.only().event["family"] == 6
    c.send("a", c.data("a", b"over v6"))
    assert payloads(c.recv("b", 1.0, 1)) == [b"over v6"]
    assert e.kill() == 0
    got = c.recv("b", 1.0, 2)
    assert got and all(s.has(RST) and s.csum_ok for s in got) and got[0].seq == c.seq("a", 7)


def test_sequence_numbers_wrap(kit):
    e, c = opened(kit, auto_pass=True, cisn=0xFFFFFFF0)
    chunks = [c.data("a", bytes([97 + i]) * 10) for i in range(4)]      # crosses 2**32
    c.send("a", chunks[1], chunks[0], chunks[3], chunks[2])
    assert bytes(e.only().data[FROM]) == b"a" * 10 + b"b" * 10 + b"c" * 10 + b"d" * 10
    assert len(c.recv("b", 1.0, 4)) == 4


# ---------------------------------------------------------------------------
# FIN, kill
# ---------------------------------------------------------------------------

def test_fin_in_order_ends_a_direction_and_closes_after_both_are_acknowledged(kit):
    e, c = opened(kit)
    data = c.data("a", b"last words", off=0, advance=False)
    fin = c.segment("a", ACK | FIN, off=10)
    c.ends["a"].sent, c.ends["a"].fin_sent = 10, True
    c.send("a", fin)
    st = e.only()
    assert not st.eof[FROM]                                     # FIN beyond a gap: not yet
    c.send("a", data)
    assert st.eof[FROM] and bytes(st.data[FROM]) == b"last words"
    assert c.recv("b") == []                                    # the FIN waits with the data
    e.pass_(FROM, 10)
    got = c.recv("b", 1.0, 2)
    assert [s.payload for s in got] == [b"last words", b""] and got[1].has(FIN)
    c.send("b", c.segment("b", ACK | FIN))
    c.ends["b"].fin_sent = True
    e.pass_(TO, 0)
    assert [s.has(FIN) for s in c.recv("a", 1.0, 1)] == [True]
    c.send("a", c.segment("a", ACK))
    kit.step()
    assert st.closed == fplib.VN_CLOSE_FIN and e.flows() == 0


def test_kill_sends_rsts_both_ends_accept_and_drops_held_data(kit):
    e, c = opened(kit)
    c.send("a", c.data("a", b"passed "), c.data("a", b"and held"))
    e.pass_(FROM, 7)
    assert payloads(c.recv("b", 1.0, 1)) == [b"passed "]
    assert e.kill() == 0
    to_a, to_b = c.recv("a", 1.0, 2), c.recv("b", 1.0, 2)
    # each end gets an RST whose sequence number is exactly its receive point
    assert [s.flags for s in to_a] == [RST | ACK] and to_a[0].seq == c.seq("b", 0)
    assert to_b and all(s.has(RST) for s in to_b) and to_b[0].seq == c.seq("a", 7)
    assert to_b[0].csum_ok and to_a[0].csum_ok
    assert (to_a[0].sport, to_a[0].dport, to_b[0].sport, to_b[0].dport) == (25, 40000, 40000, 25)
    assert b"and held" not in b"".join(s.payload for s in to_b)
    assert e.only().closed == fplib.VN_CLOSE_KILLED
    assert kit.stats("a")["tcp_killed"] == 1 and e.flows() == 0
    assert e.kill() < 0                                          # once


# ---------------------------------------------------------------------------
# Memcaps and their exception policies
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("over", ["drop", "pass"])
def test_flow_table_limit(kit, over):
    e = Engine(kit, tcp_flows_max=1, tcp_flows_over=over)
    first = Conn(kit, cport=40001)
    first.open()
    second = Conn(kit, cport=40002)
    second.send("a", second.syn())
    got = second.recv("b", 0.5)
    assert kit.stats("a")["tcp_flows_over"] == 1 and e.flows() == 1
    if over == "drop":
        assert got == []
    else:
        # fail open: the connection goes on uninspected
        assert len(got) == 1
        second.send("b", second.synack())
        second.send("a", second.segment("a", ACK), second.data("a", b"uninspected"))
        assert payloads(second.recv("b", 1.0, 2)) == [b"uninspected"]
        assert len(e.streams) == 1


@pytest.mark.parametrize("over", ["drop", "pass"])
def test_bytes_memcap(kit, over):
    e, c = opened(kit, tcp_bytes_max=1 << 17, tcp_bytes_over=over, cwscale=7, swscale=7)
    c.send("b", c.segment("b", ACK))                            # b's window, scaled: 8 MB
    chunk = b"m" * 1400
    frames = [c.data("a", chunk) for _ in range(100)]           # ~145 KB of frames, held
    c.send("a", *frames[:40])
    c.send("a", *frames[40:80])
    c.send("a", *frames[80:])
    st_ = kit.stats("a")
    assert st_["tcp_bytes_over"] >= 1
    if over == "drop":
        assert e.bytes_kept() <= 1 << 17
        assert c.recv("b") == []
        assert e.only().closed is None
    else:
        assert st_["tcp_bypassed"] == 1
        assert e.only().closed == fplib.VN_CLOSE_BYPASS
        assert b"".join(payloads(c.recv("b", 2.0, 100))) == chunk * 100
        assert e.bytes_kept() == 0


@pytest.mark.parametrize("over", ["drop", "pass"])
def test_reassembly_depth_memcap(kit, over):
    e, c = opened(kit, tcp_depth_max=3000, tcp_depth_over=over)
    frames = [c.data("a", bytes([48 + i]) * 1000) for i in range(6)]
    c.send("a", *frames[1:])                                   # 5000 bytes beyond a gap
    st_ = kit.stats("a")
    assert st_["tcp_depth_over"] >= 1
    if over == "drop":
        assert c.recv("b") == []
        c.send("a", frames[0])
        st = e.only()
        assert bytes(st.data[FROM]) == b"".join(bytes([48 + i]) * 1000 for i in range(4))
    else:
        assert st_["tcp_bypassed"] == 1
        c.send("a", frames[0])
        assert sorted(payloads(c.recv("b", 2.0, 6))) == sorted(bytes([48 + i]) * 1000 for i in range(6))


@pytest.mark.parametrize("limit", ["bytes", "depth"])
def test_memcap_pass_sends_the_segment_over_it_behind_the_held_ones(kit, limit):
    """A limit whose policy says pass lets the held segments go on (through the emit
    queue); the segment that went over the limit must go through that queue too, behind
    them, or b gets it before them.  Distinct payloads, so that b's order shows."""
    if limit == "bytes":
        e, c = opened(kit, tcp_bytes_max=1 << 17, tcp_bytes_over="pass", cwscale=7, swscale=7)
        c.send("b", c.segment("b", ACK))                        # b's window, scaled: 8 MB
        chunks = [struct.pack("!H", i) * 700 for i in range(100)]
        frames = [c.data("a", ch) for ch in chunks]             # ~145 KB, all held until over
    else:
        e, c = opened(kit, tcp_depth_max=3000, tcp_depth_over="pass")
        chunks = [bytes([48 + i]) * 1000 for i in range(6)]
        frames = [c.data("a", ch) for ch in chunks]
        frames, chunks = frames[:1] + frames[2:], chunks[:1] + chunks[2:]  # held, then beyond a gap
    for i in range(0, len(frames), 20):
        c.send("a", *frames[i:i + 20])
    st_ = kit.stats("a")
    assert st_[f"tcp_{limit}_over"] == 1 and st_["tcp_bypassed"] == 1
    assert payloads(c.recv("b", 2.0, len(chunks))) == chunks    # the one over it last, not first


def test_policy_keys_validate(tmp_path):
    from vhostni.policy import PolicyError, parse_policy
    p = parse_policy({"ni": {"tcp_flows_max": 10, "tcp_bytes_max": 1 << 20, "tcp_depth_max": 0,
                             "tcp_flows_over": "pass", "tcp_bytes_over": "drop",
                             "tcp_depth_over": "pass", "tcp_idle_timeout_ms": 5000}})
    assert (p.tcp_flows_max, p.tcp_flows_over_pass, p.tcp_bytes_over_pass, p.tcp_depth_over_pass,
            p.tcp_idle_timeout) == (10, True, False, True, 5.0)
    assert not parse_policy({}).tcp_flows_over_pass                     # fail closed by default
    for bad, where in (({"tcp_flows_over": "maybe"}, "ni.tcp_flows_over"),
                       ({"tcp_flows_max": 0}, "ni.tcp_flows_max"),
                       ({"tcp_bytes_max": 10}, "ni.tcp_bytes_max"),
                       ({"tcp_idle_timeout_ms": 5}, "ni.tcp_idle_timeout_ms")):
        with pytest.raises(PolicyError) as exc:
            parse_policy({"ni": bad})
        assert exc.value.where == where


def test_idle_connection_is_forgotten(kit):
    e, c = opened(kit, tcp_idle_timeout_ms=1000)
    kit.run_for(1.4)
    assert e.flows() == 0
    assert e.only().closed == fplib.VN_CLOSE_IDLE


def test_policy_cleared_forgets_the_flows(kit):
    e, c = opened(kit)
    c.send("a", c.data("a", b"held"))
    e.port.clear_policy()
    kit.step()
    assert e.flows() == 0 and e.bytes_kept() == 0
    assert e.only().closed == fplib.VN_CLOSE_GONE


# ---------------------------------------------------------------------------
# The promise, as a property
# ---------------------------------------------------------------------------

def _receiver_saw_only_the_scanners_bytes(kit, e, c, sid) -> None:
    """Every byte b was handed has one value across its segments, and it is the scanner's
    at that offset; then the stream is killed and both ends drained."""
    kit.step()
    view = bytes(e.streams[sid].data[FROM])
    got: dict[int, set] = {}
    for s in c.recv("b", 0.2):
        if s.dport != 25 or s.sport != c.ends["a"].port or not s.payload:
            continue
        start = (s.seq - c.seq("a", 0)) & 0xFFFFFFFF
        for i, byte in enumerate(s.payload):
            got.setdefault(start + i, set()).add(byte)
    for off, vals in got.items():
        assert len(vals) == 1, f"two versions of byte {off} reached the receiver"
        assert off < len(view) and vals == {view[off]}, f"byte {off} unseen or different"
    e.kill(sid)
    kit.recv("a", 0.05)
    kit.recv("b", 0.05)


def test_receiver_and_scanner_never_disagree(kit):
    """Any segmentation, order, duplication and conflicting copies from the sender: every
    byte the receiver is handed has one value across all segments it gets, and that value
    is the scanner's at that offset (so any reassembly policy of the receiver ends up with
    the scanner's bytes); and nothing beyond the scanner's in-order bytes is handed on."""
    from hypothesis import HealthCheck, given, settings, strategies as stg
    e = Engine(kit, auto_pass=True)
    ports = iter(range(41000, 60000))
    base = bytes((i * 7 + 13) % 251 for i in range(1500))

    seg = stg.tuples(stg.integers(0, 1499), stg.integers(1, 300), stg.booleans())

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(stg.lists(seg, min_size=1, max_size=12), stg.booleans())
    def run(sends, fill):
        c = Conn(kit, cport=next(ports))
        c.open()
        kit.step()
        sid = max(e.streams)
        frames = []
        for off, ln, evil in sends:
            data = base[off:off + ln]
            if evil:
                data = bytes(b ^ 0x5A for b in data)
            frames.append(c.data("a", data, off=off, advance=False))
        if fill:                                    # the honest stream, in order, at the end
            frames += [c.data("a", base[o:o + 500], off=o, advance=False) for o in range(0, 1500, 500)]
        for i in range(0, len(frames), 8):
            c.send("a", *frames[i:i + 8])
        _receiver_saw_only_the_scanners_bytes(kit, e, c, sid)

    run()


def test_fragroute_style_fragments_never_let_unseen_bytes_through(kit):
    """fragroute's IP tricks on top of TCP's: every segment cut into fragments of random
    sizes, sent in random order, some twice, some with an overlapping fragment carrying
    other bytes (favouring either copy).  The promise holds: whatever reaches the receiver
    is the scanner's bytes at the same offsets; datagrams that went whole are inspected."""
    import random as _random

    from hypothesis import HealthCheck, given, settings, strategies as stg
    e = Engine(kit, auto_pass=True)
    ports = iter(range(41000, 60000))
    idents = iter(range(100, 60000))
    base = bytes((i * 7 + 13) % 251 for i in range(1200))

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(stg.integers(0, 2**32 - 1))
    def run(seed):
        rnd = _random.Random(seed)
        c = Conn(kit, cport=next(ports))
        c.open()
        kit.step()
        sid = max(e.streams)
        frames = []
        for off in range(0, 1200, 400):
            seg = c.data("a", base[off:off + 400], off=off, advance=False)
            body = _ip_parts(seg)[2]
            cuts = sorted(rnd.sample(range(8, len(body), 8), rnd.randrange(0, 5)))
            ident = next(idents)
            frs = [ip_fragment(seg, a, body[a:b], b < len(body), ident)
                   for a, b in zip([0] + cuts, cuts + [len(body)])]
            if rnd.random() < 0.3:                     # an overlapping fragment, other bytes
                a = rnd.randrange(0, len(body) - 16) // 8 * 8
                frs.insert(rnd.randrange(len(frs) + 1),
                           ip_fragment(seg, a, bytes(x ^ 0x5A for x in body[a:a + 16]), True, ident))
            if rnd.random() < 0.3:
                frs.append(rnd.choice(frs))            # a duplicate
            rnd.shuffle(frs)
            frames += frs
        for i in range(0, len(frames), 8):
            c.send("a", *frames[i:i + 8])
        _receiver_saw_only_the_scanners_bytes(kit, e, c, sid)

    run()
    assert kit.stats("a")["tcp_frag_reassembled"] > 0 and kit.stats("a")["tcp_frag_overlap"] > 0
