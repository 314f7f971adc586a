"""The scanner's side of the shared-memory rings (csrc/vnring.h, vhostni/scanner/ring.py),
against a fake NI (tests/fakeni.py) and a fake kernel socket: frames as views, decisions
in batches, wraparound, the want_kick protocol both ways, a hostile NI's headers and
descriptors, sync ordering, frames_batch, and a scanner in C (tests/c/null_ring_scanner.c)."""
from __future__ import annotations

import mmap
import os
import select
import struct
import shutil
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

from vhostni.scanner import Frame, Scanner, ScannerError, wire
from vhostni.scanner import ring as R
from vhostni.scanner.ring import RingFrame

from fakeni import FakeKernel, FakeNI, Thread

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def pair():
    """(fake kernel, fake NI, scanner on the ring)."""
    made = []

    def make(ni_kw=None, reply=True, config=None, hello=None):
        k = FakeKernel(config)
        ni = FakeNI(**(ni_kw or {}))
        made.append((k, ni))
        if reply is not None:
            k.reply(1, ok=reply, error="unknown op 'ring'")   # the SDK's first request
        sc = Scanner(k.child, lockdown=False, ring_fds=ni.fds)
        body = k.recv_control("ring")
        assert body == {"op": "ring", "version": 1, "id": 1}
        assert isinstance(wire.decode_request(body), wire.RingRequest)
        return k, ni, sc
    yield make
    for k, ni in made:
        k.close()
        ni.close()


def frame(i: int, marker: bytes = b"") -> bytes:
    return b"\x02" * 12 + b"\x08\x00" + i.to_bytes(8, "big") + marker + b"\0" * (i % 50)


def test_frames_arrive_as_views_and_decisions_go_in_a_batch(pair):
    k, ni, sc = pair()
    assert sc.ring is not None
    seqs = ni.publish([(frame(0), wire.FROM_GUEST, True, 1_500_000_000_000_000_000),
                       (frame(1), wire.TO_GUEST, False, 0),
                       (frame(2), wire.FROM_GUEST, True, 0)])
    assert seqs == [0, 1, 2]
    f0 = sc.recv(timeout=1)
    assert isinstance(f0, RingFrame) and isinstance(f0, Frame)
    assert (f0.number, f0.direction, f0.held, f0.time) == (0, wire.FROM_GUEST, True, 1.5e9)
    assert isinstance(f0.data, memoryview) and f0.data.readonly and f0.data == frame(0)
    with pytest.raises(TypeError):
        f0.data[0] = 1
    sc.pass_(f0)
    assert ni.read_decisions() == []                 # buffered, not yet published
    assert ni.desc_cons() == 0                       # f0's bytes are still in use
    f1 = sc.recv(timeout=1)
    assert ni.desc_cons() == 1                       # asking for f1 gave f0's bytes back
    assert (f1.number, f1.held, bytes(f1.data)) == (1, False, frame(1))
    f2 = sc.recv(timeout=1)
    sc.cut(f2)
    assert sc.recv(timeout=0.05) is None             # waiting published the decisions
    assert ni.read_decisions() == [(0, wire.PASS), (2, wire.CUT)]
    assert ni.desc_cons() == 3


def test_decisions_are_published_every_batch_without_waiting(pair):
    k, ni, sc = pair(ni_kw={"desc_slots": 256, "dec_slots": 256})
    ni.publish([(frame(i), wire.FROM_GUEST, True) for i in range(sc.RING_BATCH + 5)])
    for _ in range(sc.RING_BATCH):
        sc.pass_(sc.recv(timeout=1))
    assert len(ni.read_decisions()) == sc.RING_BATCH
    sc.pass_(sc.recv(timeout=1))
    sc.flush()
    assert ni.read_decisions() == [(sc.RING_BATCH, wire.PASS)]


def test_ring_refused_keeps_frames_on_the_socket(pair):
    k, ni, sc = pair(reply=False)
    assert sc.ring is None
    k.sock.send(wire.encode_frame(1, wire.FROM_GUEST, True, 0, b"abc"))
    f = sc.recv(timeout=1)
    assert not isinstance(f, RingFrame)
    assert isinstance(f.data, memoryview) and f.data == b"abc"     # the same shape either way
    sc.cut(f)
    assert k.recv() == wire.Decision(1, wire.CUT)


def test_a_frame_sent_on_the_socket_before_the_ring_is_decided_on_the_socket(pair):
    k = FakeKernel()
    ni = FakeNI()
    try:
        k.sock.send(wire.encode_frame(5, wire.FROM_GUEST, True, 0, b"early"))
        k.reply(1)
        sc = Scanner(k.child, lockdown=False, ring_fds=ni.fds)
        ni.publish([(b"late", wire.FROM_GUEST, True)])
        early, late = sc.recv(timeout=1), sc.recv(timeout=1)
        assert (bytes(early.data), bytes(late.data)) == (b"early", b"late")
        sc.pass_(early)
        sc.pass_(late)
        k.recv_control("ring")
        assert k.recv() == wire.Decision(5, wire.PASS)
        sc.flush()
        assert ni.read_decisions() == [(0, wire.PASS)]
    finally:
        k.close()
        ni.close()


