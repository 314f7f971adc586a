"""Stream subscriptions end to end: the NI kernel, its rights checks and sandboxed stream
scanners (tests/scanners/stream_*.py) over simulated TCP conversations, and real guest TCP
stacks (marked ``guest``).

In the simulated tests guest a connects to guest b; a's NI runs the scanners.  The
scanners report what they saw through alerts (tests/scanners/stream_decider.py).
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest

from nikit import Kit, policy, scanner_spec, time_limit
from tcpkit import ACK, FIN, PSH, RST, Conn, segments
from vhostni import scannerproc as scannerproc_mod
from vhostni.scanner import wire

FROM, TO = 1, 2
SMTP_CONTAIN = {"port": 25, "direction": "both", "contain": True}


@pytest.fixture(autouse=True)
def _fast(monkeypatch, request):
    monkeypatch.setattr(scannerproc_mod, "RESTART_MIN", 0.05)
    if request.node.get_closest_marker("guest"):
        yield
        return
    with time_limit(60, "the test"):
        yield


def stream_right(port=25, direction="both", contain=True) -> dict:
    return {"stream": True, "port": port, "direction": direction, "contain": contain}


def decider(name="sd", subscribe=(SMTP_CONTAIN,), allow=None, **config) -> dict:
    rights = allow if allow is not None else [stream_right(s.get("port", 25), s.get("direction", "both"),
                                                           s.get("contain", False)) for s in subscribe]
    return scanner_spec(name, "stream_decider.py", allow=rights, alerts_per_second=1000,
                        config=dict(config, subscribe=list(subscribe)))


def started(kits, scanners, **ni) -> Kit:
    k = kits({"a": policy(scanners=scanners, **ni)})
    for s in scanners:
        k.wait_alert("ready", "a", s["name"])
    return k


def reports(k: Kit, kind: str, scanner: str = "sd") -> list[dict]:
    return [a.get("fields", {}) for a in k.alerts_matching(kind, "a", scanner) if a["message"] == kind]


def seen(k: Kit, direction: int, scanner: str = "sd") -> bytes:
    chunks = sorted((r["offset"], bytes.fromhex(r["data"])) for r in reports(k, "data", scanner)
                    if r["direction"] == direction)
    out = b""
    for off, data in chunks:
        assert off == len(out), f"chunk at {off} after {len(out)} bytes: a gap or an overlap"
        out += data
    return out


def got_payload(k: Kit, name: str, want: int, wait: float = 5.0) -> bytes:
    """The payload bytes guest ``name`` receives until ``want`` arrived (or ``wait``)."""
    out = b""
    end = time.monotonic() + wait
    while len(out) < want and time.monotonic() < end:
        out += b"".join(s.payload for s in segments(k.recv(name, 0.1)))
    return out


# ---------------------------------------------------------------------------
# Wire format and SDK
# ---------------------------------------------------------------------------

def test_stream_messages_round_trip():
    m = wire.decode(wire.encode_stream_data(7, wire.TO_GUEST, True, 1 << 40, b"bytes"))
    assert m == wire.StreamData(7, wire.TO_GUEST, True, 1 << 40, b"bytes") and m.end == (1 << 40) + 5
    p = wire.decode(wire.encode_stream_pass(7, wire.FROM_GUEST, wire.PASS_ALL))
    assert p == wire.StreamPass(7, wire.FROM_GUEST, wire.PASS_ALL)
    for bad in (wire.encode_stream_data(1, 3, False, 0, b""), wire.encode_stream_pass(1, 0, 5),
                wire.encode_stream_data(1, 1, False, 0, b"xy")[:-1], wire.encode_stream_pass(1, 1, 5) + b"x"):
        with pytest.raises(wire.WireError):
            wire.decode(bad)


def test_sdk_streams_over_a_socketpair():
    """The SDK's socket-like API against a hand-driven kernel end."""
    import socket
    from vhostni.scanner import Scanner, StreamClosed, StreamData, StreamOpened
    kern, scan = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kern.send(wire.encode_control({"op": "hello", "scanner": "t", "ni": "a", "config": {}}))
    sc = Scanner(scan, lockdown=False)
    open_msg = {"op": "stream_open", "stream": 3, "family": 4, "client": "guest",
                "guest": ["10.0.0.1", 40000], "remote": ["10.0.0.2", 25], "port": 25,
                "read": ["from_guest", "to_guest"], "held": ["from_guest"]}
    for m in (wire.encode_control(dict(open_msg, stream=4)), wire.encode_control(open_msg),
              wire.encode_stream_data(3, 1, True, 0, b"HELO"), wire.encode_stream_data(4, 1, True, 0, b"four"),
              wire.encode_control({"op": "stream_end", "stream": 3, "direction": "from_guest", "offset": 4}),
              wire.encode_control({"op": "stream_close", "stream": 3, "reason": "fin"})):
        kern.send(m)
    s = sc.accept(timeout=2)
    assert s.id == 4 and s.tuple == ("tcp", "10.0.0.1", 40000, "10.0.0.2", 25)
    t = sc.accept(timeout=2)
    assert t.id == 3 and t.holds == {1}
    d = t.read(timeout=2)
    assert (d.direction, d.offset, d.data, d.held, d.end) == (1, 0, b"HELO", True, 4)
    t.pass_(d)
    assert wire.decode(kern.recv(100)) == wire.StreamPass(3, 1, 4)
    assert t.read(timeout=2) is None and t.closed and t.reason == "fin" and t.ended == {1: 4}
    t.kill()
    assert wire.decode(kern.recv(100)).body == {"op": "kill", "stream": 3}
    evs = [next(sc.events(timeout=0.5))]
    assert isinstance(evs[0], StreamData) and evs[0].stream is s and evs[0].data == b"four"
    assert next(sc.events(timeout=0.1)) is None
    assert not isinstance(evs[0], (StreamOpened, StreamClosed))
    sc.close()
    kern.close()


