"""Tests of the test driver itself (tests/vdriver.py).

The simulator is only worth trusting if it is checked against a backend nobody
here wrote: the ``dpdk`` tests run it against DPDK's vhost PMD in dpdk-testpmd
(macswap forwarding on one port, so every frame the driver sends comes back
with its MAC addresses swapped).  The others check its pieces and the message
sequence it sends, with no backend at all.
"""

import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time

import pytest

from vhostni.vhost_user import proto as vu
from vhostni.vhost_user.proto import Request

from vdriver import (  # tests/ is on sys.path (pytest's rootdir-relative import)
    MiB, PAGE, Arena, DeviceError, GuestMemory, VhostUserFrontend, VirtioNetDriver, VirtioNetHdr,
    VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, vring_need_event, DEFAULT_FEATURES,
)


def ether(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + b"\x08\x00" + payload


A_MAC, B_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def swapped(frame: bytes) -> bytes:
    return frame[6:12] + frame[0:6] + frame[12:]


# --- pieces -------------------------------------------------------------------

def test_guest_memory_straddles_adjacent_regions():
    mem = GuestMemory([(0, 4 * PAGE), (4 * PAGE, 4 * PAGE)])
    try:
        assert mem.boundaries() == [4 * PAGE]
        data = bytes(range(256)) * 3
        mem.write(4 * PAGE - 100, data)
        assert mem.read(4 * PAGE - 100, len(data)) == data
        assert mem.regions[1].mm[:len(data) - 100] == data[100:]
        with pytest.raises(ValueError, match="not in guest memory"):
            mem.read(8 * PAGE - 1, 2)
        table = mem.table()
        assert [r.guest_phys_addr for r in table.regions] == [0, 4 * PAGE]
        assert len(set(table.fds)) == 2
        # user addresses are not guest addresses, and do not overlap
        assert mem.uva(0) != 0 and mem.uva(4 * PAGE) - mem.uva(0) != 4 * PAGE
        table.check_disjoint()
    finally:
        mem.close()


def test_guest_memory_shared_fd_uses_mmap_offsets():
    mem = GuestMemory([(0, 2 * PAGE), (1 << 32, 2 * PAGE)], shared_fd=True)
    try:
        assert mem.boundaries() == []
        fds = {r.fd for r in mem.regions}
        assert len(fds) == 1
        assert [r.mmap_offset for r in mem.regions] == [PAGE, 3 * PAGE]
        mem.write((1 << 32) + 5, b"hello")
        assert os.pread(fds.pop(), 5, 3 * PAGE + 5) == b"hello"
    finally:
        mem.close()


def test_guest_memory_rejects_unaligned_regions():
    with pytest.raises(ValueError, match="page-aligned"):
        GuestMemory([(100, PAGE)])


def test_arena_first_fit_and_merge():
    arena = Arena([(0, 1000), (2000, 3000)])
    a = arena.alloc(500)
    b = arena.alloc(500)        # does not fit after a (aligned to 16): next extent
    assert a == 0 and b == 2000
    arena.release(a, 500)
    arena.release(b, 500)
    assert arena.free == [(0, 1000), (2000, 3000)]
    with pytest.raises(MemoryError):
        arena.alloc(1001)


def test_vring_need_event():
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 3, 2)
    assert vring_need_event(5, 6, 5) and not vring_need_event(5, 5, 4)
    assert vring_need_event(0xFFFF, 0, 0xFFFF)       # wraps
    assert not vring_need_event(10, 12, 11)


def test_virtio_net_hdr():
    hdr = VirtioNetHdr(1, 4, 54, 1448, 34, 16, 3)
    assert len(hdr.pack(12)) == 12 and len(hdr.pack(10)) == 10
    assert VirtioNetHdr.unpack(hdr.pack(12)) == hdr
    assert VirtioNetHdr.unpack(hdr.pack(10)).num_buffers == 0


# --- the setup sequence, against a recording fake backend -----------------------

