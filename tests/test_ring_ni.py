"""The NI's side of scanner rings (csrc/ring.c): frames a scanner's subscriptions matched are
published on its ring, its decisions come back on the ring and are applied in C, hold
timeouts and full rings give the policy's default, and a scanner that writes nonsense into
its region breaks only its own ring.

In-process: two sink ports of one switch (the guest's NI with the policy, and the network);
the scanner is tests/ringkit.py, written from the ABI alone.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import random

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ringkit import RawRing
from vhostni.fastpath import Switch, lib
from vhostni.policy import parse_match, parse_policy

GMAC, NMAC = "02:00:00:00:0a:0a", "02:00:00:00:0b:0b"
GIP, NIP = "10.0.0.1", "10.0.0.2"
T0 = 1_700_000_000 * 10**9
ALL_OUT = {"direction": "from_guest"}
VERDICT = {"pass": lib.VNR_PASS, "cut": lib.VNR_CUT}


def frame(i: int = 0, size: int = 0) -> bytes:
    pad = b"x" * max(0, size - 42)
    return bytes(Ether(src=GMAC, dst=NMAC) / IP(src=GIP, dst=NIP) /
                 UDP(sport=1000 + i % 50000, dport=53) / Raw(i.to_bytes(4, "big") + pad))


class Net:
    """The guest's NI (sink port 0) whose frame subscriptions deliver to rings, and the
    network (sink port 1)."""

    def __init__(self, rings=((ALL_OUT, True),), desc_slots=256, dec_slots=256,
                 data_bytes=256 << 10, kernel_subs=(), **ni):
        self.sw = Switch()
        self.guest = self.sw.add_sink_port()
        self.net = self.sw.add_sink_port()
        self.sw.set_clock(T0)
        doc = {"ni": dict({"mac": GMAC, "addresses": [f"{GIP}/32"]}, **ni)}
        self.policy = parse_policy(doc)
        self.rings = []
        subs, chans = [], []
        for match, contain in rings:
            slot = self.sw.ring_open(self.guest.index, desc_slots, dec_slots, data_bytes)
            self.rings.append((slot, RawRing(self.sw.ring_info(self.guest.index, slot))))
            subs.append((parse_match("t", match), contain))
            chans.append(slot + 1)
        for match, contain in kernel_subs:
            subs.append((parse_match("t", match), contain))
            chans.append(0)
        self.guest.set_policy(self.policy.compile(subs, sub_rings=chans))

    def ring(self, i: int = 0) -> RawRing:
        return self.rings[i][1]

    def info(self, i: int = 0) -> dict:
        return self.sw.ring_info(self.guest.index, self.rings[i][0])

    def out(self, *frames: bytes) -> int:
        """The guest sends ``frames``; how many reached the network at once."""
        for f in frames:
            self.guest.inject_from(f)
        return self.delivered()

    def delivered(self) -> int:
        """Frames that reached the network since the last call (all of them: self.total)."""
        k = sum(1 for p, _ in self.sw.sink_frames() if p == self.net.index)
        self.total = getattr(self, "total", 0) + k
        return k

    def poll(self) -> int:
        """The switch reads the rings (its loop does this each pass)."""
        self.sw.ring_poll()
        return self.delivered()

    def advance(self, seconds: float) -> None:
        self.sw.set_clock(self.sw_clock() + int(seconds * 1e9))

    def sw_clock(self) -> int:
        self._t = getattr(self, "_t", T0)
        return self._t

    def close(self):
        for _, r in self.rings:
            r.close()
        self.sw.close()


@pytest.fixture
def net():
    made = []

    def make(*a, **kw):
        made.append(Net(*a, **kw))
        return made[-1]
    yield make
    for n in made:
        n.close()


def test_header_describes_the_regions(net):
    n = net()
    r = n.ring()
    assert (r.magic, r.version) == (lib.VNR_MAGIC, 1)
    assert (r.desc_slots, r.dec_slots) == (256, 256)
    assert r.data_off + r.data_size == r.size == os.fstat(n.info()["ni_fd"]).st_size
    assert r.desc_off + 32 * r.desc_slots <= r.data_off
    assert r.sc_size >= 256 + 16 * r.dec_slots


def test_held_frame_passes_or_is_cut_by_its_scanner(net):
    n = net()
    r = n.ring()
    assert n.out(frame(1), frame(2)) == 0                  # held
    got = r.poll()
    assert [d.seq for d in got] == [0, 1] and all(d.held and d.dir == 1 for d in got)
    assert r.data(got[0]) == frame(1) and r.data(got[1]) == frame(2)
    r.decide((0, VERDICT["pass"]), (1, VERDICT["cut"]))
    assert n.poll() == 1
    st = n.info()
    assert (st["passed"], st["cut"], st["owed"], st["delivered"]) == (1, 1, 0, 2)
    assert n.guest.stats()["held_passed"] == 1 and n.guest.stats()["held_cut"] == 1


def test_read_only_subscription_copies_and_forwards_at_once(net):
    n = net(rings=((ALL_OUT, False),))
    assert n.out(frame(1)) == 1
    (d,) = n.ring().poll()
    assert not d.held and n.ring().data(d) == frame(1)
    assert n.info()["held"] == 0


def test_thousands_of_frames_wrap_both_rings_decided_out_of_order(net):
    """Far more frames than descriptor, decision or data slots: everything passed arrives,
    everything cut does not, in whatever order the scanner decides."""
    n = net(desc_slots=64, dec_slots=64)
    rng = random.Random(7)
    r = n.ring()
    sent = passed = 0
    for burst in range(60):                     # ~1,800 frames: the 64-slot rings wrap ~28 times
        k = rng.randint(1, 60)
        n.out(*(frame(sent + i, size=rng.choice((60, 600, 1514))) for i in range(k)))
        sent += k
        got = r.poll()
        assert len(got) == k, f"burst {burst}: the ring took {len(got)} of {k}"
        rng.shuffle(got)
        for i in range(0, len(got), 16):
            batch = [(d.seq, VERDICT["pass"] if d.seq % 3 else VERDICT["cut"]) for d in got[i:i + 16]]
            passed += sum(1 for _, v in batch if v == VERDICT["pass"])
            r.decide(*batch)
            n.sw.ring_poll()
        r.consume()
    n.delivered()
    assert n.total == passed
    st = n.info()
    assert st["delivered"] == sent and st["passed"] == passed and st["owed"] == 0
    assert st["ring_full"] == 0 and st["broken"] == 0


def test_kernel_and_ring_both_holding_need_both_passes(net):
    n = net(kernel_subs=((ALL_OUT, True),))
    assert n.out(frame(1)) == 0
    (p,) = [p for p in iter(n.sw.next_punt, None)]
    assert p.rings == 1 << n.rings[0][0]                  # the kernel learns the ring got it
    (d,) = n.ring().poll()
    n.sw.decide_held(p.id, True)
    assert n.delivered() == 0                             # the scanner has not passed it
    n.ring().decide((d.seq, VERDICT["pass"]))
    assert n.poll() == 1
    # and a cut from either is final
    n.out(frame(2))
    (p,) = [p for p in iter(n.sw.next_punt, None)]
    (d,) = n.ring().poll()
    n.ring().decide((d.seq, VERDICT["cut"]))
    n.poll()
    n.sw.decide_held(p.id, True)
    assert n.delivered() == 0


@pytest.mark.parametrize("default", ["cut", "pass"])
def test_hold_timeout_gives_the_default(net, default):
    n = net(hold_timeout_ms=500, default_decision=default)
    n.out(frame(1))
    n.sw.set_clock(T0 + 400_000_000)
    assert n.poll() == 0
    n.sw.set_clock(T0 + 600_000_000)
    assert n.poll() == (1 if default == "pass" else 0)
    st = n.info()
    assert st["timeouts"] == 1 and st["timeouts_in_a_row"] == 1 and st["owed"] == 0
    # a late decision is stale: counted, nothing happens
    n.ring().poll()
    n.ring().decide((0, VERDICT["pass"]))
    assert n.poll() == 0
    assert n.info()["stale"] == 1 and n.info()["broken"] == 0


@pytest.mark.parametrize("default", ["cut", "pass"])
def test_full_ring_gives_the_default_at_once(net, default):
    """A scanner that never consumes nor decides fills its ring: the frames it would have
    held get the default there and then, counted; nothing else stalls."""
    n = net(desc_slots=64, default_decision=default)
    got = n.out(*(frame(i) for i in range(100)))
    assert got == (36 if default == "pass" else 0)
    st = n.info()
    assert st["ring_full"] == 36 and st["owed"] == 64
    assert n.guest.stats()["drop_ring_full"] == (0 if default == "pass" else 36)


def test_data_area_full_is_back_pressure_too(net):
    n = net(desc_slots=4096, data_bytes=256 << 10, default_decision="pass")
    n.out(*(frame(i, size=1514) for i in range(200)))       # 200 x 1536 > 256 KiB
    st = n.info()
    assert 0 < st["ring_full"] < 200 and st["delivered"] + st["ring_full"] == 200
    # consuming and deciding frees it again
    r = n.ring()
    r.decide(*[(d.seq, VERDICT["pass"]) for d in r.poll()])
    r.consume()
    n.sw.ring_poll()
    before = n.info()["ring_full"]
    n.out(*(frame(i, size=1514) for i in range(10)))
    assert n.info()["ring_full"] == before


def test_close_settles_what_the_scanner_owed(net):
    n = net()
    n.out(frame(1), frame(2))
    n.sw.ring_close(n.guest.index, n.rings[0][0], True)
    assert n.delivered() == 2
    assert n.sw.ring_info(n.guest.index, n.rings[0][0]) is None
    # the subscription still names the closed ring: the default (cut) stands for it
    assert n.out(frame(3)) == 0
    assert n.guest.stats()["drop_ring_full"] == 1


def test_a_closed_rings_slot_is_not_reused_while_the_policy_names_it(net):
    """Scanner A's ring closes (it died) while the policy still routes A's subscription to
    it: a ring opened meanwhile for scanner B must not receive A's frames."""
    n = net()
    slot_a = n.rings[0][0]
    n.sw.ring_close(n.guest.index, slot_a, False)
    slot_b = n.sw.ring_open(n.guest.index, 256, 256, 256 << 10)
    assert slot_b != slot_a
    b = RawRing(n.sw.ring_info(n.guest.index, slot_b))
    n.out(frame(1))
    assert b.poll() == [] and n.sw.ring_info(n.guest.index, slot_b)["delivered"] == 0
    b.close()


