"""The NI daemon as a QMP client of the QEMU it serves: the NIC's MAC, and its link.

An NI given a QEMU's QMP socket (``vhostni run --qemu-qmp NAME=PATH[,nic=ID]``) learns which
of that VM's NICs it serves, and that NIC's MAC (``query-rx-filter``'s ``main-mac``, asked
again on every ``NIC_RX_FILTER_CHANGED``).  The MAC feeds anti-spoofing when the NI's policy
names none.  The NI can put the guest's link down and up (``set_link`` on the NIC): the
guest sees its carrier go, as with a cable pulled.  Only QEMU can do that; the NI's own
half of a link set down is dropping every frame in the fast path, so a guest that ignores
its carrier gains nothing (see ``Daemon.set_link``).

Which NIC: ``nic=ID`` if given; else the one whose vhost-user chardev's socket is the NI's
(HMP ``info network`` maps NICs to chardevs, ``qom-get /chardevs/ID addr`` gives their
paths); else the VM's only NIC.  QEMU 7.2 offers no query of a NIC's link state, so the
link state reported is the one this NI last set (``None``: never set, QEMU's default is up).
Whenever QEMU comes back (a restart, a vhost-user reconnection, which makes QEMU set the
link up itself), the NI sets the link it wants again.

Threads: the daemon's thread runs the data plane and must never wait for QEMU.  All QMP
work happens on one asyncio loop in a worker thread (qemu.qmp's ``QMPClient``), one task
per NI, with timeouts on every command.  Results go back through ``post`` (a callable the
daemon gives, which queues a function for its own thread); ``QemuLink.status`` is only ever
changed on the daemon's thread.  A QEMU that is not there yet, goes away or restarts is
reconnected with back-off.

A QEMU is not trusted more than its guest (a compromised one is a hostile peer): what it
says is checked and bounded.  A QMP message is at most ``READ_LIMIT`` bytes (parsing one
holds the GIL the data plane needs); no event is kept (qemu.qmp's default listener would
queue every one, without bound): a ``NIC_RX_FILTER_CHANGED`` for the NIC only marks it for
one re-query, at most every ``RX_FILTER_INTERVAL``; a MAC that is not a unicast
``xx:xx:xx:xx:xx:xx`` is refused; QEMU's text (NIC names, errors) is escaped in the log; a
QEMU that keeps hanging up is reconnected with growing back-off, not five times a second.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from qemu.qmp import ExecuteError, QMPClient, QMPError, Runstate

from .logtext import printable

log = logging.getLogger("vhostni.qemu")

CONNECT_TIMEOUT = 5.0      # connect + greeting + capabilities
COMMAND_TIMEOUT = 5.0
BACKOFF_MIN = 0.2
BACKOFF_MAX = 5.0
STABLE_SESSION = 30.0      # a session this long resets the back-off (shorter: QEMU is flapping)
READ_LIMIT = 256 * 1024    # bytes of one QMP message (qemu.qmp's default: 10 MiB)
RX_FILTER_INTERVAL = 0.5   # seconds between re-queries of the NIC's filter (MAC)

_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")

_NIC_LINE = re.compile(r"^(?P<nic>\S+): index=\d+,type=nic,")
_PEER_LINE = re.compile(r"^\s*\\\s+(?P<netdev>\S+): index=\d+,type=vhost-user,.*\bto (?P<chardev>\S+)\s*$")


class LearnError(Exception):
    """QEMU answered, but not with what the NI needs (which NIC is its own)."""


def valid_mac(value) -> Optional[str]:
    """QEMU's ``main-mac`` if it is a unicast, non-zero ``xx:xx:xx:xx:xx:xx`` (lower case),
    else None."""
    if not isinstance(value, str) or not _MAC.fullmatch(value):
        return None
    mac = value.lower()
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        return None
    return mac


class _Client(QMPClient):
    """A QMPClient that keeps no event (qemu.qmp's default listener queues every one, without
    bound, for a reader this NI does not have): a ``NIC_RX_FILTER_CHANGED`` for ``nic`` (any
    NIC while ``nic`` is None) sets ``rx_filter_changed``; a flood of them is one re-query."""

    def __init__(self, name: str):
        super().__init__(name, readbuflen=READ_LIMIT)
        self.nic: Optional[str] = None
        self.rx_filter_changed = asyncio.Event()

    async def _event_dispatch(self, msg) -> None:
        if msg.get("event") != "NIC_RX_FILTER_CHANGED":
            return
        data = msg.get("data")
        if self.nic is None or (isinstance(data, dict) and data.get("name") == self.nic):
            self.rx_filter_changed.set()

    def _cb_inbound(self, msg):
        # qemu.qmp's formats every message (indented JSON) for a debug line most often dropped
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg


def parse_info_network(text: str) -> dict[str, str]:
    """HMP ``info network`` -> {NIC name: chardev id} for NICs whose peer is vhost-user.

    QEMU 7.2 prints each NIC and, indented under it, its peer::

        nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:aa:bb:cc
         \\ n0: index=0,type=vhost-user,vhost-user0 to c0
    """
    out: dict[str, str] = {}
    nic = None
    for line in text.splitlines():
        m = _NIC_LINE.match(line)
        if m:
            nic = m.group("nic")
            continue
        m = _PEER_LINE.match(line)
        if m:
            if nic is not None:
                out[nic] = m.group("chardev")
            continue
        if line and not line[0].isspace():
            nic = None
    return out


def parse_qmp_spec(text: str) -> tuple[str, Optional[str]]:
    """``PATH[,nic=ID]`` -> (path, nic)."""
    path, nic = text, None
    if ",nic=" in text:
        path, _, nic = text.rpartition(",nic=")
        if not nic or "," in nic:
            raise ValueError(f"{text!r}: expected QMP_SOCKET[,nic=ID]")
    if not path:
        raise ValueError(f"{text!r}: expected QMP_SOCKET[,nic=ID]")
    return path, nic


def _same_path(a: str, b: str) -> bool:
    if a == b or os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@dataclass
class QemuStatus:
    """What the daemon's thread knows of one NI's QEMU (changed on that thread only)."""

    qmp: str
    state: str = "connecting"       # connecting | connected | unreachable | error
    nic: Optional[str] = None
    mac: Optional[str] = None
    link: Optional[bool] = None     # the link state this NI last set (None: never set)
    link_wanted: Optional[bool] = None
    error: str = ""
    connects: int = 0


class QemuLink:
    """One NI's QMP connection.  The public methods are safe to call from the daemon's
    thread and never block it; everything else runs on the monitor's loop."""

    def __init__(self, monitor: "QemuMonitor", ni: str, qmp_path: str, vhost_socket: str,
                 nic: Optional[str] = None,
                 on_change: Optional[Callable[["QemuLink", dict], None]] = None):
        self.monitor = monitor
        self.ni = ni
        self.qmp_path = qmp_path
        self.vhost_socket = vhost_socket
        self.nic_option = nic
        self.on_change = on_change
        self.status = QemuStatus(qmp=qmp_path, nic=nic)
        # loop-side state
        self._qmp: Optional[QMPClient] = None
        self._nic: Optional[str] = None
        self._want_link: Optional[bool] = None
        self._task: Optional[asyncio.Task] = None
        self._connects = 0

    # ---- the daemon's side
    def set_link(self, up: bool) -> None:
        """Asks QEMU to set the NIC's link (again whenever QEMU comes back)."""
        self.status.link_wanted = up
        self.monitor._call(self._set_link, up)

    def reassert(self) -> None:
        """Sets the wanted link again (QEMU sets the link up itself when a vhost-user
        connection opens)."""
        if self.status.link_wanted is not None:
            self.set_link(self.status.link_wanted)

    def info(self) -> dict:
        return asdict(self.status)

    def _apply(self, changes: dict) -> None:
        for k, v in changes.items():
            setattr(self.status, k, v)
        if self.on_change:
            self.on_change(self, changes)

    def _post(self, **changes) -> None:
        self.monitor.post(lambda: self._apply(changes))

    # ---- the loop's side
    async def _exec(self, qmp: QMPClient, cmd: str, args: Optional[dict] = None):
        return await asyncio.wait_for(qmp.execute(cmd, args), COMMAND_TIMEOUT)

    async def _main(self) -> None:
        backoff = BACKOFF_MIN
        last_error = None
        while True:
            qmp = _Client(f"vhostni-{self.ni}")
            try:
                await asyncio.wait_for(qmp.connect(self.qmp_path), CONNECT_TIMEOUT)
            except asyncio.CancelledError:
                await self._close(qmp)
                raise
            except (OSError, QMPError, asyncio.TimeoutError) as exc:
                await self._close(qmp)
                why = f"cannot connect to QMP {self.qmp_path}: {printable(exc or type(exc).__name__)}"
                if why != last_error:
                    log.info("NI %s: %s (retrying)", self.ni, why)
                    self._post(state="unreachable", error=why)
                    last_error = why
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            last_error = None
            started = asyncio.get_running_loop().time()
            try:
                await self._session(qmp)
            except asyncio.CancelledError:
                raise
            except (QMPError, OSError, asyncio.TimeoutError) as exc:
                log.info("NI %s: QMP session with %s ended: %s", self.ni, self.qmp_path,
                         printable(exc or type(exc).__name__))
            except Exception as exc:    # noqa: BLE001 - LearnError, or an answer of a wrong type
                why = printable(exc if isinstance(exc, LearnError)
                                else f"unexpected answer ({type(exc).__name__}: {exc})")
                log.error("NI %s: QEMU at %s: %s", self.ni, self.qmp_path, why)
                self._post(state="error", error=why)
                await asyncio.sleep(BACKOFF_MAX)       # a VM being set up may change
            finally:
                self._qmp = None
                await self._close(qmp)
            self._post(state="connecting")
            # a QEMU that hangs up at once again and again is reconnected ever more slowly
            if asyncio.get_running_loop().time() - started >= STABLE_SESSION:
                backoff = BACKOFF_MIN
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    @staticmethod
    async def _close(qmp: QMPClient) -> None:
        try:
            await asyncio.wait_for(qmp.disconnect(), 2.0)
        except asyncio.CancelledError:
            raise
        except Exception:       # noqa: BLE001 - what ended the session (any error QEMU caused)
            pass

    async def _session(self, qmp: "_Client") -> None:
        self._qmp = qmp
        nic, mac = await self._learn(qmp)
        qmp.nic = self._nic = nic
        self._connects += 1
        self._post(state="connected", nic=nic, error="", connects=self._connects,
                   **({"mac": mac} if mac else {}))
        log.info("NI %s: QEMU at %s: NIC %s, MAC %s", self.ni, self.qmp_path, printable(nic),
                 mac or "(not a unicast MAC: ignored)")
        if self._want_link is not None:
            await self._set_link(self._want_link)
        events = asyncio.ensure_future(self._events(qmp))
        try:
            while qmp.runstate == Runstate.RUNNING:
                await qmp.runstate_changed()
        finally:
            events.cancel()
            try:
                await events
            except (asyncio.CancelledError, Exception):
                pass

    async def _events(self, qmp: "_Client") -> None:
        errors = 0
        while True:
            await qmp.rx_filter_changed.wait()
            qmp.rx_filter_changed.clear()
            # the event comes once until the filter is queried again: re-query
            try:
                filters = await self._exec(qmp, "query-rx-filter", {"name": self._nic})
            except (QMPError, asyncio.TimeoutError) as exc:
                errors += 1
                if errors == 1:     # once a session: QEMU decides how often this happens
                    log.warning("NI %s: query-rx-filter after a filter change: %s", self.ni,
                                printable(exc or type(exc).__name__))
                filters = None
            if isinstance(filters, list) and filters and isinstance(filters[0], dict):
                mac = valid_mac(filters[0].get("main-mac"))
                if mac:
                    self._post(mac=mac)
            await asyncio.sleep(RX_FILTER_INTERVAL)

    async def _learn(self, qmp: QMPClient) -> tuple[str, Optional[str]]:
        filters = await self._exec(qmp, "query-rx-filter")
        if not isinstance(filters, list):
            raise LearnError("query-rx-filter did not answer a list")
        nics = {f["name"]: f for f in filters
                if isinstance(f, dict) and isinstance(f.get("name"), str)}
        nic = self.nic_option or await self._find_nic(qmp, nics)
        if nic not in nics:
            raise LearnError(f"QEMU has no NIC {nic!r} (it has: {', '.join(sorted(nics)) or 'none'})")
        return nic, valid_mac(nics[nic].get("main-mac"))

    async def _find_nic(self, qmp: QMPClient, nics: dict) -> str:
        try:
            text = await self._exec(qmp, "human-monitor-command", {"command-line": "info network"})
            mapping = parse_info_network(text if isinstance(text, str) else "")
        except ExecuteError:
            mapping = {}
        mine = []
        for nic, chardev in mapping.items():
            try:
                addr = await self._exec(qmp, "qom-get", {"path": f"/chardevs/{chardev}", "property": "addr"})
            except ExecuteError:
                continue
            if isinstance(addr, dict):
                path = addr.get("path") or (addr.get("data") or {}).get("path")
                if isinstance(path, str) and _same_path(path, self.vhost_socket):
                    mine.append(nic)
        if len(mine) == 1:
            return mine[0]
        if mine:
            raise LearnError(f"NICs {', '.join(mine)} all use {self.vhost_socket}; give nic=ID")
        if mapping:
            raise LearnError(f"none of QEMU's vhost-user NICs ({', '.join(sorted(mapping))}) uses "
                             f"{self.vhost_socket}; give nic=ID if it is one of them")
        if len(nics) == 1:
            return next(iter(nics))
        raise LearnError(f"cannot tell which of QEMU's NICs ({', '.join(sorted(nics)) or 'none'}) "
                         f"is this NI's; give nic=ID")

    async def _set_link(self, up: bool) -> None:
        self._want_link = up
        qmp, nic = self._qmp, self._nic
        if qmp is None or nic is None:
            return      # set when QEMU is (back) there
        try:
            await self._exec(qmp, "set_link", {"name": nic, "up": up})
        except (QMPError, OSError, asyncio.TimeoutError) as exc:
            log.error("NI %s: set_link %s on %s failed: %s", self.ni, "up" if up else "down",
                      printable(nic), printable(exc or type(exc).__name__))
            self._post(error=printable(f"set_link: {exc or type(exc).__name__}"))
            return
        log.info("NI %s: QEMU NIC %s link %s", self.ni, printable(nic), "up" if up else "down")
        self._post(link=up, error="")


