"""Reconstructed TCP streams on a scanner ring (csrc/tcp_ring.c, ring.c): a ring whose stream
subscription matches a connection gets OPEN, its in-order bytes (DATA, held where it holds),
END and CLOSE; its stream passes release the held bytes in C, with no Python per segment; the
kernel and other parties still must pass what they hold; the hold timeout, a full ring and
a ring that goes away give the policy's default; a hostile ring breaks only itself.

Simulated guests a and b (tests/tcpkit.py): a connects to b's port 25; the test plays the
scanner on the ring with tests/ringkit.py.
"""
from __future__ import annotations

import hashlib
import random

import pytest

from nikit import Kit, time_limit
from ringkit import CLOSE, DATA, END, OPEN, RawRing, stream_desc, stream_pass
from tcpkit import ACK, FIN, PSH, RST, Conn, Engine, payload_of, segments
from vhostni._fastpath import lib

FROM, TO = 1, 2
RING = ((25, "both", True),)


@pytest.fixture(autouse=True)
def _limit():
    with time_limit(120, "the test"):
        yield


@pytest.fixture
def kit():
    k = Kit()
    yield k
    k.close()


def setup(kit, subs=(), ring_subs=RING, ring_slots=4096, **ni):
    e = Engine(kit, subs=subs, ring_subs=ring_subs, ring_slots=ring_slots, **ni)
    r = RawRing(kit.daemon.switch.ring_info(e.port.index, e.ring_slot))
    c = Conn(kit)
    c.open()
    kit.step()
    return e, r, c


def descs(kit, r):
    kit.step()
    return [stream_desc(r, d) for d in r.poll()]


def info(e):
    return e.kit.daemon.switch.ring_info(e.port.index, e.ring_slot)


def test_a_held_stream_on_the_ring_goes_on_as_the_scanner_passes_it(kit):
    e, r, c = setup(kit)
    (o,) = descs(kit, r)
    assert o.desc.kind == OPEN and o.open["server_port"] == 25 and o.open["held"] == 3
    assert o.open["client"] == FROM and o.open["guest_port"] == 40000
    assert e.streams == {}                      # the kernel never hears of it
    c.send("a", c.data("a", b"HELO there\r\n"))
    (d,) = descs(kit, r)
    assert (d.desc.kind, d.desc.dir, d.desc.held, d.offset, d.payload) == (DATA, FROM, True, 0, b"HELO there\r\n")
    assert d.handle == o.handle and d.stream == o.stream
    assert kit.recv("b", 0.2) == []             # held
    stream_pass(r, d.handle, FROM, 4)           # part of it: nothing (segments go whole)
    kit.step()
    assert kit.recv("b", 0.2) == []
    stream_pass(r, d.handle, FROM, 12)
    assert payload_of(kit.recv("b", 1.0, 1)) == b"HELO there\r\n"
    # the other way, and the end
    c.send("b", c.data("b", b"250 ok\r\n"))
    (d2,) = descs(kit, r)
    assert (d2.desc.dir, d2.payload) == (TO, b"250 ok\r\n")
    stream_pass(r, d2.handle, TO, 2**64 - 1)    # all of it, later bytes too
    assert payload_of(kit.recv("a", 1.0, 1)) == b"250 ok\r\n"
    c.send("b", c.data("b", b"more\r\n"))
    assert payload_of(kit.recv("a", 1.0, 1)) == b"more\r\n"
    c.send("a", c.segment("a", FIN | ACK))
    got = descs(kit, r)
    ends = [x for x in got if x.desc.kind == END]
    assert [(x.desc.dir, x.offset) for x in ends] == [(FROM, 12)]
    st = info(e)
    assert st["broken"] == 0 and st["stale"] == 0 and e.port.stats()["ring_stream_bytes"] == 26


def test_a_large_transfer_both_ways_arrives_intact(kit):
    """Many segments, out of order too, passed as they come: both receivers get exactly
    the bytes, the ring saw exactly them, and nothing is left kept."""
    e, r, c = setup(kit)
    handle = descs(kit, r)[0].handle
    rng = random.Random(5)
    sent = {FROM: bytearray(), TO: bytearray()}
    seen = {FROM: bytearray(), TO: bytearray()}
    got = {FROM: bytearray(), TO: bytearray()}
    for round_ in range(40):
        for frm, d in (("a", FROM), ("b", TO)):
            chunk = rng.randbytes(rng.randint(1, 4000))
            segs = []
            off = len(sent[d])
            for i in range(0, len(chunk), 1000):
                segs.append(c.data(frm, chunk[i:i + 1000], off=off + i))
            sent[d] += chunk
            rng.shuffle(segs)
            c.send(frm, *segs)
        for x in descs(kit, r):
            if x.desc.kind == DATA:
                assert x.offset == len(seen[x.desc.dir])
                seen[x.desc.dir] += x.payload
                stream_pass(r, handle, x.desc.dir, x.offset + len(x.payload))
        r.consume()
        kit.step()
        for name, d in (("b", FROM), ("a", TO)):
            for s in segments(kit.recv(name, 0.05)):
                got[d] += s.payload
            c.send(name, c.segment(name, ACK))     # the receiver acknowledges what it has
    for name, d in (("b", FROM), ("a", TO)):
        for s in segments(kit.recv(name, 0.5)):
            got[d] += s.payload
    for d in (FROM, TO):
        assert hashlib.md5(seen[d]).digest() == hashlib.md5(sent[d]).digest()
        assert bytes(got[d]) == bytes(sent[d])


