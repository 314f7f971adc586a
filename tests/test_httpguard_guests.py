"""The HTTP overflow stage between real guests (issue 13, item 4).

Guest `bob` serves a web site with busybox `httpd -vv` (which logs every URL it is asked for) on
port 80, the same site on port 8000 (not guarded: the latency baseline), and on port 8080 a raw
`nc -l` listener that records every byte it receives.  bob's NI runs the HTTP overflow stage from
examples/httpguard.toml as it ships (block = "reply": the policy's 400 in the server's place).
Guest `alice` browses with busybox `wget` and sends Code-Red's request (as the worm did: the
request line, its headers and 3379 bytes of body) with busybox `nc`.

What this checks:

* normal requests are answered: a page, a long but allowed query, a short /default.ida query;
* Code-Red and Code-Red II never reach httpd (its log has no trace of them) and alice gets the
  400; the alert names the signature, the field, its length and the limit;
* the raw listener receives nothing of Code-Red's request, and (the control) the bytes of a
  normal request when one is sent the same way;
* Code-Red pipelined behind a normal request in one segment: the normal one is answered, the
  worm's is not received;
* browsing goes on afterwards; and `make demo-http` passes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vhostni.testing import VhostUserNic

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
LAN = "198.51.100"
ALICE_MAC = "52:54:00:81:01:01"
BOB_MAC = "52:54:00:81:01:02"
PAGE = b"<h1>bob's page</h1>\n"


def _alerts(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _overflows(path: Path) -> list[dict]:
    return [a for a in _alerts(path) if a["scanner"] == "httpguard" and a["fields"].get("event") == "overflow"]


def _wait(cond, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def http_lab(vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir, tmp_path_factory):
    from vhostni.demo_http import codered_request
    work = tmp_path_factory.mktemp("httpguard")
    text = (REPO / "examples" / "httpguard.toml").read_text()
    assert 'program = "../scanners/httpguard"' in text and 'block = "reply"' in text
    policy = work / "bob.toml"
    policy.write_text(text.replace('program = "../scanners/httpguard"', f'program = "{REPO / "scanners" / "httpguard"}"'))
    alerts = work / "alerts.jsonl"
    socks = {n: str(vhostni_sockdir / f"hg-{n}.sock") for n in ("alice", "bob")}
    vhostni_daemon_factory(socks, name="httpguard", extra_args=["--policy", f"bob={policy}", "--alert-log", str(alerts)])
    alice, bob = vhostni_guest_factory.many([
        ("alice", dict(nics=[VhostUserNic(socket=socks["alice"], mac=ALICE_MAC)], ip=f"{LAN}.1/24")),
        ("bob", dict(nics=[VhostUserNic(socket=socks["bob"], mac=BOB_MAC)], ip=f"{LAN}.2/24")),
    ])
    bob.check("mkdir -p /www")
    bob.put_file("/www/index.html", PAGE)
    bob.check("(httpd -f -vv -p 80 -h /www 2> /tmp/httpd.log &); (httpd -f -p 8000 -h /www &); sleep 0.5")
    alice.put_file("/tmp/cr1.req", codered_request(b"N"))
    alice.put_file("/tmp/cr2.req", codered_request(b"X"))
    get = f"GET /index.html HTTP/1.0\r\nHost: {LAN}.2\r\n\r\n".encode()
    alice.put_file("/tmp/get.req", get)
    alice.put_file("/tmp/pipelined.req", get + codered_request(b"N"))
    ready = _wait(lambda: [a for a in _alerts(alerts) if a["message"] == "http guard ready"], "the guard is ready")
    assert ready[0]["ni"] == "bob" and ready[0]["fields"]["reply"] == "bad_request"
    yield dict(alice=alice, bob=bob, alerts=alerts, get=get)


def _wget(g, url: str, timeout: int = 30) -> tuple[str, int]:
    return g.run(f"timeout {timeout} wget -q -O - '{url}' 2>&1", timeout=timeout + 10)


def _httpd_urls(bob) -> list[str]:
    return [line.split("url:", 1)[1] for line in bob.run("cat /tmp/httpd.log")[0].splitlines() if "url:" in line]


def test_normal_requests_are_answered(http_lab):
    alice, bob = http_lab["alice"], http_lab["bob"]
    for url in (f"http://{LAN}.2/index.html", f"http://{LAN}.2/index.html?q={'x' * 700}"):
        out, rc = _wget(alice, url)
        assert rc == 0 and out.strip() == PAGE.decode().strip(), out
    out, rc = _wget(alice, f"http://{LAN}.2/default.ida?q=short")     # within the limit: httpd's 404
    assert rc != 0 and "404" in out, out
    assert "/default.ida" in _httpd_urls(bob)
    assert not _overflows(http_lab["alerts"])


@pytest.mark.parametrize("req,fill", [("/tmp/cr1.req", "N"), ("/tmp/cr2.req", "X")], ids=["codered", "codered2"])
def test_codered_never_reaches_the_web_server(http_lab, req, fill):
    alice, bob, alerts = http_lab["alice"], http_lab["bob"], http_lab["alerts"]
    before = len(_overflows(alerts))
    urls = _httpd_urls(bob)
    out = alice.check(f"timeout 5 nc {LAN}.2 80 < {req}; true", timeout=20)
    assert "HTTP/1.1 400 Bad Request" in out and "blocked by the network interface" in out, out
    a = _wait(lambda: _overflows(alerts)[before:], "the overflow alert")[0]
    f = a["fields"]
    assert a["ni"] == "bob" and (f["signature"], f["field"], f["length"], f["limit"], f["action"]) == (
        "iis-ida-codered", "query", 252, 200, "reply"), f
    assert f["uri"].startswith("/default.ida?" + fill * 224 + "%u9090") and f["direction"] == "inbound"
    assert _httpd_urls(bob) == urls                 # httpd was asked nothing


def test_a_raw_listener_receives_none_of_the_worm_and_all_of_a_normal_request(http_lab):
    alice, bob, get = http_lab["alice"], http_lab["bob"], http_lab["get"]
    for req, want in (("/tmp/cr1.req", b""), ("/tmp/get.req", get)):
        bob.check("rm -f /tmp/raw; (timeout 15 nc -l -p 8080 > /tmp/raw &); sleep 0.3")
        alice.run(f"timeout 4 nc {LAN}.2 8080 < {req}", timeout=20)
        time.sleep(0.5)
        size = int(bob.check("wc -c < /tmp/raw").strip())
        assert size == len(want), (req, size)
        if want:
            assert bob.check("cat /tmp/raw").replace("\r", "").strip() == want.decode().replace("\r", "").strip()
        bob.run("kill $(pidof nc) 2>/dev/null; true")


def test_codered_pipelined_behind_a_normal_request(http_lab):
    """One segment with a normal request and the worm's behind it: httpd answers the first (and,
    as busybox httpd does, closes); nothing of the worm's reaches it."""
    alice, bob, alerts = http_lab["alice"], http_lab["bob"], http_lab["alerts"]
    before = len(_overflows(alerts))
    n = len(_httpd_urls(bob))
    out = alice.check(f"timeout 5 nc {LAN}.2 80 < /tmp/pipelined.req; true", timeout=20)
    assert "bob's page" in out, out
    _wait(lambda: _overflows(alerts)[before:], "the overflow alert")
    assert _httpd_urls(bob)[n:] == ["/index.html"]