class QemuMonitor:
    """One asyncio loop in a worker thread serving every NI's QMP connection.

    ``post(fn)`` must queue ``fn`` to run on the daemon's thread (thread-safe, non-blocking).
    """

    def __init__(self, post: Callable[[Callable[[], None]], None]):
        self.post = post
        # qemu.qmp logs every failed connection attempt as an error; the links say once
        # what is wrong (run with -v, or set the level, to see its own messages)
        qlog = logging.getLogger("qemu.qmp")
        if qlog.level == logging.NOTSET and not log.isEnabledFor(logging.DEBUG):
            qlog.setLevel(logging.CRITICAL)
        self.links: list[QemuLink] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="vhostni-qmp", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def _call(self, coro_fn, *args) -> None:
        def start():
            asyncio.ensure_future(coro_fn(*args))
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(start)

    def add(self, ni: str, qmp_path: str, vhost_socket: str, nic: Optional[str] = None,
            on_change: Optional[Callable[[QemuLink, dict], None]] = None) -> QemuLink:
        link = QemuLink(self, ni, qmp_path, vhost_socket, nic, on_change)
        self.links.append(link)

        def start():
            link._task = asyncio.ensure_future(link._main())
        self.loop.call_soon_threadsafe(start)
        return link

    def remove(self, link: QemuLink) -> None:
        if link in self.links:
            self.links.remove(link)

        def stop():
            if link._task:
                link._task.cancel()
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(stop)

    def close(self, timeout: float = 3.0) -> None:
        """Disconnects from every QEMU and stops the thread (waits at most ``timeout``)."""
        if self.loop.is_closed() or not self._thread.is_alive():
            return

        async def shutdown():
            tasks = [lk._task for lk in self.links if lk._task]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        fut = asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        try:
            fut.result(timeout)
        except Exception:   # noqa: BLE001 - shutting down regardless
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
