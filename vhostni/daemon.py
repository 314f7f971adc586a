"""The vhostni daemon: NIs (vhost-user servers) and uplinks on one switch, one thread.

The data plane runs inside the C loop (``Switch.run``) with the GIL released.  It returns
to Python only when the control epoll set below becomes readable (a vhost-user message, a
new connection, a signal) or its timeout passes, so control work and forwarding never race:
the same thread does both, one after the other.

An NI either listens on its socket (QEMU connects, with ``reconnect=N`` so it comes back
after a daemon restart) or, given as ``client:PATH``, connects to a QEMU that listens there
(``server=on,wait=off``), and connects again with back-off whenever the connection ends.
An NI can be quarantined (only what its policy's ``[quarantine] allow`` rules match goes
either way) and have its link set down (nothing goes either way; with ``--qemu-qmp`` QEMU
also takes the guest's carrier away); both survive policy changes (see ``quarantine``,
``set_link`` and vhostni/qemu.py).  Other threads (the QMP client's) hand work to this one
with ``call_soon``.
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
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import tap
from .device import MAX_QUEUE_PAIRS, CloseConnection, VhostUserDevice, rarp_frame
from .fastpath import ISOLATE_LINK_DOWN, ISOLATE_QUARANTINE, Port, Switch
from .kernel import Kernel
from .policy import PolicyError, load_policy
from .vhost_user import proto
from .service import notify
from .unixsock import socket_in_use
from .logtext import printable

REASON_MAX = 200        # characters of an administrator's reason (quarantine, link) kept

log = logging.getLogger("vhostni")

HOUSEKEEPING_MS = 250
CLIENT_BACKOFF_MIN = 0.25    # client-mode NIs: seconds between connection attempts, doubling
CLIENT_BACKOFF_MAX = 4.0
CLIENT_PREFIX = "client:"


@dataclass
class _Reader:
    """Assembles one vhost-user message at a time from a non-blocking socket, reading
    exactly the bytes of the current message so that the fds the kernel delivers with
    them belong to it.  A frontend that stalls mid-message stalls only itself."""

    sock: socket.socket
    device: Optional[VhostUserDevice] = None     # the session this connection drives
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
                if flags & socket.MSG_CTRUNC or len(self.fds) > proto.MAX_FDS:
                    # (fds sent with every byte of one message would pile up here: the daemon's
                    # fds are every NI's)
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
        # "client:PATH": QEMU listens on PATH (server=on) and this NI connects to it
        self.client = path.startswith(CLIENT_PREFIX)
        self.path = path[len(CLIENT_PREFIX):] if self.client else path
        if not self.path:
            raise ValueError(f"NI {name!r}: no socket path")
        self.port = daemon.switch.add_vhost_port()
        self.device = self._new_device()
        try:
            self.listener = None if self.client else _listen(self.path, daemon.socket_group)
        except BaseException:
            self.port.remove()              # the slot is not lost to a socket that failed
            raise
        self.reader: Optional[_Reader] = None
        # live migration: a second frontend on the socket (the destination QEMU) waits
        # here until it configures the device (see Daemon._promote)
        self.standby: Optional[_Reader] = None
        self.handovers = 0
        self.broken_logged: Optional[str] = None
        self.next_connect = 0.0            # client mode: when to try again
        self.backoff = CLIENT_BACKOFF_MIN
        self.connect_error = ""
        self.qemu = None                   # a vhostni.qemu.QemuLink with --qemu-qmp
        self.isolation_reason = {}         # "quarantine"/"link-down" -> why

    def _new_device(self, counters=None) -> VhostUserDevice:
        dev = VhostUserDevice(self.name, self.port, offloads=self.daemon.offloads)
        if counters is not None:
            dev.counters = counters                  # one NI, one set of counters
        dev.on_rarp = lambda mac: self.port.inject_from(rarp_frame(mac))
        dev.on_promote = lambda d: self.daemon._promote(self, d)
        return dev

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
            "mode": "client" if self.client else "server",
            "quarantined": bool(self.port.isolation & ISOLATE_QUARANTINE),
            "link": "down" if self.port.isolation & ISOLATE_LINK_DOWN else "up",
            "standby_frontend": self.standby is not None,
            "handovers": self.handovers,
        }
        if self.client and not self.connected and self.connect_error:
            d["connect_error"] = self.connect_error
        if self.qemu is not None:
            d["qemu"] = self.qemu.info()
        d.update(self.port.stats())
        d["queues"] = self.port.queue_stats()
        return d


def _listen(path: str, group: Optional[int] = None) -> socket.socket:
    """A vhost-user server socket at ``path``; with ``group``, that group (e.g. libvirt's QEMU
    user's) may connect to it (mode 0660) and nobody else but the daemon's user."""
    if socket_in_use(path):
        # another process's live socket (a second daemon's NI, or any service's): replacing
        # it would take its clients away
        raise OSError(errno.EADDRINUSE, "a process is listening on this socket already", path)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket from an earlier run
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.bind(path)
    if group is not None:
        os.chown(path, -1, group)
        os.chmod(path, 0o660)
    s.listen(4)
    s.setblocking(False)
    return s


class Daemon:
    def __init__(self, nis: list[tuple[str, str]], uplinks: list[str] = (), poll: bool = False,
                 offloads: bool = True, stats_file: Optional[str] = None,
                 policies: Optional[dict[str, str]] = None, alert_log: Optional[str] = None,
                 socket_group: Optional[int] = None, state_dir: Optional[str] = None):
        self.socket_group = socket_group
        self.switch = Switch()
        self.poll = poll
        self.offloads = offloads
        self.stats_file = stats_file
        self.ep = select.epoll()
        self.switch.set_wake_fd(self.ep.fileno())
        self.nis: dict[str, NI] = {}
        self.uplinks: dict[str, Port] = {}
        self._handlers: dict[int, Callable[[], None]] = {}
        self._parked: set = set()          # registered fds out of the epoll set (set_events 0)
        self.housekeepers: list[Callable[[], None]] = []   # called every HOUSEKEEPING_MS
        self._stop = False
        self._reload = False
        self._reloading = False       # a background reload is loading (reload_policies_in_background)
        self.uncaught = 0                  # exceptions _guarded caught: bugs, see the log
        self._broken_seen = 0               # ports broken at the last housekeeping tick
        self.stats_error: Optional[str] = None   # why --stats-file cannot be written now
        self.stats_write_errors = 0
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.ep.register(self._sig_r, select.EPOLLIN)
        self.kernel = Kernel(self.switch, self.register, self.unregister, alert_log, state_dir)
        self.register(self.switch.punt_fd, self.kernel.on_punts)
        # the alert log's fsyncs on a thread of their own: they never stall forwarding
        self.kernel.alerts.start_writer(self.register, self.unregister)
        # work other threads hand to this one (call_soon), and the pipe that wakes it
        self._inbox: deque = deque()
        self._inbox_r, self._inbox_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.register(self._inbox_r, self._run_inbox)
        self.qemu_monitor = None           # vhostni.qemu.QemuMonitor, made by attach_qemu
        self._alerts_by_scanner: dict = {}
        self.kernel.alerts.listeners.append(self._on_alert)
        self.housekeepers.append(self._connect_clients)
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
        self._parked.discard(fd)      # a new file with a number a parked one had
        self.ep.register(fd, events)

    def set_events(self, fd: int, events: int) -> None:
        """Changes what a registered fd waits for (e.g. EPOLLOUT only while output is queued:
        a level-triggered EPOLLOUT left on would wake the data-plane loop all the time).  0 takes
        it out of the epoll set until it waits for something again: epoll reports a hang-up or an
        error whatever the mask, and would do so on every turn."""
        if not events:
            if fd not in self._parked:
                self.ep.unregister(fd)
                self._parked.add(fd)
        elif fd in self._parked:
            self._parked.discard(fd)
            self.ep.register(fd, events)
        else:
            self.ep.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self._handlers.pop(fd, None)
        if fd in self._parked:
            self._parked.discard(fd)
            return
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass

    def reload_policies(self) -> None:
        """Re-reads every policy file; a file that does not validate (or cannot be applied)
        keeps the old policy, and nothing here stops the daemon."""
        for name, path in list(self.policy_files.items()):
            try:
                pol = load_policy(path)
                self.set_policy(name, pol, path)
            except (OSError, PolicyError) as exc:
                log.error("NI %s: policy %s not reloaded, keeping the old one: %s", name, path, exc)
                continue
            except Exception:     # noqa: BLE001 - a bug must not take every NI down
                log.exception("NI %s: policy %s not reloaded", name, path)
                continue
            log.info("NI %s: policy reloaded from %s", name, path)

    def reload_policies_in_background(self) -> None:
        """SIGHUP: reload_policies with the loading (parsing, compiling signature rules: seconds
        for 10,000 rules) on a worker thread, so the data plane never waits for it; each policy
        that loaded is applied on this thread (call_soon), an atomic switch between batches."""
        if self._reloading:
            self._reload = True        # one more after the one running: the file changed again
            return
        self._reloading = True
        files = list(self.policy_files.items())

        def load() -> None:
            done = []
            for name, path in files:
                try:
                    done.append((name, path, load_policy(path), None))
                except (OSError, PolicyError) as exc:
                    done.append((name, path, None, exc))
                except Exception as exc:  # noqa: BLE001 - a bug must not take every NI down
                    log.exception("NI %s: policy %s not reloaded", name, path)
                    done.append((name, path, None, exc))
            self.call_soon(lambda: apply(done))

        def apply(done) -> None:
            self._reloading = False
            for name, path, pol, exc in done:
                if pol is None:
                    log.error("NI %s: policy %s not reloaded, keeping the old one: %s", name, path, exc)
                    continue
                if name not in self.nis or self.policy_files.get(name) != path:
                    continue           # removed or given another policy meanwhile
                try:
                    self.set_policy(name, pol, path)
                except PolicyError as exc:
                    log.error("NI %s: policy %s not reloaded, keeping the old one: %s", name, path, exc)
                    continue
                except Exception:     # noqa: BLE001
                    log.exception("NI %s: policy %s not reloaded", name, path)
                    continue
                log.info("NI %s: policy reloaded from %s", name, path)
            notify("READY=1")

        threading.Thread(target=load, name="vhostni-policy-load", daemon=True).start()

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
        if ni.client:
            log.info("NI %s connects to %s (vhost-user client)", name, ni.path)
            self._connect_client(ni)
            return ni
        self.register(ni.listener.fileno(), lambda: self._accept(ni))
        log.info("NI %s listening on %s", name, path)
        return ni

    def remove_ni(self, name: str) -> None:
        """Removes an NI at run time: its scanners stop, held frames are dropped, its guest
        is disconnected and its socket goes away.  KeyError if there is no such NI."""
        ni = self.nis.pop(name)
        self.kernel.detach(ni.port.index)
        self.kernel.checkpoints.drop_ni(name)
        self._drop(ni, ni.standby)
        self._drop(ni)
        if ni.qemu is not None and self.qemu_monitor is not None:
            self.qemu_monitor.remove(ni.qemu)
        if ni.listener is not None:
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
        try:
            self.uplinks[spec] = self.switch.add_tap_port(fd, tap.VNET_HDR_LEN)
        except BaseException:
            os.close(fd)                    # refused: the switch did not take it
            raise
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
        notify("READY=1\nSTATUS=serving %d NIs" % len(self.nis))   # every socket listens now
        try:
            while not self._stop:
                wait = HOUSEKEEPING_MS
                if self.kernel.next_deadline != float("inf"):
                    left = (self.kernel.next_deadline - time.monotonic()) * 1000
                    wait = max(1, min(wait, int(left) + 1))
                self.switch.run(wait, self.poll)
                for fd, _ in self.ep.poll(0):
                    self._guarded(self._control_event, fd)
                if self._reload and not self._reloading:
                    # (a SIGHUP during a reload waits for it to finish, then starts one more)
                    self._reload = False
                    notify("RELOADING=1")
                    self._guarded(self.reload_policies_in_background)

                now = time.monotonic()
                if now - last_house >= HOUSEKEEPING_MS / 1000 or now >= self.kernel.next_deadline:
                    self._guarded(self.kernel.housekeeping)
                if now - last_house >= HOUSEKEEPING_MS / 1000:
                    last_house = now
                    self._guarded(self._housekeeping)
        finally:
            notify("STOPPING=1")
            signal.set_wakeup_fd(old)
            for s, h in handlers.items():
                signal.signal(s, h)
            self._housekeeping()

    def _guarded(self, fn: Callable, *args) -> None:
        """Runs one piece of control work; an exception it did not handle (a bug, an I/O
        error nobody expected) is logged and counted, and the data plane goes on: it never
        ends the daemon and every NI with it."""
        try:
            fn(*args)
        except Exception:     # noqa: BLE001
            self.uncaught += 1
            log.exception("internal error (%d so far); the daemon goes on", self.uncaught)

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
            self._serve(ni, ni.reader)
        if ni.connected and ni.standby is not None:
            self._serve(ni, ni.standby)
        if ni.connected and ni.standby is not None:
            log.warning("NI %s: refusing a third frontend connection", ni.name)
            conn.close()
            return
        if ni.connected:
            # live migration: the destination QEMU connects while the source runs
            self._attach_standby(ni, conn)
            return
        self._attach_frontend(ni, conn)

    def _attach_frontend(self, ni: NI, conn: socket.socket) -> None:
        conn.setblocking(False)
        ni.reader = reader = _Reader(conn, ni.device)
        self.register(conn.fileno(), lambda: self._serve(ni, reader))
        ni.device.connected()
        log.info("NI %s: frontend connected", ni.name)
        self.kernel.event("NI_UP", ni=ni.name)
        if ni.qemu is not None:
            ni.qemu.reassert()    # QEMU sets the link up itself when vhost-user (re)connects

    def _attach_standby(self, ni: NI, conn: socket.socket) -> None:
        conn.setblocking(False)
        dev = ni._new_device(counters=ni.device.counters)
        dev.standby = True
        ni.standby = reader = _Reader(conn, dev)
        self.register(conn.fileno(), lambda: self._serve(ni, reader))
        dev.connected()
        log.info("NI %s: second frontend connected (standby: a migration's destination)", ni.name)

    def _promote(self, ni: NI, dev: VhostUserDevice) -> None:
        """The standby session configures the device: it becomes the NI's frontend, if the
        active one's rings are stopped (GET_VRING_BASE: QEMU stopped the source VM) or it
        is gone.  Two QEMUs running one NI at once would corrupt both guests: refused."""
        if ni.standby is None or ni.standby.device is not dev:
            raise CloseConnection("not this NI's standby session")
        if ni.reader is not None:
            running = [q for q in range(2 * MAX_QUEUE_PAIRS) if ni.port.vring_started(q)]
            if running:
                raise CloseConnection(
                    f"second frontend configures the device while rings {running} of the "
                    "first still run (migrate only a stopped source)")
        old_reader, old_dev = ni.reader, ni.device
        ni.port.reset()          # the source's memory, rings and fds; policy, held frames stay
        if old_dev is not None:
            old_dev.demote()
        ni.reader, ni.device = ni.standby, dev
        ni.standby = old_reader
        dev.activate()
        ni.handovers += 1
        log.info("NI %s: the second frontend took over (migration hand-over %d)", ni.name,
                 ni.handovers)
        self.kernel.event("NI_UP", ni=ni.name)
        if ni.qemu is not None:
            ni.qemu.reassert()

    def _serve(self, ni: NI, reader: Optional[_Reader]) -> None:
        if reader is None:
            return
        try:
            for header, payload, fds in reader.messages():
                try:
                    msg = proto.decode_request(header, payload, fds)
                except proto.ProtocolError:
                    proto.close_fds(fds)
                    raise
                reply = reader.device.handle(msg)
                if reply is not None:
                    reader.sock.sendall(reply)
        except EOFError:
            log.info("NI %s: frontend disconnected", ni.name)
            self._drop(ni, reader)
        except proto.ProtocolError as exc:
            reader.device.counters.errors += 1
            reader.device.counters.last_error = str(exc)
            log.error("NI %s: protocol error, closing the connection: %s", ni.name, exc)
            self._drop(ni, reader)
        except CloseConnection as exc:
            reader.device.counters.errors += 1
            reader.device.counters.last_error = str(exc)
            log.error("NI %s: closing the connection: %s", ni.name, exc)
            self._drop(ni, reader)
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.EAGAIN):
                log.exception("NI %s: connection failed", ni.name)
            else:
                log.info("NI %s: connection lost (%s)", ni.name, exc)
            self._drop(ni, reader)

    def _drop(self, ni: NI, reader: Optional[_Reader] = None) -> None:
        if reader is None:
            reader = ni.reader
        if reader is None or reader not in (ni.reader, ni.standby):
            return
        self.unregister(reader.sock.fileno())
        reader.close()
        reader.device.disconnected()      # a standby's: its own state only
        if reader is ni.standby:
            ni.standby = None
            return
        ni.reader = None
        self.kernel.event("NI_DOWN", ni=ni.name)
        if ni.standby is not None:
            # the source went away first (or a migration failed on the other side): the
            # standby is now the only frontend; it takes the port when it configures it
            log.info("NI %s: the standby frontend is now the only one", ni.name)
            ni.reader, ni.standby = ni.standby, None
            ni.device = ni.reader.device
            ni.device.activate()
            self.kernel.event("NI_UP", ni=ni.name)
            return
        if ni.client:
            ni.next_connect = time.monotonic() + ni.backoff   # QEMU restarting, or gone

    def _housekeeping(self) -> None:
        # Per NI only while some port is (or just was) broken: with hundreds of idle NIs the
        # tick stays one C call.
        broken = self.switch.ports_broken()
        if broken or self._broken_seen:
            for ni in self.nis.values():
                reason = ni.port.broken_reason()
                if reason != ni.broken_logged:
                    if reason:
                        log.error("NI %s: guest broke the virtio rules (%s); NIC stopped until the "
                                  "guest driver resets it", ni.name, reason)
                    ni.broken_logged = reason
            self._broken_seen = broken
        for fn in self.housekeepers:
            fn()
        if self.stats_file:
            self._write_stats()

    def _write_stats(self) -> None:
        """--stats-file, replaced atomically; a failure (full disk...) is logged once, counted,
        and retried at the next housekeeping: the NIs go on."""
        tmp = None
        try:
            data = json.dumps(self.stats(), indent=1)
            # a new file of a random name (O_EXCL, O_NOFOLLOW): nothing planted beside it is followed
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.stats_file)}.", suffix=".tmp",
                                       dir=os.path.dirname(os.path.abspath(self.stats_file)))
            os.fchmod(fd, 0o644)
            with open(fd, "w") as f:
                f.write(data)
            os.replace(tmp, self.stats_file)
        except OSError as exc:
            self.stats_write_errors += 1
            try:
                if tmp is not None:
                    os.unlink(tmp)
            except OSError:
                pass
            if self.stats_error is None:
                log.error("stats file %s not written: %s (retrying; the NIs go on)",
                          self.stats_file, exc)
                self.kernel.event("STATS_FILE_FAILED", path=self.stats_file, error=str(exc))
            self.stats_error = str(exc)
            return
        if self.stats_error is not None:
            log.warning("stats file %s written again", self.stats_file)
            self.kernel.event("STATS_FILE_RECOVERED", path=self.stats_file,
                              failures=self.stats_write_errors)
            self.stats_error = None

    # ---- vhost-user client mode
    def _connect_clients(self) -> None:
        if self._stop:
            return
        now = time.monotonic()
        for ni in list(self.nis.values()):
            if ni.client and not ni.connected and now >= ni.next_connect:
                self._connect_client(ni)

    def _connect_client(self, ni: NI) -> None:
        """One non-blocking attempt to reach the QEMU listening on ``ni.path``."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            s.connect(ni.path)    # a unix connect completes at once, or fails (EAGAIN: backlog full)
        except OSError as exc:
            s.close()
            why = exc.strerror or str(exc)
            if why != ni.connect_error:
                log.info("NI %s: cannot connect to %s (%s); retrying", ni.name, ni.path, why)
                ni.connect_error = why
            ni.next_connect = time.monotonic() + ni.backoff
            ni.backoff = min(CLIENT_BACKOFF_MAX, ni.backoff * 2)
            return
        ni.connect_error = ""
        ni.backoff = CLIENT_BACKOFF_MIN
        self._attach_frontend(ni, s)

    # ---- containment: quarantine and link
    def quarantine(self, name: str, on: bool = True, reason: str = "") -> dict:
        """Quarantines NI ``name`` (or releases it): while quarantined, frames either way that
        match none of its policy's ``[quarantine] allow`` rules are dropped in the fast path
        (counter ``drop_quarantine``).  Survives policy changes.  KeyError if no such NI."""
        ni = self.nis[name]
        reason = printable(reason, REASON_MAX)     # an admin client's text: one log line, bounded
        self._set_isolation(ni, ISOLATE_QUARANTINE, on, "quarantine", reason)
        log.warning("NI %s: %s%s", name, "quarantined" if on else "released from quarantine",
                    f" ({reason})" if reason else "")
        self.kernel.event("NI_QUARANTINE", ni=name, quarantined=on, reason=reason)
        return self.containment(name)

    def set_link(self, name: str, up: bool, reason: str = "") -> dict:
        """Sets NI ``name``'s link: down drops every frame either way in the fast path
        (counter ``drop_isolated``) and, with ``--qemu-qmp``, has QEMU take the guest's carrier
        away (``set_link``, asynchronous: see ``containment()["qemu"]``).  Survives policy
        changes; re-applied to QEMU whenever it comes back.  KeyError if no such NI."""
        ni = self.nis[name]
        reason = printable(reason, REASON_MAX)
        self._set_isolation(ni, ISOLATE_LINK_DOWN, not up, "link-down", reason)
        if ni.qemu is not None:
            ni.qemu.set_link(up)
        log.warning("NI %s: link set %s%s%s", name, "up" if up else "down",
                    f" ({reason})" if reason else "", "" if ni.qemu else " (no QMP: the NI only)")
        self.kernel.event("NI_LINK", ni=name, up=up, reason=reason)
        return self.containment(name)

    def _set_isolation(self, ni: NI, bit: int, on: bool, what: str, reason: str) -> None:
        bits = ni.port.isolation
        ni.port.set_isolation(bits | bit if on else bits & ~bit)
        if on:
            ni.isolation_reason[what] = reason
        else:
            ni.isolation_reason.pop(what, None)

    def containment(self, name: str) -> dict:
        ni = self.nis[name]
        bits = ni.port.isolation
        st = ni.port.stats()
        return {"ni": name, "quarantined": bool(bits & ISOLATE_QUARANTINE),
                "link": "down" if bits & ISOLATE_LINK_DOWN else "up",
                "reasons": dict(ni.isolation_reason),
                "drop_quarantine": st["drop_quarantine"], "drop_isolated": st["drop_isolated"],
                "qemu": ni.qemu.info() if ni.qemu is not None else None}

    def _on_alert(self, rec: dict) -> None:
        """[ni] on_alert: an alert a scanner raised (not one the kernel raised about it)
        triggers the NI's containment action, on this thread after the alert is logged."""
        ni = self.nis.get(rec.get("ni"))
        if ni is None or not rec.get("scanner"):
            return
        nk = self.kernel.nis.get(ni.port.index)
        sp = nk.scanners.get(rec["scanner"]) if nk else None
        if sp is None:
            return
        # a scanner's own alert bumps its counter right before it is logged; the kernel's
        # alerts about a scanner (refusals, hangs) do not
        key = id(sp)
        if self._alerts_by_scanner.get(key, 0) == sp.counters.alerts:
            return
        self._alerts_by_scanner[key] = sp.counters.alerts
        action = nk.policy.on_alert
        if action != "none":
            self.call_soon(lambda: self._contain(ni.name, action, rec))

    def _contain(self, name: str, action: str, rec: dict) -> None:
        ni = self.nis.get(name)
        if ni is None:
            return
        bit = ISOLATE_QUARANTINE if action == "quarantine" else ISOLATE_LINK_DOWN
        if ni.port.isolation & bit:
            return
        reason = f"policy on_alert after alert #{rec.get('seq')} from scanner {rec.get('scanner')}"
        if action == "quarantine":
            self.quarantine(name, True, reason)
        else:
            self.set_link(name, False, reason)
        self.kernel.alerts.append(name, None, f"NI contained by its policy: {action}",
                                  action=action, after_seq=rec.get("seq"), scanner=rec.get("scanner"))

    # ---- QEMU's QMP (vhostni/qemu.py)
    def attach_qemu(self, name: str, qmp_path: str, nic: Optional[str] = None):
        """Makes NI ``name`` a QMP client of its QEMU at ``qmp_path``: it learns the NIC's MAC
        (anti-spoofing's when the policy names none) and can set the guest's link."""
        from .qemu import QemuMonitor
        ni = self.nis[name]
        if ni.qemu is not None:
            raise ValueError(f"NI {name!r} already has a QEMU QMP socket")
        if self.qemu_monitor is None:
            self.qemu_monitor = QemuMonitor(self.call_soon)
        ni.qemu = self.qemu_monitor.add(name, qmp_path, ni.path, nic, self._qemu_changed)
        if ni.port.isolation & ISOLATE_LINK_DOWN:
            ni.qemu.set_link(False)
        return ni.qemu

    def _qemu_changed(self, link, changes: dict) -> None:
        ni = self.nis.get(link.ni)
        if ni is None or ni.qemu is not link or not changes.get("mac"):
            return
        try:
            mac = bytes.fromhex(changes["mac"].replace(":", ""))
        except ValueError:
            return
        if len(mac) != 6 or mac == ni.port.fallback_mac:
            return
        ni.port.set_fallback_mac(mac)
        nk = self.kernel.nis.get(ni.port.index)
        own = nk.policy.mac if nk else None
        if own and own != mac:
            log.warning("NI %s: the policy's MAC %s is not the NIC's %s (QEMU): the guest's "
                        "frames will be dropped as spoofed", ni.name, own.hex(":"), mac.hex(":"))
        else:
            log.info("NI %s: NIC MAC %s from QEMU%s", ni.name, mac.hex(":"),
                     "" if own else " (anti-spoofing uses it)" if nk else "")

    # ---- other threads
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` on the daemon's thread soon; safe from any thread, never blocks."""
        self._inbox.append(fn)
        try:
            os.write(self._inbox_w, b"\0")
        except BlockingIOError:
            pass     # the pipe is full: the daemon is already awake for it
        except OSError:
            pass     # closed: the daemon is gone

    def _run_inbox(self) -> None:
        try:
            while os.read(self._inbox_r, 4096):
                pass
        except BlockingIOError:
            pass
        # what was there when this turn began: a callback that schedules another (a client's next
        # batch of commands) runs it on the next turn, after the data plane had its own
        for _ in range(len(self._inbox)):
            fn = self._inbox.popleft()
            try:
                fn()
            except Exception:   # noqa: BLE001 - one bad callback must not stop the daemon
                log.exception("callback from another thread failed")
        if self._inbox:
            try:
                os.write(self._inbox_w, b"\0")
            except OSError:
                pass            # full: the daemon is awake for it already

    def stats(self) -> dict:
        kernels = {nk.name: nk.info() for nk in self.kernel.nis.values()}
        return {
            "time": time.time(),
            "nis": {name: dict(ni.info(), kernel=kernels.get(name)) for name, ni in self.nis.items()},
            "alerts": self.kernel.alerts.seq,
            "checkpoints": self.kernel.checkpoints.info(),
            "alert_log": self.kernel.alerts.info(),
            "internal_errors": self.uncaught,
            "stats_write_errors": self.stats_write_errors,
            "uplinks": {name: port.stats() for name, port in self.uplinks.items()},
        }

    def close(self) -> None:
        if self.qemu_monitor is not None:
            self.qemu_monitor.close()
        self.kernel.close()
        for ni in self.nis.values():
            self._drop(ni, ni.standby)
            self._drop(ni)
            if ni.listener is None:
                continue
            ni.listener.close()
            try:
                os.unlink(ni.path)
            except OSError:
                pass
        self.switch.close()
        self.ep.close()
        os.close(self._sig_r)
        os.close(self._sig_w)
        os.close(self._inbox_r)
        os.close(self._inbox_w)