def test_many_thousand_frames_wrap_both_rings(pair):
    """20000 frames through 64 descriptor slots and 16 decision slots: every held frame
    decided once, with the verdict its bytes call for, and its bytes intact."""
    k, ni, sc = pair(ni_kw={"desc_slots": 64, "dec_slots": 16})
    n = 20000

    def feed():
        sent = 0
        while sent < n or len(ni.decisions) < n * 2 // 3:
            ni.read_decisions()
            room = min(ni.room(), n - sent, 50)
            if room > 0:
                ni.publish([(frame(i, b"CUT" if i % 5 == 0 else b""), 1 + i % 2, i % 3 != 0)
                            for i in range(sent, sent + room)])
                sent += room
            else:
                time.sleep(0.0002)
        return sent
    t = Thread(feed)
    t.start()
    got = 0
    while got < n:
        batch = sc.frames_batch(max=37, timeout=10)
        assert batch, "the scanner starved"
        for f in batch:
            assert f.number == got and bytes(f.data[14:22]) == got.to_bytes(8, "big")
            assert f.direction == 1 + got % 2 and f.held == (got % 3 != 0)
            if f.held:
                (sc.cut if b"CUT" in bytes(f.data) else sc.pass_)(f)
            got += 1
    sc.flush()
    t.join()
    want = [(i, wire.CUT if i % 5 == 0 else wire.PASS) for i in range(n) if i % 3 != 0]
    assert ni.decisions == want


def test_a_sleeping_scanner_is_kicked(pair):
    k, ni, sc = pair()
    t = Thread(lambda: sc.recv(timeout=10))
    t.start()
    deadline = time.monotonic() + 5
    while not ni.scanner_wants_kick():
        assert time.monotonic() < deadline, "the scanner never said it sleeps"
        time.sleep(0.001)
    ni.publish([(b"wake", wire.FROM_GUEST, False)])
    assert ni.kicks == 1
    f = t.join()
    assert f is not None and f.data == b"wake"
    assert not ni.scanner_wants_kick()               # cleared on waking
    ni.publish([(b"busy", wire.FROM_GUEST, False)])
    assert ni.kicks == 1                             # an awake scanner is not kicked
    assert sc.recv(timeout=1).data == b"busy"


def test_a_sleeping_ni_is_kicked_and_an_awake_one_is_not(pair):
    k, ni, sc = pair()
    ni.publish([(b"a", wire.FROM_GUEST, True), (b"b", wire.FROM_GUEST, True)])
    sc.pass_(sc.recv(timeout=1))
    sc.flush()
    assert sc.ring.kicks_sent == 0                   # the NI did not ask
    t = Thread(lambda: ni.sleep_for_decisions(10))
    t.start()
    deadline = time.monotonic() + 5
    while not ni.wa.u32(R.NI_WANT_KICK):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    sc.cut(sc.recv(timeout=1))
    sc.flush()
    assert t.join() is True
    assert sc.ring.kicks_sent == 1
    assert ni.read_decisions() == [(0, wire.PASS), (1, wire.CUT)]


def test_a_full_decision_ring_waits_for_the_ni(pair):
    k, ni, sc = pair(ni_kw={"desc_slots": 64, "dec_slots": 4})
    ni.publish([(frame(i), wire.FROM_GUEST, True) for i in range(10)])
    for _ in range(10):
        sc.pass_(sc.recv(timeout=1))

    def reader():
        while len(ni.decisions) < 10:
            ni.read_decisions()
            time.sleep(0.001)
    t = Thread(reader)
    t.start()
    sc.flush()
    t.join()
    assert [s for s, _ in ni.decisions] == list(range(10))


def test_an_ni_that_never_reads_decisions_is_an_error_not_a_hang(pair, monkeypatch):
    k, ni, sc = pair(ni_kw={"dec_slots": 2})
    monkeypatch.setattr(sc.ring, "DEC_WAIT", 0.2)
    ni.publish([(frame(i), wire.FROM_GUEST, True) for i in range(3)])
    for _ in range(3):
        sc.pass_(sc.recv(timeout=1))
    with pytest.raises(ScannerError, match="read no decision"):
        sc.flush()


def test_a_broken_ring_says_why(pair):
    k, ni, sc = pair(ni_kw={"dec_slots": 2})
    ni.publish([(frame(i), wire.FROM_GUEST, True) for i in range(3)])
    for _ in range(3):
        sc.pass_(sc.recv(timeout=1))
    ni.wa.set_u32(R.NI_BROKEN, 3)
    with pytest.raises(ScannerError, match="never given"):
        sc.flush()