def test_port_removed_with_rings_open(net):
    n = net()
    n.out(frame(1))
    n.guest.remove()
    assert n.sw.ring_info(n.guest.index, 0) is None


def test_kicks_only_when_the_scanner_sleeps(net):
    n = net()
    r = n.ring()
    n.out(frame(1))
    assert r.kicks_pending() == 0                         # busy scanner: no kick
    r.set_want_kick(1)
    n.out(frame(2))
    assert r.kicks_pending() == 1
    r.set_want_kick(0)
    n.out(frame(3))
    assert r.kicks_pending() == 0


# ---- hostile scanners: whatever they write, only their own ring breaks

def _broken(n, why):
    st = n.info()
    assert st["broken"] == why, st
    assert n.ring().broken == why
    return st


@pytest.mark.parametrize("default", ["cut", "pass"])
def test_decision_for_a_frame_never_given_breaks_the_ring(net, default):
    n = net(default_decision=default)
    n.out(frame(1), frame(2))
    n.ring().decide((5, VERDICT["pass"]))
    got = n.poll()
    st = _broken(n, lib.VNR_BROKEN_DEC_SEQ)
    assert st["owed"] == 0 and got == (2 if default == "pass" else 0)
    # a broken ring takes nothing more: the default at once
    assert n.out(frame(3)) == (1 if default == "pass" else 0)


