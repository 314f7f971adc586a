"""Scanner rings through a real daemon (tests/nikit.py): the kernel gives each scanner a
ring, routes its frame subscriptions there once it asks, and answers a scanner that abuses
its ring as one that abuses its socket: an alert, a kill, a restart with a new ring, and the
policy's default for what it owed.  The scanner (tests/scanners/ring_raw.py) drives its ring
by hand, so these tests do not depend on the SDK's ring code.
"""
from __future__ import annotations

import pytest

from nikit import Kit, policy, scanner_spec, tcp_frame, time_limit  # noqa: F401
from vhostni import scannerproc as scannerproc_mod

HTTP = {"direction": "from_guest", "proto": "tcp", "dport": 80}


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(scannerproc_mod, "RESTART_MIN", 0.05)
    with time_limit(90, "the test"):
        yield


def raw(name="raw", match=HTTP, contain=True, **config):
    subs = [{"match": match, "contain": contain}]
    return scanner_spec(name, "ring_raw.py", allow=[dict(match, contain=contain)],
                        config=dict(config, subscribe=subs))


def ready(k, ni="a", name="raw", n=1):
    k.until(lambda: len(k.alerts_matching("ready", ni, name)) >= n, 20, f"{name} ready")
    k.until(lambda: k.sp(ni, name).info()["ring"], 10, f"{name} on its ring")


def test_held_frames_go_over_the_ring_and_back(kits):
    k = kits({"a": policy(hold_timeout_ms=5000, scanners=[raw()])})
    ready(k)
    frames = [tcp_frame(payload=b"x%d" % i) for i in range(50)]
    k.send("a", *frames)
    assert k.recv("b", 5.0, 50) == frames
    st = k.stats("a")
    assert st["ring_frames"] == 50 and st["held_passed"] == 50 and st["held"] == 50
    k.until(lambda: k.sp("a", "raw").counters.frames == 50, 5, "the ring's counters")
    assert k.sp("a", "raw").counters.decisions == 50
    assert not k.alerts_matching("broke")


@pytest.mark.parametrize("attack,why", [
    ("never_given", "a decision for a frame it was never given"),
    ("verdict", "a verdict neither pass nor cut"),
    ("cons_past", "its consumer index went back or past"),
    ("dec_jump", "its decision index went back or jumped"),
])
@pytest.mark.parametrize("default", ["cut", "pass"])
def test_a_scanner_that_breaks_its_ring_is_killed_and_its_frames_defaulted(kits, attack, why, default):
    k = kits({"a": policy(hold_timeout_ms=20000, default_decision=default,
                          scanners=[raw(attack=attack)])})
    ready(k)
    f = tcp_frame(payload=b"victim")
    k.send("a", f)
    alert = k.wait_alert("scanner broke its ring", "a", "raw")
    assert why in alert["message"]
    # its frame got the default at once (not after the 20 s hold timeout)
    assert k.recv("b", 2.0) == ([f] if default == "pass" else [])
    k.wait_alert("protocol violation on its ring", "a", "raw")
    # restarted with a new ring (it may break that one too); the NI goes on forwarding
    ready(k, n=2)
    other = tcp_frame(dport=81, payload=b"unheld")
    k.send("a", other)
    assert k.recv("b", 2.0, 1) == [other]


def test_a_silent_scanner_stalls_only_itself(kits):
    """It never consumes nor decides: held frames get the default at the hold timeout, a
    full ring the default at once, and after max_timeouts misses it is killed as hung."""
    spec = raw(attack="silent")
    spec["max_timeouts"] = 2
    k = kits({"a": policy(hold_timeout_ms=300, default_decision="pass", scanners=[spec])})
    ready(k)
    f = tcp_frame(payload=b"one")
    k.send("a", f)
    assert k.recv("b", 0.1) == []
    assert k.recv("b", 3.0, 1) == [f]                  # the default, at the timeout
    k.wait_alert("decision missed", "a", "raw")
    g = tcp_frame(payload=b"two")
    k.send("a", g)
    assert k.recv("b", 3.0, 1) == [g]
    k.wait_alert("scanner hung", "a", "raw")


def test_ring_regions_resist_the_scanner(kits):
    k = kits({"a": policy(scanners=[raw(attack="remap")])})
    got = k.wait_alert("remap", "a", "raw", timeout=20)["fields"]
    assert got["map_a_writable"] in ("EACCES", "EPERM"), got
    for what in ("shrink_a", "grow_a", "shrink_b", "grow_b", "write_a"):
        assert got[what] == "EPERM", (what, got)
    ready(k)
    f = tcp_frame(payload=b"after")
    k.send("a", f)
    assert k.recv("b", 5.0, 1) == [f]