def test_sync_is_answered_after_the_ring_frames_before_it_and_their_decisions(pair):
    k, ni, sc = pair()
    ni.publish([(frame(i), wire.FROM_GUEST, True) for i in range(3)])
    k.send({"op": "sync", "id": 7})
    for i in range(3):
        f = sc.recv(timeout=1)
        assert f.number == i
        if i == 0:
            ni.publish([(frame(3), wire.FROM_GUEST, True)])     # after the sync was taken in
        r, _, _ = select.select([k.sock], [], [], 0.05)
        assert not r, "synced before the frames sent before the sync were taken"
        sc.pass_(f)
    f3 = sc.recv(timeout=1)                          # asking again answers the sync
    assert k.recv_control("synced") == {"op": "synced", "id": 7}
    assert ni.read_decisions() == [(0, wire.PASS), (1, wire.PASS), (2, wire.PASS)]
    assert f3.number == 3


def test_frames_batch_keeps_its_views_until_the_next_call(pair):
    k, ni, sc = pair()
    ni.publish([(frame(i), wire.FROM_GUEST, i % 2 == 0) for i in range(10)])
    b1 = sc.frames_batch(max=4, timeout=1)
    assert [f.number for f in b1] == [0, 1, 2, 3]
    assert ni.desc_cons() == 0                       # all four still readable
    assert [bytes(f.data) for f in b1] == [frame(i) for i in range(4)]
    for f in b1:
        if f.held:
            sc.pass_(f)
    b2 = sc.frames_batch(timeout=1)
    assert ni.desc_cons() == 4
    assert [f.number for f in b2] == list(range(4, 10))
    assert sc.frames_batch(timeout=0.05) == []
    assert ni.desc_cons() == 10
    assert ni.read_decisions() == [(0, wire.PASS), (2, wire.PASS)]


def test_a_timeout_of_zero_takes_what_the_ring_has(pair):
    # a scanner that polls without waiting (timeout 0) between its own work must still get the frames
    # the NI published: the ring is read before the deadline is looked at
    k, ni, sc = pair()
    assert sc.frames_batch(timeout=0) == []
    ni.publish([(frame(i), wire.FROM_GUEST, True) for i in range(3)])
    assert [f.number for f in sc.frames_batch(timeout=0)] == [0, 1, 2]
    ni.publish([(frame(3), wire.FROM_GUEST, True)])
    f = sc.recv(timeout=0)
    assert f is not None and f.number == 3
    assert sc.recv(timeout=0) is None


def test_frames_batch_stops_at_a_sync(pair):
    k, ni, sc = pair()
    ni.publish([(frame(0), wire.FROM_GUEST, True)])
    k.send({"op": "sync", "id": 3})
    sc.ready()                                       # takes the sync in: f0, then the sync
    ni.publish([(frame(1), wire.FROM_GUEST, True), (frame(2), wire.FROM_GUEST, True)])
    b = sc.frames_batch(timeout=1)
    assert [f.number for f in b] == [0]
    sc.pass_(b[0])
    r, _, _ = select.select([k.sock], [], [], 0.05)
    assert not r
    assert [f.number for f in sc.frames_batch(timeout=1)] == [1, 2]
    assert k.recv_control("synced")["id"] == 3
    assert ni.read_decisions() == [(0, wire.PASS)]


def test_frames_batch_leaves_other_events_queued(pair):
    k, ni, sc = pair()
    ni.publish([(frame(0), wire.FROM_GUEST, True)])
    k.send({"op": "flow", "event": "open", "flow": 1})
    k.send({"op": "sync", "id": 3})
    assert [f.number for f in sc.frames_batch(timeout=1)] == [0]
    ni.publish([(frame(1), wire.FROM_GUEST, True)])
    assert [f.number for f in sc.frames_batch(timeout=1)] == [1]
    r, _, _ = select.select([k.sock], [], [], 0.05)
    assert not r, "synced with an event before the sync not taken"
    assert next(sc.flows(timeout=1)).flow == 1
    assert sc.recv(timeout=0.05) is None
    assert k.recv_control("synced")["id"] == 3


def test_capture_clock_follows_ring_frames():
    k = FakeKernel(hello={"clock": "capture", "now": 100.0})
    k.reply(1)
    ni = FakeNI()
    try:
        sc = Scanner(k.child, lockdown=False, ring_fds=ni.fds)
        assert sc.clock() == 100.0
        ni.publish([(b"x", wire.FROM_GUEST, False, 250 * 10**9)])
        assert sc.recv(timeout=1000).time == 250.0
        assert sc.clock() == 250.0
    finally:
        k.close()
        ni.close()


# ---- a hostile (or broken) NI: ScannerError, never a crash

