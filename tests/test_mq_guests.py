"""Multi-queue virtio-net between real Linux guests (issue 14, item 4).

alice (4 queue pairs) and bob (2), each with 2 vCPUs, their channels set with ethtool.  Eight
TCP connections at once, four each way, their ends pinned to both vCPUs (the guest picks a
transmit queue by CPU, XPS) and their client ports fixed (the NI picks a receive queue by
connection): a stream scanner on alice's NI holds every connection and checks its bytes.
Asserted: each NI carried frames on more than one transmit and more than one receive queue;
every byte arrived intact (MD5 at both ends and in the scanner), in order; the NI's prevent
rule and its quarantine apply whatever queue a frame used.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nikit import wait_until
from qemu.qmp.legacy import QEMUMonitorProtocol

from vhostni.testing import VhostUserNic

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
LAN = "192.0.2"
HOST = {"alice": 1, "bob": 2}
QUEUES = {"alice": 4, "bob": 2}
SIZE = 1_000_000
BLOCKED = 7999
# (sender, receiver, server port, client port, vCPU of both ends)
CONNS = [(s, r, 7000 + i, 40000 + i, i % 2)
         for i, (s, r) in enumerate([("alice", "bob")] * 4 + [("bob", "alice")] * 4, start=1)]


def _wait(cond, timeout: float, what: str):
    """nikit.wait_until, polling the guests' consoles less often."""
    return wait_until(cond, timeout, what, interval=0.3)


@pytest.fixture(scope="module")
def lab(vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir, tmp_path_factory):
    work = tmp_path_factory.mktemp("mq")
    socks = {n: str(vhostni_sockdir / f"mq-{n}.sock") for n in HOST}
    scanner = {"name": "digest", "program": str(REPO / "tests" / "scanners" / "stream_digest.py"),
               "allow": [{"stream": True, "port": "7001-7008", "direction": "both", "contain": True}],
               "config": {"port": "7001-7008"}, "alerts_per_second": 100}
    pol = work / "alice.json"
    pol.write_text(json.dumps({
        "ni": {"hold_timeout_ms": 20000},
        "prevent": [{"direction": "from_guest", "proto": "tcp", "dport": BLOCKED}],
        "scanner": [scanner]}))
    alerts, stats, admin = work / "alerts.jsonl", work / "stats.json", str(vhostni_sockdir / "mq-admin.sock")
    daemon = vhostni_daemon_factory(socks, name="mq", extra_args=[
        "--policy", f"alice={pol}", "--alert-log", str(alerts), "--stats-file", str(stats),
        "--admin", f"unix:{admin}"])
    guests = vhostni_guest_factory.many([
        (n, dict(nics=[VhostUserNic(socket=socks[n], queues=QUEUES[n])], ip=f"{LAN}.{HOST[n]}/24", smp=2))
        for n in HOST])
    yield dict(daemon=daemon, alerts=alerts, stats=stats, admin=admin,
               **{g.name: g for g in guests})


