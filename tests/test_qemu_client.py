"""The daemon as QEMU's QMP client (vhostni/qemu.py) and vhost-user client mode.

* Without guests: a paused QEMU (``-S``, no guest code runs) with two vhost-user NICs is the
  frontend of an in-process daemon (tests/nikit.py); each NI finds its own NIC by its socket
  and learns its MAC over QMP, sets its link, survives QEMU going away and coming back.
* With real guests (mark ``guest``): the learned MAC and ``ni-set-link`` (over the admin
  plane's QMP, as an operator would) on live traffic; a guest whose QEMU is the vhost-user
  server (``server=on,wait=off``, the daemon connects) across a daemon restart and a QEMU
  restart.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time

import pytest

from nikit import Kit, time_limit, wait_until
from vhostni.qemu import parse_info_network, parse_qmp_spec
from vhostni.testing import VhostUserNic

QEMU = "qemu-system-x86_64"
needs_qemu = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} not installed")

MAC0 = "52:54:00:aa:bb:01"
MAC1 = "52:54:00:aa:bb:02"


# ---------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------

def test_parse_info_network_maps_vhost_user_nics_to_chardevs():
    text = ("nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:aa:bb:cc\r\n"
            " \\ n0: index=0,type=vhost-user,vhost-user0 to c0\r\n"
            "virtio-net-pci.1: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n"
            " \\ n1: index=0,type=vhost-user,vhost-user0 to c1\r\n"
            "e1: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:57\r\n"
            " \\ u0: index=0,type=user,net=10.0.2.0,restrict=off\r\n"
            "hub0port0: index=0,type=hubport\r\n"
            " \\ x: index=0,type=vhost-user,vhost-user0 to cX\r\n")
    assert parse_info_network(text) == {"nic0": "c0", "virtio-net-pci.1": "c1"}


def test_parse_qmp_spec():
    assert parse_qmp_spec("/run/vm.qmp") == ("/run/vm.qmp", None)
    assert parse_qmp_spec("/run/vm.qmp,nic=net0") == ("/run/vm.qmp", "net0")
    for bad in ("", ",nic=x", "/q,nic=", "/q,nic=a,b"):
        with pytest.raises(ValueError):
            parse_qmp_spec(bad)


# ---------------------------------------------------------------------------
# a paused QEMU as the frontend of an in-process daemon
# ---------------------------------------------------------------------------

class PausedQemu:
    """QEMU with two vhost-user NICs on the kit's sockets and a QMP socket; no guest runs."""

    def __init__(self, kit: Kit, tag: str, nic0_id: bool = True):
        self.qmp = os.path.join(kit.dir, f"{tag}.qmp")
        self.log = open(os.path.join(kit.dir, f"{tag}.qemu.log"), "wb")
        dev0 = f"virtio-net-pci,netdev=n0,mac={MAC0},vectors=0" + (",id=nic0" if nic0_id else "")
        argv = [QEMU, "-accel", "tcg", "-S", "-m", "64M", "-nodefaults", "-no-user-config",
                "-display", "none",
                "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
                "-machine", "pc,memory-backend=mem",
                "-qmp", f"unix:{self.qmp},server=on,wait=off",
                "-chardev", f"socket,id=c0,path={kit.sock_path('a')},reconnect=1",
                "-netdev", "vhost-user,id=n0,chardev=c0", "-device", dev0,
                "-chardev", f"socket,id=c1,path={kit.sock_path('b')},reconnect=1",
                "-netdev", "vhost-user,id=n1,chardev=c1",
                "-device", f"virtio-net-pci,netdev=n1,mac={MAC1},vectors=0"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def kit():
    with time_limit(90, "the test"):
        k = Kit({"a": {"ni": {"addresses": ["10.0.0.1/32"]}}}, connect=False)
        qemus: list[PausedQemu] = []
        k.qemus = qemus
        try:
            yield k
        finally:
            k.close()          # the QMP worker first, while QEMU is still there
            for q in qemus:
                q.stop()


def start_qemu(k: Kit, tag: str, **kw) -> PausedQemu:
    q = PausedQemu(k, tag, **kw)
    k.qemus.append(q)
    return q


def status(k: Kit, ni: str):
    return k.daemon.nis[ni].qemu.status


@needs_qemu
def test_each_ni_finds_its_nic_by_socket_and_learns_its_mac(kit):
    k = kit
    q = start_qemu(k, "q1")
    k.daemon.attach_qemu("a", q.qmp)
    k.until(lambda: status(k, "a").state == "connected", 30, "NI a's QMP session")
    # one QMP socket per client: b asks the same QEMU over a second monitor
    assert status(k, "a").nic == "nic0" and status(k, "a").mac == MAC0
    # the learned MAC went to the port (a's policy names none) and anti-spoofing uses it
    assert k.daemon.nis["a"].port.fallback_mac == bytes.fromhex(MAC0.replace(":", ""))
    assert k.daemon.nis["a"].port._cpolicy.mac_set == 1
    info = k.daemon.stats()["nis"]["a"]["qemu"]
    assert info["nic"] == "nic0" and info["mac"] == MAC0 and info["state"] == "connected"


@needs_qemu
def test_the_nic_is_told_by_socket_among_several(kit):
    """b's NIC has no id (QEMU names it virtio-net-pci.1): found by b's socket path."""
    k = kit
    q = start_qemu(k, "q1")
    k.until(lambda: k.daemon.nis["a"].connected and k.daemon.nis["b"].connected, 30, "QEMU to connect")
    k.until(lambda: os.path.exists(q.qmp), 10, "QEMU's QMP socket")
    k.daemon.attach_qemu("b", q.qmp)
    k.until(lambda: status(k, "b").state == "connected", 30, "NI b's QMP session")
    assert status(k, "b").nic == "virtio-net-pci.1" and status(k, "b").mac == MAC1
    # b has no policy: the MAC is kept for when it gets one
    assert k.daemon.nis["b"].port.fallback_mac == bytes.fromhex(MAC1.replace(":", ""))


@needs_qemu
def test_a_nic_that_is_not_there_is_an_error_not_a_guess(kit):
    k = kit
    q = start_qemu(k, "q1")
    k.daemon.attach_qemu("a", q.qmp, nic="nosuch")
    k.until(lambda: status(k, "a").state == "error", 30, "the error")
    assert "no NIC 'nosuch'" in status(k, "a").error and "nic0" in status(k, "a").error
    assert status(k, "a").mac is None and k.daemon.nis["a"].port.fallback_mac is None


@needs_qemu
def test_set_link_reaches_qemu_and_is_set_again_when_qemu_comes_back(kit):
    k = kit
    q = start_qemu(k, "q1")
    k.daemon.attach_qemu("a", q.qmp)
    k.until(lambda: status(k, "a").state == "connected", 30, "NI a's QMP session")
    k.daemon.set_link("a", False, reason="test")
    k.until(lambda: status(k, "a").link is False, 10, "QEMU to take the link down")
    assert k.daemon.containment("a")["link"] == "down"
    # QEMU goes away: the NI notices and waits for it
    q.stop()
    k.until(lambda: status(k, "a").state in ("connecting", "unreachable"), 15, "the session to end")
    assert k.daemon.nis["a"].port.isolation != 0          # the NI's half stays down meanwhile
    # a new QEMU on the same sockets: reconnected, and the link set down there too
    status(k, "a").link = None                            # forget, to see it set again
    q2 = start_qemu(k, "q1")
    k.until(lambda: status(k, "a").state == "connected" and status(k, "a").connects == 2, 40,
            "the NI to reconnect to the new QEMU")
    k.until(lambda: status(k, "a").link is False, 10, "the link to be set down again")
    k.daemon.set_link("a", True)
    k.until(lambda: status(k, "a").link is True, 10, "the link to come up")
    assert k.daemon.containment("a")["link"] == "up"
    assert q2.proc.poll() is None


@needs_qemu
def test_qmp_work_never_blocks_the_daemon(kit):
    """A QMP socket that accepts but never greets: the daemon's thread keeps serving."""
    import socket as socketmod
    k = kit
    path = os.path.join(k.dir, "silent.qmp")
    srv = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    try:
        k.daemon.attach_qemu("a", path)
        t0 = time.monotonic()
        k.daemon.set_link("a", False)
        for _ in range(50):
            k.step(1)
        assert time.monotonic() - t0 < 3.0
        assert status(k, "a").state != "connected" and status(k, "a").link is None
        assert k.daemon.containment("a")["link"] == "down"   # the NI's own half is immediate
    finally:
        srv.close()


# ---------------------------------------------------------------------------
# real guests
# ---------------------------------------------------------------------------

LAN = "192.0.2"


def admin(path: str, cmd: str, args: dict | None = None):
    """One command over the daemon's admin plane, as any qemu.qmp client would send it."""
    from qemu.qmp import QMPClient

    async def go():
        c = QMPClient("test")
        await c.connect(path)
        try:
            return await c.execute(cmd, args)
        finally:
            await c.disconnect()
    return asyncio.run(go())


def ping_ok(g, addr: str, tries: int = 10) -> None:
    out, status_ = g.run(f"ok=1; for i in $(seq {tries}); do if ping -c 1 -W 2 {addr}; then ok=0; break; fi; "
                         f"done; [ $ok = 0 ]", timeout=tries * 3 + 10)
    assert status_ == 0, f"{g.name} cannot ping {addr}:\n{out}"


def ping_fails(g, addr: str, count: int = 3) -> None:
    out, status_ = g.run(f"ping -c {count} -W 1 {addr}", timeout=count * 3 + 10)
    assert status_ != 0, f"{g.name} still reaches {addr}:\n{out}"


def carrier(g) -> str:
    return g.check("cat /sys/class/net/eth0/carrier").strip()


def wait_for(cond, timeout: float, what: str):
    return wait_until(cond, timeout, what, interval=0.2)


@pytest.fixture(scope="module")
def qlan(vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir):
    """Guests a and b on one daemon; a's NI is a QMP client of a's QEMU (a second monitor,
    the harness keeps the first, qmp=True, for the test); a's policy names no MAC."""
    d = vhostni_sockdir
    socks = {n: str(d / f"{n}.sock") for n in ("a", "b")}
    ni_qmp = str(d / "a-ni.qmp")
    adm = str(d / "admin.qmp")
    pol = d / "a-policy.json"
    pol.write_text(json.dumps({"ni": {"addresses": [f"{LAN}.1/32"]}}))
    daemon = vhostni_daemon_factory(socks, name="qlan", extra_args=[
        "--qemu-qmp", f"a={ni_qmp}", "--admin", f"unix:{adm}", "--policy", f"a={pol}",
        "--alert-log", str(d / "alerts.jsonl")])
    a, b = vhostni_guest_factory.many([
        ("a", dict(nics=[VhostUserNic(socket=socks["a"])], ip=f"{LAN}.1/24", qmp=True,
                   extra_args=["-qmp", f"unix:{ni_qmp},server=on,wait=off"])),
        ("b", dict(nics=[VhostUserNic(socket=socks["b"])], ip=f"{LAN}.2/24")),
    ])
    return daemon, adm, a, b


def containment(adm: str) -> dict:
    return admin(adm, "query-ni-containment", {"name": "a"})[0]


@pytest.mark.guest
def test_guest_the_ni_learns_the_nics_mac_from_qemu(qlan):
    daemon, adm, a, b = qlan
    q = wait_for(lambda: (c := containment(adm)["qemu"])["state"] == "connected" and c, 30,
                 "the NI's QMP session")
    assert q["mac"] == a.macs[0] and q["nic"]
    assert a.qmp_path and os.path.exists(a.qmp_path)      # the harness's own monitor is separate
    # it is the NIC the guest sees
    assert a.check("cat /sys/class/net/eth0/address").strip() == a.macs[0]


@pytest.mark.guest
def test_guest_set_link_down_stops_pings_and_up_brings_them_back(qlan):
    daemon, adm, a, b = qlan
    wait_for(lambda: containment(adm)["qemu"]["state"] == "connected", 30, "the NI's QMP session")
    ping_ok(a, f"{LAN}.2")
    assert carrier(a) == "1"
    r = admin(adm, "ni-set-link", {"name": "a", "up": False, "reason": "test"})
    assert r["link"] == "down"
    wait_for(lambda: containment(adm)["qemu"]["link"] is False, 15, "QEMU to take the link down")
    wait_for(lambda: carrier(a) == "0", 15, "the guest to lose its carrier")
    ping_fails(a, f"{LAN}.2")
    ping_fails(b, f"{LAN}.1")                 # and nothing reaches it from outside
    assert containment(adm)["drop_isolated"] > 0
    admin(adm, "ni-set-link", {"name": "a", "up": True})
    wait_for(lambda: containment(adm)["qemu"]["link"] is True, 15, "QEMU to bring the link up")
    wait_for(lambda: carrier(a) == "1", 15, "the guest's carrier")
    ping_ok(a, f"{LAN}.2")
    ping_ok(b, f"{LAN}.1")


@pytest.mark.guest
def test_guest_the_learned_mac_feeds_anti_spoofing(qlan):
    daemon, adm, a, b = qlan
    wait_for(lambda: containment(adm)["qemu"]["mac"] == a.macs[0], 30, "the learned MAC")
    ping_ok(a, f"{LAN}.2")
    before = admin(adm, "query-nis", {"name": "a"})
    try:
        a.check("ip link set eth0 down; ip link set eth0 address 52:54:00:de:ad:01; ip link set eth0 up")
        b.check("ip neigh flush dev eth0 || true")
        ping_fails(a, f"{LAN}.2")
    finally:
        a.check(f"ip link set eth0 down; ip link set eth0 address {a.macs[0]}; ip link set eth0 up")
    after = admin(adm, "query-nis", {"name": "a"})
    spoofed = lambda r: (r[0] if isinstance(r, list) else r)["counters"]["drop_spoofed"]  # noqa: E731
    assert spoofed(after) > spoofed(before)
    b.check("ip neigh flush dev eth0 || true")
    ping_ok(a, f"{LAN}.2")


@pytest.mark.guest
def test_guest_qemu_as_vhost_user_server_survives_daemon_and_qemu_restarts(
        vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir):
    """QEMU listens (server=on,wait=off) and the daemon connects (--ni a=client:PATH);
    the guest's NIC works again after the daemon restarts, and after QEMU restarts."""
    d = vhostni_sockdir
    qsock = str(d / "c-server.sock")          # QEMU's listening socket
    bsock = str(d / "d.sock")                 # the usual mode for the peer
    args = ["--ni", f"c=client:{qsock}", "--alert-log", str(d / "alerts-client.jsonl")]
    first = vhostni_daemon_factory({"d": bsock}, name="client1", extra_args=args)
    c, peer = vhostni_guest_factory.many([
        ("c", dict(nics=[VhostUserNic(socket=qsock, server=True)], ip=f"{LAN}.11/24")),
        ("d", dict(nics=[VhostUserNic(socket=bsock)], ip=f"{LAN}.12/24")),
    ])
    ping_ok(c, f"{LAN}.12")
    assert "NI c: frontend connected" in first.log_text()
    assert first.stop() == 0
    ping_fails(c, f"{LAN}.12", count=2)
    second = vhostni_daemon_factory({"d": bsock}, name="client2", extra_args=args)
    t0 = time.monotonic()
    ping_ok(c, f"{LAN}.12", tries=20)
    print(f"guest c reached its peer {time.monotonic() - t0:.1f} s after the daemon restarted")
    # QEMU restarts (a new guest on the same listening socket): the daemon connects again
    c.close()
    c2 = vhostni_guest_factory("c2", nics=[VhostUserNic(socket=qsock, server=True)], ip=f"{LAN}.11/24")
    ping_ok(c2, f"{LAN}.12", tries=20)
    assert second.log_text().count("NI c: frontend connected") >= 2, second.log_tail()
    assert second.alive
