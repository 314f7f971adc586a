"""The vhostni daemon: NIs (vhost-user servers) and uplinks on one switch, one thread.

The data plane runs inside the C loop (``Switch.run``) with the GIL released.  It returns
to Python only when the control epoll set below becomes readable (a vhost-user message, a
new connection, a signal) or its timeout passes, so control work and forwarding never race:
the same thread does both, one after the other.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import tap
from .device import CloseConnection, VhostUserDevice, rarp_frame
from .fastpath import Port, Switch
from .kernel import Kernel
from .policy import PolicyError, load_policy
from .vhost_user import proto

log = logging.getLogger("vhostni")

HOUSEKEEPING_MS = 250


@dataclass
class _Reader:
    """Assembles one vhost-user message at a time from a non-blocking socket, reading
    exactly the bytes of the current message so that the fds the kernel delivers with
    them belong to it.  A frontend that stalls mid-message stalls only itself."""

    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    fds: list = field(default_factory=list)
    header: Optional[proto.Header] = None

    def messages(self):
        """Yields (header, payload, fds) for each complete message; raises EOFError when
        the peer closed, proto.ProtocolError on garbage."""
        while True:
            want = (proto.HEADER_SIZE if self.header is None else self.header.size) - len(self.buf)
            if want > 0:
                try:
                    data, fds, flags, _ = socket.recv_fds(self.sock, want, proto.MAX_FDS)
                except (BlockingIOError, InterruptedError):
                    return
                self.fds.extend(fds)
                if flags & socket.MSG_CTRUNC:
                    raise proto.ProtocolError(None, "more fds attached than any message carries")
                if not data:
                    raise EOFError
                self.buf += data
                if len(self.buf) < (proto.HEADER_SIZE if self.header is None else self.header.size):
                    continue
            if self.header is None:
                self.header = proto.parse_header(bytes(self.buf))
                self.buf.clear()
                if self.header.size:
                    continue
            header, payload, fds = self.header, bytes(self.buf), self.fds
            self.header, self.buf, self.fds = None, bytearray(), []
            yield header, payload, fds

    def close(self) -> None:
        proto.close_fds(self.fds)
        self.fds = []
        self.sock.close()


class NI:
    """One VM NIC: a vhost-user socket, its device state and its switch port."""

    def __init__(self, daemon: "Daemon", name: str, path: str):
        self.daemon = daemon
        self.name = name
        self.path = path
        self.port = daemon.switch.add_vhost_port()
        self.device = VhostUserDevice(name, self.port, offloads=daemon.offloads)
        self.device.on_rarp = lambda mac: self.port.inject_from(rarp_frame(mac))
        self.listener = _listen(path)
        self.reader: Optional[_Reader] = None
        self.broken_logged: Optional[str] = None

    @property
    def connected(self) -> bool:
        return self.reader is not None

    def info(self) -> dict:
        d = {
            "name": self.name,
            "socket": self.path,
            "connected": self.connected,
            "features": f"{self.device.features:#x}",
            "broken": self.port.broken_reason(),
            "messages": self.device.counters.messages,
            "protocol_errors": self.device.counters.errors,
            "sessions": self.device.counters.sessions,
            "mtu": self.device.mtu,
        }
        d.update(self.port.stats())
        return d


def _listen(path: str) -> socket.socket:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket from an earlier run
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.bind(path)
    s.listen(4)
    s.setblocking(False)
    return s


class Daemon:
    def __init__(self, nis: list[tuple[str, str]], uplinks: list[str] = (), poll: bool = False,
                 offloads: bool = True, stats_file: Optional[str] = None,
                 policies: Optional[dict[str, str]] = None, alert_log: Optional[str] = None):
        self.switch = Switch()
        self.poll = poll
        self.offloads = offloads
        self.stats_file = stats_file
        self.ep = select.epoll()
        self.switch.set_wake_fd(self.ep.fileno())
        self.nis: dict[str, NI] = {}
        self.uplinks: dict[str, Port] = {}
        self._handlers: dict[int, Callable[[], None]] = {}
        self.housekeepers: list[Callable[[], None]] = []   # called every HOUSEKEEPING_MS
        self._stop = False
        self._reload = False
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.ep.register(self._sig_r, select.EPOLLIN)
        self.kernel = Kernel(self.switch, self.register, self.unregister, alert_log)
        self.register(self.switch.punt_fd, self.kernel.on_punts)
        self.policy_files = dict(policies or {})
        unknown = set(self.policy_files) - {name for name, _ in nis}
        if unknown:
            raise ValueError(f"--policy for unknown NI {sorted(unknown)[0]!r}")
        loaded = {name: load_policy(path) for name, path in self.policy_files.items()}
        for name, path in nis:
            self.add_ni(name, path)
        for spec in uplinks:
            self.add_uplink(spec)
        for name, pol in loaded.items():
            ni = self.nis[name]
            self.kernel.attach(name, ni.port, pol)

    # ---- the control epoll set
    def register(self, fd: int, handler: Callable[[], None], events: int = select.EPOLLIN) -> None:
        self._handlers[fd] = handler
        self.ep.register(fd, events)

    def set_events(self, fd: int, events: int) -> None:
        """Changes what a registered fd waits for (e.g. EPOLLOUT only while output is queued:
        a level-triggered EPOLLOUT left on would wake the data-plane loop all the time)."""
        self.ep.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self._handlers.pop(fd, None)
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass

    def reload_policies(self) -> None:
        """Re-reads every policy file; a file that does not validate keeps the old policy."""
        for name, path in self.policy_files.items():
            try:
                pol = load_policy(path)
            except (OSError, PolicyError) as exc:
                log.error("NI %s: policy %s not reloaded, keeping the old one: %s", name, path, exc)
                continue
            self.set_policy(name, pol, path)
            log.info("NI %s: policy reloaded from %s", name, path)

    def set_policy(self, name: str, pol, path: Optional[str] = None) -> None:
        """Gives NI ``name`` a validated policy at once (attaching its NI kernel if it had
        none).  ``path``: the file SIGHUP re-reads it from (None: none, e.g. set over the
        admin plane without a state directory)."""
        ni = self.nis[name]
        nk = self.kernel.nis.get(ni.port.index)
        if nk is None:
            self.kernel.attach(name, ni.port, pol)
        else:
            nk.replace_policy(pol)
        if path:
            self.policy_files[name] = path
        else:
            self.policy_files.pop(name, None)
        self.kernel.event("POLICY_CHANGED", ni=name, source=pol.source)

    # ---- configuration
    def add_ni(self, name: str, path: str) -> NI:
        if name in self.nis:
            raise ValueError(f"NI {name!r} defined twice")
        ni = NI(self, name, path)
        self.nis[name] = ni
        self.register(ni.listener.fileno(), lambda: self._accept(ni))
        log.info("NI %s listening on %s", name, path)
        return ni

    def remove_ni(self, name: str) -> None:
        """Removes an NI at run time: its scanners stop, held frames are dropped, its guest
        is disconnected and its socket goes away.  KeyError if there is no such NI."""
        ni = self.nis.pop(name)
        self.kernel.detach(ni.port.index)
        self._drop(ni)
        self.unregister(ni.listener.fileno())
        ni.listener.close()
        try:
            os.unlink(ni.path)
        except OSError:
            pass
        ni.port.remove()
        self.policy_files.pop(name, None)
        log.info("NI %s removed", name)

    def add_uplink(self, spec: str) -> None:
        kind, _, arg = spec.partition(":")
        if kind != "tap" or not arg:
            raise ValueError(f"uplink {spec!r}: expected tap:IFNAME")
        fd = tap.open_tap(arg, offloads=self.offloads)
        self.uplinks[spec] = self.switch.add_tap_port(fd, tap.VNET_HDR_LEN)
        log.info("uplink %s attached", spec)

    # ---- the loop
    def request_stop(self, *_: object) -> None:
        self._stop = True

    def request_reload(self, *_: object) -> None:
        self._reload = True

    def run(self) -> None:
        old = signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        handlers = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self.request_reload)
        last_house = 0.0
        try:
            while not self._stop:
                wait = HOUSEKEEPING_MS
                if self.kernel.next_deadline != float("inf"):
                    left = (self.kernel.next_deadline - time.monotonic()) * 1000
                    wait = max(1, min(wait, int(left) + 1))
                self.switch.run(wait, self.poll)
                for fd, _ in self.ep.poll(0):
                    self._control_event(fd)
                if self._reload:
                    self._reload = False
                    self.reload_policies()
                now = time.monotonic()
                if now - last_house >= HOUSEKEEPING_MS / 1000 or now >= self.kernel.next_deadline:
                    self.kernel.housekeeping()
                if now - last_house >= HOUSEKEEPING_MS / 1000:
                    last_house = now
                    self._housekeeping()
        finally:
            signal.set_wakeup_fd(old)
            for s, h in handlers.items():
                signal.signal(s, h)
            self._housekeeping()

    def _control_event(self, fd: int) -> None:
        if fd == self._sig_r:
            try:
                while os.read(self._sig_r, 64):
                    pass
            except BlockingIOError:
                pass
            return
        handler = self._handlers.get(fd)
        if handler is not None:
            handler()

    def _accept(self, ni: NI) -> None:
        try:
            conn, _ = ni.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if ni.connected:
            # The old connection may be gone already, its EOF not yet seen in this batch of
            # events (epoll need not report it first): finish it before judging, or a
            # frontend that reconnects at once is refused.
            self._serve(ni)
        if ni.connected:
            log.warning("NI %s: refusing a second frontend connection", ni.name)
            conn.close()
            return
        conn.setblocking(False)
        ni.reader = _Reader(conn)
        self.register(conn.fileno(), lambda: self._serve(ni))
        ni.device.connected()
        log.info("NI %s: frontend connected", ni.name)
        self.kernel.event("NI_UP", ni=ni.name)

    def _serve(self, ni: NI) -> None:
        reader = ni.reader
        try:
            for header, payload, fds in reader.messages():
                try:
                    msg = proto.decode_request(header, payload, fds)
                except proto.ProtocolError:
                    proto.close_fds(fds)
                    raise
                reply = ni.device.handle(msg)
                if reply is not None:
                    reader.sock.sendall(reply)
        except EOFError:
            log.info("NI %s: frontend disconnected", ni.name)
            self._drop(ni)
        except proto.ProtocolError as exc:
            ni.device.counters.errors += 1
            ni.device.counters.last_error = str(exc)
            log.error("NI %s: protocol error, closing the connection: %s", ni.name, exc)
            self._drop(ni)
        except CloseConnection as exc:
            log.error("NI %s: closing the connection: %s", ni.name, exc)
            self._drop(ni)
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.EAGAIN):
                log.exception("NI %s: connection failed", ni.name)
            else:
                log.info("NI %s: connection lost (%s)", ni.name, exc)
            self._drop(ni)

    def _drop(self, ni: NI) -> None:
        if ni.reader is None:
            return
        self.unregister(ni.reader.sock.fileno())
        ni.reader.close()
        ni.reader = None
        ni.device.disconnected()
        self.kernel.event("NI_DOWN", ni=ni.name)

    def _housekeeping(self) -> None:
        for ni in self.nis.values():
            reason = ni.port.broken_reason()
            if reason != ni.broken_logged:
                if reason:
                    log.error("NI %s: guest broke the virtio rules (%s); NIC stopped until the "
                              "guest driver resets it", ni.name, reason)
                ni.broken_logged = reason
        for fn in self.housekeepers:
            fn()
        if self.stats_file:
            tmp = self.stats_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.stats(), f, indent=1)
            os.replace(tmp, self.stats_file)

    def stats(self) -> dict:
        kernels = {nk.name: nk.info() for nk in self.kernel.nis.values()}
        return {
            "time": time.time(),
            "nis": {name: dict(ni.info(), kernel=kernels.get(name)) for name, ni in self.nis.items()},
            "alerts": self.kernel.alerts.seq,
            "uplinks": {name: port.stats() for name, port in self.uplinks.items()},
        }

    def close(self) -> None:
        self.kernel.close()
        for ni in self.nis.values():
            self._drop(ni)
            ni.listener.close()
            try:
                os.unlink(ni.path)
            except OSError:
                pass
        self.switch.close()
        self.ep.close()
        os.close(self._sig_r)
        os.close(self._sig_w)
