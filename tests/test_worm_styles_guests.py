"""Worms that scan the ways real ones do, in a real guest, contained by its NI; normal traffic untouched; a SYN
bomb's victim repaired.  Boots two guests once for the module.

Guest `alice` is "infected": guests/worm.c scans with UDP datagrams (Slammer), ICMP echo requests, PTR-laundered
addresses (reverse then forward lookups) and slowly, and SYN-bombs bob.  Her NI runs the widened worm scanner
and the SYN-bomb detector (examples/codered.toml and examples/synbomb.toml, together).  Guest `bob` is the
router toward the worm's targets (198.18.0.0/16, which he drops: `InAddrErrors` in his /proc/net/snmp counts
every probe that got out), the DNS server (guests/dnsd.c over UDP and TCP, with a synthesised reverse zone),
a web server on four addresses, and the SYN bomb's victim.

Last, bob port-scans alice: her NI's TRW detector blocks him.

Guest `carol`'s NI runs the worm scanner in strict mode (``unknown = "queue"``): a slow worm on her, below every
threshold, gets no probe out, while a name resolved and a peer that came first connect at once and an address
nothing vouched for connects once it has waited its turn in the delay queue.

Normal traffic, checked while the worm is contained: a name resolved over UDP then connected to, a name
resolved only over TCP/53 then connected to, a peer (one of bob's addresses nothing resolved) that pinged alice
first and that she then connects to: each connects at once.
"""
from __future__ import annotations

import json
import re
import time
import tomllib
from pathlib import Path

import pytest

from vhostni.testing import VhostUserNic

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
LAN = "192.0.2"
WORM_NET = "198.18.0.0/16"
ALICE_MAC = "52:54:00:78:00:01"
BOB_MAC = "52:54:00:78:00:02"
BOMB_SRC = f"{LAN}.11"        # alice's in her policy, not configured on her interface
CAROL = f"{LAN}.6"
CAROL_MAC = "52:54:00:78:00:03"
STRICT_TICK = 20.0            # carol's queue_interval: shorter than the default 120 s, for the test's sake


def toml_value(v) -> str:
    return json.dumps(v)      # strings, numbers, booleans and lists of them read the same in TOML


def policy_text() -> str:
    """examples/codered.toml, synbomb.toml and trw.toml (inbound only) as one policy for alice."""
    cod = tomllib.loads((REPO / "examples" / "codered.toml").read_text())
    bomb = tomllib.loads((REPO / "examples" / "synbomb.toml").read_text())
    cod["scanner"][0]["config"].update(attack_duration=5.0)          # re-evaluate (and alert) often
    bomb["scanner"][0]["config"].update(max_half_open=3)            # httpd's small listen backlog
    trw = tomllib.loads((REPO / "examples" / "trw.toml").read_text())
    trw["scanner"][0]["config"].update(outbound=False)               # here: remote hosts scanning alice
    out = [f'[ni]\nmac = "{ALICE_MAC}"\naddresses = ["{LAN}.1/32", "{BOMB_SRC}/32"]\nanti_spoof = true\n'
           'hold_timeout_ms = 2000\ndefault_decision = "cut"\n']
    for sc in cod["scanner"] + bomb["scanner"] + trw["scanner"]:
        out.append("[[scanner]]")
        for k in ("name", "resets"):
            if k in sc:
                out.append(f"{k} = {toml_value(sc[k])}")
        out.append(f'program = "{REPO / "scanners" / "codered"}"')
        out.append("[scanner.config]")
        out += [f"{k} = {toml_value(v)}" for k, v in sc["config"].items()]
        for a in sc["allow"]:
            out.append("[[scanner.allow]]")
            out += [f"{k} = {toml_value(v)}" for k, v in a.items()]
        out.append("")
    return "\n".join(out)