BAD_HEADERS = [
    ({"magic": 0x12345678}, "magic"),
    ({"version": 2}, "version"),
    ({"desc_slots": 48}, "power of two"),
    ({"dec_slots": 0}, "power of two"),
    ({"desc_slots": 1 << 30}, "power of two"),
    ({"desc_off": 100}, "descriptor ring"),
    ({"desc_off": 1 << 40}, "descriptor ring"),
    ({"data_off": 1 << 62}, "data area"),
    ({"data_size": 1 << 40}, "data area"),
    ({"size": 1 << 40}, "memfd has"),
    ({"sc_size": 100}, "region B"),
    ({"sc_size": 1 << 40}, "region B"),
]


@pytest.mark.parametrize("bad,why", BAD_HEADERS)
def test_a_bad_header_is_a_scanner_error(bad, why):
    k = FakeKernel()
    ni = FakeNI(header=bad)
    try:
        with pytest.raises(ScannerError, match=why):
            Scanner(k.child, lockdown=False, ring_fds=ni.fds)
        r, _, _ = select.select([k.sock], [], [], 0)
        assert not r, "asked for a ring it could not use"
    finally:
        k.close()
        ni.close()


def test_a_region_too_small_for_its_header_is_a_scanner_error():
    k = FakeKernel()
    ni = FakeNI()
    small = os.memfd_create("tiny")
    os.ftruncate(small, 100)
    try:
        with pytest.raises(ScannerError, match="smaller than its header"):
            Scanner(k.child, lockdown=False, ring_fds=(small,) + ni.fds[1:])
        k.send(k.hello)
        with pytest.raises(ScannerError, match="cannot stat"):
            Scanner(k.child, lockdown=False, ring_fds=(9999,) + ni.fds[1:])
    finally:
        os.close(small)
        k.close()
        ni.close()