def test_bad_verdict_breaks_the_ring(net):
    n = net()
    n.out(frame(1))
    n.ring().decide((0, 7))
    assert n.poll() == 0
    _broken(n, lib.VNR_BROKEN_VERDICT)


@pytest.mark.parametrize("value", [5, 2**64 - 1])
def test_consumer_index_past_the_producer_breaks_the_ring(net, value):
    n = net()
    n.out(frame(1))
    n.ring().consume(value)
    n.poll()
    _broken(n, lib.VNR_BROKEN_DESC_CONS)


def test_consumer_index_going_back_breaks_the_ring(net):
    n = net()
    n.out(frame(1), frame(2))
    r = n.ring()
    r.poll()
    r.consume(2)
    n.poll()
    r.consume(1)
    n.poll()
    _broken(n, lib.VNR_BROKEN_DESC_CONS)


@pytest.mark.parametrize("jump", [257, 2**63, -1])
def test_decision_index_jumping_breaks_the_ring(net, jump):
    n = net()
    n.out(frame(1))
    n.ring().set_dec_prod(jump % 2**64)
    n.poll()
    _broken(n, lib.VNR_BROKEN_DEC_PROD)


def test_frames_another_party_cut_are_not_owed_nor_missed(net):
    """The kernel cuts a frame the ring also holds: the scanner no longer owes it, and its
    hold timeout does not count against the scanner (which would end in a hung kill)."""
    n = net(kernel_subs=((ALL_OUT, True),), hold_timeout_ms=500)
    n.out(frame(1), frame(2))
    punts = [p for p in iter(n.sw.next_punt, None)]
    n.sw.release_held(punts[0].id, False)
    assert n.info()["owed"] == 1
    n.sw.set_clock(T0 + 10**9)
    n.sw.ring_poll()
    st = n.info()
    assert st["timeouts"] == 1 and st["owed"] == 0          # frame 2 only


