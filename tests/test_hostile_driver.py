"""The vhostni backend against hostile virtio drivers and vhost-user frontends.

The known vhost-user backend CVE patterns (out-of-range descriptors and ring indices,
descriptor loops, bad indirect tables, huge lengths, absurd ring sizes and bases, fd and
memory leaks, malformed messages) are played by one NI ("h") of an in-process daemon
(tests/nibench.py) while two well-behaved NIs ("a", "b") share its switch.  Every test
checks that the backend survived, that the right port was marked broken with the right
reason (``Port.broken_reason()`` and the daemon's stats file), and that a and b still
talk.  A hypothesis test throws random rings at it; a few tests run ``vhostni run`` as
a separate process to see it survive and not leak from the outside.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from nibench import (
    A_MAC, B_MAC, BCAST, Bench, DaemonProcess, MiB, Request, VirtioNetHdr, check_pair_works,
    ether, fd_count, map_count, pattern, setup_features, vring_file, vu,
)
from vdriver import (
    PAGE, VIRTQ_DESC_F_INDIRECT as INDIRECT, VIRTQ_DESC_F_NEXT as NEXT, VIRTQ_DESC_F_WRITE as WRITE,
    GuestMemory, VhostUserFrontend, VirtioNetDriver,
)

H_MAC = bytes.fromhex("02000000eeee")

# vn_broken_reason() texts
RING_ADDR = "ring address outside guest memory"
AVAIL_IDX = "avail index moved by more than the ring size"
HEAD = "avail ring head index out of range"
DESC_ADDR = "descriptor buffer outside guest memory"
LOOP = "descriptor chain longer than the ring (loop)"
BAD_INDIRECT = "malformed indirect descriptor table"
DESC_NEXT = "descriptor next index out of range"
DESC_DIR = "descriptor direction wrong for this queue"
CHAIN_LEN = "descriptor chain length absurd"
REASONS = {RING_ADDR, AVAIL_IDX, HEAD, DESC_ADDR, LOOP, BAD_INDIRECT, DESC_NEXT, DESC_DIR, CHAIN_LEN}

MEM = 32 * MiB          # the hostile guest's memory: one region at gpa 0
FAR = 1 << 40           # nowhere


class Trio:
    """NIs h (hostile), a and b (well-behaved) on one in-process daemon."""

    def __init__(self, h_kw=None, connect_h=True, rx=64):
        self.bench = Bench(("h", "a", "b"))
        self.a = self.bench.connect("a")
        self.b = self.bench.connect("b")
        if rx:
            self.a.post_rx_buffers(rx, 2048)
            self.b.post_rx_buffers(rx, 2048)
        self.seed = 0
        if rx:
            self.good_pair_works()   # the switch learns where A_MAC and B_MAC are
        self.h = self.bench.connect("h", **(h_kw or {})) if connect_h else None

    def good_pair_works(self):
        self.seed += 1
        check_pair_works(self.bench, self.a, self.b, seed=self.seed)

    def assert_contained(self, reason: str):
        """h broken for ``reason``, the daemon says so, and a <-> b unaffected."""
        bench = self.bench
        bench.step(2)
        assert bench.broken("h") == reason
        stats = bench.stats_json()["nis"]
        assert stats["h"]["broken"] == reason
        assert stats["a"]["broken"] is None and stats["b"]["broken"] is None
        self.good_pair_works()
        # a frame for h (flooded) is dropped and counted, not written into its rings
        drops = bench.stats("h")["drop_broken"]
        self.a.send_frame(ether(BCAST, A_MAC, pattern(64)))
        bench.recv(self.b, 1)
        assert bench.stats("h")["drop_broken"] == drops + 1
        assert bench.broken("a") is None and bench.broken("b") is None

    def close(self):
        self.bench.close()


@pytest.fixture
def trio():
    t = Trio()
    yield t
    t.close()


@pytest.fixture
def make_trio():
    made = []

    def make(**kw):
        t = Trio(**kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def tx_frame(h: VirtioNetDriver, n: int = 100, seed: int = 0) -> tuple[int, bytes]:
    """A valid header+frame written to h's memory: (gpa, bytes)."""
    data = VirtioNetHdr().pack(h.hdr_len) + ether(A_MAC, H_MAC, pattern(n, seed))
    gpa = h.arena.alloc(len(data))
    h.mem.write(gpa, data)
    return gpa, data


def post_raw(q, descs, head=0, *, table=None, kick=True):
    """Write raw descriptors [(index, addr, len, flags, next)] and make ``head`` available."""
    for i, addr, length, flags, nxt in descs:
        q.write_desc(i, addr, length, flags, nxt, table=table)
    q.put_avail([head])
    if kick:
        q.kick(force=True)


# ---------------------------------------------------------------------------
# Descriptors on the TX queue
# ---------------------------------------------------------------------------

def _indirect(h, entries, ring_len=None, ring_flags=INDIRECT):
    """A ring descriptor 0 pointing at an indirect table holding ``entries``."""
    table = h.arena.alloc(16 * max(len(entries), 2), 16)
    for i, (addr, length, flags, nxt) in enumerate(entries):
        h.queues[1].write_desc(i, addr, length, flags, nxt, table=table)
    return [(0, table, 16 * len(entries) if ring_len is None else ring_len, ring_flags, 0)]


def _table_at_the_end(h, g):
    """An indirect table of two entries whose second lies past the end of guest memory."""
    h.mem.write(MEM - 16, struct.pack("<QIHH", g, 12, NEXT, 1))
    return [(0, MEM - 16, 32, INDIRECT, 0)]


def tx_cases():
    """name -> (builder(h, gpa, data) -> descs, expected reason)."""
    return {
        "addr-outside-memory": (lambda h, g, d: [(0, FAR, len(d), 0, 0)], DESC_ADDR),
        "addr-just-past-memory": (lambda h, g, d: [(0, MEM, 64, 0, 0)], DESC_ADDR),
        "runs-past-region-end": (lambda h, g, d: [(0, MEM - 50, 100, 0, 0)], DESC_ADDR),
        "addr-plus-len-wraps-u64": (lambda h, g, d: [(0, 2**64 - 16, 100, 0, 0)], DESC_ADDR),
        "second-descriptor-outside": (lambda h, g, d: [(0, g, 12, NEXT, 1), (1, FAR, 100, 0, 0)], DESC_ADDR),
        "len-0xffffffff": (lambda h, g, d: [(0, g, 0xFFFFFFFF, 0, 0)], CHAIN_LEN),
        "len-0xffffffff-at-0": (lambda h, g, d: [(0, 0, 0xFFFFFFFF, 0, 0)], CHAIN_LEN),
        "chain-of-17-MiB-in-memory": (
            lambda h, g, d: [(i, 0, 2 * MiB, NEXT, i + 1) for i in range(8)] + [(8, 0, 2 * MiB, 0, 0)],
            CHAIN_LEN),
        "loop-two": (lambda h, g, d: [(0, g, 12, NEXT, 1), (1, g + 12, 50, NEXT, 0)], LOOP),
        "loop-self": (lambda h, g, d: [(0, g, len(d), NEXT, 0)], LOOP),
        "loop-zero-length": (lambda h, g, d: [(0, 0, 0, NEXT, 1), (1, FAR, 0, NEXT, 0)], LOOP),
        "loop-back-to-middle": (
            lambda h, g, d: [(0, g, 12, NEXT, 1), (1, g + 12, 20, NEXT, 2), (2, g + 32, 20, NEXT, 1)], LOOP),
        "next-equals-ring-size": (lambda h, g, d: [(0, g, 12, NEXT, 256)], DESC_NEXT),
        "next-0xffff": (lambda h, g, d: [(0, g, 12, NEXT, 0xFFFF)], DESC_NEXT),
        "writable-on-tx": (lambda h, g, d: [(0, g, len(d), WRITE, 0)], DESC_DIR),
        "writable-in-the-middle": (
            lambda h, g, d: [(0, g, 12, NEXT, 1), (1, g + 12, 10, NEXT | WRITE, 2), (2, g + 22, len(d) - 22, 0, 0)],
            DESC_DIR),
        "indirect-len-not-multiple-of-16": (lambda h, g, d: _indirect(h, [(g, len(d), 0, 0)], ring_len=24),
                                            BAD_INDIRECT),
        "indirect-len-0": (lambda h, g, d: _indirect(h, [(g, len(d), 0, 0)], ring_len=0), BAD_INDIRECT),
        "indirect-len-huge": (lambda h, g, d: _indirect(h, [(g, len(d), 0, 0)], ring_len=0xFFFFFFF0),
                              BAD_INDIRECT),
        "indirect-table-outside": (lambda h, g, d: [(0, FAR, 32, INDIRECT, 0)], BAD_INDIRECT),
        "indirect-table-past-end": (lambda h, g, d: _table_at_the_end(h, g), BAD_INDIRECT),
        "indirect-nested": (lambda h, g, d: _indirect(h, [(g, 16, INDIRECT, 0)]), BAD_INDIRECT),
        "indirect-nested-after-next": (
            lambda h, g, d: _indirect(h, [(g, 12, NEXT, 1), (g, 32, INDIRECT, 0)]), BAD_INDIRECT),
        "indirect-with-next": (lambda h, g, d: _indirect(h, [(g, len(d), 0, 0)], ring_flags=INDIRECT | NEXT),
                               BAD_INDIRECT),
        "indirect-loop": (lambda h, g, d: _indirect(h, [(g, 12, NEXT, 1), (g + 12, 30, NEXT, 0)]), LOOP),
        "indirect-next-past-table": (lambda h, g, d: _indirect(h, [(g, 12, NEXT, 2), (g + 12, 30, 0, 0)]),
                                     DESC_NEXT),
        "indirect-entry-outside": (lambda h, g, d: _indirect(h, [(g, 12, NEXT, 1), (FAR, 30, 0, 0)]), DESC_ADDR),
        "indirect-entry-writable": (lambda h, g, d: _indirect(h, [(g, len(d), WRITE, 0)]), DESC_DIR),
        "indirect-entry-huge": (lambda h, g, d: _indirect(h, [(g, 0xFFFFFFFF, 0, 0)]), CHAIN_LEN),
    }