def test_a_ring_carries_only_what_its_scanner_subscribed_to(kits):
    """Two scanners on one NI: each ring gets the frames of its own subscriptions only."""
    k = kits({"a": policy(hold_timeout_ms=5000, scanners=[
        raw("web", HTTP, report=True),
        raw("ssh", dict(HTTP, dport=22), report=True)])})
    ready(k, name="web")
    ready(k, name="ssh")
    web, ssh, other = (tcp_frame(dport=p, payload=b"p%d" % p) for p in (80, 22, 443))
    k.send("a", web, ssh, other)
    assert sorted(k.recv("b", 5.0, 3)) == sorted([web, ssh, other])
    k.until(lambda: len(k.alerts_matching("frame")) >= 2, 5, "the reports")
    seen = {a["scanner"]: a["fields"]["data"] for a in k.alerts_matching("frame")}
    assert seen == {"web": web.hex(), "ssh": ssh.hex()}


def stream_scanner(name="sraw", **config):
    spec = scanner_spec(name, "ring_raw.py", allow=[{"stream": True, "port": 25, "contain": True}],
                        config=dict(config, streams=25))
    return spec


def test_streams_on_the_ring_pass_and_cut_through_the_daemon(kits):
    """A scanner with its streams on its ring: the bytes reach it and the receiver as it
    passes them, and its cut (a socket request on a stream the kernel does not broker) is
    checked against its ring's part and edits the stream."""
    from tcpkit import ACK, FIN, Conn, payload_of
    k = kits({"a": policy(hold_timeout_ms=5000, scanners=[stream_scanner(cut="EVIL")])})
    ready(k, name="sraw")
    c = Conn(k)
    c.open()
    c.send("a", c.data("a", b"hello "))
    assert payload_of(k.recv("b", 3.0, 1)) == b"hello "
    c.send("b", c.segment("b", ACK))
    c.send("a", c.data("a", b"good EVIL rest"))
    assert payload_of(k.recv("b", 3.0, 1)) == b"good "
    c.send("b", c.segment("b", ACK, ack=c.seq("a", 11)))
    c.send("a", c.data("a", b"next"))
    got = k.recv("b", 3.0, 1)
    assert payload_of(got) == b"next"
    c.send("a", c.data("a", b"", flags=FIN | ACK))
    c.send("b", c.data("b", b"", flags=FIN | ACK))
    c.send("a", c.segment("a", ACK))
    rep = k.wait_alert("stream", "a", "sraw")["fields"]
    assert bytes.fromhex(rep["from_guest"]) == b"hello good EVIL restnext"
    sp = k.sp("a", "sraw")
    assert sp.counters.streams == 1 and sp.counters.stream_bytes >= 24
    assert k.nk("a").streams == {}               # never brokered by the kernel


def test_the_sdk_null_stream_scanner_passes_on_its_ring(kits):
    """scanners/null_stream.py asks for its streams on the ring: the bytes reach the
    receiver as it passes them, the kernel never brokers the stream, and the ring's counters
    are the scanner's."""
    import os
    from tcpkit import Conn, payload_of
    from nikit import scanner_spec as spec_of
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = spec_of("ns", os.path.join(root, "scanners", "null_stream.py"),
                   allow=[{"stream": True, "port": 25, "contain": True}], config={"port": 25})
    k = kits({"a": policy(hold_timeout_ms=5000, scanners=[spec])})
    k.until(lambda: k.sp("a", "ns").info()["ring"] and k.sp("a", "ns").ring_streams
            and k.nk("a").stream_subs, 20, "the null stream scanner on its ring")
    c = Conn(k)
    c.open()
    for i in range(20):
        c.send("a", c.data("a", b"chunk %02d " % i))
        assert payload_of(k.recv("b", 3.0, 1)) == b"chunk %02d " % i
        c.send("b", c.segment("b", 0x10))
    assert k.nk("a").streams == {}
    st = k.stats("a")
    assert st["ring_stream_bytes"] == 180 and st["tcp_released_segments"] == 20
    sp = k.sp("a", "ns")
    assert sp.counters.streams == 1 and sp.counters.stream_bytes == 180 and sp.counters.timeouts == 0