def test_kernel_and_ring_both_holding_need_both_passes(kit):
    e, r, c = setup(kit, subs=((25, "from_guest", True),))
    (o,) = descs(kit, r)
    (st,) = e.streams.values()                   # the kernel heard of it: its own subscription
    c.send("a", c.data("a", b"both must pass"))
    (d,) = descs(kit, r)
    stream_pass(r, d.handle, FROM, 14)
    kit.step()
    assert kit.recv("b", 0.2) == []
    e.pass_(FROM, 14, stream=st.id)
    assert payload_of(kit.recv("b", 1.0, 1)) == b"both must pass"
    # and the kernel's pass alone does not let the next bytes go either
    c.send("a", c.data("a", b"again"))
    kit.step()
    e.pass_(FROM, 19, stream=st.id)
    assert kit.recv("b", 0.2) == []
    (d,) = descs(kit, r)
    stream_pass(r, d.handle, FROM, 19)
    assert payload_of(kit.recv("b", 1.0, 1)) == b"again"


def test_a_ring_that_only_reads_gets_a_copy_and_holds_nothing(kit):
    e, r, c = setup(kit, ring_subs=((25, "both", False),))
    (o,) = descs(kit, r)
    assert o.open["held"] == 0 and o.open["read"] == 3
    c.send("a", c.data("a", b"just looking"))
    assert payload_of(kit.recv("b", 1.0, 1)) == b"just looking"
    (d,) = descs(kit, r)
    assert d.payload == b"just looking" and not d.desc.held
    # its pass of a direction it does not hold is not its to make: stale, harmless
    stream_pass(r, d.handle, FROM, 100)
    kit.step()
    assert info(e)["stale"] == 1 and info(e)["broken"] == 0


@pytest.mark.parametrize("default", ["pass", "cut"])
def test_hold_timeout_on_a_stream_chunk_gives_the_default(kit, default):
    e, r, c = setup(kit, hold_timeout_ms=300, default_decision=default)
    descs(kit, r)
    c.send("a", c.data("a", b"nobody passes this"))
    descs(kit, r)
    e.advance(0.2)
    e.housekeeping()
    assert kit.recv("b", 0.1) == []
    e.advance(0.2)
    e.housekeeping()
    got = kit.recv("b", 0.5)
    st = info(e)
    assert st["timeouts"] == 1 and st["owed"] == 0
    if default == "pass":
        assert payload_of(got) == b"nobody passes this"
    else:                                        # killed: RSTs to both ends
        assert any(s.has(RST) for s in segments(got))
        assert any(x.desc.kind == CLOSE and x.reason == lib.VNR_CLOSE_KILLED for x in descs(kit, r))


@pytest.mark.parametrize("default", ["pass", "cut"])
def test_a_ring_too_full_for_a_streams_bytes_loses_it(kit, default):
    """The scanner never consumes: its ring fills; the connection is lost to it (the default
    stands in for its hold), counted, and it gets a CLOSE (overrun) if there is room."""
    e, r, c = setup(kit, ring_slots=64, default_decision=default)
    assert descs(kit, r)[0].desc.kind == OPEN
    big = bytes(range(256)) * 2
    for i in range(100):                          # 100 held chunks, never passed: 64 slots fill
        c.send("a", c.data("a", big))
        c.send("b", c.segment("b", ACK))
        kit.step()
    assert e.port.stats()["ring_streams_lost"] == 1
    got = kit.recv("b", 0.5)
    if default == "pass":
        assert len(payload_of(got)) == 100 * 512
        assert not any(s.has(RST) for s in segments(got))
    else:
        assert any(s.has(RST) for s in segments(got))


def test_the_ring_going_away_gives_the_default_for_what_it_held(kit):
    e, r, c = setup(kit, default_decision="pass")
    descs(kit, r)
    c.send("a", c.data("a", b"held when the scanner died"))
    descs(kit, r)
    kit.daemon.switch.ring_close(e.port.index, e.ring_slot, True)
    assert payload_of(kit.recv("b", 1.0, 1)) == b"held when the scanner died"
    c.send("a", c.data("a", b"after"))
    assert payload_of(kit.recv("b", 1.0, 1)) == b"after"


def test_the_ring_going_away_with_default_cut_kills_its_connections(kit):
    e, r, c = setup(kit, default_decision="cut")
    descs(kit, r)
    c.send("a", c.data("a", b"held"))
    descs(kit, r)
    kit.daemon.switch.ring_close(e.port.index, e.ring_slot, False)
    kit.step()
    assert any(s.has(RST) for s in segments(kit.recv("b", 1.0)))


def test_a_stream_pass_naming_a_handle_never_given_breaks_the_ring(kit):
    e, r, c = setup(kit)
    descs(kit, r)
    stream_pass(r, 10**6, FROM, 5)
    kit.step()
    assert info(e)["broken"] == lib.VNR_BROKEN_HANDLE


def test_passes_after_the_stream_closed_are_stale(kit):
    e, r, c = setup(kit)
    (o,) = descs(kit, r)
    c.send("a", c.segment("a", RST))
    kit.step()
    kit.recv("b", 0.3)                           # the RST itself
    got = descs(kit, r)
    assert [x.desc.kind for x in got] == [CLOSE] and got[0].reason == lib.VNR_CLOSE_RST
    stream_pass(r, o.handle, FROM, 10)
    kit.step()
    assert info(e)["stale"] == 1 and info(e)["broken"] == 0
    # its handle is reused only once the scanner consumed the CLOSE
    r.consume()
    c2 = Conn(kit, cport=40001)
    c2.open()
    (o2,) = descs(kit, r)
    assert o2.desc.kind == OPEN and o2.stream != o.stream
