"""A worm in a guest, contained by its network interface: the kind of test a project runs in its CI.

Two guests, alice and bob, are joined by vhostni.  alice's NI runs policy.toml (the Code-Red scanner vhostni
ships).  bob serves DNS and HTTP.  alice runs a worm (`worm`, a program in vhostni's guest image) that opens
TCP connections to random addresses without resolving any name.  The test asserts, from the daemon's alert
log and its counters, that the worm was detected and its connection attempts cut, while alice's normal
traffic (resolve a name, then fetch from it) still went through.

Everything comes from the installed vhostni package: the fixtures (its pytest plugin), the guest images
(built by the plugin on first use into ~/.cache/vhostni/images, or taken from $VHOSTNI_IMAGES), the daemon
and the scanner.  Run it as root (the scanners' sandbox uses user ids and network namespaces of its own).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vhostni.testing import VhostUserNic

pytestmark = pytest.mark.guest

HERE = Path(__file__).resolve().parent
LAN = "192.0.2"                 # TEST-NET-1: alice .1, bob .2
WORM_NET = "198.18.0.0/16"      # the worm's targets, routed to bob, who drops them
ALICE_MAC, BOB_MAC = "52:54:00:77:00:01", "52:54:00:77:00:02"     # as in policy.toml


def counters(stats_file: Path, ni: str) -> dict:
    """The NI's counters from the daemon's --stats-file, as written after now (it is rewritten every 250 ms)."""
    t0 = time.time()
    while True:
        try:
            s = json.loads(stats_file.read_text())
            if s["time"] > t0:
                return s["nis"][ni]
        except (OSError, ValueError):
            pass
        time.sleep(0.1)


@pytest.fixture(scope="module")
def lab(vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir, tmp_path_factory):
    work = tmp_path_factory.mktemp("lab")
    alerts, stats = work / "alerts.jsonl", work / "stats.json"
    socks = {name: str(vhostni_sockdir / f"{name}.sock") for name in ("alice", "bob")}
    vhostni_daemon_factory(socks, extra_args=["--policy", f"alice={HERE / 'policy.toml'}",
                                              "--alert-log", str(alerts), "--stats-file", str(stats)])
    alice, bob = vhostni_guest_factory.many([
        ("alice", dict(nics=[VhostUserNic(socks["alice"], mac=ALICE_MAC)], ip=f"{LAN}.1/24", dns=f"{LAN}.2")),
        ("bob", dict(nics=[VhostUserNic(socks["bob"], mac=BOB_MAC)], ip=f"{LAN}.2/24")),
    ])
    bob.check("mkdir -p /srv && echo hello-from-bob > /srv/index.html && httpd -p 80 -h /srv && "
              f"(dnsd www.test={LAN}.2 > /tmp/dnsd.log 2>&1 &) && sleep 1")
    alice.check(f"route add -net {WORM_NET} gw {LAN}.2")
    return alice, alerts, stats


def fetch_by_name(alice) -> str:
    return alice.check("ip=$(nslookup www.test | awk '/^Address: /{a=$2} END{print a}') && "
                       "timeout 10 wget -q -O - http://$ip/", timeout=30)


def test_worm_is_contained_and_normal_traffic_flows(lab):
    alice, alerts, stats = lab
    assert "hello-from-bob" in fetch_by_name(alice)
    before = counters(stats, "alice")

    # 60 connection attempts to random addresses at 10 a second, then 3 s for retransmissions
    alice.check(f"(worm -n 60 -r 10 -p 80 -w 3 -s 7 {WORM_NET} > /tmp/worm.log 2>&1 &)")
    time.sleep(3)
    assert "hello-from-bob" in fetch_by_name(alice), "normal traffic must flow during the attack"
    out = alice.check("for i in $(seq 30); do grep -q '^done:' /tmp/worm.log && break; sleep 1; done; "
                      "cat /tmp/worm.log", timeout=60)
    assert "sent 60 attempts" in out, out

    after = counters(stats, "alice")
    passed = after["held_passed"] - before["held_passed"]
    cut = after["held_cut"] - before["held_cut"]
    print(f"worm: {passed} connection attempts passed, {cut} cut")
    assert cut >= 40, f"the worm was not contained: {cut} SYNs cut, {passed} passed"
    assert passed <= 12, f"too many of the worm's SYNs passed: {passed}"

    records = [json.loads(line) for line in alerts.read_text().splitlines()]
    worm = [r for r in records
            if r["scanner"] == "codered" and r["ni"] == "alice" and r.get("fields", {}).get("count")]
    assert worm, f"no Code-Red alert for alice in the alert log: {records}"
    assert worm[0]["fields"]["last_port"] == 80
