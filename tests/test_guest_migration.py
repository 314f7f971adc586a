"""Live migration of a real guest between two QEMUs on this host, both on one `vhostni run`.

Guest a streams a file to guest b over TCP (busybox httpd CGI -> wget) while QEMU migrates a
(QMP ``migrate`` over a unix socket, TCG, memory-backend-memfd share=on on both sides; the
destination QEMU joins the same NI socket).  The connection must survive and every byte
arrive (md5 on both ends); the NI's quarantine must follow the guest.  Addresses are
TEST-NET-1 (192.0.2.0/24), inside the guests only.
"""
from __future__ import annotations

import time

import pytest

from vhostni.testing import VhostUserNic
from vhostni.testing.guest import qmp_command

pytestmark = pytest.mark.guest

LAN = "192.0.2"
CHUNKS = 40           # the stream: the 1 MiB blob CHUNKS times, paced to last ~20 s

STREAM_CGI = f"""#!/bin/sh
echo "Content-Type: application/octet-stream"
echo
for i in $(seq {CHUNKS}); do cat /www/blob; sleep 0.5; done
"""


@pytest.fixture(scope="module")
def lan(vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir):
    socks = {n: str(vhostni_sockdir / f"{n}.sock") for n in ("a", "b")}
    admin = str(vhostni_sockdir / "admin.sock")
    daemon = vhostni_daemon_factory(socks, name="mig", extra_args=["--admin", f"unix:{admin}"])
    a, b = vhostni_guest_factory.many([
        ("a", dict(nics=[VhostUserNic(socket=socks["a"])], ip=f"{LAN}.1/24", qmp=True)),
        ("b", dict(nics=[VhostUserNic(socket=socks["b"])], ip=f"{LAN}.2/24")),
    ])
    return daemon, admin, a, b


def ni_info(admin: str, name: str) -> dict:
    """query-nis's entry for NI ``name``, its counters merged in."""
    ni = next(n for n in qmp_command(admin, "query-nis") if n["name"] == name)
    return {**ni, **ni["counters"]}


def ping_ok(g, addr: str, tries: int = 10) -> None:
    out, status = g.run(f"ok=1; for i in $(seq {tries}); do if ping -c 1 -W 2 {addr}; then ok=0; break; fi; "
                        f"done; [ $ok = 0 ]", timeout=tries * 3 + 10)
    assert status == 0, f"{g.name} cannot ping {addr}:\n{out}"


def test_tcp_stream_survives_live_migration(lan):
    daemon, admin, a, b = lan
    ping_ok(a, f"{LAN}.2")
    a.check("mkdir -p /www/cgi-bin && dd if=/dev/urandom of=/www/blob bs=1M count=1 2>/dev/null")
    a.put_file("/www/cgi-bin/stream", STREAM_CGI.encode(), mode=0o755)
    want = a.check(f"for i in $(seq {CHUNKS}); do cat /www/blob; done | md5sum").split()[0]
    a.check("pidof httpd >/dev/null || httpd -p 8080 -h /www")
    b.check("rm -f /tmp/recv /tmp/wget.rc")
    b.check(f"(wget -q -O /tmp/recv http://{LAN}.1:8080/cgi-bin/stream; echo $? > /tmp/wget.rc) "
            ">/dev/null 2>&1 &")
    # the stream is under way before the migration starts
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        size = int(b.check("stat -c %s /tmp/recv 2>/dev/null || echo 0").strip() or 0)
        if size > 0:
            break
        time.sleep(0.5)
    assert size > 0, "the stream did not start"
    sessions = ni_info(admin, "a")["sessions"]
    info = a.migrate(timeout=240)
    print(f"migration: {info.get('total-time')} ms total, downtime {info.get('downtime')} ms, "
          f"{info.get('ram', {}).get('transferred', 0) >> 20} MiB transferred")
    ni = ni_info(admin, "a")
    assert ni["handovers"] == 1, ni
    assert ni["sessions"] == sessions + 1
    assert ni["broken"] is None
    at_migration = int(b.check("stat -c %s /tmp/recv").strip())
    assert at_migration < CHUNKS << 20, "the stream ended before the migration: nothing tested"
    # the same TCP connection carries on to the end
    b.check("while [ ! -e /tmp/wget.rc ]; do sleep 1; done", timeout=180)
    assert b.check("cat /tmp/wget.rc").strip() == "0"
    assert b.check("stat -c %s /tmp/recv").strip() == str(CHUNKS << 20)
    assert b.check("md5sum < /tmp/recv").split()[0] == want
    ping_ok(b, f"{LAN}.1")
    assert daemon.alive


def test_quarantine_follows_the_migrated_guest(lan):
    daemon, admin, a, b = lan
    ping_ok(a, f"{LAN}.2")
    qmp_command(admin, "ni-quarantine", {"name": "a", "reason": "test"})
    before = ni_info(admin, "a")["handovers"]
    a.migrate(timeout=240)
    ni = ni_info(admin, "a")
    assert ni["handovers"] == before + 1
    assert ni["quarantined"], ni
    dropped = ni["drop_quarantine"]
    out, status = a.run(f"ping -c 3 -W 1 {LAN}.2", timeout=30)
    assert status != 0, f"a quarantined guest reached b after its migration:\n{out}"
    assert ni_info(admin, "a")["drop_quarantine"] > dropped
    qmp_command(admin, "ni-release", {"name": "a"})
    ping_ok(a, f"{LAN}.2")