def test_browsing_goes_on_and_its_cost(http_lab):
    alice = http_lab["alice"]
    for _ in range(3):
        out, rc = _wget(alice, f"http://{LAN}.2/index.html")
        assert rc == 0 and "bob's page" in out, out
    # wget's time in the guest through the guard (port 80) and past it (port 8000): 20 requests
    # timed by /proc/uptime (10 ms ticks), alternating, best of 3 rounds
    best: dict = {}
    for _ in range(3):
        for p in ("8000", "80"):
            a, b = alice.check(f"a=$(cut -d' ' -f1 /proc/uptime); for i in $(seq 20); do wget -q -O /dev/null "
                               f"http://{LAN}.2:{p}/index.html || exit 1; done; echo $a $(cut -d' ' -f1 /proc/uptime)",
                               timeout=300).split()
            best[p] = min(best.get(p, 1e9), (float(b) - float(a)) / 20)
    print(f"wget of a page in a TCG guest: {best['8000'] * 1e3:.0f} ms past the guard, "
          f"{best['80'] * 1e3:.0f} ms through it")


def test_the_http_demo_passes(tmp_path, vhostni_images):
    """`make demo-http` (vhostni/demo_http.py) with its own daemon and guests."""
    from vhostni import demo_http
    images = str(Path(vhostni_images.kernel).parent)
    assert demo_http.main(["--images", images, "--logs", str(tmp_path / "logs")]) == 0