def _alerts(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _stats(lab, after: float = 0.0) -> dict:
    """The stats file, once written after ``after`` (time.time())."""
    def read():
        try:
            s = json.loads(lab["stats"].read_text())
        except (OSError, ValueError):
            return None
        return s if s.get("time", 0) > after else None
    return _wait(read, 15, "a fresh stats file")


def _pairs(st: dict, ni: str) -> list[dict]:
    return st["nis"][ni]["queues"]


def _used(pairs: list[dict], before: list[dict], key: str) -> list[int]:
    return [p["pair"] for p, b in zip(pairs, before) if p[key] > b[key]]


def _set_channels(g, n: int) -> str:
    out, status = g.run("command -v ethtool")
    assert status == 0, "no ethtool in the guest image: it is stale, run `make images`"
    g.check(f"ethtool -L eth0 combined {n}")
    out = g.check("ethtool -l eth0; ls /sys/class/net/eth0/queues")
    assert f"rx-{n - 1}" in out and f"rx-{n}" not in out, out
    return out


def test_ethtool_sets_channels_and_the_ni_sees_them(lab):
    alice, bob = lab["alice"], lab["bob"]
    out = _set_channels(alice, 3)
    assert "Combined:\t4" in out, out                     # the maximum the device offers
    t = time.time()
    assert [p["ready"] for p in _pairs(_stats(lab, t), "alice")] == [True, True, True, False]
    _set_channels(alice, 4)
    _set_channels(bob, 2)
    t = time.time()
    st = _stats(lab, t)
    assert [p["ready"] for p in _pairs(st, "alice")] == [True] * 4
    assert [p["ready"] for p in _pairs(st, "bob")] == [True] * 2


def test_connections_both_ways_over_every_queue_held_and_intact(lab):
    alice, bob, alerts = lab["alice"], lab["bob"], lab["alerts"]
    g = {"alice": alice, "bob": bob}
    for n, q in QUEUES.items():
        if f"rx-{q - 1}" not in g[n].check("ls /sys/class/net/eth0/queues"):
            _set_channels(g[n], q)
    _wait(lambda: any(a["message"] == "ready" for a in _alerts(alerts)), 30, "the scanner to subscribe")
    closed0 = len([a for a in _alerts(alerts) if a["message"] == "closed"])
    before = _stats(lab)
    want = {}
    for s, r, port, cport, cpu in CONNS:
        want[port] = g[s].check(f"head -c {SIZE} /dev/urandom > /tmp/d{port}; md5sum < /tmp/d{port}").split()[0]
        # busybox nc leaves at its stdin's EOF: keep the listener's stdin open (it leaves at
        # the socket's EOF then; the pipeline does not, so the rc is written inside it)
        g[r].check(f"rm -f /tmp/g{port} /tmp/r{port}; ((sleep 300 | (taskset -c {cpu} nc -l -p {port} "
                   f"> /tmp/g{port}; echo rc=$? > /tmp/r{port})) &)")
    time.sleep(0.5)
    t0 = time.monotonic()
    for s, r, port, cport, cpu in CONNS:
        g[s].check(f"rm -f /tmp/s{port}; ((taskset -c {cpu} nc -p {cport} {LAN}.{HOST[r]} {port} "
                   f"< /tmp/d{port}; echo rc=$? > /tmp/s{port}) &)")
    for s, r, port, _, _ in CONNS:
        for who, f in ((r, "r"), (s, "s")):
            _wait(lambda: "rc=" in g[who].run(f"cat /tmp/{f}{port} 2>/dev/null")[0], 60,
                  f"the transfer on {port} ({who})")
            assert "rc=0" in g[who].check(f"cat /tmp/{f}{port}"), f"{who}, port {port}"
        got = g[r].check(f"md5sum < /tmp/g{port}")
        assert got.split()[0] == want[port], f"port {port}: {got}"
    elapsed = time.monotonic() - t0
    # the scanner held every connection and saw each one's bytes, in order
    closed = _wait(lambda: (c := [a for a in _alerts(alerts) if a["message"] == "closed"][closed0:])
                   and len(c) >= len(CONNS) and c, 30, "the scanner's close reports")
    by_port = {a["fields"]["tuple"][4]: a["fields"] for a in closed}
    assert sorted(by_port) == [c[2] for c in CONNS]
    for s, r, port, _, _ in CONNS:
        f = by_port[port]
        d = "from_guest" if s == "alice" else "to_guest"
        assert (f[d], f[f"{d}_md5"], f["gaps"], f["reason"]) == (SIZE, want[port], 0, "fin"), f
    # more than one transmit and more than one receive queue carried frames on each NI
    after = _stats(lab, time.time())
    for ni in HOST:
        p, b = _pairs(after, ni), _pairs(before, ni)
        tx, rx = _used(p, b, "in_frames"), _used(p, b, "out_frames")
        print(f"{ni}: tx pairs {tx}, rx pairs {rx}: {p}")
        assert len(tx) > 1 and len(rx) > 1, (ni, p)
        st = after["nis"][ni]
        assert sum(q["in_frames"] for q in p) >= st["in_frames"] > 0
        assert sum(q["out_frames"] for q in p) == st["out_frames"]
    held = after["nis"]["alice"]["tcp_held_segments"] - before["nis"]["alice"]["tcp_held_segments"]
    assert held > 0
    print(f"{len(CONNS)} x {SIZE} bytes in {elapsed:.1f} s; {held} segments held")


def _attempts(g, port: int) -> None:
    """Connection attempts from both vCPUs, several each (their frames take both queues)."""
    g.run("for c in 0 1 0 1 0 1; do (taskset -c $c timeout 2 nc -w 1 "
          f"{LAN}.2 {port} < /dev/null > /dev/null 2>&1 &); done; sleep 2.5", timeout=30)


def test_prevent_rule_and_quarantine_apply_on_every_queue(lab):
    alice, bob = lab["alice"], lab["bob"]
    bob.check(f"rm -f /tmp/blocked; ((sleep 60 | nc -l -p {BLOCKED} > /tmp/blocked) &)")
    before = _stats(lab, time.time())
    _attempts(alice, BLOCKED)
    after = _stats(lab, time.time())
    a0, a1 = before["nis"]["alice"], after["nis"]["alice"]
    tx = _used(_pairs(after, "alice"), _pairs(before, "alice"), "in_frames")
    assert len(tx) > 1, (tx, _pairs(after, "alice"))
    assert a1["drop_prevented"] - a0["drop_prevented"] >= 6
    assert bob.check("wc -c < /tmp/blocked").split()[-1] == "0"
    # quarantine: nothing passes, whatever the queue, either way
    q = QEMUMonitorProtocol(lab["admin"])
    q.connect()
    try:
        q.cmd("ni-quarantine", name="alice", reason="test")
        before = _stats(lab, time.time())
        _attempts(alice, 7001)
        out, status = bob.run(f"ping -c 3 -W 1 {LAN}.1", timeout=20)
        assert status != 0, out
        after = _stats(lab, time.time())
        a0, a1 = before["nis"]["alice"], after["nis"]["alice"]
        assert len(_used(_pairs(after, "alice"), _pairs(before, "alice"), "in_frames")) > 1
        assert a1["drop_quarantine"] - a0["drop_quarantine"] >= 6 + 3
        assert a1["out_frames"] == a0["out_frames"]
    finally:
        q.cmd("ni-release", name="alice")
        q.close()
    out, status = bob.run(f"ping -c 2 -W 2 {LAN}.1", timeout=20)
    assert status == 0, out
