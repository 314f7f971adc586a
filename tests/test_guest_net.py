"""Real guests talking through `vhostni run`: guest to guest on one daemon, and a guest behind a TAP uplink.

Every address here lives inside the guests or inside a network namespace these tests create: the guests' LAN
is 192.0.2.0/24 (TEST-NET-1) and the uplink's is 198.51.100.0/24 (TEST-NET-2).  The uplink daemon runs inside
its namespace, so the TAP it creates, and the host-side server behind it, never touch the root namespace.
"""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from vhostni.testing import VhostUserNic

pytestmark = pytest.mark.guest

LAN = "192.0.2"
UPNET = "198.51.100"
TEN_MB = 10 * 1024 * 1024


def ping_ok(g, addr: str, tries: int = 10) -> str:
    """Ping until one echo comes back (the first may be lost to ARP or a link still coming up)."""
    out, status = g.run(f"ok=1; for i in $(seq {tries}); do if ping -c 1 -W 2 {addr}; then ok=0; break; fi; "
                        f"done; [ $ok = 0 ]", timeout=tries * 3 + 10)
    assert status == 0, f"{g.name} cannot ping {addr}:\n{out}"
    return out


def md5_in(g, path: str) -> str:
    return g.check(f"md5sum < {path}").split()[0]


@pytest.fixture(scope="module")
def lan(vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir):
    """Guests a and b, each on an NI of one `vhostni run`."""
    socks = {n: str(vhostni_sockdir / f"{n}.sock") for n in ("a", "b")}
    daemon = vhostni_daemon_factory(socks, name="lan")
    a, b = vhostni_guest_factory.many([
        ("a", dict(nics=[VhostUserNic(socket=socks["a"])], ip=f"{LAN}.1/24")),
        ("b", dict(nics=[VhostUserNic(socket=socks["b"])], ip=f"{LAN}.2/24")),
    ])
    return daemon, a, b


def test_guests_ping_each_other(lan):
    daemon, a, b = lan
    ping_ok(a, f"{LAN}.2")
    ping_ok(b, f"{LAN}.1")
    out = a.check(f"ping -c 5 -i 0.2 -W 2 {LAN}.2", timeout=30)
    assert "5 packets received" in out, out
    assert daemon.alive


@pytest.mark.parametrize("src,dst", [("a", "b"), ("b", "a")])
def test_tcp_transfer_10mb_verified(lan, src, dst):
    """10 MB of random bytes over HTTP (busybox httpd -> wget), md5 computed on both ends."""
    _, a, b = lan
    g = {"a": a, "b": b}
    server, client = g[src], g[dst]
    server_ip = f"{LAN}.1" if src == "a" else f"{LAN}.2"
    server.check(f"mkdir -p /www && dd if=/dev/urandom of=/www/blob bs=1M count={TEN_MB >> 20} 2>/dev/null")
    server.check("pidof httpd >/dev/null || httpd -p 8080 -h /www")
    client.check("rm -f /tmp/recv")
    t = time.monotonic()
    client.check(f"wget -q -O /tmp/recv http://{server_ip}:8080/blob", timeout=180)
    elapsed = time.monotonic() - t
    assert client.check("stat -c %s /tmp/recv").strip() == str(TEN_MB)
    assert md5_in(server, "/www/blob") == md5_in(client, "/tmp/recv")
    print(f"10 MB {src} -> {dst}: {elapsed:.2f} s ({TEN_MB * 8 / elapsed / 1e6:.0f} Mbit/s incl. wget)")


def test_daemon_stops_cleanly_on_sigterm(lan):
    daemon, a, b = lan
    assert daemon.alive, f"vhostni died during the tests:\n{daemon.log_tail()}"
    status = daemon.stop()
    log = daemon.log_text()
    assert status == 0, f"vhostni exited with {status} on SIGTERM:\n{daemon.log_tail()}"
    assert "Traceback" not in log, log


# ---- a guest behind a TAP uplink -----------------------------------------------------------------------------

def wait_tcp(ns, addr: str, port: int, timeout: float = 15.0) -> None:
    probe = ("import socket,sys,time\n"
             "end=time.time()+float(sys.argv[3])\n"
             "while True:\n"
             "  try: socket.create_connection((sys.argv[1],int(sys.argv[2])),1).close(); break\n"
             "  except OSError:\n"
             "    if time.time()>end: sys.exit('nothing listens on %s:%s' % (sys.argv[1], sys.argv[2]))\n"
             "    time.sleep(0.1)\n")
    r = ns.run([sys.executable, "-c", probe, addr, str(port), str(timeout)])
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def uplinked(vhostni_netns, vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir, vhostni_logdir,
             tmp_path_factory):
    """Guest c on an NI whose switch has a TAP uplink; the TAP's host side is 198.51.100.1 in a namespace
    where an HTTP server runs."""
    ns = vhostni_netns("vniup")
    sock = str(vhostni_sockdir / "c.sock")
    daemon = vhostni_daemon_factory({"c": sock}, uplink="tap:vnup0", netns=ns, name="uplink")
    ns.wait_link("vnup0")
    ns.ip("addr", "add", f"{UPNET}.1/24", "dev", "vnup0")
    ns.ip("link", "set", "vnup0", "up")
    www = tmp_path_factory.mktemp("www")
    payload = os.urandom(3 * 1024 * 1024)
    (www / "payload.bin").write_bytes(payload)
    log = open(vhostni_logdir / "test_guest_net.uplink-httpd.log", "wb")
    srv = ns.popen([sys.executable, "-m", "http.server", "--bind", f"{UPNET}.1", "8080", "--directory", str(www)],
                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_tcp(ns, f"{UPNET}.1", 8080)
        c = vhostni_guest_factory("c", nics=[VhostUserNic(socket=sock)], ip=f"{UPNET}.2/24", gw=f"{UPNET}.1")
        yield ns, daemon, c, hashlib.md5(payload).hexdigest()
    finally:
        srv.terminate()
        srv.wait(10)
        log.close()


def test_guest_fetches_from_server_behind_uplink(uplinked):
    ns, daemon, c, md5 = uplinked
    ping_ok(c, f"{UPNET}.1")
    c.check(f"wget -q -O /tmp/payload http://{UPNET}.1:8080/payload.bin", timeout=120)
    assert md5_in(c, "/tmp/payload") == md5


def test_host_side_reaches_guest_through_uplink(uplinked):
    """A connection opened from the TAP side: the namespace fetches a file the guest serves."""
    ns, daemon, c, _ = uplinked
    c.check("mkdir -p /www && dd if=/dev/urandom of=/www/g.bin bs=1k count=1024 2>/dev/null")
    c.check("pidof httpd >/dev/null || httpd -p 8080 -h /www")
    guest_md5 = md5_in(c, "/www/g.bin")
    fetch = ("import hashlib,sys,urllib.request\n"
             "d=urllib.request.urlopen(sys.argv[1],timeout=60).read()\n"
             "print(len(d), hashlib.md5(d).hexdigest())\n")
    r = ns.run([sys.executable, "-c", fetch, f"http://{UPNET}.2:8080/g.bin"], timeout=120)
    assert r.returncode == 0, r.stderr
    size, md5 = r.stdout.split()
    assert (int(size), md5) == (1024 * 1024, guest_md5)
    assert daemon.alive
