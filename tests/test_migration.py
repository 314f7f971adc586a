"""Live migration against simulated frontends: the dirty-page log and the ring hand-over.

QEMU migrates a guest's RAM while it runs by copying it, then re-copying every page that
was written since; a vhost-user backend writes guest memory behind QEMU's back (RX
buffers, the used rings), so it must set a bit per written 4 KiB page in the log QEMU
gives it (SET_LOG_BASE) while VHOST_F_LOG_ALL is negotiated.  A page written but not
logged is a page the destination has stale: a corrupted guest.  The checks here compare
guest memory before and after the backend ran: every page that changed must be in the
log.  Then the hand-over: a second frontend on the same NI socket (the destination
QEMU) takes the NI over when its rings start, the source's rings stopped.
"""
from __future__ import annotations

import os
import socket

import pytest

from nibench import A_MAC, B_MAC, Bench, MiB, Request, check_pair_works, ether, pattern, vu
from vdriver import PAGE, VirtioNetDriver


def snapshot(drv: VirtioNetDriver) -> dict[int, bytes]:
    """Every page of guest memory, by guest page number."""
    pages = {}
    for r in drv.mem.regions:
        data = bytes(r.mm)
        for off in range(0, r.size, PAGE):
            pages[(r.gpa + off) // PAGE] = data[off:off + PAGE]
    return pages


def changed_pages(before: dict[int, bytes], drv: VirtioNetDriver) -> set[int]:
    after = snapshot(drv)
    return {pg for pg, data in after.items() if before[pg] != data}


def ring_pages(drv: VirtioNetDriver) -> set[int]:
    """Pages of the used rings (the only ring part the device writes)."""
    pages = set()
    for q in drv.queues:
        end = q.used + 6 + 8 * q.size
        pages |= set(range(q.used // PAGE, (end - 1) // PAGE + 1))
    return pages


def buffer_pages(drv: VirtioNetDriver, queue: int = 0) -> set[int]:
    """Pages of the receive buffers outstanding on ``queue``."""
    pages = set()
    for chain in drv.queues[queue].outstanding.values():
        for gpa, size, _writable in chain.buffers:
            pages |= set(range(gpa // PAGE, (gpa + size - 1) // PAGE + 1))
    return pages


REGIONS = [
    pytest.param(dict(), id="one-region"),
    pytest.param(dict(regions=((0, 8 * MiB), (8 * MiB, 8 * MiB))), id="adjacent-regions"),
    pytest.param(dict(regions=((0, 4 * MiB), (64 * MiB, 8 * MiB)), shared_fd=True), id="hole-shared-fd"),
]


@pytest.mark.parametrize("kw", REGIONS)
@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_every_page_the_backend_writes_is_logged(bench, kw, event_idx):
    features = vu.feature_mask(vu.VIRTIO_RING_F_EVENT_IDX) if not event_idx else 0
    from vdriver import DEFAULT_FEATURES
    a = bench.connect("a", features=DEFAULT_FEATURES & ~features, **kw)
    b = bench.connect("b", features=DEFAULT_FEATURES & ~features, **kw)
    for drv in (a, b):
        drv.start_logging()
        assert drv.has(vu.VHOST_F_LOG_ALL)
    # small buffers, chains of two: frames spread over many pages and page boundaries
    b.post_rx_buffers(48, 700, chain=2)
    a.post_rx_buffers(8, 2048)
    frames = [ether(B_MAC, A_MAC, pattern(60 + 97 * i, seed=i)) for i in range(24)]
    for f in frames:
        a.send_frame(f)
    rx_pages = buffer_pages(b)
    a.dirty_pages(), b.dirty_pages()              # what setting up wrote is QEMU's business
    before_a, before_b = snapshot(a), snapshot(b)
    for _ in range(5):                            # only the backend runs: the driver is idle
        bench.step()
    changed_a, changed_b = changed_pages(before_a, a), changed_pages(before_b, b)
    dirty_a, dirty_b = a.dirty_pages(), b.dirty_pages()
    assert changed_b & rx_pages, "no frame was delivered: the test tests nothing"
    assert changed_a - dirty_a == set(), "pages written but not logged (A: used rings)"
    assert changed_b - dirty_b == set(), "pages written but not logged (B: RX buffers, used rings)"
    # and nothing else: a bit far from what was written means a wrong translation
    assert dirty_a <= ring_pages(a)
    assert dirty_b <= ring_pages(b) | rx_pages
    got = [f for _, f in bench.recv(b, len(frames))]
    assert got == frames


def test_nothing_is_logged_without_log_all(bench):
    a = bench.connect("a")
    b = bench.connect("b")
    b.start_logging()
    # the log is mapped and the rings flagged, but the features say no logging
    b.features &= ~(1 << vu.VHOST_F_LOG_ALL)
    b.frontend.call(Request.SET_FEATURES, vu.U64(b.features))
    b.post_rx_buffers(8, 2048)
    b.dirty_pages()
    before = snapshot(b)
    a.send_frame(ether(B_MAC, A_MAC, pattern(500)))
    for _ in range(3):
        bench.step()
    assert changed_pages(before, b), "nothing delivered"
    assert b.dirty_pages() == set()


def test_logging_stops_when_the_migration_ends(bench):
    a = bench.connect("a")
    b = bench.connect("b")
    b.start_logging()
    b.stop_logging(unmap=False)     # SET_FEATURES without LOG_ALL, rings without VRING_F_LOG
    b.post_rx_buffers(8, 2048)
    b.dirty_pages()
    a.send_frame(ether(B_MAC, A_MAC, pattern(500)))
    assert len(bench.recv(b, 1)) == 1
    assert b.dirty_pages() == set()


def test_log_base_reply_is_what_qemu_waits_for(bench):
    """QEMU sends SET_LOG_BASE without NEED_REPLY and blocks on a reply to it."""
    a = bench.connect("a")
    a.start_logging()                # call() reads the reply: it would hang or fail without
    check_pair_works(bench, a, bench.connect("b"))


def test_log_base_at_an_offset_and_a_second_one_replacing_it(bench):
    a = bench.connect("a")
    b = bench.connect("b")
    b.start_logging(offset=3 * PAGE + 8)
    b.start_logging(offset=PAGE)                   # QEMU resizes the log: a new base
    b.post_rx_buffers(8, 2048)
    pages = buffer_pages(b)
    b.dirty_pages()
    a.send_frame(ether(B_MAC, A_MAC, pattern(1000)))
    assert len(bench.recv(b, 1)) == 1
    assert b.dirty_pages() & pages


# ---------------------------------------------------------------------------
# Hostile log bases: every one refused, the daemon and the other NIs unharmed
# ---------------------------------------------------------------------------

def _memfd(size: int) -> int:
    fd = os.memfd_create("hostile-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _pipe() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


HOSTILE_LOGS = [
    # 512 bytes cover 16 MiB: guest memory is 32
    pytest.param(lambda: (_memfd(4096), 512, 0), id="too-small-for-guest-memory"),
    pytest.param(lambda: (_memfd(4096), 1 << 40, 0), id="huge-size"),
    pytest.param(lambda: (_memfd(4096), 4096, 2**64 - 100), id="offset-overflow"),
    pytest.param(lambda: (_memfd(1024), 1024, 4096), id="past-the-end-of-the-file"),
    pytest.param(lambda: (_pipe(), 4096, 0), id="a-pipe"),
    pytest.param(lambda: (os.open("/dev/null", os.O_RDONLY), 4096, 0), id="dev-null"),
]


@pytest.mark.parametrize("make_log", HOSTILE_LOGS)
@pytest.mark.parametrize("ack", [True, False], ids=["reply-ack", "no-reply-ack"])
def test_hostile_log_base_is_refused(bench, make_log, ack):
    a = bench.connect("a")
    b = bench.connect("b")
    fd, size, offset = make_log()
    try:
        b.frontend.send(Request.SET_LOG_BASE, vu.Log(size, offset), need_reply=ack, fds=[fd])
    finally:
        os.close(fd)
    if ack:
        header, reply = b.frontend.recv_reply()
        assert isinstance(reply, vu.U64) and reply.value != 0, "accepted a hostile log"
    else:
        # the frontend waits for a reply that would mean "logging": better no connection
        assert b.frontend.peer_closed(1.0)
    assert bench.device("b").counters.errors >= 1
    assert "set log base" in bench.device("b").counters.last_error
    # the other NI is untouched, and b (reconnected, if it was dropped) works
    if not ack:
        b.frontend.close()
        bench.control()
        b.frontend = bench.frontend("b")
        b.negotiate()
        b.start_queues([q.used_idx() for q in b.queues])
    check_pair_works(bench, a, b)


def test_log_base_without_log_shmfd_is_refused(bench):
    from vdriver import DEFAULT_PROTOCOL_FEATURES
    b = bench.connect("b", protocol_features=DEFAULT_PROTOCOL_FEATURES & ~vu.ProtocolFeature.LOG_SHMFD)
    fd = _memfd(4096)
    try:
        b.frontend.send(Request.SET_LOG_BASE, vu.Log(4096, 0), need_reply=True, fds=[fd])
    finally:
        os.close(fd)
    _, reply = b.frontend.recv_reply()
    assert reply.value != 0


def test_log_flag_with_a_used_address_elsewhere_is_refused(bench):
    b = bench.connect("b")
    b.start_logging()
    q = b.queues[0]
    bad = vu.VringAddr(q.index, vu.VRING_F_LOG, b.mem.uva(q.desc), b.mem.uva(q.used),
                       b.mem.uva(q.avail), q.used + PAGE)
    b.frontend.send(Request.SET_VRING_ADDR, bad, need_reply=True)
    _, reply = b.frontend.recv_reply()
    assert reply.value != 0
    assert "vring 0 log" in bench.device("b").counters.last_error


# ---------------------------------------------------------------------------
# The hand-over: the destination QEMU connects to the same NI socket
# ---------------------------------------------------------------------------

def standby_frontend(bench: Bench, name: str, drv: VirtioNetDriver):
    """The destination QEMU's connection as it is while the migration runs: it negotiates
    and hands over its call fds (vhost_dev_init), nothing else."""
    fe = bench.frontend(name)
    offered = fe.call(Request.GET_FEATURES).value
    assert offered >> vu.VHOST_USER_F_PROTOCOL_FEATURES & 1
    pf = fe.call(Request.GET_PROTOCOL_FEATURES).value & drv.wanted_protocol_features
    fe.call(Request.SET_PROTOCOL_FEATURES, vu.U64(pf))
    fe.protocol_features = pf
    fe.call(Request.GET_QUEUE_NUM)
    fe.call(Request.SET_OWNER)
    for q in drv.queues:
        fe.call(Request.SET_VRING_CALL, vu.VringFile(q.index, False, q.call_fd))
    return fe


def copy_pages(src: VirtioNetDriver, dst_mem, pages) -> None:
    for pg in sorted(pages):
        gpa = pg * PAGE
        try:
            src.mem.region_at(gpa)
        except (KeyError, ValueError, LookupError):
            continue
        dst_mem.write(gpa, src.mem.read(gpa, PAGE))


def all_pages(drv: VirtioNetDriver) -> set[int]:
    return {(r.gpa + off) // PAGE for r in drv.mem.regions for off in range(0, r.size, PAGE)}


def move_guest(drv: VirtioNetDriver, fe, dst_mem) -> None:
    """The guest runs on the destination from now on: its memory, its connection."""
    old = drv.mem
    drv.mem = dst_mem
    for q in drv.queues:
        q.mem = dst_mem
    drv.frontend = fe
    drv.stop_logging(send=False)
    old.close()


def test_migration_hand_over_keeps_every_byte_and_the_quarantine(bench):
    from vdriver import GuestMemory
    a, b = bench.connect("a"), bench.connect("b")
    a.post_rx_buffers(32, 2048)
    b.post_rx_buffers(32, 2048)
    bench.step()
    check_pair_works(bench, a, b)
    # the destination connects while the source runs: the source keeps working
    dest = standby_frontend(bench, "a", a)
    assert bench.daemon.nis["a"].info()["standby_frontend"]
    check_pair_works(bench, a, b, seed=1)
    # migration: log, copy everything, then copy what was dirtied while traffic flows
    a.start_logging()
    dst_mem = GuestMemory([(r.gpa, r.size) for r in a.mem.regions])
    copy_pages(a, dst_mem, all_pages(a))
    a.dirty_pages()
    to_a = [ether(A_MAC, B_MAC, pattern(200 + 50 * i, seed=100 + i)) for i in range(10)]
    for f in to_a:
        b.send_frame(f)
    pending = [ether(B_MAC, A_MAC, pattern(300, seed=200 + i)) for i in range(2)]
    for f in pending:                  # queued by the guest, not yet seen by the backend
        a.send_frame(f, kick=False)
    for _ in range(5):
        bench.step()
    # what the guest wrote itself, QEMU tracks (KVM's log); here: copy the driver's pages
    copy_pages(a, dst_mem, a.dirty_pages() | {q.avail // PAGE for q in a.queues}
               | {q.desc // PAGE for q in a.queues} | buffer_pages(a, 1))
    bench.daemon.quarantine("a", reason="scanner said so")
    # the source stops: rings stopped, their state handed over, the last dirty pages
    bases = a.stop()
    copy_pages(a, dst_mem, a.dirty_pages())
    src_pages = snapshot(a)
    # the destination's memory is the source's, byte for byte
    move_guest(a, dest, dst_mem)
    dst_pages = snapshot(a)
    assert [pg for pg in src_pages if src_pages[pg] != dst_pages[pg]] == []
    # the destination starts the device: it takes the NI over
    a.negotiate()
    a.start_queues(bases)
    ni = bench.daemon.nis["a"]
    assert ni.handovers == 1 and ni.device.standby is False
    assert ni.info()["quarantined"], "the quarantine did not follow the VM"
    dropped = bench.stats("a")["drop_quarantine"]
    # the frames delivered to the source during the migration are in the destination
    got = [f for _, f in bench.recv(a, len(to_a))]
    assert got == to_a
    # quarantined: the guest's frames go nowhere, counted
    a.queues[1].kick(force=True)
    for _ in range(5):
        bench.step()
    assert b.recv_frames(timeout=0, count=10) == []
    assert bench.stats("a")["drop_quarantine"] >= dropped + len(pending)
    bench.daemon.quarantine("a", on=False)
    # the source QEMU quits: the NI stays with the destination
    src_fe = ni.standby
    assert src_fe is not None
    bench.frontends[0].close()
    bench.control()
    assert ni.standby is None and ni.reader is not None
    check_pair_works(bench, a, b, seed=2)
    assert bench.broken("a") is None


def test_second_frontend_cannot_take_a_running_nic(bench):
    a, b = bench.connect("a"), bench.connect("b")
    check_pair_works(bench, a, b)
    dest = standby_frontend(bench, "a", a)
    from vdriver import GuestMemory
    mem = GuestMemory()
    try:
        dest.send(Request.SET_MEM_TABLE, mem.table())
        assert dest.peer_closed(1.0), "a second QEMU configured a NIC whose rings run"
    finally:
        mem.close()
    assert "still run" in bench.device("a").counters.last_error
    assert bench.daemon.nis["a"].standby is None
    check_pair_works(bench, a, b, seed=1)


def test_third_frontend_is_refused(bench):
    a = bench.connect("a")
    standby_frontend(bench, "a", a)
    third = bench.raw_socket("a")
    try:
        third.settimeout(1.0)
        assert third.recv(1) == b""
    finally:
        third.close()


def test_standby_becomes_the_frontend_when_the_source_goes(bench):
    """The source QEMU dies (or is killed after the guest moved) before the destination
    configured anything: the destination is the NI's only frontend."""
    a, b = bench.connect("a"), bench.connect("b")
    dest = standby_frontend(bench, "a", a)
    bases = [q.used_idx() for q in a.queues]
    a.frontend.close()
    bench.control()
    ni = bench.daemon.nis["a"]
    assert ni.reader is not None and ni.reader.device is ni.device and ni.standby is None
    a.frontend = dest
    a.negotiate()
    a.start_queues(bases)
    check_pair_works(bench, a, b)


def test_failed_migration_the_source_resumes(bench):
    """The destination goes away after the source stopped: the source starts again."""
    a, b = bench.connect("a"), bench.connect("b")
    check_pair_works(bench, a, b)
    dest = standby_frontend(bench, "a", a)
    bases = a.stop()
    dest.close()
    bench.control()
    assert bench.daemon.nis["a"].standby is None
    a.negotiate()
    a.start_queues(bases)
    check_pair_works(bench, a, b, seed=3)


def test_standby_sessions_leak_no_fds_or_maps(bench):
    """A standby that hands over call fds (kept for later) and then goes, many times; and
    log bases replaced and dropped: nothing stays open or mapped."""
    from nibench import fd_count, map_count
    a, b = bench.connect("a"), bench.connect("b")
    check_pair_works(bench, a, b)
    fds, maps = fd_count(), map_count()
    for _ in range(5):
        fe = standby_frontend(bench, "a", a)
        for q in range(4):                       # twice per ring: the first is replaced
            efd = os.eventfd(0, os.EFD_CLOEXEC)
            try:
                fe.call(Request.SET_VRING_CALL, vu.VringFile(q % 2, False, efd))
            finally:
                os.close(efd)
        fe.close()
        bench.control()
        bench.frontends.remove(fe)
    for _ in range(3):
        a.start_logging()
    a.stop_logging()
    a.frontend.call(Request.RESET_OWNER)
    a.frontend.close()
    bench.control()
    check_pair_works(bench, reconnected(bench, a), b, seed=5)
    a.stop_logging(send=False)
    assert fd_count() == fds and map_count() == maps


def reconnected(bench: Bench, drv: VirtioNetDriver) -> VirtioNetDriver:
    drv.frontend = bench.frontend("a")
    drv.negotiate()
    drv.start_queues([q.used_idx() for q in drv.queues])
    return drv


@pytest.mark.parametrize("where", ["idx-and-entries-on-two-pages", "avail-event-alone-on-a-page"])
def test_used_ring_fields_on_their_own_pages_are_logged(bench, where):
    """The used ring laid across a page boundary so that idx, the entries and avail_event
    land on different pages: each write must log its own page."""
    a = bench.connect("a")
    b = bench.connect("b", setup=False)
    size = b.queue_size
    addrs = {}
    for q in (0, 1):
        block = b.mem.alloc(3 * PAGE, PAGE)
        if where == "idx-and-entries-on-two-pages":
            used = block + PAGE - 4                     # flags, idx | ring[0..]
        else:
            used = block + 2 * PAGE - (4 + 8 * size)    # ... ring[size-1] | avail_event
        addrs[q] = (None, None, used)
    b.ring_addrs = addrs
    b.setup()
    a.start_logging()
    b.start_logging()
    b.post_rx_buffers(16, 2048)
    a.post_rx_buffers(16, 2048)
    frames = [ether(B_MAC, A_MAC, pattern(100 + i, seed=i)) for i in range(6)]
    back = [ether(A_MAC, B_MAC, pattern(120 + i, seed=50 + i)) for i in range(6)]
    for f in frames:
        a.send_frame(f)
    for f in back:
        b.send_frame(f)
    b.dirty_pages()
    before = snapshot(b)
    for _ in range(5):
        bench.step()
    changed, dirty = changed_pages(before, b), b.dirty_pages()
    used_pages = {(addrs[q][2] + off) // PAGE for q in (0, 1) for off in (2, 4, 4 + 8 * size)}
    assert changed & used_pages, "the ring fields did not change: nothing tested"
    assert changed - dirty == set()
    assert [f for _, f in bench.recv(b, len(frames))] == frames
    assert [f for _, f in bench.recv(a, len(back))] == back