# ---------------------------------------------------------------------------
# Through the kernel
# ---------------------------------------------------------------------------

def test_pass_everything_conversation_is_byte_exact(kits):
    k = started(kits, [decider(mode="pass", report=True)], hold_timeout_ms=5000)
    c = Conn(k, cwscale=2, swscale=2)
    c.open()
    client = [b"EHLO alice\r\n", b"MAIL FROM:<a@x>\r\n", b"DATA\r\n", bytes(range(256)) * 30, b"\r\n.\r\n"]
    server = [b"220 hi\r\n", b"250 ok\r\n", b"354 go\r\n", b"250 queued\r\n"]
    frames = [c.data("a", m) for m in client]
    # out of order, with a retransmission: the scanner still sees one in-order stream
    c.send("a", frames[1], frames[0], frames[0], *frames[2:])
    c.send("b", *[c.data("b", m) for m in server])
    want_a, want_b = b"".join(server), b"".join(client)
    assert got_payload(k, "b", len(want_b)) == want_b
    assert got_payload(k, "a", len(want_a)) == want_a
    k.until(lambda: len(seen(k, FROM)) == len(want_b) and len(seen(k, TO)) == len(want_a),
            what="the scanner's reports")
    assert seen(k, FROM) == want_b and seen(k, TO) == want_a
    (o,) = reports(k, "open")
    assert o["tuple"] == ["tcp", "10.0.0.1", 40000, "10.0.0.2", 25] and o["client"] == "guest"
    assert o["holds"] == [1, 2]
    # close: FINs both ways, then the last ACK
    c.send("a", c.data("a", b"", flags=ACK | FIN))
    c.send("b", c.data("b", b"", flags=ACK | FIN))
    c.send("a", c.segment("a", ACK))
    k.until(lambda: reports(k, "close"), what="the close")
    assert reports(k, "close")[0]["reason"] == "fin"
    assert sorted(r["direction"] for r in reports(k, "end")) == [1, 2]
    info = k.nk("a").info()
    assert info["streams"] == 0 and info["tcp_flows"] == 0 and info["tcp_bytes"] == 0
    assert k.sp("a", "sd").counters.stream_bytes == len(want_a) + len(want_b)