def strict_policy_text() -> str:
    """examples/codered.toml in strict mode, for carol."""
    cod = tomllib.loads((REPO / "examples" / "codered.toml").read_text())
    [sc] = cod["scanner"]
    sc["config"].update(unknown="queue", queue_interval=STRICT_TICK, resolvers=[f"{LAN}.2/32"])
    out = [f'[ni]\nmac = "{CAROL_MAC}"\naddresses = ["{CAROL}/32"]\nanti_spoof = true\n'
           'hold_timeout_ms = 2000\ndefault_decision = "cut"\n', "[[scanner]]",
           f"name = {toml_value(sc['name'])}", f'program = "{REPO / "scanners" / "codered"}"', "[scanner.config]"]
    out += [f"{k} = {toml_value(v)}" for k, v in sc["config"].items()]
    for a in sc["allow"]:
        out.append("[[scanner.allow]]")
        out += [f"{k} = {toml_value(v)}" for k, v in a.items()]
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def world(vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir, tmp_path_factory):
    work = tmp_path_factory.mktemp("styles")
    policy = work / "alice.toml"
    policy.write_text(policy_text())
    strict = work / "carol.toml"
    strict.write_text(strict_policy_text())
    alerts = work / "alerts.jsonl"
    socks = {n: str(vhostni_sockdir / f"s{n}.sock") for n in ("alice", "bob", "carol")}
    vhostni_daemon_factory(socks, name="styles", extra_args=["--policy", f"alice={policy}",
                                                             "--policy", f"carol={strict}",
                                                             "--alert-log", str(alerts)])
    alice, bob, carol = vhostni_guest_factory.many([
        ("alice", dict(nics=[VhostUserNic(socket=socks["alice"], mac=ALICE_MAC)], ip=f"{LAN}.1/24",
                       dns=f"{LAN}.2")),
        ("bob", dict(nics=[VhostUserNic(socket=socks["bob"], mac=BOB_MAC)], ip=f"{LAN}.2/24")),
        ("carol", dict(nics=[VhostUserNic(socket=socks["carol"], mac=CAROL_MAC)], ip=f"{CAROL}/24",
                       dns=f"{LAN}.2")),
    ])
    bob.check(f"for a in 3 4 5; do ip addr add {LAN}.$a/24 dev eth0; done; "
              f"arp -s {BOMB_SRC} {ALICE_MAC}; "
              "mkdir -p /srv && echo hello-from-bob > /srv/index.html && httpd -p 80 -h /srv && "
              f"(dnsd -t -r rev.test www.test={LAN}.5 tcponly.test={LAN}.3 > /tmp/dnsd.log 2>&1 &)")
    bob.check("for i in $(seq 50); do grep -q serving /tmp/dnsd.log && break; sleep 0.1; done; "
              "grep serving /tmp/dnsd.log")
    alice.check(f"route add -net {WORM_NET} gw {LAN}.2")
    # the scanners are up once a lookup through alice's NI works
    deadline = time.monotonic() + 30
    while "connected" not in alice.run(f"worm -m lookup -d {LAN}.2 -p 80 www.test", timeout=20)[0]:
        assert time.monotonic() < deadline, "alice cannot resolve and connect through her NI"
        time.sleep(1)
    carol.check(f"route add -net {WORM_NET} gw {LAN}.2")
    return {"alice": alice, "bob": bob, "carol": carol, "alerts": alerts}


@pytest.fixture(scope="module")
def lab(world):
    return world["alice"], world["bob"], world["alerts"]


def escaped(bob) -> int:
    """Packets that reached bob for the worm's prefix (he does not forward: each counts as InAddrErrors)."""
    out = bob.check("awk '/^Ip:/ {n++; if (n == 1) for (i = 1; i <= NF; i++) h[$i] = i; "
                    "else print $h[\"InAddrErrors\"]}' /proc/net/snmp")
    return int(out.strip().splitlines()[-1])


def codered_alerts(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines())
            if r["scanner"] == "codered" and r.get("fields", {}).get("event") in ("attack_detected",
                                                                                   "attack_continues")]