TX_CASES = tx_cases()


@pytest.mark.parametrize("case", sorted(TX_CASES))
def test_hostile_tx_descriptors(trio, case):
    build, reason = TX_CASES[case]
    h, bench = trio.h, trio.bench
    gpa, data = tx_frame(h)
    q = h.queues[1]
    post_raw(q, build(h, gpa, data))
    bench.step(2)
    assert bench.broken("h") == reason
    st = bench.stats("h")
    assert st["drop_bad_desc"] == 1 and st["in_frames"] == 0
    assert q.used_idx() == 0               # the bad chain was not consumed
    trio.assert_contained(reason)


@pytest.mark.parametrize("head", [256, 257, 0x8000, 0xFFFF])
def test_head_index_out_of_range(trio, head):
    q = trio.h.queues[1]
    q.put_avail([head])
    q.kick(force=True)
    trio.assert_contained(HEAD)


@pytest.mark.parametrize("idx", [257, 300, 0x8000, 0xFFFF])
def test_avail_idx_jumps_more_than_the_ring(trio, idx):
    h = trio.h
    gpa, data = tx_frame(h)
    q = h.queues[1]
    for i in range(256):
        q.write_desc(i, gpa, len(data))
        q.write_avail_entry(i, i)
    q.set_avail_idx(idx)
    q.kick(force=True)
    trio.assert_contained(AVAIL_IDX)
    assert q.used_idx() == 0


def test_heads_are_checked_when_taken_not_when_the_avail_idx_was_read(make_trio):
    """The switch reads avail idx once per burst and takes the heads it showed later (a pass
    forwards at most 256 frames): a head the driver rewrites in between is checked as it is
    taken, and what was before it is forwarded."""
    trio = make_trio(h_kw=dict(queue_size=512))
    h, bench = trio.h, trio.bench
    q = h.queues[1]
    data = VirtioNetHdr().pack(h.hdr_len) + ether(H_MAC, H_MAC, pattern(100))   # to itself:
    gpa = h.arena.alloc(len(data))                     # dropped, a's buffers stay for a and b
    h.mem.write(gpa, data)
    for i in range(300):
        q.write_desc(i, gpa, len(data))
        q.write_avail_entry(i, i)
    q.set_avail_idx(300)
    assert bench.service() == 256         # one pass: 256 taken, 44 known and left
    assert bench.broken("h") is None
    q.write_avail_entry(280, 0xFFFF)
    bench.service()
    assert q.used_idx() == 280             # 256..279 taken, the bad head not
    assert bench.stats("h")["drop_same_port"] == 280
    trio.assert_contained(HEAD)


def test_avail_idx_of_exactly_the_ring_size_is_fine(make_trio):
    trio = make_trio(rx=0)
    h, bench = trio.h, trio.bench
    q = h.queues[1]
    gpa, data = tx_frame(h)
    trio.a.post_rx_buffers(256, 256)
    for i in range(256):
        q.write_desc(i, gpa, len(data))
        q.write_avail_entry(i, i)
    q.set_avail_idx(256)
    q.kick(force=True)
    got = bench.recv(trio.a, 256, steps=50)
    assert len(got) == 256 and all(f == data[12:] for _, f in got)
    assert bench.broken("h") is None


def test_indirect_table_longer_than_the_queue(trio):
    """virtio 2.7.5.3.1: no chain longer than the queue size, indirect ones included."""
    h = trio.h
    gpa, data = tx_frame(h)
    entries = [(FAR, 0, NEXT, i + 1) for i in range(256)] + [(gpa, len(data), 0, 0)]
    post_raw(h.queues[1], _indirect(h, entries))
    trio.assert_contained(BAD_INDIRECT)


@pytest.mark.parametrize("entries", [256, 32768])
def test_descriptor_walks_cannot_stall_the_switch(trio, entries):
    """256 avail entries all naming one indirect table of zero-length descriptors (runts,
    not errors) is the most descriptor walking a guest can ask of one pass.  With tables
    as long as 32768 entries that was 8 million descriptors, over 100 ms in which no other
    NI moved; bounded by the queue size it is a fraction of a millisecond, and a longer
    table breaks the port at once."""
    h, bench = trio.h, trio.bench
    q = h.queues[1]
    table = h.arena.alloc(16 * entries, 16)
    h.mem.write(table, b"".join(struct.pack("<QIHH", FAR, 0, NEXT, i + 1) for i in range(entries - 1))
                + struct.pack("<QIHH", FAR, 0, 0, 0))
    q.write_desc(0, table, 16 * entries, INDIRECT, 0)
    q.put_avail([0] * 256)
    t0 = time.perf_counter()
    bench.service()
    took = time.perf_counter() - t0
    assert took < 0.03, f"one pass took {took * 1000:.1f} ms"
    if entries <= q.size:
        assert bench.stats("h")["drop_runt"] == 256 and bench.broken("h") is None
        trio.good_pair_works()
    else:
        trio.assert_contained(BAD_INDIRECT)


def test_indirect_without_the_feature(make_trio):
    t = make_trio(h_kw=dict(features=setup_features(exclude=[vu.VIRTIO_RING_F_INDIRECT_DESC])))
    h = t.h
    assert not h.has(vu.VIRTIO_RING_F_INDIRECT_DESC)
    gpa, data = tx_frame(h)
    post_raw(h.queues[1], _indirect(h, [(gpa, len(data), 0, 0)]))
    t.assert_contained(BAD_INDIRECT)


def test_indirect_table_straddling_two_regions_works(make_trio):
    t = make_trio(h_kw=dict(regions=[(0, 8 * MiB), (8 * MiB, 8 * MiB)]))
    h, bench = t.h, t.bench
    gpa, data = tx_frame(h)
    table = 8 * MiB - 16
    h.mem.write(table, struct.pack("<QIHH", gpa, 12, NEXT, 1) + struct.pack("<QIHH", gpa + 12, len(data) - 12, 0, 0))
    post_raw(h.queues[1], [(0, table, 32, INDIRECT, 0)])
    got = bench.recv(t.a, 1)
    assert got and got[0][1] == data[12:]
    assert bench.broken("h") is None


def test_chain_as_long_as_the_ring_works(make_trio):
    t = make_trio(h_kw=dict(queue_size=16))
    h, bench = t.h, t.bench
    gpa, data = tx_frame(h, 200)
    pieces = [12] + [14] * 14 + [len(data) - 12 - 14 * 14]
    off, descs = 0, []
    for i, n in enumerate(pieces):
        descs.append((i, gpa + off, n, NEXT if i < 15 else 0, i + 1))
        off += n
    post_raw(h.queues[1], descs)
    got = bench.recv(t.a, 1)
    assert got and got[0][1] == data[12:]
    assert bench.broken("h") is None


