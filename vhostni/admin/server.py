"""The admin plane's sockets: QMP over unix sockets and TCP+TLS, inside the daemon's epoll.

Everything here runs on the daemon's one thread, so nothing may block:

* sockets are non-blocking and registered with ``Daemon.register``; a client is served
  only when epoll says it is ready, and at most READS_PER_WAKEUP reads at a time;
* TLS runs through ``ssl.MemoryBIO`` (the socket stays non-blocking plain bytes; a peer
  that stalls mid-handshake stalls only itself, and is dropped after HANDSHAKE_TIMEOUT);
* input is bounded by the protocol (one unfinished message of at most ``max_message``
  bytes; more: an error and the connection is closed);
* output is bounded: while more than PAUSE_READ bytes wait for a client, its input is not
  read (EPOLLIN off, EPOLLOUT on); a client with more than MAX_OUTPUT bytes queued (it
  does not read its events) is dropped.  EPOLLOUT is on only while output is queued.

Who may connect: on a unix socket, the peer's uid (SO_PEERCRED, from the kernel) must be
root, the daemon's own, or one given with ``--admin-allow-uid``; the socket file is 0600
unless other uids are allowed (then 0666: the uid check decides).  On TCP, mutual TLS: the
client must present a certificate signed by ``--tls-ca``.

Nobody can lock the administrator out.  A connection is *pending* until it is
authenticated (TCP: the TLS handshake completed with a valid client certificate; unix: at
once, by its uid) and a *session* after.  The two are bounded separately, so that pending
connections never take a session's place:

* pending: at most MAX_PENDING_PER_SOURCE from one source address and MAX_PENDING in all;
  a new connection over either cap evicts the oldest pending one that sent nothing yet (or
  else the oldest) of its source, or of the source with the most, so an attacker must
  complete more than MAX_PENDING connections within one administrator's handshake to keep
  them out, not merely hold sockets open (an attacker that shares the administrator's source
  address competes with it for that address's slots only); a pending connection has
  HANDSHAKE_TIMEOUT seconds to authenticate;
* sessions: at most MAX_SESSIONS_PER_PRINCIPAL per principal (a unix uid, a TLS client
  certificate's subject), so that one uid or certificate cannot starve another, and
  MAX_SESSIONS in all (root's and the daemon's own uid's unix sessions are not held to that
  one).  A session over a cap is refused with a QMP error saying which.

``info()`` (``query-admin``) counts what was refused, evicted, failed its handshake and
timed out; the log lines for these (anyone can cause them at will) are rate-limited: a burst
of WARN_BURST, then one every WARN_EVERY seconds saying how many were not logged.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import ssl
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Optional

from . import commands
from ..logtext import printable
from .state import socket_in_use
from .protocol import (DEFAULT_MAX_MESSAGE, ConnectionClosed, Execute, InputError, MessageTooLarge,
                       NEED_DATA, Negotiated, QMPServerConnection, encode)

log = logging.getLogger("vhostni.admin")

MAX_SESSIONS = 64                 # authenticated clients, all principals
MAX_SESSIONS_PER_PRINCIPAL = 8    # ... of one unix uid / one TLS client certificate
MAX_PENDING = 32                  # TCP connections still in their TLS handshake
MAX_PENDING_PER_SOURCE = 4        # ... from one source address
HANDSHAKE_TIMEOUT = 3.0           # seconds a pending connection has to authenticate
ACCEPTS_PER_WAKEUP = 64
WARN_BURST = 10                   # log lines about refused/evicted peers, at once
WARN_EVERY = 10.0                 # ... then one every this many seconds
READ_CHUNK = 65536
READS_PER_WAKEUP = 4
PAUSE_READ = 256 << 10
EVENTS_PER_WAKEUP = 256     # commands (and errors) one client gets handled per turn of the loop
MAX_OUTPUT = 4 << 20


@dataclass
class TLSFiles:
    cert: str
    key: str
    ca: str


def parse_endpoint(spec: str) -> tuple[str, object]:
    """``unix:PATH`` -> ("unix", PATH); ``tcp:HOST:PORT`` (``tcp:[::1]:PORT``) -> ("tcp", (HOST, PORT))."""
    kind, sep, rest = spec.partition(":")
    if kind == "unix" and sep and rest:
        return "unix", os.path.abspath(rest)
    if kind == "tcp" and sep and rest:
        host, sep, port = rest.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if sep and port.isdigit() and int(port) < 65536:
            return "tcp", (host or "127.0.0.1", int(port))
    raise ValueError(f"admin endpoint {spec!r}: expected unix:PATH or tcp:HOST:PORT")


def server_tls_context(tls: TLSFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(cafile=tls.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED          # mutual TLS: no client certificate, no QMP
    return ctx


class _Listener:
    def __init__(self, kind: str, sock: socket.socket, where: str, path: Optional[str] = None):
        self.kind, self.sock, self.where, self.path = kind, sock, where, path


class Client:
    """One admin connection: socket, optional TLS object, QMP state, queued output."""

    def __init__(self, server: "AdminServer", sock: socket.socket, peer: str,
                 tls: Optional[ssl.SSLObject] = None, incoming=None, outgoing=None,
                 source: Optional[str] = None, principal: Optional[str] = None):
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.source = source            # TCP: the peer's address (pending caps)
        self.principal = principal      # who it is once authenticated (session caps)
        self.tls, self._in_bio, self._out_bio = tls, incoming, outgoing
        self.handshaken = tls is None
        self.proto = QMPServerConnection(server.version, max_message=server.max_message)
        self.raw_out = bytearray()
        self.mask = select.EPOLLIN
        self.created = time.monotonic()
        self.closed = False
        self.commands = 0
        self.errors = 0
        self.bytes_in = 0               # a pending peer that sent nothing is evicted first
        # a command whose work runs on a worker thread (commands.Deferred): until it is
        # answered this client's later commands wait (QMP answers in order) and its socket
        # is not read
        self.waiting: Optional[Execute] = None
        self._continuing = False        # a _continue is scheduled on the daemon's loop
        self._budget = EVENTS_PER_WAKEUP  # what this turn of the loop still handles for it

    # ---- epoll
    def on_ready(self) -> None:
        if self.closed:
            return
        if not self._continuing:        # (a continuation on the next turn will, otherwise)
            self._budget = EVENTS_PER_WAKEUP    # one budget for the whole turn, every read in it
            self._process()             # what waited for room first
            self._read()
        if not self.closed:
            self._flush()

    def _output(self) -> int:
        return self.proto.pending_output + len(self.raw_out)

    def _read(self) -> None:
        for _ in range(READS_PER_WAKEUP):
            if (self.closed or self.proto.must_close or self.waiting or self.proto.has_work
                    or self._output() > PAUSE_READ):
                return
            try:
                data = self.sock.recv(READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.info("admin: %s: connection lost (%s)", self.peer, exc)
                self.close()
                return
            self.bytes_in += len(data)
            if self.tls is not None:
                if not data:
                    self._feed(b"")
                    return
                self._in_bio.write(data)
                if not self._tls_read():
                    return
            else:
                self._feed(data)
                if not data:
                    return

    def _tls_read(self) -> bool:
        if not self.handshaken:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                return True
            except (ssl.SSLError, OSError) as exc:
                self.server.note("handshake_failed", "admin: %s: TLS handshake failed, closing: %s",
                                 self.peer, exc)
                self._send_raw_best_effort()
                self.close()
                return False
            cert = self.tls.getpeercert() or {}
            subject = printable(", ".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
                                or "?", 200)
            why = self.server.session_refusal(f"certificate {subject}")
            if why:
                self.server.note("session_refused", "admin: %s: TLS client %s refused: %s",
                                 self.peer, subject, why)
                try:
                    self.tls.write(encode({"error": {"class": "GenericError", "desc": why}}))
                except (ssl.SSLError, OSError):
                    pass
                self._send_raw_best_effort()
                self.close()
                return False
            self.handshaken = True
            self.principal = f"certificate {subject}"
            log.info("admin: %s: TLS client %s connected", self.peer, subject)
        while True:
            try:
                plain = self.tls.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                return True
            except ssl.SSLZeroReturnError:
                self._feed(b"")
                return False
            except (ssl.SSLError, OSError) as exc:
                log.warning("admin: %s: TLS error, closing: %s", self.peer, exc)
                self.close()
                return False
            if not plain:
                self._feed(b"")
                return False
            self._feed(plain)
            if self.closed or self.proto.must_close:
                return False

    def _feed(self, data: bytes) -> None:
        self.proto.receive_data(data)
        self._process()

    def _process(self) -> None:
        while not self.closed and self.waiting is None:
            if self._output() > PAUSE_READ:
                return                  # the rest once the peer read its answers (_flush)
            if self._budget <= 0:
                # a peer that sent many commands at once: the rest on the loop's next turn
                self._continue_soon()
                return
            self._budget -= 1
            ev = self.proto.next_event()
            if ev is NEED_DATA:
                return
            if isinstance(ev, Execute):
                self.commands += 1
                self._execute(ev)
            elif isinstance(ev, Negotiated):
                log.debug("admin: %s: capabilities negotiated", self.peer)
            elif isinstance(ev, InputError):
                self.errors += 1
                log.debug("admin: %s: bad input: %s", self.peer, ev.desc)
            elif isinstance(ev, MessageTooLarge):
                self.errors += 1
                log.warning("admin: %s: message larger than %d bytes; closing", self.peer, ev.limit)
            elif isinstance(ev, ConnectionClosed):
                log.info("admin: %s: disconnected", self.peer)
                self._flush()
                self.close()
                return

    def _continue_soon(self) -> None:
        if not self._continuing:
            self._continuing = True
            self.server.daemon.call_soon(self._continue)

    def _continue(self) -> None:
        self._continuing = False
        if not self.closed:
            self.on_ready()

    def _execute(self, ev: Execute) -> None:
        self._answer(ev, lambda: commands.dispatch(self.server, ev.command, ev.arguments))

    def _answer(self, ev: Execute, run) -> None:
        try:
            value = run()
        except commands.QMPError as exc:
            self.errors += 1
            self.proto.send_error(ev, exc.error_class, exc.desc)
        except Exception as exc:          # a bug in a command must not take the daemon down
            self.errors += 1
            log.exception("admin: %s: command %s failed", self.peer, printable(ev.command, 64))
            self.proto.send_error(ev, "GenericError", f"internal error in {ev.command}: {exc}")
        else:
            if isinstance(value, commands.Deferred):
                self._defer(ev, value)
            else:
                self.proto.send_return(ev, value)

    def _defer(self, ev: Execute, d: "commands.Deferred") -> None:
        """Runs ``d.work`` on a worker thread (compiling a policy's signature rules takes
        seconds: the data plane must not wait for it), then ``d.finish`` on the daemon's
        thread, which answers.  The command takes effect even if the client left meanwhile."""
        self.waiting = ev
        daemon = self.server.daemon

        def work() -> None:
            try:
                res: tuple = (d.work(), None)
            except BaseException as exc:  # noqa: BLE001 - carried to the daemon's thread
                res = (None, exc)
            daemon.call_soon(lambda: self._resume(ev, d, res))

        threading.Thread(target=work, name=f"vhostni-admin-{ev.command}", daemon=True).start()

    def _resume(self, ev: Execute, d: "commands.Deferred", res: tuple) -> None:
        value, exc = res

        def finish():
            if exc is not None:
                raise exc
            out = d.finish(value)
            return {} if out is None else out
        self.waiting = None
        self._answer(ev, finish)
        if not self.closed:
            self._budget = EVENTS_PER_WAKEUP    # a turn of its own (the answer's callback)
            self._process()         # the commands that waited behind it
            self._flush()
            if not self.closed and self.mask & select.EPOLLIN:
                self._read()        # what the socket held meanwhile
                self._flush()

    def has_spoken(self) -> bool:
        """Has the peer sent anything (read already, or waiting in the socket)?"""
        if self.bytes_in:
            return True
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:
            return False

    # ---- output
    def _send_raw_best_effort(self) -> None:
        if self._out_bio is not None:
            self.raw_out += self._out_bio.read()
        try:
            self.sock.send(self.raw_out)
        except OSError:
            pass

    def _flush(self) -> None:
        if self.closed:
            return
        if self.handshaken:
            out = self.proto.data_to_send()
            if out:
                if self.tls is not None:
                    try:
                        self.tls.write(out)
                    except (ssl.SSLError, OSError) as exc:
                        log.warning("admin: %s: TLS error, closing: %s", self.peer, exc)
                        self.close()
                        return
                else:
                    self.raw_out += out
        if self._out_bio is not None and self._out_bio.pending:
            self.raw_out += self._out_bio.read()
        while self.raw_out:
            try:
                n = self.sock.send(self.raw_out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.warning("admin: %s: send failed: %s", self.peer, exc)
                self.close()
                return
            del self.raw_out[:n]
        if len(self.raw_out) > MAX_OUTPUT:
            log.warning("admin: %s: not reading (%d bytes queued); dropped", self.peer, len(self.raw_out))
            self.close()
            return
        if self.proto.must_close and not self.raw_out:
            self.close()
            return
        # not read while a command it sent runs on a worker (its socket would be reported ready on
        # every turn of the loop) or while its answers wait
        paused = self.proto.must_close or self.waiting is not None or len(self.raw_out) > PAUSE_READ
        mask = 0 if paused else select.EPOLLIN
        if self.raw_out:
            mask |= select.EPOLLOUT
        elif self.proto.has_work and self.waiting is None:
            self._continue_soon()       # its answers are out: what waited behind them
        if mask != self.mask:
            self.mask = mask
            self.server.daemon.set_events(self.fd, mask)

    def event(self, name: str, data: dict, when: Optional[float]) -> None:
        if self.closed or not self.handshaken:
            return
        if self.proto.send_event(name, data, when):
            self._flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server._forget(self)
        try:
            self.sock.close()
        except OSError:
            pass


class AdminServer:
    """The QMP admin endpoints of one daemon; see the module docstring.  It is also the
    ``ctx`` the commands (vhostni.admin.commands) get."""

    def __init__(self, daemon, endpoints: Iterable[str], *, allow_uids: Iterable[int] = (),
                 tls: Optional[TLSFiles] = None, state=None, runtime_nis: Iterable[tuple[str, str]] = (),
                 max_message: int = DEFAULT_MAX_MESSAGE):
        self.daemon = daemon
        self.state = state
        self.runtime_nis: dict[str, str] = dict(runtime_nis)
        self.alert_log = daemon.kernel.alerts
        self.max_message = max_message
        self.version = commands.query_version(self, {})
        self.extra_uids = set(allow_uids)
        self.allow_uids = {0, os.getuid()} | self.extra_uids
        self.ssl_ctx = server_tls_context(tls) if tls else None
        self.listeners: dict[int, _Listener] = {}
        self.clients: dict[int, Client] = {}
        self.counters = {"refused_uid": 0, "session_refused": 0, "pending_evicted": 0,
                         "handshake_failed": 0, "handshake_timeouts": 0}
        self._warned: dict[str, list] = {}   # counter -> [tokens, when, not logged]
        self._closed = False
        try:
            for spec in endpoints:
                self._listen(spec)
        except BaseException:
            self.close()
            raise
        daemon.kernel.events.append(self._on_kernel_event)
        self.alert_log.listeners.append(self._on_alert)
        daemon.housekeepers.append(self._housekeeping)

    # ---- listening
    def _listen(self, spec: str) -> None:
        kind, addr = parse_endpoint(spec)
        if kind == "unix":
            path = addr
            if socket_in_use(path):
                raise ValueError(f"admin endpoint {spec}: something is listening there already")
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)       # a stale socket from an earlier run
            except FileNotFoundError:
                pass
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.bind(path)
            os.chmod(path, 0o666 if self.extra_uids - {0, os.getuid()} else 0o600)
            where = f"unix:{path}"
        else:
            if self.ssl_ctx is None:
                raise ValueError(f"admin endpoint {spec}: TCP needs --tls-cert, --tls-key and --tls-ca "
                                 "(mutual TLS)")
            host, port = addr
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            h, p = s.getsockname()[:2]
            where = f"tcp:[{h}]:{p}" if fam == socket.AF_INET6 else f"tcp:{h}:{p}"
            path = None
        s.listen(64)       # drained ACCEPTS_PER_WAKEUP at a time; pending peers are capped after
        s.setblocking(False)
        lst = _Listener(kind, s, where, path)
        self.listeners[s.fileno()] = lst
        self.daemon.register(s.fileno(), lambda: self._accept(lst))
        log.info("admin: QMP listening on %s%s", where, " (mutual TLS)" if kind == "tcp" else "")

    @property
    def addresses(self) -> list[str]:
        return [lst.where for lst in self.listeners.values()]

    def _accept(self, lst: _Listener) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, addr = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("admin: accept on %s failed: %s", lst.where, exc)
                return
            conn.setblocking(False)
            if lst.kind == "unix":
                pid, uid, gid = struct.unpack("3i", conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
                peer = f"unix pid {pid} uid {uid}"
                if uid not in self.allow_uids:
                    self.note("refused_uid", "admin: refused %s: uid %d may not administer this daemon",
                              peer, uid)
                    self._refuse(conn, f"uid {uid} may not administer this vhostni daemon")
                    continue
                principal = f"uid {uid}"
                why = self.session_refusal(principal, exempt=uid in (0, os.getuid()))
                if why:
                    self.note("session_refused", "admin: refused %s: %s", peer, why)
                    self._refuse(conn, why)
                    continue
                client = Client(self, conn, peer, principal=principal)
            else:
                peer = f"tcp {addr[0]}:{addr[1]}"
                self._make_room(addr[0])
                inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
                tls = self.ssl_ctx.wrap_bio(inc, out, server_side=True)
                client = Client(self, conn, peer, tls, inc, out, source=addr[0])
            self.clients[client.fd] = client
            self.daemon.register(client.fd, client.on_ready)
            # a TCP peer is only pending: logged when authenticated (anyone can connect)
            log.log(logging.DEBUG if lst.kind == "tcp" else logging.INFO, "admin: %s connected", peer)
            client._flush()               # the greeting (after the handshake, on TLS)

    def session_refusal(self, principal: str, exempt: bool = False) -> Optional[str]:
        """Why ``principal`` may not open one more session now (None: it may)."""
        sessions = [c for c in self.clients.values() if c.handshaken and not c.closed]
        mine = sum(1 for c in sessions if c.principal == principal)
        if mine >= MAX_SESSIONS_PER_PRINCIPAL:
            return f"too many admin sessions of {principal} ({MAX_SESSIONS_PER_PRINCIPAL})"
        if len(sessions) >= MAX_SESSIONS and not exempt:
            return f"too many admin sessions ({MAX_SESSIONS})"
        return None

    def _make_room(self, source: str) -> None:
        """Before a new pending connection from ``source``: evicts the oldest pending one of
        that source at its cap, or of the busiest source when all pending slots are taken."""
        pending = [c for c in self.clients.values() if not c.handshaken and not c.closed]
        same = [c for c in pending if c.source == source]
        def first(cands):          # silent ones first (a real client talks at once), oldest first
            return min(cands, key=lambda c: (c.has_spoken(), c.created))
        if len(same) >= MAX_PENDING_PER_SOURCE:
            victim = first(same)
        elif len(pending) >= MAX_PENDING:
            by_source: dict = {}
            for c in pending:
                by_source.setdefault(c.source, []).append(c)
            victim = first(max(by_source.values(), key=len))
        else:
            return
        self.note("pending_evicted", "admin: %s: still not authenticated, evicted for a new "
                  "connection (%d pending)", victim.peer, len(pending))
        victim.close()

    def note(self, counter: str, msg: str, *args) -> None:
        """Counts an event of a kind an attacker can repeat at will, and logs it within a
        budget (WARN_BURST lines, then one every WARN_EVERY seconds, saying how many were
        not logged)."""
        self.counters[counter] += 1
        now = time.monotonic()
        w = self._warned.setdefault(counter, [float(WARN_BURST), now, 0])
        w[0] = min(float(WARN_BURST), w[0] + (now - w[1]) / WARN_EVERY)
        w[1] = now
        if w[0] < 1:
            w[2] += 1
            return
        w[0] -= 1
        skipped, w[2] = w[2], 0
        log.warning(msg + (f" (and {skipped} more not logged)" if skipped else ""), *args)

    @staticmethod
    def _refuse(conn: socket.socket, desc: str) -> None:
        try:
            conn.send(encode({"error": {"class": "GenericError", "desc": desc}}))
        except OSError:
            pass
        conn.close()

    def _forget(self, client: Client) -> None:
        if self.clients.pop(client.fd, None) is not None:
            self.daemon.unregister(client.fd)

    # ---- events
    def emit(self, name: str, data: Optional[dict] = None, when: Optional[float] = None) -> None:
        for client in list(self.clients.values()):
            client.event(name, data or {}, when)

    def _on_kernel_event(self, name: str, data: dict) -> None:
        try:
            self.emit(name, dict(data))
        except Exception:        # the kernel called us: a bug here must not break it
            log.exception("admin: event %s not sent", name)

    def _on_alert(self, rec: dict) -> None:
        try:
            self.emit("VHOSTNI_ALERT", dict(rec), rec.get("time"))
        except Exception:
            log.exception("admin: alert #%s not sent as an event", rec.get("seq"))

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for client in list(self.clients.values()):
            if not client.handshaken and now - client.created > HANDSHAKE_TIMEOUT:
                self.note("handshake_timeouts", "admin: %s: no TLS handshake within %.0f s; dropped",
                          client.peer, HANDSHAKE_TIMEOUT)
                client.close()

    # ---- for the commands
    def save_nis(self) -> None:
        if self.state:
            self.state.save_nis(self.runtime_nis.items())

    def info(self) -> dict:
        return {"listening": self.addresses,
                "clients": [{"peer": c.peer, "principal": c.principal, "commands": c.commands,
                             "errors": c.errors, "queued": len(c.raw_out)}
                            for c in self.clients.values() if c.handshaken],
                "pending": sum(1 for c in self.clients.values() if not c.handshaken),
                **self.counters}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for client in list(self.clients.values()):
            client._flush()
            client.close()
        for fd, lst in list(self.listeners.items()):
            self.daemon.unregister(fd)
            lst.sock.close()
            if lst.path:
                try:
                    os.unlink(lst.path)
                except OSError:
                    pass
        self.listeners.clear()
        for lst, fn in ((self.daemon.kernel.events, self._on_kernel_event),
                        (self.alert_log.listeners, self._on_alert),
                        (self.daemon.housekeepers, self._housekeeping)):
            if fn in lst:
                lst.remove(fn)