def test_region_a_cannot_be_mapped_writable_by_the_scanner():
    ni = FakeNI()
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(ni.fd_ni, ni.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        ni.close()


BAD_DESCRIPTORS = [
    (dict(off=ni_off, length=10), "outside") for ni_off in (64 * 2048 - 5, 1 << 31, 0xFFFFFFFF)
] + [
    (dict(length=0xFFFFFFFF), "outside"),
    (dict(seq=5), "says seq"),
    (dict(kind=9), "kind"),
    (dict(direction=0), "direction"),
    (dict(direction=3), "direction"),
]


@pytest.mark.parametrize("bad,why", BAD_DESCRIPTORS)
def test_a_bad_descriptor_is_a_scanner_error(pair, bad, why):
    k, ni, sc = pair()
    direction = bad.pop("direction", wire.FROM_GUEST)
    ni.write_desc(0, b"abc", direction, True, 0, **bad)
    ni.set_desc_prod(1)
    with pytest.raises(ScannerError, match=why):
        sc.recv(timeout=1)


@pytest.mark.parametrize("prod", [65, 1 << 63, (1 << 64) - 1])
def test_desc_prod_jumping_past_the_ring_is_a_scanner_error(pair, prod):
    k, ni, sc = pair()
    ni.set_desc_prod(prod)
    with pytest.raises(ScannerError, match="jumped"):
        sc.recv(timeout=1)


def test_desc_prod_going_back_is_a_scanner_error(pair):
    k, ni, sc = pair()
    ni.publish([(b"a", wire.FROM_GUEST, False), (b"b", wire.FROM_GUEST, False)])
    sc.recv(timeout=1)
    ni.set_desc_prod(1)
    sc.recv(timeout=1)                               # the one already polled
    with pytest.raises(ScannerError, match="jumped"):
        sc.recv(timeout=1)


def test_dec_cons_beyond_dec_prod_is_a_scanner_error(pair):
    k, ni, sc = pair()
    ni.publish([(b"a", wire.FROM_GUEST, True)])
    sc.pass_(sc.recv(timeout=1))
    ni.wa.set_u64(R.NI_DEC_CONS, 1000)
    with pytest.raises(ScannerError, match="dec_cons"):
        sc.flush()


@settings(max_examples=300, deadline=None)
@given(seq=st.integers(0, 2**64 - 1), data=st.integers(0, 2**32 - 1), length=st.integers(0, 2**32 - 1),
       kind=st.integers(0, 255), direction=st.integers(0, 255), flags=st.integers(0, 255))
def test_any_descriptor_is_a_frame_inside_the_data_area_or_an_error(seq, data, length, kind, direction, flags):
    ni = FakeNI(desc_slots=4, slot_bytes=256)
    try:
        ring = R.Ring(ni.fds)
        R.DESC.pack_into(ni.a, ni.desc_off, seq, 0, data, length, kind, direction, flags)
        ni.set_desc_prod(1)
        try:
            [f] = ring.poll()
        except R.RingError:
            return
        assert f.number == 0 and kind == R.KIND_FRAME and direction in (1, 2)
        assert len(f.data) == length and data + length <= ni.data_size
        assert f.held == bool(flags & R.F_HELD)
        f.data.release()
        ring.close()
    finally:
        ni.close()


# ---- a scanner in C against the same rings

def build_null_ring_scanner(tmp_path) -> str:
    exe = str(tmp_path / "null_ring_scanner")
    subprocess.run(["cc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-I", os.path.join(HERE, "..", "csrc"),
                    os.path.join(HERE, "c", "null_ring_scanner.c"), "-o", exe], check=True)
    return exe


def drive_c_scanner(k: FakeKernel, ni: FakeNI, n: int, proc, running=lambda: None) -> None:
    """Answers the C scanner's subscribe and ring requests, feeds ``n`` frames through
    the ring, and checks it passed every held one, answered a sync after them, and exits
    when the socket closes.  ``running`` is called once it has spoken (so it runs its own
    program, not its launcher's)."""
    sub = k.recv_control("subscribe")
    running()
    assert sub["contain"] is True and isinstance(sub["match"], dict)
    k.reply(sub["id"])
    ring = k.recv_control("ring")
    assert ring["version"] == 1
    k.reply(ring["id"])
    assert k.recv_control("synced") == {"op": "synced", "id": -1}
    sent = 0
    deadline = time.monotonic() + 60
    while sent < n:
        assert time.monotonic() < deadline and proc.poll() is None
        ni.read_decisions()
        room = min(ni.room(), n - sent, 40)
        if room:
            ni.publish([(frame(i), 1 + i % 2, i % 4 != 3) for i in range(sent, sent + room)])
            sent += room
        else:
            ni.sleep_for_decisions(0.01)
    k.send({"op": "sync", "id": 9})
    while not select.select([k.sock], [], [], 0.001)[0]:     # the NI goes on reading decisions
        assert time.monotonic() < deadline and proc.poll() is None
        ni.read_decisions()
    assert k.recv_control("synced") == {"op": "synced", "id": 9}
    ni.read_decisions()
    assert ni.decisions == [(i, wire.PASS) for i in range(n) if i % 4 != 3]
    assert ni.desc_cons() == n
    k.sock.close()
    assert proc.wait(timeout=10) == 0


def test_a_null_scanner_in_c_passes_every_held_frame(tmp_path):
    exe = build_null_ring_scanner(tmp_path)
    k = FakeKernel()
    ni = FakeNI(desc_slots=64, dec_slots=16)
    try:
        for fd in ni.fds:
            os.set_inheritable(fd, True)
        k.send({"op": "sync", "id": -1})             # as the kernel does, right after hello
        env = {"VHOSTNI_SCANNER_FD": str(k.child.fileno()), "VHOSTNI_RING_FDS": ni.env()}
        proc = subprocess.Popen([exe], env=env, pass_fds=(k.child.fileno(),) + ni.fds)
        try:
            k.child.close()
            drive_c_scanner(k, ni, 20000, proc)
        finally:
            proc.kill() if proc.poll() is None else None
            proc.wait()
    finally:
        k.sock.close()
        ni.close()


def assert_confined(why) -> None:
    assert why is None, why


@pytest.mark.skipif(shutil.which("bwrap") is None or os.geteuid() != 0,
                    reason="the sandbox needs bubblewrap, run as root")
def test_the_c_null_scanner_runs_in_the_sandbox(tmp_path):
    """A compiled scanner is staged and confined like a Python one (vhostni.sandbox: bwrap,
    the launcher's seccomp filter, its own uid) and still works its rings."""
    from vhostni import sandbox
    exe = build_null_ring_scanner(tmp_path)
    root = sandbox.new_stage_root("cring")
    uid = sandbox.UidPool().take()
    k = FakeKernel()
    ni = FakeNI(desc_slots=64, dec_slots=16)
    proc = None
    try:
        argv, _ = sandbox.stage([exe], root)
        assert argv[0].startswith(root)
        for fd in ni.fds:
            os.set_inheritable(fd, True)
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        filt_r, filt_w = os.pipe2(os.O_CLOEXEC)
        filt = sandbox.launch_filter()
        os.write(filt_w, filt)
        os.close(filt_w)
        k.send({"op": "sync", "id": -1})
        env = {"VHOSTNI_SCANNER_FD": str(k.child.fileno()), "VHOSTNI_RING_FDS": ni.env()}
        proc = subprocess.Popen(sandbox.command(argv, root, uid, filt_r, info_w), env=env, cwd="/",
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                pass_fds=(k.child.fileno(), info_w, filt_r) + ni.fds,
                                preexec_fn=sandbox.preexec(256, 30, 64, uid))
        os.close(info_w)
        os.close(filt_r)
        k.child.close()
        init = sandbox.read_child_pid(info_r)
        os.close(info_r)
        pid = sandbox.find_scanner_pid(init) if init else None
        assert pid is not None
        drive_c_scanner(k, ni, 2000, proc,
                        running=lambda: assert_confined(sandbox.check_confined(
                            pid, uid, parent=init, launcher=proc.pid, first=filt)))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        k.sock.close()
        ni.close()
        sandbox.remove_stage_root(root)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_the_null_scanner_works_its_ring_under_the_sdk_lockdown():
    """scanners/null.py as the kernel runs it (Scanner.connect() from the environment, the
    SDK's seccomp lockdown after the ring is mapped): the ring, the barrier and the kicks
    need nothing the lockdown takes away."""
    k = FakeKernel()
    ni = FakeNI(desc_slots=256, dec_slots=64)
    n = 5000
    proc = None
    try:
        for fd in ni.fds:
            os.set_inheritable(fd, True)
        env = dict(os.environ, VHOSTNI_SCANNER_FD=str(k.child.fileno()), VHOSTNI_RING_FDS=ni.env(),
                   PYTHONPATH=os.path.join(HERE, ".."))
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "..", "scanners", "null.py")], env=env,
                                pass_fds=(k.child.fileno(),) + ni.fds)
        k.child.close()
        ring = k.recv_control("ring")
        k.reply(ring["id"])
        sub = k.recv_control("subscribe")
        k.reply(sub["id"])
        k.send({"op": "sync", "id": -1})
        assert k.recv_control("synced")["id"] == -1
        sent, t0 = 0, time.monotonic()
        while sent < n:
            assert time.monotonic() - t0 < 60 and proc.poll() is None
            ni.read_decisions()
            room = min(ni.room(), n - sent, 64)
            if room:
                ni.publish([(frame(i), wire.FROM_GUEST, i % 2 == 0) for i in range(sent, sent + room)])
                sent += room
            else:
                ni.sleep_for_decisions(0.01)
        k.send({"op": "sync", "id": 1})
        while not select.select([k.sock], [], [], 0.001)[0]:
            ni.read_decisions()
        assert k.recv_control("synced")["id"] == 1
        ni.read_decisions()
        assert ni.decisions == [(i, wire.PASS) for i in range(0, n, 2)]
        with open(f"/proc/{proc.pid}/status") as f:
            assert "Seccomp:\t2" in f.read()
        k.sock.close()
        proc.wait(timeout=10)                        # it ends when the kernel goes away
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        k.sock.close()
        ni.close()


