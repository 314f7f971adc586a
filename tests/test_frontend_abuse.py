"""A hostile vhost-user frontend (a compromised QEMU) against the daemon every NI shares: kick and
call fds that are not counter-mode eventfds (a blocking or full call fd, a semaphore eventfd, a pipe
at end of file), guest memory or a dirty log shrunk under the mapping (SIGBUS), fds sent with every
byte of a message, and sparse guest memory as large as the address space.  Each breaks at most its
own NI; the others go on."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from nibench import A_MAC, DaemonProcess, Request, ether, pattern, vring_file, vu
from vdriver import MiB, VirtioNetDriver
from test_hostile_driver import H_MAC, Trio


@pytest.fixture
def trio():
    t = Trio()
    yield t
    t.close()


def _step_in_thread(bench, timeout):
    """Run one data-plane step on another thread; True if it returned within ``timeout``."""
    t = threading.Thread(target=bench.step, args=(2,), daemon=True)
    t.start()
    t.join(timeout)
    return t, not t.is_alive()


def test_call_fd_that_cannot_take_a_write_does_not_hang_the_switch(trio):
    """A frontend hands over a *blocking* eventfd as the TX call fd and fills its counter
    (0xfffffffffffffffe: the next write of 1 would overflow, so write(2) blocks).  The
    switch's interrupt write must not block the one data-plane thread of every NI: the
    backend should make call fds non-blocking (as it does kick fds) and count the
    failed interrupt."""
    h, bench = trio.h, trio.bench
    efd = os.eventfd(0)                      # blocking, as any frontend may choose
    try:
        h.frontend.call(Request.SET_VRING_CALL, vring_file(1, efd))
        os.eventfd_write(efd, 0xFFFF_FFFF_FFFF_FFFE)
        h.send_frame(ether(A_MAC, H_MAC, pattern(64)))
        thread, returned = _step_in_thread(bench, 3.0)
        if not returned:
            os.eventfd_read(efd)              # unblock the stuck write so the test can end
            thread.join(5)
        assert returned, "the data plane blocked in write() on the hostile frontend's call fd"
        # h's frame went on (its interrupt was already pending: the counter was full)
        assert trio.a.recv_frames(count=1)[0][1] == ether(A_MAC, H_MAC, pattern(64))
        trio.good_pair_works()
    finally:
        os.close(efd)


def test_call_fd_that_is_a_full_pipe_does_not_hang_the_switch(trio):
    """The same with a pipe whose buffer the frontend filled: write(2) blocks."""
    h, bench = trio.h, trio.bench
    r, w = os.pipe()
    try:
        h.frontend.call(Request.SET_VRING_CALL, vring_file(1, w))
        os.set_blocking(w, False)
        try:
            while True:
                os.write(w, b"\0" * 65536)
        except BlockingIOError:
            pass
        os.set_blocking(w, True)             # the file description is shared with the NI
        h.send_frame(ether(A_MAC, H_MAC, pattern(64)))
        thread, returned = _step_in_thread(bench, 3.0)
        if not returned:
            os.set_blocking(r, False)
            try:
                while os.read(r, 65536):
                    pass
            except BlockingIOError:
                pass
            thread.join(5)
        assert returned, "the data plane blocked in write() on a full call pipe"
    finally:
        os.close(r)
        os.close(w)


def test_kick_fd_at_eof_does_not_spin_the_switch(trio):
    """A kick fd that stays readable for ever (the read end of a pipe whose write end the
    frontend closed: EPOLLIN|EPOLLHUP on every epoll_wait) makes drain_eventfd() read 0
    bytes and the level-triggered event fire again, so the one data-plane thread never
    sleeps (100% CPU) and counts a "kick" per spin.  Such an fd should be refused (not an
    eventfd) or dropped from epoll (and the NI broken) once it reads EOF."""
    h, bench = trio.h, trio.bench
    r, w = os.pipe()
    try:
        h.frontend.call(Request.SET_VRING_KICK, vring_file(1, r))
        os.close(w)
        w = -1
        bench.step()
        before = bench.stats("h")["kicks"]
        t0 = time.process_time()
        bench.daemon.switch.run(200, False)  # idle otherwise: should sleep in epoll_wait
        cpu = time.process_time() - t0
        kicks = bench.stats("h")["kicks"] - before
        assert kicks <= 2, f"{kicks} spurious kicks in 200 ms (busy loop, {cpu:.2f}s CPU)"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_a_kick_fd_at_end_of_file_in_the_switch_breaks_its_ni(trio):
    """The device refuses anything but an eventfd; the switch itself does not rely on that: a
    kick fd that reads end of file leaves its epoll set and breaks its NI (no spinning), and the
    others go on."""
    h, bench = trio.h, trio.bench
    r, w = os.pipe()
    bench.port("h").set_vring_kick(1, os.dup(r))      # past the device's check, straight to C
    os.close(w)
    os.close(r)
    before = bench.stats("h")["kicks"]
    bench.daemon.switch.run(200, False)
    assert bench.stats("h")["kicks"] - before <= 1
    assert bench.broken("h") == "kick fd at end of file or failing"
    trio.good_pair_works()


@pytest.mark.parametrize("which", ["guest-memory", "dirty-log"])
def test_memfd_shrunk_under_the_backend_does_not_kill_the_daemon(which):
    """The frontend truncates a memfd the NI mapped: guest memory after SET_MEM_TABLE, or
    the dirty-page bitmap after SET_LOG_BASE (nothing stops it: neither fd is checked for
    F_SEAL_SHRINK).  The daemon's next access is a SIGBUS and the whole process, every
    other NI with it, dies.  vn_mem_map/vn_log_map check the file size only once.  The NI
    should refuse memory fds that can shrink (require F_SEAL_SHRINK, which QEMU's
    memory-backend-memfd and its log memfd set) or survive the fault and break that NI."""
    p = DaemonProcess(("h", "a"))
    logfd = -1
    try:
        h = VirtioNetDriver.connect(p.sock_path("h"))
        p.drivers.append(h)
        if which == "dirty-log":
            logfd = os.memfd_create("log")
            os.ftruncate(logfd, 4096)
            h.frontend.call(Request.SET_LOG_BASE, vu.Log(4096, 0), fds=[logfd])
            h.features |= 1 << vu.VHOST_F_LOG_ALL
            h.frontend.call(Request.SET_FEATURES, vu.U64(h.features), need_reply=True)
            for q in h.queues:
                h.frontend.call(Request.SET_VRING_ADDR, q.addr(log=True), need_reply=True)
        h.frontend.call(Request.GET_FEATURES)        # the daemon acted on the setup
        h.send_frame(ether(A_MAC, H_MAC, pattern(64)), kick=False)
        if which == "dirty-log":
            os.ftruncate(logfd, 0)
        else:
            for region in h.mem.regions:
                os.ftruncate(region.fd, 0)          # from here on, never touch h.mem
        os.eventfd_write(h.queues[1].kick_fd, 1)
        deadline = time.monotonic() + 3
        while p.proc.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.proc.alive, f"vhostni died (returncode {p.proc.proc.returncode}; -7 is SIGBUS)"
        # h is broken, and says why; a stays as it was
        t0 = time.time()
        deadline = time.monotonic() + 5
        while True:
            nis = p.stats(fresh_after=t0)["nis"]
            if nis["h"]["broken"] or time.monotonic() > deadline:
                break
            t0 = time.time()
        assert nis["h"]["broken"] == "guest memory or log file shrunk under the NI" and not nis["a"]["broken"]
    finally:
        if logfd >= 0:
            os.close(logfd)
        p.drivers = []                           # h's memory may be gone: do not touch it
        p.close()


def test_semaphore_eventfd_as_kick_fd_does_not_hang_the_daemon():
    """An EFD_SEMAPHORE eventfd as kick fd, its counter set to 2**64 - 2: every read(2)
    returns 1 and takes 1 off, so drain_eventfd()'s `while (read(...) == 8)` runs ~1.8e19
    times.  The daemon's one thread never comes back: every NI stops forwarding and the
    control plane (new connections, stats) stops too.  The drain should be bounded (one
    read is enough for a real eventfd) or the fd refused (a semaphore eventfd is not
    what vhost-user passes)."""
    from test_hostile_driver import proc_pair, proc_pair_works
    p = DaemonProcess(("h", "a", "b"))
    try:
        a, b = proc_pair(p)
        proc_pair_works(a, b)
        h = VirtioNetDriver.connect(p.sock_path("h"))
        p.drivers.append(h)
        efd = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK)
        try:
            h.frontend.send(Request.SET_VRING_KICK, vring_file(1, efd))
            os.eventfd_write(efd, 0xFFFF_FFFF_FFFF_FFFE)
            # refused: with no reply asked for, the daemon closes the connection
            with pytest.raises((ConnectionError, EOFError, OSError)):
                h.frontend.call(Request.GET_FEATURES)
        finally:
            os.close(efd)
        time.sleep(0.3)
        try:
            proc_pair_works(a, b, seed=1)
            ok = True
        except AssertionError:
            ok = False
        assert ok, "a <-> b stopped: the daemon is stuck draining h's kick fd"
    finally:
        p.close()


def test_fds_sent_with_every_byte_of_a_message_are_not_hoarded(trio):
    """_Reader.messages() (vhostni/daemon.py) keeps the fds of every recvmsg() of a
    message until the message is complete, and a frontend may send a message one byte
    per sendmsg(), each carrying MAX_FDS fds, and then stall: 12 header bytes and up to
    4096 payload bytes hold up to (12 + 4096) * 8 = 32864 of the daemon's fds, which
    every NI shares (RLIMIT_NOFILE: accept(), other frontends' memory and kick fds then
    fail).  At most MAX_FDS fds may wait for one message (QEMU sends them all with the
    first byte); more is a protocol error."""
    from nibench import fd_count
    bench = trio.bench
    h = trio.h
    h.frontend.call(Request.GET_FEATURES)
    before = fd_count()
    header = vu.Header(Request.SET_FEATURES, vu.VERSION, 8).pack() + bytes(7)  # one byte short
    closed = False
    for byte in header:
        fds = [os.eventfd(0) for _ in range(vu.MAX_FDS)]
        try:
            socket.send_fds(h.frontend.sock, [bytes([byte])], fds)
        except (BrokenPipeError, ConnectionResetError):
            closed = True                    # the daemon hung up on it: a protocol error
            break
        finally:
            for fd in fds:
                os.close(fd)
        bench.control()
    bench.control()
    held = fd_count() - before
    assert closed or held <= vu.MAX_FDS
    assert held <= vu.MAX_FDS, f"the daemon holds {held} fds for one incomplete message"


def test_one_frontend_cannot_take_the_whole_address_space_of_the_daemon():
    """SET_MEM_TABLE maps each region whole (MAP_NORESERVE) with no bound on its size but
    the fd's: a sparse memfd ftruncate'd to 128 TiB costs the frontend nothing, and 8
    regions of it fill the daemon's 47-bit address space (csrc/mem.c vn_mem_map).  Every
    other NI's next SET_MEM_TABLE (a guest reboot, a QEMU reconnect, a migration) then
    fails, and so does any large malloc in the daemon.  A region (and a table) larger than
    any guest (host RAM, or a configured limit) should be refused."""
    from test_hostile_driver import proc_pair_works
    p = DaemonProcess(("h", "a", "b"))
    mfd = os.memfd_create("huge")
    try:
        a = VirtioNetDriver.connect(p.sock_path("a"))
        p.drivers.append(a)
        h = VirtioNetDriver.connect(p.sock_path("h"), setup=False)
        p.drivers.append(h)
        h.negotiate()
        fe = h.frontend
        assert fe.protocol_features & vu.ProtocolFeature.REPLY_ACK
        os.ftruncate(mfd, 1 << 47)
        page = 4096

        def accepted(sizes):
            fe.call(Request.SET_MEM_TABLE, vu.MemoryTable([], ()), need_reply=True)
            regions = [vu.MemoryRegion(i << 47, s, (0x100 + i) << 47, 0) for i, s in enumerate(sizes)]
            try:
                fe.call(Request.SET_MEM_TABLE, vu.MemoryTable(regions, (mfd,) * len(regions)),
                        need_reply=True)
                return True
            except vu.ProtocolError:         # NACKed: did not map
                return False

        sizes = []
        for _ in range(vu.MAX_REGIONS):           # greedy: the largest region that still maps
            lo, hi = 0, (1 << 47) // page
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if accepted(sizes + [mid * page]):
                    lo = mid
                else:
                    hi = mid - 1
            if lo == 0:
                break
            sizes.append(lo * page)
        assert accepted(sizes)
        mapped = sum(sizes)
        # b's QEMU (re)connects now, with a guest of 32 MiB
        try:
            b = VirtioNetDriver.connect(p.sock_path("b"))
            p.drivers.append(b)
            b.frontend.call(Request.GET_FEATURES)
            a.post_rx_buffers(16, 2048)
            b.post_rx_buffers(16, 2048)
            proc_pair_works(a, b)
            ok, why = True, ""
        except Exception as exc:          # noqa: BLE001
            ok, why = False, repr(exc)
        assert p.proc.alive, f"vhostni died after h mapped {mapped / 2**40:.1f} TiB"
        assert ok, f"h mapped {mapped / 2**40:.1f} TiB of the daemon's address space; b cannot come up: {why}"
    finally:
        os.close(mfd)
        p.close()


HUGE = 2 * MiB


def _wait_dead(p, secs=3.0):
    deadline = time.monotonic() + secs
    while p.proc.alive and time.monotonic() < deadline:
        time.sleep(0.05)


def _hugetlb_fd():
    try:
        fd = os.memfd_create("review-huge", os.MFD_HUGETLB)
        os.ftruncate(fd, HUGE)
    except OSError as exc:
        pytest.skip(f"no hugetlb memfd here: {exc}")
    return fd


def test_a_sigbus_in_huge_page_guest_memory_breaks_only_its_ni():
    """hugetlbfs guest memory (a file that can shrink): the guard mends whole huge pages, never a
    4 KiB page inside one (the kernel refuses that, and the daemon would die).  With no huge pages
    in the pool, the first touch of a MAP_NORESERVE hugetlb mapping is the same SIGBUS as one past
    a truncated end."""
    hfd = _hugetlb_fd()
    p = DaemonProcess(("h", "a"))
    try:
        h = VirtioNetDriver.connect(p.sock_path("h"), setup=False,
                                    regions=((0, 32 * MiB), (64 * MiB, HUGE)))
        p.drivers.append(h)
        real_table = h.mem.table

        def table():
            t = real_table()
            return type(t)(t.regions, (t.fds[0], hfd))   # the second region: hugetlbfs
        h.mem.table = table
        h.setup()
        q = h.queues[1]                                  # TX: the device reads the buffer
        head = q.add_chain([(64 * MiB + 0x1000, 256, False)])
        q.make_available([head])
        q.kick(force=True)
        _wait_dead(p)
        assert p.proc.alive, f"vhostni died (rc {p.proc.proc.returncode}; -7 is SIGBUS)"
    finally:
        os.close(hfd)
        p.drivers = []
        p.close()


def test_a_sigbus_sent_by_kill_leaves_the_guard_in_place():
    """kill(pid, SIGBUS) is no fault (si_code SI_USER): ignored, and the guard stays for the next
    shrink."""
    p = DaemonProcess(("h", "a"))
    try:
        h = VirtioNetDriver.connect(p.sock_path("h"))
        p.drivers.append(h)
        from vhostni.vhost_user.proto import Request
        h.frontend.call(Request.GET_FEATURES)
        os.kill(p.pid, signal.SIGBUS)
        time.sleep(0.3)
        assert p.proc.alive          # swallowed, not acted on
        h.send_frame(ether(A_MAC, H_MAC, pattern(64)), kick=False)
        for region in h.mem.regions:
            os.ftruncate(region.fd, 0)
        os.eventfd_write(h.queues[1].kick_fd, 1)
        _wait_dead(p)
        assert p.proc.alive, f"vhostni died (rc {p.proc.proc.returncode}): the guard was uninstalled"
    finally:
        p.drivers = []
        p.close()


def test_a_semaphore_eventfd_is_refused_where_fdinfo_does_not_say_so(monkeypatch):
    """fdinfo's 'eventfd-semaphore:' line is recent (Linux 6.6); on older kernels (Debian 12's 6.1)
    the device asks the fd itself (adds 2, reads: a semaphore gives 1 back).  Simulated here by
    hiding that line."""
    import builtins
    import io
    from vhostni.vhost_user.proto import Request
    from nibench import vring_file
    from test_hostile_driver import Trio
    real_open = builtins.open

    def old_kernel_open(path, *a, **kw):
        f = real_open(path, *a, **kw)
        if isinstance(path, str) and path.startswith("/proc/self/fdinfo/"):
            text = "".join(l for l in f.read().splitlines(True) if not l.startswith("eventfd-semaphore"))
            f.close()
            return io.StringIO(text)
        return f
    t = Trio()
    try:
        h, bench = t.h, t.bench
        efd = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK)
        monkeypatch.setattr(builtins, "open", old_kernel_open)
        try:
            with pytest.raises((ConnectionError, EOFError, OSError)):
                h.frontend.call(Request.SET_VRING_KICK, vring_file(1, efd))   # refused: closed
                h.frontend.call(Request.GET_FEATURES)
        finally:
            monkeypatch.setattr(builtins, "open", real_open)
            os.close(efd)
        t.good_pair_works()
    finally:
        t.close()