def test_zero_length_descriptors_are_never_dereferenced(trio):
    h, bench = trio.h, trio.bench
    gpa, data = tx_frame(h, 300)
    bogus = [FAR, 2**64 - 1, 0, MEM, 2**63]
    descs, i = [], 0
    for k, (s, e) in enumerate([(0, 5), (5, 12), (12, 100), (100, len(data))]):
        descs.append((i, bogus[k], 0, NEXT, i + 1))
        descs.append((i + 1, gpa + s, e - s, NEXT, i + 2))
        i += 2
    descs.append((i, bogus[4], 0, 0, 0))
    post_raw(h.queues[1], descs)
    got = bench.recv(trio.a, 1)
    assert got and got[0][1] == data[12:]
    assert bench.broken("h") is None
    # also inside an indirect table
    post_raw(h.queues[1], _indirect(h, [(FAR, 0, NEXT, 1), (gpa, len(data), NEXT, 2), (2**64 - 1, 0, 0, 0)]))
    got = bench.recv(trio.a, 1)
    assert got and got[0][1] == data[12:]
    assert bench.broken("h") is None


def test_header_over_one_byte_descriptors_works(trio):
    h, bench = trio.h, trio.bench
    frame = ether(A_MAC, H_MAC, pattern(500, 4))
    for indirect in (False, True):
        h.send_frame(frame, layout="split_header", header_pieces=range(1, 12), indirect=indirect)
        got = bench.recv(trio.a, 1)
        assert got and got[0][1] == frame
    # a frame one byte per descriptor, in an indirect table as long as the queue
    small = ether(A_MAC, H_MAC, pattern(256 - 12 - 14, 5))
    h.send_frame(small, layout="scattered", chunk=1, indirect=True)
    got = bench.recv(trio.a, 1)
    assert got and got[0][1] == small
    assert bench.broken("h") is None


@pytest.mark.parametrize("total", [0, 5, 11, 12, 25])
def test_chain_shorter_than_header_plus_ethernet_is_a_runt(trio, total):
    h, bench = trio.h, trio.bench
    gpa, data = tx_frame(h)
    descs = [(0, gpa, min(total, 7), NEXT if total > 7 else 0, 1)]
    if total > 7:
        descs.append((1, gpa + 7, total - 7, 0, 0))
    post_raw(h.queues[1], descs)
    bench.step(2)
    assert bench.broken("h") is None
    st = bench.stats("h")
    assert st["drop_runt"] == 1 and st["in_frames"] == 0
    assert h.queues[1].used_idx() == 1         # consumed and returned
    # and h goes on working
    h.queues[1].outstanding.clear()
    h.queues[1].free_descs = list(range(2, 256))
    h.queues[1].last_used = 1
    frame = ether(A_MAC, H_MAC, pattern(80))
    h.send_frame(frame)
    got = bench.recv(trio.a, 1)
    assert got and got[0][1] == frame


# ---------------------------------------------------------------------------
# Descriptors on the RX queue
# ---------------------------------------------------------------------------

def rx_cases():
    return {
        "read-only-on-rx": (lambda h, g: [(0, g, 2048, 0, 0)], DESC_DIR),
        "addr-outside": (lambda h, g: [(0, FAR, 2048, WRITE, 0)], DESC_ADDR),
        "past-region-end": (lambda h, g: [(0, MEM - 100, 2048, WRITE, 0)], DESC_ADDR),
        "len-0xffffffff": (lambda h, g: [(0, g, 0xFFFFFFFF, WRITE, 0)], CHAIN_LEN),
        "loop": (lambda h, g: [(0, g, 100, WRITE | NEXT, 1), (1, g + 100, 100, WRITE | NEXT, 0)], LOOP),
        "next-out-of-range": (lambda h, g: [(0, g, 100, WRITE | NEXT, 999)], DESC_NEXT),
        "indirect-odd": (lambda h, g: [(0, g, 40, INDIRECT, 0)], BAD_INDIRECT),
        "indirect-outside": (lambda h, g: [(0, FAR, 32, INDIRECT, 0)], BAD_INDIRECT),
    }


RX_CASES = rx_cases()


@pytest.mark.parametrize("case", sorted(RX_CASES))
def test_hostile_rx_descriptors(trio, case):
    build, reason = RX_CASES[case]
    h, bench = trio.h, trio.bench
    g = h.arena.alloc(4096)
    before = h.mem.read(g, 4096)
    post_raw(h.queues[0], build(h, g))
    trio.a.send_frame(ether(BCAST, A_MAC, pattern(200)))     # floods to b and h
    assert bench.recv(trio.b, 1)
    assert h.mem.read(g, 4096) == before
    assert h.queues[0].used_idx() == 0
    trio.assert_contained(reason)


@pytest.mark.parametrize("what", ["head", "avail-idx"])
def test_hostile_rx_ring_indices(trio, what):
    q = trio.h.queues[0]
    if what == "head":
        q.put_avail([300])
    else:
        q.set_avail_idx(1000)
    q.kick(force=True)
    trio.a.send_frame(ether(BCAST, A_MAC, pattern(200)))
    assert trio.bench.recv(trio.b, 1)
    trio.assert_contained(HEAD if what == "head" else AVAIL_IDX)


def test_rx_zero_length_descriptors_with_bogus_addresses(trio):
    h, bench = trio.h, trio.bench
    g = h.arena.alloc(2048)
    post_raw(h.queues[0], [(0, FAR, 0, WRITE | NEXT, 1), (1, g, 2048, WRITE | NEXT, 2), (2, 2**64 - 1, 0, WRITE, 0)])
    frame = ether(H_MAC, A_MAC, pattern(500))
    trio.a.send_frame(frame)
    bench.step(3)
    assert bench.broken("h") is None
    q = h.queues[0]
    assert q.used_idx() == 1 and q.read_used_elem(0) == (0, 12 + len(frame))
    assert h.mem.read(g + 12, len(frame)) == frame


# ---------------------------------------------------------------------------
# Guest rewriting what the backend already read
# ---------------------------------------------------------------------------

def test_frame_is_copied_once_at_tx(make_trio):
    """Once the backend has taken a TX chain, the guest rewriting its descriptor and its
    data cannot change what is delivered: the frame was copied out, not referenced.
    (a has no receive buffers, so the frame waits in a's backlog meanwhile.)"""
    t = make_trio(rx=0)
    h, a, bench = t.h, t.a, t.bench
    gpa, data = tx_frame(h, 400, seed=1)
    post_raw(h.queues[1], [(0, gpa, len(data), 0, 0)])
    bench.step(2)
    assert h.queues[1].used_idx() == 1  # taken and given back
    assert bench.stats("a")["backlog_max"] == 1
    # the guest now scribbles over the buffer and points the descriptor elsewhere
    h.mem.write(gpa, b"\xEE" * len(data))
    h.queues[1].write_desc(0, FAR, 0xFFFFFFFF, NEXT | WRITE, 7)
    a.post_rx_buffers(8, 2048)
    got = bench.recv(a, 1)
    assert got and got[0][1] == data[12:]
    assert bench.broken("h") is None