def test_events_interleave_ring_frames_with_socket_events(pair):
    k, ni, sc = pair()
    k.send({"op": "stream_open", "stream": 4, "guest": ["10.0.0.2", 1234], "remote": ["10.0.0.1", 25],
            "port": 25, "read": ["from_guest"], "held": []})
    ni.publish([(frame(0), wire.FROM_GUEST, True)])
    k.sock.send(wire.encode_stream_data(4, wire.FROM_GUEST, False, 0, b"HELO"))
    kinds = []
    for ev in sc.events(timeout=0.1):
        if ev is None:
            break
        kinds.append(type(ev).__name__)
        if isinstance(ev, Frame):
            assert isinstance(ev, RingFrame) and ev.data == frame(0)
            sc.pass_(ev)
    assert sorted(kinds) == ["RingFrame", "StreamData", "StreamOpened"]
    assert kinds.index("StreamOpened") < kinds.index("StreamData")
    assert ni.read_decisions() == [(0, wire.PASS)]


def test_frames_batch_on_the_socket_path(pair):
    k, ni, sc = pair(reply=False)
    for i in range(5):
        k.sock.send(wire.encode_frame(i + 1, wire.FROM_GUEST, True, 0, frame(i)))
    got = []
    while len(got) < 5:
        got += sc.frames_batch(max=3, timeout=1)
    assert [f.number for f in got] == [1, 2, 3, 4, 5]
    assert [bytes(f.data) for f in got] == [frame(i) for i in range(5)]
    sc.pass_(got[0])
    assert k.recv() == wire.Decision(1, wire.PASS)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "magic": st.sampled_from([R.MAGIC, 0, R.MAGIC ^ 1]), "version": st.integers(0, 3),
    "desc_slots": st.integers(0, 2**32 - 1) | st.sampled_from([1, 2, 64, 4096]),
    "dec_slots": st.integers(0, 2**32 - 1) | st.sampled_from([1, 2, 16, 4096]),
    "desc_off": st.integers(0, 2**64 - 1) | st.integers(0, 70000),
    "data_off": st.integers(0, 2**64 - 1) | st.integers(0, 70000),
    "data_size": st.integers(0, 2**64 - 1) | st.integers(0, 70000),
    "size": st.integers(0, 2**64 - 1) | st.integers(0, 70000),
    "sc_size": st.integers(0, 2**64 - 1) | st.integers(0, 70000)}))