def test_data_waits_for_every_contain_scanner(kits):
    k = started(kits, [decider("x", mode="pass"), decider("y", mode="lag")], hold_timeout_ms=10000)
    c = Conn(k)
    c.open()
    c.send("a", c.data("a", b"first "))
    assert got_payload(k, "b", 6, 0.5) == b""          # x passed, y holds it back
    c.send("a", c.data("a", b"second"))                 # y passes the first now
    assert got_payload(k, "b", 6, 3.0) == b"first "
    assert got_payload(k, "b", 6, 0.4) == b""


def test_read_only_scanner_sees_the_stream_without_holding_it(kits):
    ro = {"port": 25, "direction": "from_guest", "contain": False}
    k = started(kits, [decider(subscribe=[ro], report=True, mode="hold")])
    c = Conn(k)
    c.open()
    c.send("a", c.data("a", b"not held"))
    assert got_payload(k, "b", 8) == b"not held"
    k.until(lambda: seen(k, FROM) == b"not held", what="the copy")
    assert all(not r["held"] for r in reports(k, "data"))
    assert reports(k, "open")[0]["reads"] == [1] and reports(k, "open")[0]["holds"] == []


def test_kill_resets_both_ends(kits):
    spec = scanner_spec("killer", "stream_kill.py", allow=[stream_right()],
                        config={"port": 25, "marker": "VIRUS"})
    k = started(kits, [spec])
    c = Conn(k)
    c.open()
    c.send("a", c.data("a", b"hello "))
    assert got_payload(k, "b", 6) == b"hello "
    c.send("a", c.data("a", b"here is a VIRUS"))
    k.wait_alert("killed", "a", "killer")
    to_a = [s for s in segments(k.recv("a", 1.0, 2))]
    to_b = [s for s in segments(k.recv("b", 1.0, 2))]
    assert to_a and all(s.has(RST) and not s.payload for s in to_a)
    assert to_b and all(s.has(RST) and not s.payload for s in to_b)     # the VIRUS never arrived
    assert to_a[0].seq == c.seq("b", 0) and to_b[0].seq == c.seq("a", 6)
    k.until(lambda: k.nk("a").info()["tcp_flows"] == 0, what="the flow to go")
    assert k.stats("a")["tcp_killed"] == 1 and k.nk("a").streams_killed == 1
    # the connection is gone for the NI: more data of it is dropped, not let through unseen
    c.send("a", c.data("a", b"after"))
    assert got_payload(k, "b", 5, 0.3) == b""


@pytest.mark.parametrize("inject", [None, "<removed>"])
def test_cut_and_inject_edit_the_stream_and_the_connection_goes_on(kits, inject):
    spec = scanner_spec("editor", "stream_edit.py", allow=[stream_right()],
                        config={"port": 25, "marker": "VIRUS", "injection": "note" if inject else None},
                        inject=[{"name": "note", "stream": inject}] if inject else [])
    k = started(kits, [spec])
    c = Conn(k)
    c.open()
    c.send("a", c.data("a", b"hello "), c.data("a", b"here is a VIRUS, "),
           c.data("a", b"and more", flags=ACK | PSH | FIN))      # (its end lets the tail go)
    want = b"hello here is a " + (inject or "").encode() + b", and more"
    assert got_payload(k, "b", len(want)) == want
    # b acknowledges what it got: a hears every byte it sent, in its own numbering
    c.send("b", c.segment("b", ACK, ack=c.seq("a", len(want) + 1)))     # (+1: the FIN)
    acks = [s.ack for s in segments(k.recv("a", 1.0)) if s.has(ACK)]
    assert acks and acks[-1] == c.seq("a", 32)
    st = k.stats("a")
    assert st["tcp_cut_bytes"] == 5 and st["tcp_injected_bytes"] == len(inject or "")
    assert st["tcp_killed"] == 0 and k.sp("a", "editor").counters.stream_cuts == 1