class RecordingBackend(threading.Thread):
    """Answers what must be answered, records every message (request, body,
    need_reply, fstat of each fd) and every ProtocolError.  Serves ``sock``, or
    the first connection accepted on ``listener``."""

    def __init__(self, sock, features, protocol_features, queue_num=1, listener=None):
        super().__init__(daemon=True)
        self.sock, self.listener = sock, listener
        self.features, self.protocol_features = features, protocol_features
        self.queue_num, self.log, self.errors, self.negotiated, self.status = queue_num, [], [], 0, 0

    def run(self):
        try:
            if self.listener is not None:
                self.sock, _ = self.listener.accept()
            while self._serve_one():
                pass
        except OSError:
            return

    def _serve_one(self):
        data, anc, _, _ = self.sock.recvmsg(vu.HEADER_SIZE, socket.CMSG_SPACE(4 * vu.MAX_FDS))
        if not data:
            return False
        fds = [fd for _, _, payload in anc for fd in memoryview(payload).cast("i")]
        header = vu.parse_header(data)
        payload = self.sock.recv(header.size, socket.MSG_WAITALL) if header.size else b""
        try:
            msg = vu.decode_request(header, payload, fds)
        except vu.ProtocolError as exc:
            self.errors.append(exc)
            vu.close_fds(fds)
            return True
        with msg:
            self.log.append((msg.request, msg.body, msg.need_reply, [os.fstat(fd) for fd in msg.fds]))
            if msg.request == Request.SET_PROTOCOL_FEATURES:
                self.negotiated = msg.body.value
            elif msg.request == Request.SET_STATUS:
                self.status = msg.body.value
            reply = {Request.GET_FEATURES: vu.U64(self.features),
                     Request.GET_PROTOCOL_FEATURES: vu.U64(self.protocol_features),
                     Request.GET_QUEUE_NUM: vu.U64(self.queue_num),
                     Request.GET_STATUS: vu.U64(self.status),
                     Request.GET_VRING_BASE: vu.VringState(getattr(msg.body, "index", 0), 0)}
            if msg.request in reply:
                self.sock.sendall(vu.encode_reply(msg.request, reply[msg.request]))
            elif vu.reply_expected(msg.request, msg.need_reply, self.negotiated):
                self.sock.sendall(vu.encode_ack(msg.request, True))
        return True


@pytest.fixture
def fake_backend():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    made = []

    def start(features=DEFAULT_FEATURES, protocol_features=int(vu.ProtocolFeature.MQ | vu.ProtocolFeature.REPLY_ACK),
              **kwargs):
        backend = RecordingBackend(theirs, features, protocol_features)
        backend.start()
        drv = VirtioNetDriver(VhostUserFrontend(ours, timeout=5), **kwargs)
        made.append(drv)
        drv.setup()
        return drv, backend

    yield start
    for drv in made:
        drv.close()
    theirs.close()


def test_setup_sequence_is_qemu_like(fake_backend):
    drv, backend = fake_backend(regions=[(0, 4 * MiB), (4 * MiB, 4 * MiB)])
    assert drv.stop() == [0, 0]      # answered, so the backend has seen everything before
    requests = [r for r, *_ in backend.log]
    ring = [Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.SET_VRING_ADDR,
            Request.SET_VRING_KICK, Request.SET_VRING_CALL]
    assert requests == [Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.SET_PROTOCOL_FEATURES,
                        Request.GET_QUEUE_NUM, Request.SET_OWNER, Request.SET_FEATURES,
                        Request.SET_MEM_TABLE] + ring + ring + [Request.SET_VRING_ENABLE] * 4 \
        + [Request.GET_VRING_BASE] * 2
    log = {r: (body, need_reply, kinds) for r, body, need_reply, kinds in backend.log}
    table, need_reply, kinds = log[Request.SET_MEM_TABLE]
    assert need_reply                                    # REPLY_ACK negotiated: QEMU asks
    assert [k.st_size for k in kinds] == [4 * MiB, 4 * MiB]
    assert all(stat.S_ISREG(k.st_mode) for k in kinds)   # memfds
    assert log[Request.SET_FEATURES][0].value == DEFAULT_FEATURES
    assert drv.hdr_len == 12
    # The ring addresses sent are user addresses inside the table's regions.
    addrs = [body for r, body, *_ in backend.log if r == Request.SET_VRING_ADDR]
    for addr in addrs:
        for uaddr in (addr.desc, addr.avail, addr.used):
            assert any(reg.userspace_addr <= uaddr < reg.user_end for reg in table.regions)


