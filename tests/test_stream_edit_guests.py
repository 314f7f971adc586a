"""Stream editing between real Linux TCP stacks (issue 4, item 2).

Two guests behind one daemon; alice's NI runs tests/scanners/stream_edit.py, which replaces
every marker in port 7000 streams with a pre-registered stream injection (inject + cut, in
both directions).  Each transfer carries about a thousand markers, spread over many receive
windows: the receiver must get exactly the edited stream (md5), with no stall (a stall
would run into the timeouts), and both ends must close cleanly (every byte acknowledged
in each side's own numbering, so neither stack retransmits forever or resets).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from vhostni.testing import VhostUserNic

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
LAN = "192.0.2"
MARKER = "BAD!"
NOTE = "[removed by vhostni]"
LINES = 100000
HOST = {"alice": 1, "bob": 2}


def expected() -> bytes:
    """What `seq LINES | sed 's/77$/BAD!/'` prints, with each marker replaced by NOTE."""
    out = []
    for i in range(1, LINES + 1):
        s = str(i)
        out.append(s[:-2] + NOTE if s.endswith("77") else s)
    return ("\n".join(out) + "\n").encode()


SENDER = f"seq {LINES} | sed 's/77$/{MARKER}/'"


@pytest.fixture(scope="module")
def lab(vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir, tmp_path_factory):
    work = tmp_path_factory.mktemp("edit")
    scanner = {"name": "editor", "program": str(REPO / "tests" / "scanners" / "stream_edit.py"),
               "allow": [{"stream": True, "port": 7000, "direction": "both", "contain": True}],
               "inject": [{"name": "note", "stream": NOTE}],
               "config": {"port": 7000, "marker": MARKER, "injection": "note"}}
    pol = work / "alice.json"
    pol.write_text(json.dumps({"ni": {"hold_timeout_ms": 20000}, "scanner": [scanner]}))
    alerts = work / "alerts.jsonl"
    socks = {n: str(vhostni_sockdir / f"edit-{n}.sock") for n in ("alice", "bob")}
    daemon = vhostni_daemon_factory(socks, name="edit", extra_args=[
        "--policy", f"alice={pol}", "--alert-log", str(alerts)])
    alice, bob = vhostni_guest_factory.many([
        ("alice", dict(nics=[VhostUserNic(socket=socks["alice"])], ip=f"{LAN}.1/24")),
        ("bob", dict(nics=[VhostUserNic(socket=socks["bob"])], ip=f"{LAN}.2/24")),
    ])
    deadline = time.monotonic() + 30
    while not (alerts.exists() and '"ready"' in alerts.read_text()):
        assert time.monotonic() < deadline, "the editing scanner never subscribed"
        time.sleep(0.2)
    yield dict(daemon=daemon, alice=alice, bob=bob, alerts=alerts)


def _alerts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _edited_alert(alerts: Path, n: int) -> dict:
    deadline = time.monotonic() + 30
    while True:
        got = [a for a in _alerts(alerts) if a["scanner"] == "editor" and a["message"] == "edited"]
        if len(got) >= n:
            return got[n - 1]
        assert time.monotonic() < deadline, f"no close of stream {n}: {_alerts(alerts)[-5:]}"
        time.sleep(0.3)


def _transfer(sender, receiver) -> None:
    want = expected()
    # (busybox nc leaves at its stdin's EOF: keep the listener's open; it leaves at the
    # socket's EOF then)
    receiver.check("rm -f /tmp/got /tmp/nc.err; ((sleep 300 | (nc -l -p 7000 > /tmp/got 2>/tmp/nc.err; "
                   "echo exit=$? >> /tmp/nc.err)) &); sleep 0.5")
    t0 = time.monotonic()
    out, status = sender.run(f"{SENDER} | timeout 120 nc {LAN}.{HOST[receiver.name]} 7000; echo sent=$?",
                             timeout=150)
    assert "sent=0" in out, f"sender failed: {out}"
    out = receiver.check("for i in $(seq 300); do grep -q exit= /tmp/nc.err && break; sleep 0.2; done; "
                         "cat /tmp/nc.err; wc -c < /tmp/got; md5sum /tmp/got", timeout=90)
    elapsed = time.monotonic() - t0
    assert "exit=0" in out, f"receiver: {out}"
    assert out.split()[-2] == hashlib.md5(want).hexdigest(), \
        f"edited stream differs: got {out.split()[-3]} bytes, want {len(want)}: {out}"
    print(f"{len(want)} bytes with {want.count(NOTE.encode())} replacements in {elapsed:.1f} s")


@pytest.mark.parametrize("direction", ["from_guest", "to_guest"])
def test_many_replacements_arrive_exactly_and_the_connection_closes_cleanly(lab, direction):
    alice, bob, alerts = lab["alice"], lab["bob"], lab["alerts"]
    sender, receiver = (alice, bob) if direction == "from_guest" else (bob, alice)
    n = len([a for a in _alerts(alerts) if a["message"] == "edited"]) + 1
    _transfer(sender, receiver)
    a = _edited_alert(alerts, n)
    f = a["fields"]
    assert f["reason"] == "fin", f                 # closed by both FINs: no reset, no kill
    assert f[direction] == expected().count(NOTE.encode()) > 900, f
    assert not [x for x in _alerts(alerts) if x["message"] == "refused"]
    # neither stack saw a reset
    for g in (alice, bob):
        out = g.check("awk '$1 == \"Tcp:\" { n++; if (n == 2) print $9 }' /proc/net/snmp")
        assert out.strip() == "0", f"{g.name} counted resets: {out}"