def test_stream_rights_are_checked(kits):
    # may read port 25, not hold it; asks for contain, and for port 80: both refused
    bad = decider("greedy", subscribe=[{"port": 25, "contain": True}, {"port": 80}],
                  allow=[stream_right(25, contain=False)])
    k = kits({"a": policy(scanners=[bad])})
    k.wait_alert("outside its rights", "a", "greedy")
    k.until(lambda: not k.sp("a", "greedy").running or k.sp("a", "greedy").counters.refused,
            what="the refusal")
    assert k.nk("a").stream_subs == []
    assert k.sp("a", "greedy").counters.refused >= 1


def test_read_only_scanner_cannot_kill(kits):
    ro = {"port": 25, "contain": False}
    k = started(kits, [decider(subscribe=[ro], kill_on="KILL", mode="pass", report=True)])
    # stream_decider only acts on held chunks: drive the kill through the kernel instead
    c = Conn(k)
    c.open()
    sid = k.wait_alert("open", "a", "sd")["fields"]["stream"]   # (on its ring, or brokered)
    k.nk("a").stream_kill("sd", sid, "kill")
    assert k.nk("a").streams_killed == 0 and k.sp("a", "sd").counters.refused == 1
    assert k.alerts_matching("no contain rights", "a", "sd")
    c.send("a", c.data("a", b"still here"))
    assert got_payload(k, "b", 10) == b"still here"


@pytest.mark.parametrize("default", ["pass", "cut"])
def test_hold_timeout_applies_the_default_per_chunk(kits, default):
    k = started(kits, [decider(mode="hold", report=True)], hold_timeout_ms=300, default_decision=default)
    c = Conn(k)
    c.open()
    t0 = time.monotonic()
    c.send("a", c.data("a", b"nobody decides this"))
    if default == "pass":
        assert got_payload(k, "b", 19, 3.0) == b"nobody decides this"
        assert time.monotonic() - t0 >= 0.29
        assert k.nk("a").streams                            # the stream goes on
    else:
        k.until(lambda: reports(k, "close"), what="the kill")
        assert reports(k, "close")[0]["reason"] == "timeout"
        assert [s.has(RST) for s in segments(k.recv("b", 1.0, 1))][:1] == [True]
    assert k.nk("a").decided_by_timeout >= 1
    assert k.sp("a", "sd").counters.timeouts >= 1


@pytest.mark.parametrize("default", ["pass", "cut"])
def test_scanner_crash_applies_the_default(kits, default):
    k = started(kits, [decider(mode="pass", crash_on="BOOM")], hold_timeout_ms=10000,
                default_decision=default)
    c = Conn(k)
    c.open()
    c.send("a", c.data("a", b"BOOM"))
    k.wait_alert("scanner stopped", "a", "sd")
    if default == "pass":
        assert got_payload(k, "b", 4) == b"BOOM"
    else:
        assert all(s.has(RST) for s in segments(k.recv("b", 1.0, 1)))
        assert k.nk("a").streams_killed == 1


def test_more_is_recorded_and_decisions_still_needed(kits):
    k = started(kits, [decider(mode="pass", more_on="PARTIAL")], hold_timeout_ms=5000)
    c = Conn(k)
    c.open()
    c.send("a", c.data("a", b"PARTIAL message"))
    k.wait_alert("more", "a", "sd")
    assert got_payload(k, "b", 15) == b"PARTIAL message"
    st = next(iter(k.nk("a").streams.values()))
    assert st.more == {"sd": 1} and k.sp("a", "sd").counters.stream_mores == 1


