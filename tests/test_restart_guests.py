"""A daemon killed (kill -9) and restarted under a live, inspected TCP connection (issue 16,
item 2), between real Linux TCP stacks.

Alice's NI runs scanners/null_stream.py on port 7000 (contain: every byte waits for it).
Alice streams a tick every half second to bob with busybox nc.  The daemon is killed with
SIGKILL and started again (QEMU reconnects, ``reconnect=1``); the new NI never saw the
connection open, and its policy's ``[ni] tcp_midstream`` decides what happens to it:

* ``reset`` (the default): both ends get an RST they accept, so alice's nc ends within
  seconds of the restart instead of retrying into a black hole;
* ``pass``: the connection goes on, uninspected, and bob keeps receiving ticks;
* ``adopt``: the NI asks bob's stack where it stands and inspects the connection from there
  (the new scanner holds and passes every tick), and bob keeps receiving ticks;
* ``drop``: the old black hole, shown for contrast: alice's nc is still stuck long after
  the restart, and bob receives nothing more.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from nikit import wait_until

from vhostni.testing import VhostUserNic

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
LAN = "192.0.2"
PORT = 7000


def _wait(cond, timeout: float, what: str):
    """nikit.wait_until, polling the guests' consoles less often."""
    return wait_until(cond, timeout, what, interval=0.3)


@pytest.fixture(scope="module")
def lab(vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir, tmp_path_factory):
    work = tmp_path_factory.mktemp("restart")
    socks = {n: str(vhostni_sockdir / f"restart-{n}.sock") for n in ("alice", "bob")}
    stats = work / "stats.json"

    def start(midstream: str, name: str):
        pol = work / f"alice-{midstream}.json"
        scanner = {"name": "null", "program": str(REPO / "scanners" / "null_stream.py"),
                   "allow": [{"stream": True, "port": PORT, "direction": "both", "contain": True}],
                   "config": {"port": PORT}}
        pol.write_text(json.dumps({"ni": {"tcp_midstream": midstream}, "scanner": [scanner]}))
        if stats.exists():
            stats.unlink()
        return vhostni_daemon_factory(socks, name=name, extra_args=[
            "--policy", f"alice={pol}", "--alert-log", str(work / "alerts.jsonl"),
            "--stats-file", str(stats)])

    daemon = start("reset", "first")
    alice, bob = vhostni_guest_factory.many([
        ("alice", dict(nics=[VhostUserNic(socket=socks["alice"])], ip=f"{LAN}.1/24")),
        ("bob", dict(nics=[VhostUserNic(socket=socks["bob"])], ip=f"{LAN}.2/24")),
    ])
    yield dict(daemon=daemon, start=start, alice=alice, bob=bob, stats=stats)


def _alice_stats(stats: Path) -> dict:
    try:
        return json.loads(stats.read_text())["nis"]["alice"]
    except (OSError, ValueError, KeyError):
        return {}


def _ready(stats: Path) -> bool:
    s = _alice_stats(stats)
    return bool(s.get("connected")) and (s.get("kernel") or {}).get("scanners_not_ready") == []


def _lines(bob) -> int:
    return int(bob.check("wc -l < /tmp/got").split()[-1])


def _resets(g) -> int:
    """The guest stack's EstabResets: connections it saw reset (/proc/net/snmp)."""
    out = g.check("awk '$1 == \"Tcp:\" { n++; if (n == 2) print $9 }' /proc/net/snmp")
    return int(out.split()[-1])


def _alice_done(alice) -> str:
    out, _ = alice.run("cat /tmp/rc 2>/dev/null")
    return "rc=" in out and out


def _counted(stats, counter: str):
    """alice's stats once ``counter`` is non-zero there (None before)."""
    s = _alice_stats(stats)
    return s if s.get(counter, 0) >= 1 else None


@pytest.mark.parametrize("midstream", ["reset", "pass", "adopt", "drop"])
def test_inspected_connection_across_a_daemon_kill(lab, midstream):
    alice, bob, stats = lab["alice"], lab["bob"], lab["stats"]
    _wait(lambda: _ready(stats), 60, "the NI to be connected and its scanner ready")
    resets0 = _resets(alice)
    bob.check(f"rm -f /tmp/got; ((sleep 600 | nc -l -p {PORT} > /tmp/got) &); sleep 0.5")
    alice.check("rm -f /tmp/rc; ((i=0; while true; do i=$((i+1)); echo tick$i; sleep 0.5; done "
                f"| nc {LAN}.2 {PORT}; echo rc=$? > /tmp/rc) &)")
    _wait(lambda: _lines(bob) >= 3, 30, "ticks through the inspected connection")
    # the stats file lags by up to a housekeeping interval
    _wait(lambda: _alice_stats(stats).get("tcp_held_segments", 0) >= 3, 10, "the ticks held for the scanner")

    d = lab["daemon"]
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(10)
    before = _lines(bob)
    t0 = time.monotonic()
    lab["daemon"] = new = lab["start"](midstream, f"after-{midstream}")
    _wait(lambda: _alice_stats(stats).get("connected"), 60, "QEMU to reconnect")
    try:
        if midstream == "reset":
            out = _wait(lambda: _alice_done(alice), 45, "alice's nc to see the reset")
            took = time.monotonic() - t0
            print(f"alice's nc ended {took:.1f} s after the restart: {out.strip()}")
            assert _resets(alice) == resets0 + 1          # by an RST (busybox nc exits 0 on it)
            # the stats file lags the counters by up to a housekeeping interval
            s = _wait(lambda: _counted(stats, "tcp_midstream_reset"), 10, "the reset counted")
            assert s["tcp_midstream_reset"] >= 1 and s["tcp_midstream_pass"] == 0, s
        elif midstream == "pass":
            _wait(lambda: _lines(bob) >= before + 5, 45, "ticks to flow again, uninspected")
            print(f"ticks flow again {time.monotonic() - t0:.1f} s after the restart")
            assert not _alice_done(alice) and _resets(alice) == resets0
            s = _wait(lambda: _counted(stats, "tcp_midstream_pass"), 10, "the pass counted")
            assert s["tcp_midstream_pass"] == 1 and s["tcp_midstream_reset"] == 0, s
        elif midstream == "adopt":
            _wait(lambda: _lines(bob) >= before + 5, 60, "ticks to flow again, inspected")
            print(f"ticks flow again, inspected, {time.monotonic() - t0:.1f} s after the restart")
            assert not _alice_done(alice) and _resets(alice) == resets0
            _wait(lambda: _alice_stats(stats).get("tcp_held_segments", 0) >= 3, 10,
                  "the new NI to hold the ticks for its scanner")
            s = _wait(lambda: _counted(stats, "tcp_midstream_adopt"), 10, "the adoption counted")
            assert s["tcp_midstream_adopt"] == 1 and s["tcp_midstream_reset"] == 0, s
            assert s["kernel"]["streams"] + s["kernel"]["scanners"]["null"]["streams"] == 1, s["kernel"]   # brokered, or on its ring
        else:
            time.sleep(30)
            assert not _alice_done(alice) and _resets(alice) == resets0, "not black-holed"
            assert _lines(bob) == before
            s = _alice_stats(stats)
            assert s["tcp_no_flow"] >= 1 and s["tcp_midstream_reset"] == s["tcp_midstream_pass"] == 0, s
        assert new.alive
    finally:
        alice.run("kill $(pidof nc) 2>/dev/null; true")
        bob.run("kill $(pidof nc) $(pidof sleep) 2>/dev/null; true")
