"""Real guests without vhostni: the image boots, the console is driven reliably, QEMU's own NICs work."""
from __future__ import annotations

import hashlib
import http.server
import os
import re
import threading
import time

import pytest

from vhostni.testing import Guest, GuestBootError, GuestTimeout, TapNic, UserNic

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def plain(vhostni_guest_factory):
    return vhostni_guest_factory("plain", qmp=True)


def test_boots_quickly_with_modules_loaded(plain):
    assert plain.boot_seconds is not None and plain.boot_seconds < 60, plain.boot_seconds
    out, status = plain.run("hostname; cat /proc/modules")
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "plain"
    loaded = {line.split()[0] for line in lines[1:]}
    assert {"virtio_net", "virtio_pci", "net_failover"} <= loaded


def test_run_returns_output_and_status(plain):
    assert plain.run("echo hello; echo world >&2") == ("hello\nworld\n", 0)
    assert plain.run("exit_with() { return $1; }; exit_with 42") == ("", 42)
    assert plain.run("false")[1] == 1
    assert plain.run("printf 'no newline'") == ("no newline", 0)
    assert plain.run("echo \"it's\" 'quoted' $((6 * 7))") == ("it's quoted 42\n", 0)
    assert plain.run("for i in 1 2 3; do\n  echo line$i\ndone") == ("line1\nline2\nline3\n", 0)
    # State persists between commands: it is one shell.
    plain.run("cd /tmp && export VNI_X=persisted")
    assert plain.run("pwd; echo $VNI_X") == ("/tmp\npersisted\n", 0)


def test_run_survives_syntax_errors_stdin_readers_and_markers_in_output(plain):
    out, status = plain.run("if then fi")
    assert status == 2 and "syntax error" in out
    assert plain.run("cat; echo after-cat") == ("after-cat\n", 0)          # stdin is /dev/null
    out, status = plain.run("echo __VNI_E_fake__:0: ; echo real")
    assert status == 0 and out == "__VNI_E_fake__:0:\nreal\n"


def test_run_large_output(plain):
    out, status = plain.run("seq 1 20000", timeout=120)
    assert status == 0
    assert out.splitlines() == [str(i) for i in range(1, 20001)]


def test_timeout_interrupts_and_guest_stays_usable(plain):
    t = time.monotonic()
    with pytest.raises(GuestTimeout, match=r"`echo started; sleep 60` did not finish within 2 s") as ei:
        plain.run("echo started; sleep 60", timeout=2)
    assert time.monotonic() - t < 20
    assert "started" in ei.value.output
    assert plain.run("echo alive") == ("alive\n", 0)


def test_background_jobs_do_not_disturb_later_output(plain):
    out, status = plain.run("(sleep 1; echo from-background > /tmp/bg) & echo started")
    assert (out, status) == ("started\n", 0)
    time.sleep(1.5)
    assert plain.run("cat /tmp/bg") == ("from-background\n", 0)


def test_put_file_and_md5(plain):
    data = os.urandom(20000)
    plain.put_file("/tmp/blob", data, mode=0o600)
    out = plain.check("md5sum /tmp/blob; stat -c %a /tmp/blob")
    assert out.split()[0] == hashlib.md5(data).hexdigest()
    assert out.split()[-1] == "600"


def test_iperf3_runs_with_its_libraries(plain):
    out = plain.check("iperf3 --version")
    assert out.startswith("iperf 3.")
    # A loopback measurement exercises libiperf and libcrypto for real.
    plain.check("iperf3 -s -D -1 -p 5201 >/dev/null 2>&1; sleep 0.5")
    out = plain.check("iperf3 -c 127.0.0.1 -p 5201 -t 1 -J | grep -c bits_per_second", timeout=60)
    assert int(out) > 0


def test_qmp_socket(plain):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    assert plain.qmp_path and os.path.exists(plain.qmp_path)
    mon = QEMUMonitorProtocol(plain.qmp_path)
    mon.connect()
    try:
        assert mon.cmd_obj({"execute": "query-status"})["return"]["status"] == "running"
    finally:
        mon.close()