def test_setup_without_protocol_features(fake_backend):
    legacy = vu.feature_mask(vu.VIRTIO_NET_F_MAC, vu.VIRTIO_NET_F_MRG_RXBUF)
    drv, backend = fake_backend(features=legacy)
    drv.get_vring_base(0)
    requests = [r for r, *_ in backend.log]
    assert Request.GET_PROTOCOL_FEATURES not in requests
    assert Request.SET_VRING_ENABLE not in requests
    assert drv.features == legacy and drv.hdr_len == 12
    drv.features &= ~vu.feature_mask(vu.VIRTIO_NET_F_MRG_RXBUF)
    assert drv.hdr_len == 10


def test_ack_all_sets_need_reply_everywhere(fake_backend):
    drv, backend = fake_backend(ack_all=True)
    drv.get_vring_base(0)
    for request, _, need_reply, _ in backend.log:
        if vu.REQUESTS[request].reply is None and request != Request.SET_PROTOCOL_FEATURES:
            assert need_reply, request


def test_tx_layouts_write_the_expected_chains(fake_backend):
    drv, _ = fake_backend()
    q = drv.queues[1]
    frame = ether(A_MAC, B_MAC, bytes(100))
    head = drv.send_frame(frame, layout="split_header", header_pieces=(1, 5), kick=False)
    chain = q.outstanding[head]
    assert [n for _, n, _ in chain.buffers] == [1, 4, 7, len(frame)]
    descs = [q.read_desc(d) for d in chain.descs]
    assert [f for _, _, f, _ in descs] == [VIRTQ_DESC_F_NEXT] * 3 + [0]
    head = drv.send_frame(frame, layout="scattered", chunk=7, indirect=True, kick=False)
    table, length, flags, _ = q.read_desc(head)
    assert flags == VIRTQ_DESC_F_INDIRECT and length == 16 * -(-(12 + len(frame)) // 7)
    assert b"".join(drv.mem.read(a, n) for a, n, _, _ in
                    (q.read_desc(i, table=table) for i in range(length // 16))) == bytes(12) + frame
    assert q.avail_idx == 2 and drv.mem.read_u16(q.avail + 2) == 2


def test_driver_detects_a_device_that_lies(fake_backend):
    drv, _ = fake_backend()
    q = drv.queues[0]
    (head,) = drv.post_rx_buffers(1, 256, kick=False)
    drv.mem.write(q.used + 4, (head).to_bytes(4, "little") + (257).to_bytes(4, "little"))
    drv.mem.write_u16(q.used + 2, 1)
    with pytest.raises(DeviceError, match="used len 257"):
        drv.recv_frames(timeout=0)
    drv.mem.write_u16(q.used + 2, 3)
    with pytest.raises(DeviceError, match="ahead"):
        drv.recv_frames(timeout=0)


def test_raw_messages_and_peer_closed():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fe = VhostUserFrontend(ours, timeout=2)
    r, w = os.pipe()
    try:
        fe.send_raw(b"\x01\x02\x03", [r, w])
        data, anc, _, _ = theirs.recvmsg(16, socket.CMSG_SPACE(16))
        got = [fd for _, _, payload in anc for fd in memoryview(payload).cast("i")]
        assert data == b"\x01\x02\x03" and len(got) == 2
        vu.close_fds(got)
        assert not fe.peer_closed(0.05)
        theirs.close()
        assert fe.peer_closed(1)
    finally:
        vu.close_fds([r, w])
        fe.close()


# --- against DPDK's vhost PMD (an independent backend) ----------------------------

TESTPMD = shutil.which("dpdk-testpmd")


@pytest.fixture(scope="module")
def dpdk_vhost(tmp_path_factory):
    """dpdk-testpmd serving a vhost-user socket, forwarding in macswap mode."""
    tmp = tmp_path_factory.mktemp("dpdk")
    path = str(tmp / "vhost.sock")
    proc = start_testpmd(tmp, "vhost", f"net_vhost0,iface={path}",
                         ["--forward-mode=macswap", "--port-topology=loop"])
    yield path
    stop_testpmd(proc)


def start_testpmd(tmp, name, vdev, args=()):
    """dpdk-testpmd without hugepages or PCI, on two lcores sharing CPU 0, non-interactive."""
    if TESTPMD is None:
        pytest.skip("dpdk-testpmd is not installed")
    log = open(tmp / f"testpmd-{name}.log", "w")
    proc = subprocess.Popen(
        [TESTPMD, "--lcores", "0@0,1@0", "--no-huge", "-m", "1024", "--no-pci",
         "--file-prefix", f"vdriver{os.getpid()}{name}", "--vdev", vdev, "--",
         "--stats-period", "3600", *args],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def stop_testpmd(proc):
    proc.send_signal(signal.SIGINT)   # testpmd stops its ports (GET_VRING_BASE...) and exits
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def dpdk_driver(dpdk_vhost):
    made = []

    def connect(**kwargs):
        drv = VirtioNetDriver.connect(dpdk_vhost, timeout=30, **kwargs)
        made.append(drv)
        return drv

    yield connect
    for drv in made:
        drv.close()


def _echo(drv, frames, rx_size=2048, **send_kwargs):
    per_frame = -(-(drv.hdr_len + max(map(len, frames))) // rx_size)
    drv.post_rx_buffers(len(frames) * per_frame, rx_size)
    for frame in frames:
        drv.send_frame(frame, **send_kwargs)
    got = drv.recv_frames(timeout=5, count=len(frames))
    assert [f for _, f in got] == [swapped(f) for f in frames]
    assert drv.wait_tx_done(2)
    return got


pytestmark_dpdk = pytest.mark.dpdk


@pytestmark_dpdk
@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("layout", ["combined", "separate", "split_header", "scattered"])
def test_dpdk_tx_layouts(dpdk_driver, layout, indirect):
    drv = dpdk_driver()
    assert drv.has(vu.VIRTIO_RING_F_INDIRECT_DESC) and drv.has(vu.VIRTIO_NET_F_MRG_RXBUF)
    frames = [ether(A_MAC, B_MAC, bytes([i]) * (46 + 37 * i)) for i in range(5)]
    got = _echo(drv, frames, layout=layout, indirect=indirect, chunk=7)
    assert all(h.num_buffers == 1 for h, _ in got)


@pytestmark_dpdk
def test_dpdk_many_frames_wrap_the_rings(dpdk_driver):
    drv = dpdk_driver(queue_size=64)
    for round_ in range(6):          # 6 * 40 frames through 64-entry rings: indices wrap
        _echo(drv, [ether(A_MAC, B_MAC, bytes([round_, i]) * 30) for i in range(40)])
    assert drv.stop() == [240, 240]


@pytestmark_dpdk
def test_dpdk_mergeable_rx_spans_buffers(dpdk_driver):
    drv = dpdk_driver()
    frame = ether(A_MAC, B_MAC, bytes(range(256)) * 5)
    got = _echo(drv, [frame], rx_size=256)
    assert got[0][0].num_buffers == -(-(12 + len(frame)) // 256)


@pytestmark_dpdk
def test_dpdk_buffers_straddling_two_regions(dpdk_driver):
    drv = dpdk_driver(regions=[(0, 4 * MiB), (4 * MiB, 4 * MiB), (8 * MiB, 4 * MiB)])
    tx_boundary, rx_boundary = drv.mem.boundaries()
    frame = ether(A_MAC, B_MAC, bytes(range(200)))
    # An RX buffer across the second boundary, built with the low-level hooks.
    rxq = drv.queues[0]
    head = rxq.add_chain([(rx_boundary - 100, 2048, True)])
    rxq.make_available([head])
    rxq.kick()
    # A TX frame whose bytes cross the first boundary.
    drv.send_frame(frame, layout="combined", addr=tx_boundary - 30)
    got = drv.recv_frames(timeout=5)
    assert [f for _, f in got] == [swapped(frame)]


@pytestmark_dpdk
def test_dpdk_shared_fd_regions(dpdk_driver):
    drv = dpdk_driver(regions=[(0, 4 * MiB), (1 << 32, 4 * MiB)], shared_fd=True)
    frame = ether(A_MAC, B_MAC, b"far away" * 20)
    drv.post_rx_buffers(1)
    drv.send_frame(frame, addr=(1 << 32) + 12345)
    assert [f for _, f in drv.recv_frames(timeout=5)] == [swapped(frame)]


@pytestmark_dpdk
@pytest.mark.parametrize("drop", [
    vu.feature_mask(vu.VIRTIO_RING_F_EVENT_IDX),
    vu.feature_mask(vu.VIRTIO_NET_F_MRG_RXBUF),
    vu.feature_mask(vu.VIRTIO_F_VERSION_1, vu.VIRTIO_NET_F_MRG_RXBUF),
    vu.feature_mask(vu.VHOST_USER_F_PROTOCOL_FEATURES),
], ids=["no-event-idx", "no-mrg-rxbuf", "legacy-10-byte-header", "no-protocol-features"])
def test_dpdk_feature_subsets(dpdk_driver, drop):
    drv = dpdk_driver(features=DEFAULT_FEATURES & ~drop)
    assert drv.features & drop == 0
    frames = [ether(A_MAC, B_MAC, bytes([i]) * 60) for i in range(3)]
    _echo(drv, frames)


@pytestmark_dpdk
def test_dpdk_interrupts_arrive_without_polling(dpdk_driver):
    drv = dpdk_driver()
    frame = ether(A_MAC, B_MAC, bytes(64))
    drv.post_rx_buffers(4)
    drv.send_frame(frame)
    assert [f for _, f in drv.recv_frames(timeout=5, poll=None)] == [swapped(frame)]


@pytestmark_dpdk
def test_dpdk_virtio_user_messages_all_decode(tmp_path):
    """The codec against an independent *front-end*: DPDK's virtio-user sets up a
    device on a recording backend; every message it sends must decode."""
    path = str(tmp_path / "vu.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    offered = int(vu.ProtocolFeature.MQ | vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.STATUS)
    backend = RecordingBackend(None, DEFAULT_FEATURES, offered, listener=listener)
    backend.start()
    proc = start_testpmd(tmp_path, "vuser", f"net_virtio_user0,path={path},queues=1")
    try:
        deadline = time.monotonic() + 30
        while Request.SET_VRING_ENABLE not in [r for r, *_ in backend.log] and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop_testpmd(proc)
        backend.join(5)
        listener.close()
    assert backend.errors == []
    seen = {r for r, *_ in backend.log}
    assert {Request.SET_MEM_TABLE, Request.SET_VRING_ADDR, Request.SET_VRING_KICK, Request.SET_VRING_CALL,
            Request.SET_VRING_ENABLE, Request.GET_VRING_BASE} <= seen
    tables = [body for r, body, *_ in backend.log if r == Request.SET_MEM_TABLE]
    assert all(len(t.regions) >= 1 for t in tables)


@pytestmark_dpdk
def test_dpdk_reconnect_after_the_backend_dies(tmp_path):
    """QEMU's reconnect: the backend is killed and restarted; the same rings go on."""
    path = str(tmp_path / "vhost.sock")
    args = ["--forward-mode=macswap", "--port-topology=loop"]
    proc = start_testpmd(tmp_path, "first", f"net_vhost0,iface={path}", args)
    drv = VirtioNetDriver.connect(path, timeout=30)
    try:
        _echo(drv, [ether(A_MAC, B_MAC, b"before" * 10)])
        proc.kill()
        proc.wait()
        assert drv.frontend.peer_closed(5)
        os.unlink(path)
        proc = start_testpmd(tmp_path, "second", f"net_vhost0,iface={path}", args)
        drv.reconnect(path, timeout=30)
        _echo(drv, [ether(A_MAC, B_MAC, b"after" * 10)])
        assert drv.stop() == [2, 2]
    finally:
        drv.close(graceful=False)
        stop_testpmd(proc)


def test_from_socket_and_reconnect_over_socketpairs():
    first, backend_end = socket.socketpair()
    backend = RecordingBackend(backend_end, DEFAULT_FEATURES, int(vu.ProtocolFeature.REPLY_ACK))
    backend.start()
    drv = VirtioNetDriver.from_socket(first)
    try:
        q = drv.queues[1]
        drv.send_frame(ether(A_MAC, B_MAC, bytes(60)), kick=False)
        backend_end.close()
        second, backend_end2 = socket.socketpair()
        backend2 = RecordingBackend(backend_end2, DEFAULT_FEATURES, int(vu.ProtocolFeature.REPLY_ACK))
        backend2.start()
        drv.reconnect(sock=second)
        drv.get_vring_base(0)
        bases = [body for r, body, *_ in backend2.log if r == Request.SET_VRING_BASE]
        assert bases == [vu.VringState(0, 0), vu.VringState(1, 0)]   # = used idx, not avail idx
        assert q.avail_idx == 1 and os.eventfd_read(q.kick_fd) == 1   # kicked after reconnecting
    finally:
        drv.close()
        backend_end2.close()


def test_hostile_hooks(fake_backend):
    drv, backend = fake_backend()
    fe, q = drv.frontend, drv.queues[1]
    # Malformed messages: wrong size, extra fds, unknown request.  The codec-based
    # backend must see each as a ProtocolError (and close the fds it got).
    r, w = os.pipe()
    try:
        fe.send_raw(vu.Header(Request.SET_VRING_NUM, vu.VERSION, 4).pack() + bytes(4))
        fe.send(Request.SET_FEATURES, vu.U64(0), fds=[r, w])
        fe.send(999, vu.Raw(b"junk"))
        drv.get_vring_base(0)            # answered: everything before was processed
    finally:
        vu.close_fds([r, w])
    assert [e.request for e in backend.errors] == [Request.SET_VRING_NUM, Request.SET_FEATURES, 999]
    # A descriptor loop, a huge length, an indirect table of odd size, an avail idx
    # that jumps past the ring size: the hooks write exactly what they are told.
    q.write_desc(0, 0x1000, 0xFFFFFFFF, VIRTQ_DESC_F_NEXT, 1)
    q.write_desc(1, 0x2000, 64, VIRTQ_DESC_F_NEXT, 0)
    q.write_desc(2, drv.arena.alloc(40), 40, VIRTQ_DESC_F_INDIRECT)
    assert q.read_desc(0) == (0x1000, 0xFFFFFFFF, VIRTQ_DESC_F_NEXT, 1)
    assert q.read_desc(2)[1:3] == (40, VIRTQ_DESC_F_INDIRECT)
    q.put_avail([0, 2, 300])
    assert [drv.mem.read_u16(q.avail + 4 + 2 * i) for i in range(3)] == [0, 2, 300]
    q.set_avail_idx(q.size + 5)
    assert drv.mem.read_u16(q.avail + 2) == q.size + 5
    assert q.kick(force=True)
    assert not fe.peer_closed()