def test_descriptor_flipped_while_the_backend_reads_it(trio):
    """A guest thread flips a descriptor between valid buffers (one ending exactly at the
    end of guest memory, one longer elsewhere) while the backend forwards it again and
    again.  A backend that read the descriptor twice would mix one's address with the
    other's length and read past the end of guest memory (SIGSEGV); ours delivers exactly
    one of the buffers the guest ever described each time.

    The guest writes each field with one aligned store, in an order that keeps every
    state it passes through valid: (end, short) -> (long, short) -> (long, long) -> back.
    (A torn 16-byte copy would show the backend a descriptor the guest really wrote and
    that really is out of bounds; rejecting that is right, and is not what this tests.)"""
    h, a, bench = trio.h, trio.a, trio.bench
    short = VirtioNetHdr().pack(12) + ether(A_MAC, H_MAC, pattern(100, 1))
    long_ = VirtioNetHdr().pack(12) + ether(A_MAC, H_MAC, pattern(1500, 2))
    at_end = MEM - len(short)
    h.mem.write(at_end, short)
    g = h.arena.alloc(len(long_))
    h.mem.write(g, long_)
    q = h.queues[1]
    region = h.mem.regions[0].mm
    off = q.desc - h.mem.regions[0].gpa
    assert off % 16 == 0
    addr = ctypes.c_uint64.from_buffer(region, off)
    length = ctypes.c_uint32.from_buffer(region, off + 8)
    ctypes.c_uint32.from_buffer(region, off + 12).value = 0  # flags, next
    addr.value, length.value = at_end, len(short)
    stop = threading.Event()

    def flipper():
        while not stop.is_set():
            addr.value = g
            length.value = len(long_)
            length.value = len(short)
            addr.value = at_end

    allowed = (short[12:], long_[12:len(short)], long_[12:])
    t = threading.Thread(target=flipper, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 0.5
        n = 0
        while time.monotonic() < deadline:
            a.post_rx_buffers(1, 2048) if len(a.queues[0].outstanding) < 4 else None
            q.put_avail([0])
            q.kick(force=True)
            bench.step()
            for _, f in a.recv_frames(timeout=0, count=100):
                assert f in allowed
                n += 1
    finally:
        stop.set()
        t.join()
        del addr, length  # release the exported buffer before the region is unmapped
    assert n > 10 and bench.broken("h") is None


# ---------------------------------------------------------------------------
# The control plane: vring setup values
# ---------------------------------------------------------------------------

def ack_frontend(bench, name="h"):
    """A connection with REPLY_ACK negotiated and features set, nothing else."""
    drv = bench.connect(name, setup=False)
    drv.negotiate()
    return drv


def nacked(fe, request, body, fds=None) -> bool:
    fe.send(request, body, need_reply=True, fds=fds)
    header, reply = fe.recv_reply()
    assert header.request == request
    return reply == vu.U64(1)


@pytest.mark.parametrize("base", [0x10000, 0x12345, 0xFFFFFFFF])
def test_set_vring_base_above_16_bits_is_refused(make_trio, base):
    trio = make_trio(connect_h=False)
    bench = trio.bench
    drv = ack_frontend(bench)
    fe = drv.frontend
    assert nacked(fe, Request.SET_VRING_NUM, vu.VringState(1, 256)) is False
    assert nacked(fe, Request.SET_VRING_BASE, vu.VringState(1, base))
    assert bench.device("h").counters.errors == 1
    # the connection lives on; without REPLY_ACK the same message closes it
    assert not fe.peer_closed(0.01)
    drv2 = trio.bench.frontend("h")      # a standby (a migration's destination) ...
    drv3 = trio.bench.frontend("h")      # ... but a third is refused
    assert not drv2.peer_closed(0.05)
    assert drv3.peer_closed(0.2)
    trio.good_pair_works()
    drv2.close()
    fe.close()
    bench.control()
    plain = bench.frontend("h")
    plain.send(Request.SET_VRING_BASE, vu.VringState(1, base))
    assert plain.peer_closed(0.2)
    trio.good_pair_works()


@pytest.mark.parametrize("num,how", [(0, "closed"), (3, "nack"), (100, "nack"), (32769, "closed"),
                                     (65536, "closed"), (0xFFFFFFFF, "closed")])
def test_bad_queue_sizes_are_refused(make_trio, num, how):
    trio = make_trio(connect_h=False)
    bench = trio.bench
    drv = ack_frontend(bench)
    fe = drv.frontend
    fe.send(Request.SET_VRING_NUM, vu.VringState(1, num), need_reply=True)
    if how == "closed":                   # the codec refuses it: no ack, the connection goes
        assert fe.peer_closed(0.2)
    else:
        assert fe.recv_reply()[1] == vu.U64(1)
        assert not fe.peer_closed(0.01)
    trio.good_pair_works()


def test_queue_size_cannot_change_while_the_ring_runs(trio):
    fe = trio.h.frontend
    assert nacked(fe, Request.SET_VRING_NUM, vu.VringState(1, 64))
    assert nacked(fe, Request.SET_VRING_BASE, vu.VringState(1, 5))
    h = trio.h
    frame = ether(A_MAC, H_MAC, pattern(90))
    h.send_frame(frame)
    assert trio.bench.recv(trio.a, 1)[0][1] == frame


@pytest.mark.parametrize("where", ["outside", "straddles-end", "desc-misaligned", "used-past-end", "gpa-not-uva"])
def test_ring_addresses_outside_memory_are_refused(make_trio, where):
    trio = make_trio(connect_h=False)
    bench = trio.bench
    drv = ack_frontend(bench)
    fe = drv.frontend
    uva = drv.mem.uva
    ok = dict(desc=uva(0), used=uva(0x2000), avail=uva(0x1000))
    bad = dict(ok)
    if where == "outside":
        bad["desc"] = FAR
    elif where == "straddles-end":
        bad["desc"] = uva(MEM - 16 * 256 + 16)
    elif where == "desc-misaligned":
        bad["desc"] = uva(8)
    elif where == "used-past-end":
        bad["used"] = uva(MEM - 8)
    else:
        bad["desc"] = 0           # a guest-physical address where a user address belongs
    assert not nacked(fe, Request.SET_VRING_NUM, vu.VringState(1, 256))
    assert nacked(fe, Request.SET_VRING_ADDR, vu.VringAddr(1, 0, bad["desc"], bad["used"], bad["avail"], 0))
    assert bench.port("h").vring_started(1) is False
    assert not nacked(fe, Request.SET_VRING_ADDR, vu.VringAddr(1, 0, ok["desc"], ok["used"], ok["avail"], 0))
    trio.good_pair_works()


def test_mem_table_pulled_from_under_running_rings(trio):
    h, bench = trio.h, trio.bench
    # a new table with only memory above the rings: the started rings no longer map
    other = h.mem.regions[0]
    table = vu.MemoryTable([vu.MemoryRegion(MEM, MiB, other.uva + MEM, 0)], (other.fd,))
    h.frontend.call(Request.SET_MEM_TABLE, table, need_reply=True)
    trio.assert_contained(RING_ADDR)
    # the original table back and the rings set again: h works
    h.frontend.call(Request.SET_MEM_TABLE, h.mem.table(), need_reply=True)
    for q in h.queues:
        h.frontend.call(Request.SET_VRING_ADDR, q.addr(), need_reply=True)
    assert bench.broken("h") is None
    frame = ether(A_MAC, H_MAC, pattern(64))
    h.send_frame(frame)
    assert bench.recv(trio.a, 1)[0][1] == frame


@pytest.mark.parametrize("what", ["region-beyond-file", "offset-beyond-file", "zero-regions-then-traffic"])
def test_bad_memory_tables(trio, what):
    h, bench = trio.h, trio.bench
    r = h.mem.regions[0]
    if what == "region-beyond-file":
        table = vu.MemoryTable([vu.MemoryRegion(0, 2 * MEM, r.uva, 0)], (r.fd,))
        assert nacked(h.frontend, Request.SET_MEM_TABLE, table)
    elif what == "offset-beyond-file":
        table = vu.MemoryTable([vu.MemoryRegion(0, MEM, r.uva, PAGE)], (r.fd,))
        assert nacked(h.frontend, Request.SET_MEM_TABLE, table)
    else:
        assert not nacked(h.frontend, Request.SET_MEM_TABLE, vu.MemoryTable([], ()))
        h.send_frame(ether(A_MAC, H_MAC, pattern(64)))
        trio.assert_contained(RING_ADDR)
        return
    # refused: the old table is still in force
    frame = ether(A_MAC, H_MAC, pattern(64))
    h.send_frame(frame)
    assert bench.recv(trio.a, 1)[0][1] == frame
    trio.good_pair_works()


@pytest.mark.parametrize("kind", ["eventfd", "pipe", "read-only-file", "sealed-memfd"])
def test_memory_table_with_an_fd_that_is_not_guest_memory(trio, kind, tmp_path):
    h, bench = trio.h, trio.bench
    if kind == "eventfd":
        fd, extra = os.eventfd(0), []
    elif kind == "pipe":
        fd, w = os.pipe()
        extra = [w]
    elif kind == "read-only-file":
        path = tmp_path / "ram"
        path.write_bytes(bytes(MiB))
        fd, extra = os.open(path, os.O_RDONLY), []
    else:
        fd, extra = os.memfd_create("sealed", os.MFD_ALLOW_SEALING), []
        os.ftruncate(fd, MiB)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    try:
        table = vu.MemoryTable([vu.MemoryRegion(0, MiB, 0x7F00_0000_0000, 0)], (fd,))
        assert nacked(h.frontend, Request.SET_MEM_TABLE, table)
    finally:
        for x in [fd] + extra:
            os.close(x)
    frame = ether(A_MAC, H_MAC, pattern(64))
    h.send_frame(frame)                # the old table is still in force
    assert bench.recv(trio.a, 1)[0][1] == frame
    trio.good_pair_works()


def test_queue_index_beyond_the_device(trio):
    fe = trio.h.frontend
    assert nacked(fe, Request.SET_VRING_NUM, vu.VringState(16, 256))
    efd = os.eventfd(0)
    before = fd_count()
    assert nacked(fe, Request.SET_VRING_KICK, vring_file(100, efd))
    os.close(efd)
    assert fd_count() == before - 1      # the backend closed the fd it could not use
    trio.good_pair_works()


# ---------------------------------------------------------------------------
# Recovery
# ---------------------------------------------------------------------------

def test_recovery_by_setting_the_ring_address_again(trio):
    h, bench = trio.h, trio.bench
    gpa, data = tx_frame(h)
    q = h.queues[1]
    q.write_desc(5, gpa, len(data))
    q.put_avail([999])
    q.kick(force=True)
    trio.assert_contained(HEAD)
    # the guest driver fixes its ring; the frontend re-initialises it
    q.write_avail_entry(0, 5)
    h.frontend.call(Request.SET_VRING_ADDR, q.addr(), need_reply=True)
    assert bench.broken("h") is None
    q.kick(force=True)
    got = bench.recv(trio.a, 1)
    assert got and got[0][1] == data[12:]
    assert q.used_idx() == 1 and q.read_used_elem(0) == (5, 0)
    trio.good_pair_works()


def test_recovery_by_a_full_ring_reset(trio):
    h, bench = trio.h, trio.bench
    q = h.queues[1]
    post_raw(q, [(0, 0, 0, NEXT, 0)])
    trio.assert_contained(LOOP)
    # what QEMU does when the guest resets the device: stop, then set every ring up again
    h.stop()
    for vq in h.queues:
        vq.reset()
    h.start_queues()
    assert bench.broken("h") is None
    h.post_rx_buffers(8, 2048)
    check_pair_works(bench, h, trio.a, a_mac=H_MAC, b_mac=A_MAC)


def test_recovery_by_reconnecting(trio):
    h, bench = trio.h, trio.bench
    h.queues[1].put_avail([4242])
    h.queues[1].kick(force=True)
    trio.assert_contained(HEAD)
    h.frontend.close()
    bench.control()                   # disconnect: the port is reset
    assert bench.broken("h") is None
    h2 = bench.connect("h")
    h2.post_rx_buffers(8, 2048)
    check_pair_works(bench, h2, trio.a, a_mac=H_MAC, b_mac=A_MAC)


# ---------------------------------------------------------------------------
# Leaks
# ---------------------------------------------------------------------------

def test_no_fd_or_mapping_leak_from_repeated_setup(trio):
    """200 rounds of what a frontend may repeat: stop the rings, SET_VRING_NUM/BASE/ADDR,
    new kick and call fds, a new memory table (new fds each time)."""
    h, bench = trio.h, trio.bench
    fe = h.frontend

    def round_():
        for q in h.queues:
            h.get_vring_base(q.index)
            fe.call(Request.SET_VRING_NUM, vu.VringState(q.index, q.size))
            fe.call(Request.SET_VRING_BASE, vu.VringState(q.index, 0))
            fe.call(Request.SET_VRING_ADDR, q.addr())
            fe.call(Request.SET_VRING_KICK, vring_file(q.index, q.kick_fd))
            fe.call(Request.SET_VRING_CALL, vring_file(q.index, q.call_fd))
            fe.call(Request.SET_VRING_ERR, vring_file(q.index, q.call_fd))
        fe.call(Request.SET_MEM_TABLE, h.mem.table(), need_reply=True)

    round_()
    fds, maps = fd_count(), map_count()
    for _ in range(200):
        round_()
    assert fd_count() == fds
    assert map_count() == maps
    for q in h.queues:
        q.reset()
    h.post_rx_buffers(8, 2048)
    check_pair_works(bench, h, trio.a, a_mac=H_MAC, b_mac=A_MAC)


def test_no_leak_from_reconnects(trio):
    bench = trio.bench
    trio.h.close(graceful=False)
    bench.control()
    fds, maps = fd_count(), map_count()
    for i in range(50):
        drv = bench.connect("h")
        drv.post_rx_buffers(4, 2048)
        drv.send_frame(ether(A_MAC, H_MAC, pattern(60, i)))
        bench.step()
        drv.close(graceful=i % 2 == 0)
        bench.drivers.remove(drv)
        bench.frontends.remove(drv.frontend)
        bench.control()
    assert fd_count() == fds
    assert map_count() == maps
    assert len(trio.a.recv_frames(timeout=0, count=100)) == 50


def send_with_fds(fe, data: bytes, nfds: int):
    fds = [os.eventfd(0) for _ in range(nfds)]
    try:
        fe.send_raw(data, fds)
    finally:
        for fd in fds:
            os.close(fd)


EXTRA_FD_MESSAGES = {
    "get-features": vu.Header(Request.GET_FEATURES, vu.VERSION, 0).pack(),
    "set-owner": vu.Header(Request.SET_OWNER, vu.VERSION, 0).pack(),
    "set-vring-num": vu.Header(Request.SET_VRING_NUM, vu.VERSION, 8).pack() + vu.VringState(1, 256).pack(),
    "set-vring-call-nofd-flag": vu.Header(Request.SET_VRING_CALL, vu.VERSION, 8).pack() + vu.U64(0x101).pack(),
    "set-vring-kick-two-fds": vu.Header(Request.SET_VRING_KICK, vu.VERSION, 8).pack() + vu.U64(1).pack(),
    "mem-table-more-fds-than-regions": None,
    "unknown-request": vu.Header(99, vu.VERSION, 0).pack(),
    "set-log-base": vu.Header(Request.SET_LOG_BASE, vu.VERSION, 16).pack() + vu.Log(4096, 0).pack(),
}


@pytest.mark.parametrize("case", sorted(EXTRA_FD_MESSAGES))
@pytest.mark.parametrize("nfds", [2, 8, 20])
def test_fds_on_messages_that_take_fewer_are_closed(make_trio, case, nfds):
    t = make_trio(connect_h=False)
    bench = t.bench
    data = EXTRA_FD_MESSAGES[case]
    if data is None:
        mem = GuestMemory([(0, MiB)])
        data = vu.encode_request(Request.SET_MEM_TABLE, mem.table())[0]
        mem.close()
    bench.control()
    fds, maps = fd_count(), map_count()
    fe = bench.frontend("h")
    send_with_fds(fe, data, nfds)
    assert fe.peer_closed(0.2)
    fe.close()
    bench.control()
    assert fd_count() == fds
    assert map_count() == maps
    assert bench.device("h").counters.errors >= 1
    t.good_pair_works()
    # h is usable again
    h = bench.connect("h")
    h.post_rx_buffers(8, 2048)
    check_pair_works(bench, h, t.a, a_mac=H_MAC, b_mac=A_MAC)


# ---------------------------------------------------------------------------
# Malformed vhost-user messages
# ---------------------------------------------------------------------------

def hdr(request, flags=vu.VERSION, size=0):
    return struct.pack("<III", int(request), flags, size)


MALFORMED = {
    "unknown-request": hdr(99),
    "unknown-request-0": hdr(0),
    "unknown-request-with-payload": hdr(0x7FFFFFFF, size=8) + bytes(8),
    "payload-too-short": hdr(Request.SET_VRING_NUM, size=4) + bytes(4),
    "payload-too-long": hdr(Request.SET_FEATURES, size=16) + bytes(16),
    "payload-on-get-features": hdr(Request.GET_FEATURES, size=8) + bytes(8),
    "size-field-4GiB": hdr(Request.SET_MEM_TABLE, size=0xFFFFFFFF),
    "size-field-one-past-max": hdr(Request.SET_VRING_NUM, size=vu.MAX_PAYLOAD + 1),
    "mem-table-count-lies": hdr(Request.SET_MEM_TABLE, size=8 + 32) + struct.pack("<II", 7, 0) + bytes(32),
    "mem-table-9-regions": hdr(Request.SET_MEM_TABLE, size=8 + 9 * 32) + struct.pack("<II", 9, 0) + bytes(9 * 32),
    "reply-flag-on-request": hdr(Request.GET_FEATURES, flags=vu.VERSION | vu.REPLY),
    "version-2": hdr(Request.GET_FEATURES, flags=2),
    "reserved-flag-bits": hdr(Request.GET_FEATURES, flags=vu.VERSION | 0x100),
    "vring-index-256": hdr(Request.SET_VRING_NUM, size=8) + struct.pack("<II", 256, 256),
    "vring-kick-reserved-bits": hdr(Request.SET_VRING_KICK, size=8) + vu.U64(0x1_0000_0101).pack(),
    "vring-kick-no-fd": hdr(Request.SET_VRING_KICK, size=8) + vu.U64(1).pack(),
    "enable-2": hdr(Request.SET_VRING_ENABLE, size=8) + struct.pack("<II", 1, 2),
    "vring-addr-unknown-flags": hdr(Request.SET_VRING_ADDR, size=40) + struct.pack("<IIQQQQ", 1, 6, 0, 0, 0, 0),
    "unsupported-get-config": hdr(Request.GET_CONFIG, size=12) + bytes(12),
    "features-not-offered": hdr(Request.SET_FEATURES, size=8) + vu.U64(1 << 63).pack(),
    "protocol-features-not-offered": hdr(Request.SET_PROTOCOL_FEATURES, size=8) + vu.U64(1 << 40).pack(),
    "mtu-0": hdr(Request.NET_SET_MTU, size=8) + vu.U64(0).pack(),
    "truncated-header": b"\x01\x00\x00",
    "truncated-payload": hdr(Request.SET_FEATURES, size=8) + b"\x01\x02",
    "garbage": bytes(range(256)) * 4,
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_message_closes_the_connection(make_trio, case):
    """Each gets the connection closed (it does not ask for a reply, so no nack is
    possible); the daemon keeps serving the other NIs and h can connect again."""
    t = make_trio(connect_h=False)
    bench = t.bench
    fe = bench.frontend("h")
    fe.call(Request.GET_FEATURES)
    fe.send_raw(MALFORMED[case])
    if case.startswith("truncated"):
        fe.sock.shutdown(socket.SHUT_WR)       # then the frontend goes away mid-message
        bench.control()
    assert fe.peer_closed(0.2)
    t.good_pair_works()
    fe.close()
    bench.control()
    h = bench.connect("h")
    h.post_rx_buffers(8, 2048)
    check_pair_works(bench, h, t.a, a_mac=H_MAC, b_mac=A_MAC)


@pytest.mark.parametrize("case", ["unsupported-set-config", "features-not-offered", "mtu-0", "vring-index-20"])
def test_refused_message_with_need_reply_gets_a_nack(make_trio, case):
    t = make_trio(connect_h=False)
    drv = ack_frontend(t.bench)
    fe = drv.frontend
    body = {
        "unsupported-set-config": (Request.SET_CONFIG, vu.Raw(bytes(12))),
        "features-not-offered": (Request.SET_FEATURES, vu.U64(1 << 63)),
        "mtu-0": (Request.NET_SET_MTU, vu.U64(0)),
        "vring-index-20": (Request.SET_VRING_ENABLE, vu.VringState(20, 1)),
    }[case]
    assert nacked(fe, *body)
    assert not fe.peer_closed(0.01)
    assert fe.call(Request.GET_FEATURES).value
    t.good_pair_works()


def test_frontend_stalled_mid_message_stalls_only_itself(trio):
    h, bench = trio.h, trio.bench
    data = vu.encode_request(Request.GET_FEATURES)[0]
    h.frontend.sock.sendall(data[:5])
    bench.control()
    trio.good_pair_works()
    h.frontend.sock.sendall(data[5:])
    bench.control()
    header, body = h.frontend.recv_reply()
    assert header.request == Request.GET_FEATURES
    frame = ether(A_MAC, H_MAC, pattern(70))
    h.send_frame(frame)
    assert bench.recv(trio.a, 1)[0][1] == frame


def test_frontend_that_never_reads_replies_is_dropped(trio):
    """Replies pile up in the socket until the daemon cannot write: it drops that
    connection (never blocks on it) and serves the rest."""
    h, bench = trio.h, trio.bench
    sock = h.frontend.sock
    sock.settimeout(0.5)
    burst = vu.encode_request(Request.GET_FEATURES)[0] * 2000
    closed = False
    for _ in range(200):
        try:
            sock.sendall(burst)
        except OSError:
            closed = True
            break
        bench.control()
        if bench.daemon.nis["h"].reader is None:
            closed = True
            break
    assert closed
    assert bench.device("h").counters.messages > 100      # (each reply pins a socket buffer)
    trio.good_pair_works()


def test_second_frontend_on_a_busy_ni_is_refused(trio):
    """A second connection is accepted as a standby (a migration's destination), but it
    cannot configure the NIC while the first one's rings run; a third is refused."""
    intruder = trio.bench.frontend("h")
    assert not intruder.peer_closed(0.05)
    third = trio.bench.frontend("h")
    assert third.peer_closed(0.2)
    intruder.send(Request.SET_VRING_NUM, vu.VringState(0, 256))
    assert intruder.peer_closed(0.2)
    frame = ether(A_MAC, H_MAC, pattern(70))
    trio.h.send_frame(frame)
    assert trio.bench.recv(trio.a, 1)[0][1] == frame


# ---------------------------------------------------------------------------
# Random rings (hypothesis)
# ---------------------------------------------------------------------------

FUZZ_REGIONS = [(0, 64 * 1024), (64 * 1024, 64 * 1024), (1 * MiB, 64 * 1024)]
FUZZ_Q = 16
FUZZ_HL = 12
TABLE_AT = 0x8000          # an indirect table area the examples fill
FRAME_AT = 0x1_0000 - 40   # a valid frame straddling regions 0 and 1
MAX_FRAME = 65550


def region_of(addr):
    for gpa, size in FUZZ_REGIONS:
        if gpa <= addr < gpa + size:
            return gpa, size
    return None


def pieces_ok(addr, length):
    """Whether guest-physical [addr, addr+length) is mapped (adjacent regions may be crossed);
    returns the number of pieces, or None."""
    if addr + length > 2**64:
        return None
    n = 0
    while length:
        r = region_of(addr)
        if r is None:
            return None
        take = min(length, r[0] + r[1] - addr)
        addr += take
        length -= take
        n += 1
    return n


class ModelBroken(Exception):
    def __init__(self, reason):
        self.reason = reason


def walk(ring, read_mem, head, writable, indirect_ok=True):
    """The split-virtqueue rules as vring.c states them; returns [(addr, len)] or raises."""
    num = len(ring)
    limit, count, idx, indirect, table, isize = num, 0, head, False, 0, 0
    pieces, total = [], 0
    while True:
        if not indirect:
            if idx >= num:
                raise ModelBroken(DESC_NEXT)
            addr, length, flags, nxt = ring[idx]
        else:
            if idx >= isize:
                raise ModelBroken(DESC_NEXT)
            raw = read_mem(table + 16 * idx, 16)
            if raw is None:
                raise ModelBroken(BAD_INDIRECT)
            addr, length, flags, nxt = struct.unpack("<QIHH", raw)
        count += 1
        if count > limit:
            raise ModelBroken(LOOP)
        if flags & INDIRECT:
            if indirect or flags & NEXT or not indirect_ok or length == 0 or length % 16 or length // 16 > num:
                raise ModelBroken(BAD_INDIRECT)
            indirect, table, isize, limit, count, idx = True, addr, length // 16, length // 16, 0, 0
            continue
        if bool(flags & WRITE) != writable:
            raise ModelBroken(DESC_DIR)
        if length:
            if total + length > 1 << 24:
                raise ModelBroken(CHAIN_LEN)
            if pieces_ok(addr, length) is None:
                raise ModelBroken(DESC_ADDR)
            total += length
            pieces.append((addr, length))
        if not flags & NEXT:
            return pieces
        idx = nxt


def offload_ok(hdr: bytes, flen: int) -> bool:
    flags, gso, _hl, gso_size, cs, co = struct.unpack("<BBHHHH", hdr[:10])
    if flags & 1 and cs + co + 2 > flen:
        return False
    g = gso & 0x7F
    if g not in (0, 1, 4):
        return False
    return not (g and gso_size == 0)


_EDGES = [g + d for g, sz in FUZZ_REGIONS for d in (-16, -1, 0, 1, sz - 16, sz - 1, sz, sz + 1)]
ADDRS = st.one_of(
    st.sampled_from([TABLE_AT, FRAME_AT, 0, FRAME_AT + 12, FRAME_AT + 100] + _EDGES),
    st.integers(0, 0x120000),
    st.integers(0, 2**64 - 1),
).map(lambda a: a & (2**64 - 1))
LENS = st.one_of(
    st.integers(0, 200),
    st.sampled_from([0, 5, 12, 26, 116, 16, 32, 48, 0x10000, 0xFFFF0, 0x1000000, 0xFFFFFFFF, 0xFFFFFFF0]),
    st.integers(0, 2**32 - 1),
)
FLAGS = st.one_of(st.integers(0, 7), st.sampled_from([NEXT, 0, INDIRECT, WRITE | NEXT, WRITE]),
                  st.integers(0, 0xFFFF))
NEXTS = st.one_of(st.integers(0, FUZZ_Q + 2), st.integers(0, 0xFFFF))
DESC = st.tuples(ADDRS, LENS, FLAGS, NEXTS)
RING = st.lists(DESC, min_size=FUZZ_Q, max_size=FUZZ_Q)
TABLE = st.lists(DESC, max_size=6)
HEADS = st.lists(st.one_of(st.integers(0, FUZZ_Q - 1), st.integers(0, FUZZ_Q + 1), st.integers(0, 0xFFFF)),
                 min_size=FUZZ_Q, max_size=FUZZ_Q)
AVAIL_IDXS = st.one_of(*[st.integers(1, FUZZ_Q)] * 4, st.integers(0, FUZZ_Q + 4), st.integers(0, 0xFFFF))
VALID_SLOTS = st.lists(st.integers(0, FUZZ_Q - 1), max_size=12)
RX_BUF = st.tuples(st.integers(0x9000, 0x1F000), st.integers(1, 3000))


def _fill_pattern(size):
    return bytes(((i * 37) >> 3) & 0x80 for i in range(size))   # only 0x00 and 0x80: no offload bits


FILL = {g: _fill_pattern(s) for g, s in FUZZ_REGIONS}


def overlaps(a, n, lo, hi):
    return n > 0 and a < hi and lo < a + n


class Fuzzer:
    """h (hostile, small memory of three regions, 16-entry rings) and b on one bench."""

    def __init__(self):
        self.bench = Bench(("h", "b"))
        feats = setup_features(include=[vu.VIRTIO_NET_F_GUEST_ECN])   # b takes any offload intact
        self.b = self.bench.connect("b", features=feats, queue_size=1024)
        self.b.post_rx_buffers(600, 4096)
        self.h = self.bench.connect("h", regions=FUZZ_REGIONS, queue_size=FUZZ_Q)
        self.frame = VirtioNetHdr().pack(FUZZ_HL) + ether(B_MAC, H_MAC, pattern(100, 3))
        self.learned: set[bytes] = set()     # source MACs the switch learned on h's port
        self.learned_unknown = False
        self.touched: list[tuple[int, int]] = []

    def read_model(self, addr, n):
        """Guest memory as the example wrote it (None if unmapped); records what was read."""
        if pieces_ok(addr, n) is None:
            return None
        self.touched.append((addr, n))
        out = b""
        while n:
            g, sz = region_of(addr)
            take = min(n, g + sz - addr)
            out += self.snapshot[g][addr - g:addr - g + take]
            addr += take
            n -= take
        return out

    def prepare(self, qi, table_descs, ring_descs, heads, avail_idx):
        """Write the example into guest memory, then have the frontend restart ring qi."""
        h = self.h
        q = h.queues[qi]
        for g, _ in FUZZ_REGIONS:
            h.mem.write(g, FILL[g])
        h.mem.write(FRAME_AT, self.frame)
        for i, (a, l, fl, n) in enumerate(table_descs):
            h.mem.write(TABLE_AT + 16 * i, struct.pack("<QIHH", a, l, fl & 0xFFFF, n))
        q.reset()
        for i, (a, l, fl, n) in enumerate(ring_descs):
            q.write_desc(i, a, l, fl, n)
        for i, head in enumerate(heads):
            q.write_avail_entry(i, head)
        q.set_avail_idx(avail_idx)
        h.get_vring_base(qi)                 # stop; then set up again (clears "broken")
        h.start_queue(q, 0)
        assert self.bench.broken("h") is None
        self.snapshot = {g: h.mem.read(g, sz) for g, sz in FUZZ_REGIONS}
        self.touched = []
        return q

    def other_used(self, q):
        """The avail_event fields of h's other queues' used rings: the device may write one
        whenever it arms kicks there (EVENT_IDX), during another queue's example too."""
        return [(o.used + 4 + 8 * FUZZ_Q, o.used + 6 + 8 * FUZZ_Q) for o in self.h.queues if o is not q]

    def changed(self, q):
        """Addresses of guest memory that differ from the snapshot, but for the device's
        writes to other queues' avail_event."""
        out = []
        for g, sz in FUZZ_REGIONS:
            now, old = self.h.mem.read(g, sz), self.snapshot[g]
            if now == old:
                continue
            for blk in range(0, sz, 512):
                if now[blk:blk + 512] != old[blk:blk + 512]:
                    out += [g + i for i in range(blk, min(blk + 512, sz)) if now[i] != old[i]]
        others = self.other_used(q)
        return [x for x in out if not any(lo <= x < hi for lo, hi in others)]

    def close(self):
        self.bench.close()


@pytest.fixture(scope="module")
def fuzzer():
    f = Fuzzer()
    yield f
    f.close()


def ring_draws(data, valid_chain):
    """A random ring with some well-formed chains written over it (``valid_chain(data,
    head)`` returns their [(slot, desc)]), heads that mostly name those chains, and an
    avail index that is mostly plausible: so examples get past the first entry."""
    table = data.draw(TABLE, "table")
    ring = data.draw(RING, "ring")
    valid = data.draw(VALID_SLOTS, "valid")
    for head in valid:
        for slot, desc in valid_chain(data, head):
            ring[slot] = desc
    head_st = [st.integers(0, FUZZ_Q - 1)] * 3 + [st.integers(0, FUZZ_Q + 1), st.integers(0, 0xFFFF)]
    if valid:
        head_st = [st.sampled_from(valid)] * 6 + head_st
    heads = data.draw(st.lists(st.one_of(*head_st), min_size=FUZZ_Q, max_size=FUZZ_Q), "heads")
    return table, ring, heads, data.draw(AVAIL_IDXS, "avail_idx")


def tx_valid_chain(f):
    def make(data, head):
        n = len(f.frame)
        if data.draw(st.booleans(), "split"):
            nxt = data.draw(st.integers(0, FUZZ_Q - 1), "next")
            if nxt != head:
                return [(head, (FRAME_AT, FUZZ_HL, NEXT, nxt)), (nxt, (FRAME_AT + FUZZ_HL, n - FUZZ_HL, 0, 0))]
        return [(head, (FRAME_AT, n, 0, 0))]
    return make


def rx_valid_chain(data, head):
    a, n = data.draw(RX_BUF, "buf")
    if data.draw(st.booleans(), "split"):
        nxt = data.draw(st.integers(0, FUZZ_Q - 1), "next")
        if nxt != head:
            a2, n2 = data.draw(RX_BUF, "buf2")
            return [(head, (a, n, WRITE | NEXT, nxt)), (nxt, (a2, n2, WRITE, 0))]
    return [(head, (a, n, WRITE, 0))]


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_random_tx_rings(fuzzer, data):
    """Random descriptor tables, indirect tables, heads and avail index on h's TX ring.
    The backend must not crash (reading outside guest memory would), must write nothing
    but the used ring, and must do exactly what the rules say: a model of them predicts
    whether the port breaks and why, which chains are consumed, which are runts, oversize
    or bad offloads, and the bytes of every frame forwarded to b."""
    f, bench = fuzzer, fuzzer.bench
    table, ring, heads, avail_idx = ring_draws(data, tx_valid_chain(f))
    q = f.prepare(1, table, ring, heads, avail_idx)
    before = bench.stats("h")
    q.kick(force=True)
    bench.step(2)
    after = bench.stats("h")
    delta = {k: after[k] - before[k] for k in after}
    reason = bench.broken("h")
    assert reason is None or reason in REASONS

    # the model
    expect_reason, consumed, frames = None, [], []
    runts = oversize = bad_offload = 0
    if avail_idx > FUZZ_Q:
        expect_reason = AVAIL_IDX
    else:
        for slot in range(avail_idx):
            head = heads[slot]
            if head >= FUZZ_Q:
                expect_reason = HEAD
                break
            try:
                pieces = walk(ring, f.read_model, head, writable=False)
            except ModelBroken as e:
                expect_reason = e.reason
                break
            consumed.append(head)
            blob = b"".join(f.read_model(a, n) for a, n in pieces)
            if len(blob) < FUZZ_HL + 14:
                runts += 1
            elif len(blob) - FUZZ_HL > MAX_FRAME:
                oversize += 1
            elif not offload_ok(blob[:FUZZ_HL], len(blob) - FUZZ_HL):
                bad_offload += 1
            else:
                frames.append(blob[FUZZ_HL:])
    # nothing but the used ring (and its avail_event) was written
    used_lo, used_hi = q.used, q.used + 6 + 8 * FUZZ_Q
    assert all(used_lo <= x < used_hi for x in f.changed(q)), "TX processing wrote guest memory"
    # a chain that reads the used ring sees what the backend wrote there meanwhile: the
    # model cannot know those bytes, so it only checks the rest for such examples
    exact = not any(overlaps(a, n, used_lo, used_hi) for a, n in f.touched)
    got = bench.recv(f.b, len(frames), steps=3) if frames else []
    got = [fr for _, fr in got] + [fr for _, fr in f.b.recv_frames(timeout=0, count=10000)]
    if len(f.b.queues[0].outstanding) < 300:
        f.b.post_rx_buffers(300, 4096)
    event(f"tx: {expect_reason or 'not broken'}")
    event(f"tx: {min(len(consumed), 3)}+ chains consumed, {min(len(frames), 3)}+ forwarded")
    if not exact:
        f.learned_unknown = True
        return
    assert reason == expect_reason
    assert q.used_idx() == len(consumed)
    assert [q.read_used_elem(i) for i in range(len(consumed))] == [(hd, 0) for hd in consumed]
    assert (delta["drop_runt"], delta["drop_oversize"], delta["drop_bad_offload"], delta["in_frames"]) == \
        (runts, oversize, bad_offload, len(frames))
    assert delta["drop_bad_desc"] == (1 if expect_reason not in (None, AVAIL_IDX, HEAD) else 0)
    # b got what the model forwarded, in order, except frames addressed to a MAC the
    # switch learned on h's own port (those do not leave h)
    i = 0
    for fr in frames:
        must = bool(fr[0] & 1) or not (f.learned_unknown or fr[:6] in f.learned or fr[:6] == fr[6:12])
        if not fr[6] & 1:
            f.learned.add(fr[6:12])
        if i < len(got) and got[i] == fr:
            i += 1
        else:
            assert not must, "a frame the model forwards did not arrive, or arrived changed"
    assert i == len(got), "b received frames the model did not forward"


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_random_rx_rings(fuzzer, data):
    """Random receive rings on h; b sends h a frame.  The backend writes only into the
    device-writable buffers of chains it then reports used (and the used ring), with
    lengths within them, in avail order; those bytes are the header (num_buffers right)
    and the frame.  Or h is broken, for one of the known reasons."""
    f, bench = fuzzer, fuzzer.bench
    table, ring, heads, avail_idx = ring_draws(data, rx_valid_chain)
    size = data.draw(st.integers(60, 5000), "size")
    q = f.prepare(0, table, ring, heads, avail_idx)
    frame = ether(BCAST, B_MAC, pattern(size - 14, size))
    f.b.send_frame(frame)
    bench.step(2)
    f.b.reclaim_tx()
    reason = bench.broken("h")
    assert reason is None or reason in REASONS
    used = q.used_idx()
    rings = [(q.desc, q.desc + 16 * FUZZ_Q), (q.avail, q.avail + 6 + 2 * FUZZ_Q),
             (q.used, q.used + 6 + 8 * FUZZ_Q), (TABLE_AT, TABLE_AT + 16 * 8)]
    # the model: the chains the driver made available, in order, up to the first bad one;
    # the device owns their writable buffers (it may write there before it knows the
    # frame fits, as long as it only reports complete frames used)
    chains, exact = [], True
    for slot in range(avail_idx if avail_idx <= FUZZ_Q else 0):
        if heads[slot] >= FUZZ_Q:
            break
        try:
            pieces = walk(ring, f.read_model, heads[slot], writable=True)
        except ModelBroken:
            break
        chains.append(pieces)
        if any(overlaps(a, n, lo, hi) for a, n in pieces for lo, hi in rings):
            exact = False        # a buffer over the rings changes what the next walk reads
            break
    if not exact and any(overlaps(a, n, q.used, q.used + 6 + 8 * FUZZ_Q) for pieces in chains
                         for a, n in pieces):
        return                   # the guest gave its own used ring as a buffer: the frame's
                                 # bytes may stand where the used index is read back
    assert used <= min(avail_idx, FUZZ_Q)
    allowed = [p for pieces in chains for p in pieces]
    written = b""
    for i in range(used):
        head, length = q.read_used_elem(i)
        assert head == heads[i]
        if exact:
            assert i < len(chains), "a chain the rules reject was used"
            assert length <= sum(n for _, n in chains[i])
            for a, n in chains[i]:
                take = min(n, length)
                written += h_read(f, a, take)
                length -= take
    if exact:
        for x in f.changed(q):
            assert rings[2][0] <= x < rings[2][1] or any(a <= x < a + n for a, n in allowed), \
                f"the backend wrote guest memory at {x:#x}, outside the buffers it was given"
    event(f"rx: {reason or 'not broken'}, {min(used, 3)}+ buffers used")
    if used and exact:
        assert reason is None
        spans = sorted(allowed[:sum(len(c) for c in chains[:used])])
        if all(a1 + n1 <= a2 for (a1, n1), (a2, _) in zip(spans, spans[1:])):   # buffers disjoint
            assert VirtioNetHdr.unpack(written[:FUZZ_HL]).num_buffers == used
            assert written[FUZZ_HL:] == frame


def h_read(f, a, n):
    return f.h.mem.read(a, n) if n else b""


# ---------------------------------------------------------------------------
# vhostni run as a process
# ---------------------------------------------------------------------------

@pytest.fixture
def proc():
    p = DaemonProcess(("h", "a", "b"))
    yield p
    p.close()


def proc_connect(p, name):
    """A driver set up on a vhostni run NI.  The setup messages after SET_MEM_TABLE get no
    reply, so a GET_FEATURES round trip makes sure the daemon has acted on all of them
    (until then the NIC is simply not up yet and frames for it are dropped as link down)."""
    drv = VirtioNetDriver.connect(p.sock_path(name))
    drv.frontend.call(Request.GET_FEATURES)
    return drv


def proc_pair(p):
    a = proc_connect(p, "a")
    b = proc_connect(p, "b")
    p.drivers += [a, b]
    a.post_rx_buffers(64, 2048)
    b.post_rx_buffers(64, 2048)
    return a, b


def proc_pair_works(a, b, seed=0):
    for src, dst, s, d in ((a, b, A_MAC, B_MAC), (b, a, B_MAC, A_MAC)):
        frame = ether(d, s, pattern(200, seed))
        src.send_frame(frame)
        got = dst.recv_frames(timeout=3)
        assert [f for _, f in got] == [frame]
        src.wait_tx_done(1)


def test_daemon_process_survives_hostile_guests_and_does_not_leak(proc):
    """vhostni run with three NIs: h misbehaves in every way above, one connection after
    another; the process lives, says why h is broken in its stats file, serves a and b
    throughout, and its fd and mapping counts come back to where they were."""
    a, b = proc_pair(proc)
    proc_pair_works(a, b)
    pid = proc.pid
    fds, maps = fd_count(pid), map_count(pid)

    def hostile(case):
        h = proc_connect(proc, "h")
        try:
            build, reason = TX_CASES[case]
            gpa, data = tx_frame(h)
            post_raw(h.queues[1], build(h, gpa, data))
            t0 = time.time()
            deadline = time.monotonic() + 3
            while True:
                st_ = proc.stats(fresh_after=t0)
                if st_["nis"]["h"]["broken"] == reason or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert st_["nis"]["h"]["broken"] == reason
            assert st_["nis"]["a"]["broken"] is None and st_["nis"]["b"]["broken"] is None
        finally:
            h.close(graceful=False)

    for i, case in enumerate(["addr-outside-memory", "loop-self", "indirect-nested", "len-0xffffffff"]):
        hostile(case)
        proc_pair_works(a, b, seed=i)
    # malformed messages and stray fds, over and over
    for i in range(100):
        fe = VhostUserFrontend.connect(proc.sock_path("h"))
        case = sorted(MALFORMED)[i % len(MALFORMED)]
        if i % 3 == 0:
            send_with_fds(fe, EXTRA_FD_MESSAGES["set-owner"], 5)
        else:
            fe.send_raw(MALFORMED[case])
        if i % 3 == 0 or not case.startswith("truncated"):
            assert fe.peer_closed(2)
        fe.close()
    # full set-ups and tear-downs
    for i in range(100):
        h = VirtioNetDriver.connect(proc.sock_path("h"))
        h.close(graceful=i % 2 == 0)
    proc_pair_works(a, b, seed=9)
    deadline = time.monotonic() + 3       # the daemon may not have seen the last EOF yet
    while (fd_count(pid), map_count(pid)) != (fds, maps) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.proc.alive
    assert fd_count(pid) == fds
    assert map_count(pid) == maps
    errors = sum(1 for i in range(100) if i % 3 == 0 or not sorted(MALFORMED)[i % len(MALFORMED)].startswith("truncated"))
    assert proc.stats(fresh_after=time.time())["nis"]["h"]["protocol_errors"] >= errors


def test_a_broken_nic_is_logged_once_and_counted_by_the_switch(trio, caplog):
    """The daemon's housekeeping names a broken NI in the log once (not every tick), and
    asks every port only while some port is broken: Switch.ports_broken() is one C call,
    so hundreds of idle NIs cost the tick nothing per NI."""
    import logging
    h, bench = trio.h, trio.bench
    sw = bench.daemon.switch
    assert sw.ports_broken() == 0
    post_raw(h.queues[1], [(0, FAR, 64, 0, 0)])
    bench.step(2)
    assert bench.broken("h") == "descriptor buffer outside guest memory"
    assert sw.ports_broken() == 1
    with caplog.at_level(logging.ERROR, logger="vhostni"):
        for _ in range(3):
            bench.daemon._housekeeping()
    logged = [r.getMessage() for r in caplog.records if "broke the virtio rules" in r.getMessage()]
    assert logged == ["NI h: guest broke the virtio rules (descriptor buffer outside guest memory); "
                      "NIC stopped until the guest driver resets it"]
    assert bench.broken("a") is None and bench.broken("b") is None