def test_any_header_maps_a_consistent_ring_or_is_an_error(header):
    ni = FakeNI(desc_slots=16, dec_slots=16, slot_bytes=256, header=header, seal=False)
    try:
        try:
            ring = R.Ring(ni.fds)
        except R.RingError:
            return
        assert ring.desc_off + ring.desc_slots * R.DESC.size <= len(ring.a)
        assert ring.data_off + ring.data_size <= len(ring.a)
        assert R.DEC_OFF + ring.dec_slots * R.DEC.size <= len(ring.b)
        ring.close()
    finally:
        ni.close()


def test_the_ring_request_decodes_and_refuses_what_it_does_not_know():
    assert wire.decode_request({"op": "ring", "version": 1, "id": 4}) == wire.RingRequest(1, 4)
    assert wire.decode_request(wire.RingRequest(1, 2).body()).body() == {"op": "ring", "version": 1, "id": 2}
    for body, why in (({"op": "ring", "id": 4}, "version None"),
                      ({"op": "ring", "version": 2, "id": 4}, "version 2"),
                      ({"op": "ring", "version": True, "id": 4}, "version True"),
                      ({"op": "ring", "version": "1", "id": 4}, "version '1'"),
                      ({"op": "ring", "version": 1, "id": 4, "fds": [3]}, "unknown fields 'fds'")):
        with pytest.raises(wire.RequestError, match=why) as exc:
            wire.decode_request(body)
        assert exc.value.id == 4 and exc.value.reply


def test_ring_decisions_after_a_checkpoint_wait_until_the_kernel_kept_it(pair):
    """The kernel applies ring decisions on its own loop, so a decision published right
    after a checkpoint could take effect before the kernel read the checkpoint off the
    socket.  The SDK asks for a barrier first and publishes only once it is answered."""
    k, ni, sc = pair(hello={"checkpoint_max": 1024})
    sc.checkpoint_max = 1024
    ni.publish([(frame(0), wire.FROM_GUEST, True), (frame(1), wire.FROM_GUEST, True)])
    f0 = sc.recv(timeout=1)
    sc.checkpoint({"state": 1})
    sc.pass_(f0)
    done = []
    t = Thread(lambda: done.append(sc.flush()))
    t.start()
    assert isinstance(k.recv(), wire.Checkpoint)
    barrier = k.recv_control("barrier")
    time.sleep(0.1)
    assert ni.read_decisions() == [], "published before the barrier was answered"
    k.reply(barrier["id"])
    t.join()
    assert ni.read_decisions() == [(0, wire.PASS)]
    # no checkpoint since: no barrier
    sc.pass_(sc.recv(timeout=1))
    sc.flush()
    assert ni.read_decisions() == [(1, wire.PASS)]


def _stream_record(stream, offset, handle, payload=b"", reason=0, info=None):
    head = struct.pack("<QQII8x", stream, offset, handle, reason)
    if info is not None:
        ga = bytes([10, 0, 0, 1]) + b"\0" * 12
        ra = bytes([10, 0, 0, 2]) + b"\0" * 12
        head += struct.pack("<BBBBB3xHHHxx16s16s", 4, wire.FROM_GUEST, 3, info, 0, 40000, 25, 25, ga, ra)
    return head + payload


def test_streams_on_the_ring_become_stream_events_and_passes_go_back_on_the_ring():
    """A scanner that asks for its streams on the ring: OPEN, DATA, END and CLOSE records are
    the same events as over the socket, and its passes are ring decisions naming the
    stream's handle (VNR_STREAM_PASS | direction, the offset)."""
    from vhostni.scanner import StreamClosed, StreamData, StreamEnd, StreamOpened
    from vhostni.scanner import ring as R
    k = FakeKernel()
    ni = FakeNI(desc_slots=64, dec_slots=16)
    try:
        k.reply(1)
        sc = Scanner(k.child, lockdown=False, ring_fds=ni.fds, ring_streams=True)
        assert k.recv_control("ring") == {"op": "ring", "version": 1, "streams": True, "id": 1}
        ni.publish_raw([(R.KIND_STREAM_OPEN, 0, 0, _stream_record(77, 0, 5, info=3)),
                        (R.KIND_STREAM_DATA, wire.FROM_GUEST, 1, _stream_record(77, 0, 5, b"HELO x")),
                        (R.KIND_STREAM_DATA, wire.TO_GUEST, 1, _stream_record(77, 0, 5, b"250 ok")),
                        (R.KIND_STREAM_END, wire.FROM_GUEST, 0, _stream_record(77, 6, 5)),
                        (R.KIND_STREAM_CLOSE, 0, 0, _stream_record(77, 0, 5, reason=1))])
        ev = sc.events(timeout=1)
        o = next(ev)
        assert isinstance(o, StreamOpened) and o.stream.id == 77 and o.stream.port == 25
        assert o.stream.guest == ("10.0.0.1", 40000) and o.stream.holds == {1, 2}
        d = next(ev)
        assert isinstance(d, StreamData) and (d.direction, d.offset, d.data, d.held) == (1, 0, b"HELO x", True)
        assert isinstance(d.data, bytes) and bytes(d.view) == b"HELO x"
        sc.pass_(d)
        d2 = next(ev)
        d2.stream.pass_all(wire.TO_GUEST)
        e = next(ev)
        assert isinstance(e, StreamEnd) and (e.direction, e.offset) == (1, 6)
        c = next(ev)
        assert isinstance(c, StreamClosed) and c.reason == "fin" and 77 not in sc.streams
        sc.flush()
        got = ni.read_raw_decisions()
        assert got == [(6, R.STREAM_PASS | 1, 5), ((1 << 64) - 1, R.STREAM_PASS | 2, 5)]
    finally:
        k.close()
        ni.close()