def test_console_log_is_written(plain):
    plain.run("echo logged-line")
    text = plain.log_path.read_text()
    assert "VHOSTNI-GUEST-READY hostname=plain" in text
    assert "logged-line" in text and "### run[" in text


def test_boot_error_from_init_is_reported(vhostni_guest_factory):
    # A network configuration for a NIC the guest does not have: /init reports it, boot fails loudly.
    with pytest.raises(GuestBootError, match=r"no network interface eth0") as ei:
        vhostni_guest_factory("nonic", ip="192.0.2.1/24")
    assert "console log:" in str(ei.value) and "nonic.console.log" in str(ei.value)


def test_boot_timeout_is_reported(vhostni_guest_factory):
    with pytest.raises(GuestBootError, match=r"no VHOSTNI-GUEST-READY within 0.2 s"):
        vhostni_guest_factory("slow", boot_timeout=0.2)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def test_user_networking_dhcp_and_http_to_host_loopback(vhostni_guest_factory, tmp_path):
    """QEMU's user-mode network: DHCP, and 10.0.2.2 reaches an HTTP server on the host's 127.0.0.1."""
    payload = os.urandom(300_000)
    (tmp_path / "payload.bin").write_bytes(payload)
    handler = lambda *a, **kw: _Handler(*a, directory=str(tmp_path), **kw)  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        g = vhostni_guest_factory("usernet", nics=[UserNic(restrict=False)], ip="dhcp")
        assert "inet 10.0.2.15/24" in g.check("ip -4 addr show eth0")
        port = srv.server_address[1]
        out = g.check(f"wget -q -O /tmp/p http://10.0.2.2:{port}/payload.bin && md5sum /tmp/p", timeout=60)
        assert out.split()[0] == hashlib.md5(payload).hexdigest()
        g.close()
    finally:
        srv.shutdown()


@pytest.fixture(scope="module")
def tap_pair(vhostni_guest_factory, vhostni_netns):
    """Two guests on QEMU tap NICs bridged inside a private network namespace: the no-vhostni baseline."""
    ns = vhostni_netns()
    ns.add_tap("tapa")
    ns.add_tap("tapb")
    ns.add_bridge("br0", "tapa", "tapb")
    a, b = vhostni_guest_factory.many([
        ("tapa", dict(nics=[TapNic(ifname="tapa")], ip="192.0.2.1/24", netns=ns.name)),
        ("tapb", dict(nics=[TapNic(ifname="tapb")], ip="192.0.2.2/24", mtu=1400, netns=ns.name)),
    ])
    return a, b


def ping_ok(g, addr: str, tries: int = 10) -> str:
    """Ping until one echo comes back (the first may be lost to ARP or a link still coming up)."""
    out, status = g.run(f"ok=1; for i in $(seq {tries}); do if ping -c 1 -W 2 {addr}; then ok=0; break; fi; "
                        f"done; [ $ok = 0 ]", timeout=tries * 3 + 10)
    assert status == 0, f"{g.name} cannot ping {addr}:\n{out}"
    return out


def test_tap_guests_ping_and_transfer(tap_pair):
    a, b = tap_pair
    assert "mtu 1400" in b.check("ip link show eth0")
    assert "192.0.2.1/24" in a.check("ip -4 addr show eth0")
    ping_ok(a, "192.0.2.2")
    ping_ok(b, "192.0.2.1")
    a.check("mkdir -p /www && dd if=/dev/urandom of=/www/blob bs=1024 count=2048 2>/dev/null")
    a.check("httpd -p 8080 -h /www")
    b.check("wget -q -O /tmp/recv http://192.0.2.1:8080/blob", timeout=120)
    assert a.check("md5sum < /www/blob").split()[0] == b.check("md5sum < /tmp/recv").split()[0]
    assert b.check("stat -c %s /tmp/recv").strip() == str(2048 * 1024)