def test_duplicate_and_stale_decisions_are_counted_not_applied(net):
    n = net(kernel_subs=((ALL_OUT, True),))
    n.out(frame(1))
    (p,) = [p for p in iter(n.sw.next_punt, None)]
    r = n.ring()
    r.poll()
    r.decide((0, VERDICT["pass"]), (0, VERDICT["pass"]), (0, VERDICT["cut"]))
    n.poll()
    st = n.info()
    assert (st["passed"], st["cut"], st["stale"], st["broken"]) == (1, 0, 2, 0)
    n.sw.decide_held(p.id, True)
    assert n.delivered() == 1                            # the stale cut did nothing


def test_hostile_decisions_fuzzed_never_crash_the_ni(net):
    """Random words in region B, between random traffic: the NI breaks the ring or ignores
    what it cannot use, every held frame is settled, nothing crashes (ASan runs this too)."""
    rng = random.Random(11)
    for trial in range(30):
        n = net(desc_slots=64, dec_slots=64, default_decision=rng.choice(["cut", "pass"]))
        r = n.ring()
        for _ in range(20):
            n.out(*(frame(i) for i in range(rng.randint(0, 10))))
            r.poll()
            what = rng.randrange(4)
            if what == 0:
                r.write_dec(rng.randrange(64), rng.getrandbits(rng.choice([3, 8, 64])),
                            rng.choice([0, 1, 2, 2**32 - 1]))
            elif what == 1:
                r.set_dec_prod(r.dec_cons + rng.randint(0, 70) if rng.random() < 0.8 else rng.getrandbits(64))
            elif what == 2:
                r.set_desc_cons(rng.randint(0, r.desc_prod + 2))
            n.sw.ring_poll()
        n.sw.set_clock(T0 + 10**10)
        n.sw.ring_poll()
        assert n.info()["owed"] == 0
        assert n.guest.stats()["held"] == n.guest.stats()["held_passed"] + n.guest.stats()["held_cut"]


def test_scanner_cannot_write_region_a_or_resize_either(net):
    n = net()
    info = n.info()
    with pytest.raises(PermissionError):
        mmap.mmap(info["ni_fd"], 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    with pytest.raises(OSError) as e:
        os.pwrite(info["ni_fd"], b"x", 64)
    assert e.value.errno == errno.EPERM
    for fd in (info["ni_fd"], info["sc_fd"]):
        for size in (0, 1 << 30):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, 1033, 0x8)                    # F_ADD_SEALS: no more seals either
    # a read-only mapping cannot be made writable either
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    size = n.ring().size
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, info["ni_fd"], 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    try:
        assert libc.mprotect(addr, size, mmap.PROT_READ | mmap.PROT_WRITE) == -1
        assert ctypes.get_errno() == errno.EACCES
    finally:
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))


def test_batch_injection_and_a_discarding_sink(net):
    """The harness the ring benchmarks feed from C with: frames end to end in one call, into
    a sink that only counts."""
    n = net(rings=())
    n.net.sink_discard()
    frames = [frame(i, size=60 + i) for i in range(100)]
    assert n.guest.inject_batch(b"".join(frames), [len(f) for f in frames]) == 100
    st = n.net.stats()
    assert st["out_frames"] == 100 and st["out_bytes"] == sum(map(len, frames))
    assert list(n.sw.sink_frames()) == []
    # a bad length stops the batch there
    assert n.guest.inject_batch(b"".join(frames[:3]) + b"x" * 10, [len(f) for f in frames[:3]] + [10]) == 3
    with pytest.raises(Exception):
        n.guest.inject_batch(b"x" * 10, [10])