def test_no_ring_pass_follows_a_kill():
    """A kill goes on the socket, passes on the ring, which the NI applies on its own
    loop: a pass made after the kill could release bytes before the kernel read the kill.
    The SDK sends none (the kill is the scanner's last word on the stream)."""
    from vhostni.scanner import StreamData, StreamOpened
    from vhostni.scanner import ring as R
    k = FakeKernel()
    ni = FakeNI(desc_slots=64, dec_slots=16)
    try:
        k.reply(1)
        sc = Scanner(k.child, lockdown=False, ring_fds=ni.fds, ring_streams=True)
        k.recv_control("ring")
        ni.publish_raw([(R.KIND_STREAM_OPEN, 0, 0, _stream_record(77, 0, 5, info=3)),
                        (R.KIND_STREAM_DATA, wire.FROM_GUEST, 1, _stream_record(77, 0, 5, b"HELO x"))])
        ev = sc.events(timeout=1)
        assert isinstance(next(ev), StreamOpened)
        d = next(ev)
        assert isinstance(d, StreamData)
        d.stream.kill()
        d.stream.pass_(d)
        d.stream.pass_all()
        sc.flush()
        assert k.recv_control("kill")["stream"] == 77
        assert ni.read_raw_decisions() == []
    finally:
        k.close()
        ni.close()


def test_a_machine_without_the_rings_memory_model_stays_on_the_socket(monkeypatch):
    """The SDK's side of a ring needs x86-64; elsewhere it does not ask for the ring, and its
    frames keep coming on the socket (no crash, no request)."""
    from vhostni.scanner import ring as R
    monkeypatch.setattr(R.platform, "machine", lambda: "aarch64")
    k = FakeKernel()
    ni = FakeNI()
    try:
        sc = Scanner(k.child, lockdown=False, ring_fds=ni.fds)
        assert sc.ring is None
        k.sock.send(wire.encode_frame(1, wire.FROM_GUEST, True, 0, b"abc"))
        f = sc.recv(timeout=1)
        sc.pass_(f)
        assert k.recv() == wire.Decision(1, wire.PASS)   # the first message: no ring request
    finally:
        k.close()
        ni.close()


# ---- index words are stored and loaded whole

def test_index_words_are_never_seen_torn(tmp_path):
    """The SDK's stores of its index words are single moves, so the NI (here a C loop
    doing what it does) never sees one go back; and the SDK's loads of a word the other
    side counts up never see it go back either.  struct.pack_into failed this: it zeroes
    the field before writing it, and the NI broke healthy rings on the torn index."""
    import mmap
    exe = str(tmp_path / "word_watch")
    subprocess.run(["cc", "-std=c11", "-O2", "-Wall", "-Werror", os.path.join(HERE, "c", "word_watch.c"),
                    "-o", exe], check=True)
    fd = os.memfd_create("word")
    os.ftruncate(fd, 4096)
    m = mmap.mmap(fd, 4096)
    words = R.Words(m, R.DEC_OFF)
    try:
        n = 300_000
        watch = subprocess.Popen([exe, "watch", str(fd), str(n)], pass_fds=(fd,), stdout=subprocess.PIPE)
        for i in range(1, n + 1):
            words.set_u64(R.SC_DESC_CONS, i)
        assert watch.communicate(timeout=60)[0].strip() == b"0"
        words.set_u64(R.SC_DESC_CONS, 0)
        count = subprocess.Popen([exe, "count", str(fd), str(n)], pass_fds=(fd,))
        last = back = 0
        deadline = time.monotonic() + 60
        while last < n:
            v = words.u64(R.SC_DESC_CONS)
            if v < last:
                back += 1
            else:
                last = v
            assert time.monotonic() < deadline, "the counting side stopped"
        assert count.wait(timeout=10) == 0
        assert back == 0
    finally:
        words.release()
        m.close()
        os.close(fd)