def wait_alert(path: Path, pred, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        for r in (json.loads(line) for line in (path.read_text().splitlines() if path.exists() else [])):
            if pred(r):
                return r
        assert time.monotonic() < deadline, "no such alert"
        time.sleep(0.3)


def run_worm(alice, args: str, timeout: float = 120) -> str:
    out = alice.check(f"worm {args} > /tmp/worm.log 2>&1; tail -2 /tmp/worm.log", timeout=timeout)
    assert "sent" in out or "done" in out, out
    return out


def normal_traffic(alice, bob) -> dict:
    """Seconds each normal connection took; each must connect."""
    took = {}
    t0 = time.monotonic()
    out = alice.check(f"worm -m lookup -d {LAN}.2 -p 80 www.test", timeout=30)
    took["dns_udp"] = time.monotonic() - t0
    assert f"connected 1 {LAN}.5:80" in out, out
    t0 = time.monotonic()
    out = alice.check(f"worm -m lookup -T -d {LAN}.2 -p 80 tcponly.test", timeout=30)
    took["dns_tcp"] = time.monotonic() - t0
    assert f"connected 1 {LAN}.3:80" in out, out
    bob.check(f"ping -c 1 -W 2 -I {LAN}.4 {LAN}.1")       # a peer that contacts alice first
    t0 = time.monotonic()
    out = alice.check(f"timeout 10 wget -q -O - http://{LAN}.4/", timeout=30)
    took["inbound_peer"] = time.monotonic() - t0
    assert "hello-from-bob" in out, out
    return took


def test_normal_traffic_before_any_worm(lab):
    alice, bob, alerts = lab
    took = normal_traffic(alice, bob)
    assert max(took.values()) < 5, took
    assert codered_alerts(alerts) == []


@pytest.mark.parametrize("style, args, proto", [
    ("udp", "-m udp -n 60 -r 10 -s 11", "udp"),
    ("icmp", "-m icmp -n 60 -r 10 -s 12", "icmp"),
    ("ptr", f"-m ptr -d {LAN}.2 -n 40 -r 10 -p 80 -w 3 -s 13", "tcp"),
    ("slow", "-m tcp -n 5 -r 0.2 -p 80 -w 8 -s 14", "tcp"),
])
def test_scanning_style_is_contained(lab, style, args, proto):
    alice, bob, alerts = lab
    n = int(re.search(r"-n (\d+)", args).group(1))
    before, t0 = escaped(bob), time.time()
    out = run_worm(alice, f"{args} {WORM_NET}")
    got_out = escaped(bob) - before
    print(f"{style}: {got_out} of {n} probes' packets reached the network; {out!r}")
    if style != "slow":
        # an alert (detection, or the re-evaluation of an attack going on) names this style's protocol
        wait_alert(alerts, lambda r: r["scanner"] == "codered" and r["time"] >= t0
                   and r.get("fields", {}).get("last_proto") == proto)
        # before detection at most max_per_second + ... new destinations pass; in attack mode none at once
        assert got_out <= 4, f"{style}: {got_out} of {n} probes got out"
    else:
        # a slow scanner in attack mode: no first probe passes; a released destination's retransmission may
        assert got_out <= 3, f"slow: {got_out} packets of {n} probes got out"
    if style == "udp":
        # and the normal traffic meanwhile is not delayed
        took = normal_traffic(alice, bob)
        print(f"normal traffic during the attack: {took}")
        assert max(took.values()) < 5, took


def test_syn_bomb_is_stopped_and_the_victim_repaired(lab):
    alice, bob, alerts = lab

    # httpd listens on [::]:80, so its connections from IPv4 clients are in /proc/net/tcp6
    count = "echo half-open $(cat /proc/net/tcp /proc/net/tcp6 | awk '$4 == \"03\" && $2 ~ /:0050$/' | wc -l)"

    def half_open() -> int:
        return int(re.findall(r"half-open (\d+)", bob.check(count))[-1])

    assert half_open() == 0
    t0 = time.time()
    alice.check(f"(worm -m synbomb -S {BOMB_SRC} -n 30 -r 10 -p 80 {LAN}.2/32 > /tmp/bomb.log 2>&1 &)")
    # the victim's half-open connections, sampled while the bomb goes on (the most seen at once)
    out = bob.check(f"for i in $(seq 8); do {count}; sleep 0.25; done", timeout=30)
    during = max(int(x) for x in re.findall(r"half-open (\d+)", out))
    a = wait_alert(alerts, lambda r: r["scanner"] == "synbomb" and r["time"] >= t0
                   and r.get("fields", {}).get("event") == "syn_bomb")
    assert a["fields"]["victim"] == f"{LAN}.2" and a["fields"]["guest"] == BOMB_SRC
    alice.check("for i in $(seq 60); do grep -q '^done' /tmp/bomb.log && break; sleep 0.5; done; "
                "grep '^done' /tmp/bomb.log", timeout=60)
    time.sleep(3)       # the last SYN-ACKs retransmit after 1 s: each is reset as it comes
    after = half_open()
    print(f"SYN bomb: {during} half-open connections on the victim during the bomb, {after} after; alert: "
          f"{a['message']}")
    assert during >= 2, "the bomb left no half-open connections to repair"
    assert after == 0, f"{after} half-open connections left on the victim"


def test_a_remote_port_scanner_is_blocked(lab):
    alice, bob, alerts = lab
    alice.check("mkdir -p /www && echo hello-from-alice > /www/index.html && httpd -p 8080 -h /www")
    assert "hello-from-alice" in bob.check(f"timeout 10 wget -q -O - http://{LAN}.1:8080/", timeout=30)
    t0 = time.time()
    # a connect scan of alice's closed ports from bob: her stack answers each with a RST
    bob.check(f"for p in $(seq 20 29); do timeout 2 nc {LAN}.1 $p </dev/null; done; true", timeout=60)
    a = wait_alert(alerts, lambda r: r["scanner"] == "trw" and r["time"] >= t0
                   and r.get("fields", {}).get("event") == "scan_detected")
    assert a["fields"]["direction"] == "inbound" and a["fields"]["source"] == f"{LAN}.2"
    # its earlier successful connection walked the ratio down by 4: a fifth failure decides
    assert (a["fields"]["successes"], a["fields"]["failures"]) == (1, 5)
    # now bob cannot reach alice's open port either; the guest's other peers could
    out, status = bob.run(f"timeout 5 wget -q -O - http://{LAN}.1:8080/", timeout=30)
    assert status != 0 and "hello-from-alice" not in out


# ---- carol: strict mode ----------------------------------------------------------------------------------------


def test_strict_mode_vouched_traffic_flows_and_an_address_nothing_vouched_for_waits_its_turn(world):
    carol, bob = world["carol"], world["bob"]
    # the scanner is up once a resolved name connects
    deadline = time.monotonic() + 30
    while "connected" not in carol.run(f"worm -m lookup -d {LAN}.2 -p 80 www.test", timeout=20)[0]:
        assert time.monotonic() < deadline, "carol cannot resolve and connect through her NI"
        time.sleep(1)
    t0 = time.monotonic()
    out = carol.check(f"worm -m lookup -d {LAN}.2 -p 80 www.test", timeout=30)
    assert f"connected 1 {LAN}.5:80" in out and time.monotonic() - t0 < 5, out
    # a peer that came first is known at once
    bob.check(f"ping -c 1 -W 2 -I {LAN}.4 {CAROL}")
    t0 = time.monotonic()
    assert "hello-from-bob" in carol.check(f"timeout 10 wget -q -O - http://{LAN}.4/", timeout=30)
    assert time.monotonic() - t0 < 5
    # bob's .3 was neither resolved for carol nor did it contact her: its SYNs are held until the queue's
    # tick releases it, then a retry connects
    t0 = time.monotonic()
    out = carol.check(f"for i in $(seq 20); do if timeout 4 wget -q -O - http://{LAN}.3/; then echo tries $i; "
                      "break; fi; done", timeout=150)
    took = time.monotonic() - t0
    print(f"direct address: {out.strip()!r} after {took:.1f} s")
    assert "hello-from-bob" in out and int(re.search(r"tries (\d+)", out).group(1)) >= 2, out
    assert STRICT_TICK - 1 <= took <= 3 * STRICT_TICK, took


def test_strict_mode_a_slow_worm_below_every_threshold_gets_nothing_out(world):
    carol, bob, alerts = world["carol"], world["bob"], world["alerts"]
    # three probes, one every 5 s: under max_per_second, max_per_minute and max_per_10_minutes, so no
    # detection; each SYN and its retransmissions are held all the same, and the worm has closed its
    # sockets (10 s) before the queue's first release (20 s after its first probe)
    before, wall0 = escaped(bob), time.time()
    out = run_worm(carol, f"-m tcp -n 3 -r 0.2 -p 80 -s 15 {WORM_NET}")
    time.sleep(1)
    assert escaped(bob) - before == 0, out
    assert not [r for r in codered_alerts(alerts) if r["time"] >= wall0 and r.get("ni") == "carol"]
