"""A hostile QEMU on the QMP socket the daemon connects to (vhostni/qemu.py): a fake QMP
server that greets, negotiates, then misbehaves — floods of events, messages too large to
parse cheaply, answers of the wrong type, MACs that are not unicast MACs, text with newlines
meant for the daemon's log, hanging up again and again.  The daemon's memory stays bounded,
its log gets one line per message it writes, nothing QEMU says reaches anti-spoofing unless
it is a unicast MAC, and the NI's QMP link lives on (at most this NI's MAC is not learned)."""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time

import pytest

from nikit import Kit, time_limit, wait_until
from vhostni import qemu as vq
from vhostni.qemu import QemuMonitor, valid_mac

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": []}}
MAC = "52:54:00:aa:bb:01"


class FakeQmp:
    """A QMP server on a Unix socket: greets, answers ``qmp_capabilities``, and hands every
    other command to ``handler(msg, send, conn)`` (QEMU's parser is a JSON stream: commands
    need not end with a newline).  ``send`` takes a message (sent as a line) or raw bytes,
    whole, from any thread."""

    def __init__(self, path: str, handler, first_greeting: bytes = b""):
        self.path, self.handler = path, handler
        self.first_greeting = first_greeting    # the first connection's, instead of QMP's
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(16)
        self.conns = 0
        self.commands: list[dict] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.conns += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        lock = threading.Lock()

        def send(obj) -> None:
            with lock:
                c.sendall(obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n")
        dec, buf = json.JSONDecoder(), ""
        try:
            if self.first_greeting and self.conns == 1:
                send(self.first_greeting)
                time.sleep(0.5)
                return
            send(GREETING)
            while not self._stop:
                data = c.recv(65536)
                if not data:
                    break
                buf += data.decode()
                while True:
                    buf = buf.lstrip()
                    try:
                        msg, n = dec.raw_decode(buf)
                    except ValueError:
                        break
                    buf = buf[n:]
                    if msg.get("execute") == "qmp_capabilities":
                        send({"return": {}, **({"id": msg["id"]} if "id" in msg else {})})
                        continue
                    self.commands.append(msg)
                    self.handler(msg, send, c)
        except (OSError, ValueError):
            pass
        finally:
            c.close()

    def close(self) -> None:
        self._stop = True
        self.srv.close()


def event(name: str, nic: str = "nic0") -> bytes:
    return json.dumps({"event": name, "data": {"name": nic},
                       "timestamp": {"seconds": 1, "microseconds": 0}}).encode() + b"\n"


def reply(msg, ret) -> dict:
    return {"return": ret, "id": msg["id"]}


def error(msg, desc="no") -> dict:
    return {"error": {"class": "GenericError", "desc": desc}, "id": msg["id"]}


def rx_filter(msg, name="nic0", mac=MAC) -> dict:
    return reply(msg, [{"name": name, "main-mac": mac}])


@pytest.fixture
def qmp():
    """start(handler, nic=None) -> (server, link): a QemuMonitor (posting straight onto its
    own loop) with one NI whose QEMU is a FakeQmp."""
    d = tempfile.mkdtemp(prefix="vnq-", dir="/tmp")
    made = []

    def start(handler, nic=None, first_greeting=b""):
        path = os.path.join(d, f"q{len(made)}.qmp")
        srv = FakeQmp(path, handler, first_greeting)
        mon = QemuMonitor(lambda fn: fn())
        link = mon.add("a", path, os.path.join(d, "a.sock"), nic=nic)
        made.append((srv, mon))
        return srv, link

    with time_limit(60, "the test"):
        yield start
    for srv, mon in made:
        mon.close()
        srv.close()


def queued_events(link) -> int:
    q = link._qmp
    return sum(lst._queue.qsize() for lst in q._listeners) if q is not None else 0


def test_valid_mac():
    assert valid_mac("52:54:00:AA:bb:01") == "52:54:00:aa:bb:01"
    for bad in (None, 5, ["52:54:00:aa:bb:01"], "", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01",
                "00:00:00:00:00:00", "52:54:00:aa:bb:01\nX", "52 54 00 aa bb 01", "525400aabb01",
                "52:54:00:aa:bb:01:02", "52:54:00:aa:bb:1"):
        assert valid_mac(bad) is None, bad


def test_an_event_flood_is_not_kept(qmp):
    """qemu.qmp's default listener queues every event for a reader the NI does not have: a
    QEMU sending events as fast as it can grew the daemon by ~100 MB a second, forever."""
    flood = (event("SOME_EVENT") + event("NIC_RX_FILTER_CHANGED", "other")) * 2500
    sent = threading.Event()

    def handler(msg, send, c):
        send(rx_filter(msg))
        if not sent.is_set():
            send(flood)
            sent.set()

    srv, link = qmp(handler, nic="nic0")
    assert sent.wait(10)
    wait_until(lambda: link.status.state == "connected", 10, "the session")
    time.sleep(1.0)
    assert link.status.state == "connected"
    assert queued_events(link) < 100, f"{queued_events(link)} events kept"


def test_a_flood_of_filter_changes_is_a_few_requeries(qmp):
    """Each NIC_RX_FILTER_CHANGED for the NIC was one query-rx-filter, and one MAC change
    (a policy update and a log line on the daemon's thread) if QEMU alternates MACs."""
    macs = iter(f"52:54:00:aa:bb:{i % 250:02x}" for i in range(10**6))
    started = threading.Event()

    def handler(msg, send, c):
        send(rx_filter(msg, mac=next(macs)))
        if not started.is_set():
            started.set()
            ev = event("NIC_RX_FILTER_CHANGED")
            threading.Thread(target=lambda: [send(ev * 100) for _ in range(50)],
                             daemon=True).start()

    srv, link = qmp(handler, nic="nic0")
    assert started.wait(10)
    t0 = time.monotonic()
    time.sleep(2.0)
    requeries = sum(1 for m in srv.commands if m.get("arguments", {}).get("name") == "nic0")
    limit = 2 + (time.monotonic() - t0) / vq.RX_FILTER_INTERVAL + 1
    assert requeries <= limit, f"{requeries} re-queries for 5000 events in 2 s"


def test_a_message_too_large_ends_the_session(qmp):
    """A 1 MiB message (qemu.qmp takes up to 10 MiB: parsing one holds the GIL the data plane
    needs for ~100 ms) ends the session; the link reconnects."""
    big = b'{"event": "X", "data": [' + b"1," * (512 * 1024) + b'1]}\n'

    def handler(msg, send, c):
        send(rx_filter(msg))
        if srv.conns == 1:
            send(big)

    srv, link = qmp(handler, nic="nic0")
    wait_until(lambda: srv.conns >= 2, 10, "the daemon to hang up and reconnect")
    wait_until(lambda: link.status.state == "connected", 10, "the new session")
    assert not link._task.done()


@pytest.mark.parametrize("answer", [5, "x", {"name": "nic0"}, [5], [{"name": 5}],
                                    [{"name": ["nic0"], "main-mac": MAC}]])
def test_an_answer_of_the_wrong_type_does_not_end_the_link(qmp, answer):
    """query-rx-filter answered with a number: TypeError killed the NI's QMP task for good."""
    def handler(msg, send, c):
        send(reply(msg, answer) if msg["execute"] == "query-rx-filter" else error(msg))

    srv, link = qmp(handler)
    wait_until(lambda: link.status.state == "error", 10, "the error")
    time.sleep(0.3)
    assert not link._task.done(), link._task.exception()
    assert link.status.mac is None


@pytest.mark.parametrize("mac", [5, ["52:54:00:aa:bb:01"], {"a": 1}, "ff:ff:ff:ff:ff:ff",
                                 "01:00:5e:00:00:01", "00:00:00:00:00:00", "x" * 100000,
                                 MAC + "\nFAKE", "52 54 00 aa bb 01"])
def test_a_mac_that_is_not_a_unicast_mac_is_refused(qmp, mac):
    def handler(msg, send, c):
        send(rx_filter(msg, mac=mac) if msg["execute"] == "query-rx-filter" else error(msg))
        if len(srv.commands) == 1:
            send(event("NIC_RX_FILTER_CHANGED"))    # and again, on a filter change

    srv, link = qmp(handler, nic="nic0")
    wait_until(lambda: link.status.state == "connected", 10, "the session")
    wait_until(lambda: len(srv.commands) >= 2, 5, "the re-query")
    time.sleep(0.2)
    assert link.status.mac is None


def test_qemu_text_cannot_forge_log_lines(qmp, caplog):
    """A NIC name, a MAC and an error text with newlines went into the log as they came."""
    def handler(msg, send, c):
        if msg["execute"] == "query-rx-filter":
            send(rx_filter(msg, name="nic0\nFORGED: NI b: x", mac=MAC + "\nFORGED"))
        else:
            send(error(msg, "no\nFORGED: NI b: y"))

    caplog.set_level(logging.INFO, logger="vhostni.qemu")
    srv, link = qmp(handler)
    wait_until(lambda: link.status.state == "connected", 10, "the session")
    link.set_link(False)
    wait_until(lambda: any("set_link" in r.getMessage() for r in caplog.records), 5, "set_link")
    msgs = [r.getMessage() for r in caplog.records if r.name == "vhostni.qemu"]
    assert msgs and not [m for m in msgs if "\n" in m], msgs


def test_a_qemu_that_keeps_hanging_up_is_reconnected_ever_more_slowly(qmp, caplog):
    """Accept, answer, hang up: reconnected every 0.2 s, with log lines each time."""
    def handler(msg, send, c):
        send(rx_filter(msg))
        c.shutdown(socket.SHUT_RDWR)

    caplog.set_level(logging.INFO, logger="vhostni.qemu")
    srv, link = qmp(handler, nic="nic0")
    time.sleep(4.0)
    assert srv.conns <= 6, f"{srv.conns} connections in 4 s"
    assert len(caplog.records) <= 14, len(caplog.records)
    assert not link._task.done()


def test_only_a_unicast_mac_from_qemu_reaches_anti_spoofing():
    """The daemon's side: QEMU's broadcast MAC became the NI's anti-spoofing MAC."""
    with time_limit(60, "the test"):
        k = Kit({"a": {"ni": {"addresses": ["10.0.0.1/32"]}}}, connect=False)
        srv = None
        try:
            mac = ["ff:ff:ff:ff:ff:ff"]

            def handler(msg, send, c):
                send(rx_filter(msg, mac=mac[0]) if msg["execute"] == "query-rx-filter" else error(msg))
                if mac[0] == MAC:
                    send(event("NIC_RX_FILTER_CHANGED"))

            srv = FakeQmp(os.path.join(k.dir, "a.qmp"), handler)
            link = k.daemon.attach_qemu("a", srv.path, nic="nic0")
            k.until(lambda: link.status.state == "connected", 10, "the session")
            k.run_for(0.3)
            assert k.daemon.nis["a"].port.fallback_mac is None
            mac[0] = MAC
            k.daemon.set_link("a", True)       # any command: the server then says the filter changed
            k.until(lambda: k.daemon.nis["a"].port.fallback_mac == bytes.fromhex(MAC.replace(":", "")),
                    5, "the NIC's MAC")
        finally:
            k.close()
            if srv:
                srv.close()


@pytest.mark.parametrize("where", ["greeting", "session"])
def test_deeply_nested_json_does_not_end_the_link(qmp, where):
    """json.loads raises RecursionError (not a QMPError): qemu.qmp's disconnect() re-raised it
    where the link caught only QMP and socket errors, and the NI's QMP task died for good."""
    nested = b"[" * 100000 + b"]" * 100000 + b"\n"

    def handler(msg, send, c):
        send(rx_filter(msg))
        if where == "session" and srv.conns == 1:
            send(nested)

    srv, link = qmp(handler, nic="nic0", first_greeting=nested if where == "greeting" else b"")
    wait_until(lambda: srv.conns >= 2, 10, "the daemon to reconnect")
    wait_until(lambda: link.status.state == "connected" and srv.conns >= 2, 10, "the new session")
    assert not link._task.done()


def test_an_address_of_the_wrong_type_is_an_error_not_a_dead_link(qmp):
    """qom-get's answer with ``data`` a string: AttributeError, the NI's QMP task died."""
    def handler(msg, send, c):
        ex = msg["execute"]
        if ex == "query-rx-filter":
            send(reply(msg, [{"name": "nic0", "main-mac": MAC}, {"name": "nic1", "main-mac": MAC}]))
        elif ex == "human-monitor-command":
            send(reply(msg, "nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:aa:bb:cc\r\n"
                            " \\ n0: index=0,type=vhost-user,vhost-user0 to c0\r\n"))
        else:
            send(reply(msg, {"type": "unix", "data": "x"}))

    srv, link = qmp(handler)
    wait_until(lambda: link.status.state == "error", 10, "the error")
    assert "unexpected answer" in link.status.error and not link._task.done()