def test_reload_revokes_stream_subscriptions_outside_new_rights(kits):
    k = started(kits, [decider(mode="hold")], hold_timeout_ms=10000)
    assert len(k.nk("a").stream_subs) == 1
    narrower = policy(scanners=[decider(mode="hold", allow=[stream_right(25, contain=False)])],
                      hold_timeout_ms=10000)
    k.reload("a", narrower)
    assert k.nk("a").stream_subs == []
    c = Conn(k)
    c.open()
    c.send("a", c.data("a", b"unwatched"))
    assert got_payload(k, "b", 9) == b"unwatched"


def test_midstream_reset_is_alerted_to_the_administrator(kits):
    """A daemon restart leaves connections the new NI never saw open: the default reset is
    counted and told to the administrator (one alert per interval, with the counts)."""
    k = started(kits, [decider(mode="pass")])
    c = Conn(k)
    c.ends["a"].sent, c.ends["b"].sent = 5000, 7000
    c.send("a", c.data("a", b"resumed"))
    assert [s.flags & RST for s in c.recv("a", 1.0, 1)] == [RST]
    a = k.wait_alert("picked up mid-stream", "a")
    assert a["scanner"] is None and a["fields"] == {"reset": 1} and "reset" in a["message"]


def test_midstream_adopt_reaches_the_scanner_flagged(kits):
    k = started(kits, [decider(mode="pass", report=True)], tcp_midstream="adopt")
    c = Conn(k)
    c.ends["a"].sent, c.ends["b"].sent = 5000, 7000
    c.send("a", c.data("a", b"resumed", advance=False))
    assert len(c.recv("b", 1.0, 1)) == 1                         # the probe
    c.send("b", c.segment("b", ACK, ack=c.seq("a", 5000)))       # b's answer
    c.send("a", c.data("a", b"resumed"))
    assert got_payload(k, "b", 7) == b"resumed"                  # held, passed by the scanner
    (o,) = reports(k, "open")
    assert o["midstream"] is True and o["tuple"] == ["tcp", "10.0.0.1", 40000, "10.0.0.2", 25]
    k.until(lambda: seen(k, FROM) == b"resumed", what="the scanner's report")
    assert k.wait_alert("picked up mid-stream", "a")["fields"] == {"adopt": 1}


# ---------------------------------------------------------------------------
# Real guest TCP stacks
# ---------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
SCANNERS = REPO / "tests" / "scanners"
LAN = "192.0.2"


@contextlib.contextmanager
def _guest_lab(vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir, tmp_path_factory,
               name: str, scanner: dict):
    """Two guests behind one daemon whose alice NI runs ``scanner``; all stopped on exit
    (scanner uids are per daemon, so two daemons with scanners should not overlap)."""
    from vhostni.testing import VhostUserNic
    work = tmp_path_factory.mktemp(name)
    pol = work / "alice.json"
    pol.write_text(json.dumps({"ni": {"hold_timeout_ms": 10000}, "scanner": [scanner]}))
    alerts = work / "alerts.jsonl"
    socks = {n: str(vhostni_sockdir / f"{name}-{n}.sock") for n in ("alice", "bob")}
    daemon = vhostni_daemon_factory(socks, name=name, extra_args=[
        "--policy", f"alice={pol}", "--alert-log", str(alerts)])
    alice, bob = vhostni_guest_factory.many([
        ("alice", dict(nics=[VhostUserNic(socket=socks["alice"])], ip=f"{LAN}.1/24")),
        ("bob", dict(nics=[VhostUserNic(socket=socks["bob"])], ip=f"{LAN}.2/24")),
    ])
    try:
        deadline = time.monotonic() + 30
        while not (alerts.exists() and '"ready"' in alerts.read_text()):
            assert time.monotonic() < deadline, "the stream scanner never subscribed"
            time.sleep(0.2)
        yield daemon, alice, bob, alerts
    finally:
        for g in (alice, bob):
            g.close()
        daemon.stop()


def _alerts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.guest
def test_guest_http_transfer_through_a_pass_everything_stream_scanner(
        vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir, tmp_path_factory):
    scanner = {"name": "null", "program": str(SCANNERS / "stream_pass.py"),
               "allow": [stream_right(80)], "config": {"port": 80}}
    with _guest_lab(vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir,
                    tmp_path_factory, "streams-http", scanner) as (daemon, alice, bob, alerts):
        _http_transfer(alice, bob, alerts)


def _http_transfer(alice, bob, alerts: Path) -> None:
    bob.check("mkdir -p /srv && dd if=/dev/urandom of=/srv/big bs=1024 count=1024 2>/dev/null && "
              "httpd -p 80 -h /srv")
    want = bob.check("md5sum /srv/big").split()[0]
    out = alice.check(f"timeout 120 wget -q -O /tmp/big http://{LAN}.2/big && md5sum /tmp/big && "
                      "wc -c < /tmp/big", timeout=150)
    got = out.split()[0]
    assert got == want, out
    assert "1048576" in out
    deadline = time.monotonic() + 20
    while True:
        closed = [a for a in _alerts(alerts) if a["message"] == "closed"]
        if closed:
            break
        assert time.monotonic() < deadline, "the scanner never saw the stream close"
        time.sleep(0.3)
    f = closed[0]["fields"]
    assert f["to_guest"] >= 1048576 and f["tuple"][4] == 80, f


@pytest.mark.guest
def test_guest_connection_killed_by_a_stream_scanner_is_reset_at_both_ends(
        vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir, tmp_path_factory):
    scanner = {"name": "killer", "program": str(SCANNERS / "stream_kill.py"),
               "allow": [stream_right(7000)], "config": {"port": 7000, "marker": "VIRUS"}}
    with _guest_lab(vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir,
                    tmp_path_factory, "streams-kill", scanner) as (daemon, alice, bob, alerts):
        _kill_both_ends(alice, bob, alerts)


def _kill_both_ends(alice, bob, alerts: Path) -> None:
    # bob: a server that prints what it gets; alice: a client that sends, then the marker
    # (stdin kept open: a background job's is /dev/null, and nc half-closes at its EOF)
    bob.check("((sleep 60 | nc -l -p 7000 > /tmp/got 2>/tmp/nc.err); echo exit=$? >> /tmp/nc.err) &")
    alice.check(f"((echo hello; sleep 2; echo VIRUS; sleep 30) | nc {LAN}.2 7000 > /dev/null "
                f"2>/tmp/nc.err; echo exit=$? >> /tmp/nc.err) &")
    deadline = time.monotonic() + 30
    while not any(a["message"] == "killed" for a in _alerts(alerts)):
        assert time.monotonic() < deadline, "the scanner never killed the connection"
        time.sleep(0.3)
    # both ends: the connection is gone from the socket table at once, nc is gone long
    # before its 30 s sleep, and the stack counted an established connection reset
    # (Tcp EstabResets: ESTABLISHED -> CLOSED, which a FIN never does)
    for g in (alice, bob):
        out, _ = g.run("for i in $(seq 50); do pidof nc >/dev/null || break; sleep 0.2; done; "
                       "pidof nc || echo no-nc; grep -c ':1B58 ' /proc/net/tcp || true; "
                       "awk '$1 == \"Tcp:\" { n++; if (n == 2) print \"resets=\" $9 }' /proc/net/snmp",
                       timeout=30)
        lines = out.strip().splitlines()
        assert lines[-3:-1] == ["no-nc", "0"], f"{g.name} still has the connection: {out}"
        assert lines[-1].startswith("resets=") and int(lines[-1][7:]) >= 1, f"{g.name}: {out}"
    assert bob.check("cat /tmp/got").strip() == "hello"
