"""A libvirt domain attached to vhostni, from examples/libvirt/vm.xml.

* The example validates against libvirt's domain schema (``virt-xml-validate``).
* With Debian's libvirt (libvirtd started here by hand if it is not running: there is no
  systemd), the example, with its paths pointed at this test's files, runs as a transient
  TCG domain: its NIC (``<interface type='vhostuser'>``, memfd shared memory, ``vectors=0``
  through ``<qemu:override>``) reaches a host namespace through vhostni's TAP uplink, the NI
  learns the NIC's MAC over the extra QMP monitor, and the domain's NIC works again after
  vhostni restarts (``<reconnect enabled='yes' timeout='1'/>``).

Everything here is private: the uplink and its address live in a network namespace, the
domain is transient (``virsh create``) and destroyed at the end, a libvirtd started here is
stopped here.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "libvirt" / "vm.xml"
URI = "qemu:///system"
UPNET = "198.51.100"        # TEST-NET-2, inside the test's namespace only
GUEST_MAC = "52:54:00:12:34:56"


def _missing(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def _need(*tools: str) -> None:
    missing = _missing(*tools)
    if missing:
        msg = f"{', '.join(missing)} not installed (apt-get install libvirt-daemon-system libvirt-clients libxml2-utils)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)


def test_example_domain_xml_validates():
    _need("virt-xml-validate", "xmllint")
    r = subprocess.run(["virt-xml-validate", str(EXAMPLE), "domain"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_validation_catches_a_broken_domain(tmp_path):
    """The check above can fail: the example with an interface type libvirt does not know."""
    _need("virt-xml-validate", "xmllint")
    bad = tmp_path / "bad.xml"
    bad.write_text(EXAMPLE.read_text().replace("<interface type='vhostuser'>", "<interface type='vhostuserx'>"))
    r = subprocess.run(["virt-xml-validate", str(bad), "domain"], capture_output=True, text=True)
    assert r.returncode != 0


def test_example_has_what_vhost_user_needs():
    import xml.etree.ElementTree as ET
    q = "{http://libvirt.org/schemas/domain/qemu/1.0}"
    dom = ET.parse(EXAMPLE).getroot()
    assert dom.get("type") == "qemu"
    mb = dom.find("memoryBacking")
    assert mb.find("source").get("type") == "memfd" and mb.find("access").get("mode") == "shared"
    nic = dom.find("devices/interface")
    assert nic.get("type") == "vhostuser" and nic.find("model").get("type") == "virtio"
    src = nic.find("source")
    assert src.get("type") == "unix" and src.get("mode") == "client"
    assert src.find("reconnect").get("enabled") == "yes"
    alias = nic.find("alias").get("name")
    prop = dom.find(f"{q}override/{q}device[@alias='{alias}']/{q}frontend/{q}property")
    assert (prop.get("name"), prop.get("value")) == ("vectors", "0")


# ---------------------------------------------------------------------------
# a running domain
# ---------------------------------------------------------------------------

def virsh(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {r.stdout}{r.stderr}")
    return r


def _pid_alive(pidfile: str) -> bool:
    try:
        pid = int(Path(pidfile).read_text().split()[0])
        os.kill(pid, 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


@pytest.fixture(scope="module")
def libvirtd():
    """libvirtd (and virtlogd, which it hands QEMU's output to), started by hand if needed."""
    _need("libvirtd", "virtlogd", "virsh")
    started = []
    for prog, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
        if not _pid_alive(pidfile):
            r = subprocess.run([prog, "-d"], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, f"{prog} -d: {r.stdout}{r.stderr}"
            started.append(pidfile)
    end = time.monotonic() + 30
    while virsh("version", check=False).returncode != 0:
        assert time.monotonic() < end, f"libvirtd does not answer: {virsh('version', check=False).stderr}"
        time.sleep(0.3)
    yield
    for pidfile in reversed(started):
        try:
            os.kill(int(Path(pidfile).read_text().split()[0]), signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            pass


def domain_xml(name: str, files: Path) -> str:
    """The example, pointed at this test's files (a unix-socket serial to read the console)."""
    s = EXAMPLE.read_text()
    s = s.replace("<name>vm1</name>", f"<name>{name}</name>")
    s = s.replace("/var/lib/vhostni/images/", f"{files}/").replace("/run/vhostni/", f"{files}/")
    s = s.replace("vhostni.ip=192.0.2.1/24", f"vhostni.ip={UPNET}.2/24")
    pty = ("    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n"
           "    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n")
    assert pty in s, "the example's console changed: update this test"
    s = s.replace(pty, f"    <serial type='file'>\n      <source path='{files}/console.log'/>\n"
                       f"      <target port='0'/>\n    </serial>\n")
    return s


# one ICMP echo from Python (the host need not have ping installed)
PING = """
import os, socket, struct, sys
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    return ~(s + (s >> 16)) & 0xffff
ident = os.getpid() & 0xffff
body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"vhostni!"
pkt = body[:2] + struct.pack("!H", csum(body)) + body[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(1.0)
s.sendto(pkt, (sys.argv[1], 0))
try:
    while True:
        data, (src, _) = s.recvfrom(2048)
        icmp = data[(data[0] & 15) * 4:]
        if src == sys.argv[1] and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
            sys.exit(0)
except socket.timeout:
    sys.exit("no echo reply from " + sys.argv[1])
"""


def ns_ping(ns, addr: str, timeout: float) -> float:
    """Pings from the namespace until an echo comes back; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        r = ns.run([sys.executable, "-c", PING, addr])
        if r.returncode == 0:
            return time.monotonic() - t0
        assert "Traceback" not in r.stderr, r.stderr
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{addr} does not answer pings after {timeout} s:\n{r.stdout}{r.stderr}")
        time.sleep(0.5)


@pytest.mark.guest
def test_libvirt_domain_on_vhostni(libvirtd, vhostni_images, vhostni_netns, vhostni_daemon_factory,
                                   vhostni_logdir):
    # QEMU runs as libvirt-qemu: it must reach this directory (pytest's tmp dirs are 0700
    # root) and create its sockets in it
    files = Path(tempfile.mkdtemp(prefix="vni-libvirt-", dir="/tmp"))
    os.chmod(files, 0o1777)
    for f in (vhostni_images.kernel, vhostni_images.initrd):
        shutil.copy(f, files / f.name)     # libvirt may relabel the files it boots: copies
        os.chmod(files / f.name, 0o644)
    sock, qmp = str(files / "vm1.sock"), str(files / "vm1.qmp")
    ns = vhostni_netns("vnilv")
    args = ["--qemu-qmp", f"vm1={qmp}", "--stats-file", str(files / "stats.json"),
            "--alert-log", str(files / "alerts.jsonl")]
    daemon = vhostni_daemon_factory({"vm1": sock}, uplink="tap:vnlv0", netns=ns, name="libvirt1",
                                    extra_args=args)
    os.chmod(sock, 0o777)       # see README: QEMU's user must be able to connect
    ns.wait_link("vnlv0")
    ns.ip("addr", "add", f"{UPNET}.1/24", "dev", "vnlv0")
    ns.ip("link", "set", "vnlv0", "up")

    name = f"vhostni-test-{uuid.uuid4().hex[:8]}"
    xml = files / "domain.xml"
    xml.write_text(domain_xml(name, files))
    virsh("create", str(xml))
    try:
        took = ns_ping(ns, f"{UPNET}.2", 120)
        print(f"domain {name} answered {took:.1f} s after virsh create")
        dumped = virsh("dumpxml", name).stdout
        assert "type='vhostuser'" in dumped and "memfd" in dumped
        # the NI found the domain's NIC over its own QMP monitor
        import json
        end = time.monotonic() + 30
        while True:
            q = json.loads((files / "stats.json").read_text())["nis"]["vm1"].get("qemu") or {}
            if q.get("mac") == GUEST_MAC:
                break
            assert time.monotonic() < end, f"the NI did not learn the MAC: {q}"
            time.sleep(0.3)
        assert q["nic"] == "ua-vhostni0"
        # vhostni restarts: QEMU reconnects (<reconnect timeout='1'/>) and the NIC works again
        assert daemon.stop() == 0
        daemon2 = vhostni_daemon_factory({"vm1": sock}, uplink="tap:vnlv0", netns=ns, name="libvirt2",
                                         extra_args=args)
        os.chmod(sock, 0o777)
        ns.wait_link("vnlv0")
        ns.ip("addr", "replace", f"{UPNET}.1/24", "dev", "vnlv0")
        ns.ip("link", "set", "vnlv0", "up")
        took = ns_ping(ns, f"{UPNET}.2", 60)
        print(f"domain {name} answered {took:.1f} s after vhostni restarted")
        assert daemon2.alive
    finally:
        virsh("destroy", name, check=False)
        log = Path("/var/log/libvirt/qemu") / f"{name}.log"
        for src, dst in ((log, f"test_libvirt.{name}.qemu.log"), (files / "console.log", f"test_libvirt.{name}.console.log")):
            try:
                shutil.copy(src, vhostni_logdir / dst)
            except OSError:
                pass
        shutil.rmtree(files, ignore_errors=True)


@pytest.mark.guest
def test_libvirt_domain_as_vhost_user_server(libvirtd, vhostni_images, vhostni_netns, vhostni_daemon_factory,
                                             vhostni_logdir):
    """mode='server': QEMU listens, vhostni connects (--ni NAME=client:PATH), so QEMU needs
    no access to a socket of vhostni's; the NIC works again after vhostni restarts."""
    files = Path(tempfile.mkdtemp(prefix="vni-libvirt-", dir="/tmp"))
    os.chmod(files, 0o1777)
    for f in (vhostni_images.kernel, vhostni_images.initrd):
        shutil.copy(f, files / f.name)
        os.chmod(files / f.name, 0o644)
    sock = str(files / "vm1.sock")
    ns = vhostni_netns("vnilvs")
    # a server-mode NI nobody uses: the harness waits for a socket of the daemon's own
    args = ["--ni", f"vm1=client:{sock}", "--alert-log", str(files / "alerts.jsonl")]
    idle = {"idle": str(files / "idle.sock")}
    vhostni_daemon_factory(idle, uplink="tap:vnlvs0", netns=ns, name="libvirt-server1", extra_args=args)
    ns.wait_link("vnlvs0")
    ns.ip("addr", "add", f"{UPNET}.1/24", "dev", "vnlvs0")
    ns.ip("link", "set", "vnlvs0", "up")
    name = f"vhostni-test-{uuid.uuid4().hex[:8]}"
    s = domain_xml(name, files)
    client_src = (f"<source type='unix' path='{sock}' mode='client'>\n"
                  f"        <reconnect enabled='yes' timeout='1'/>\n      </source>")
    assert client_src in s
    s = s.replace(client_src, f"<source type='unix' path='{sock}' mode='server'/>")
    xml = files / "domain.xml"
    xml.write_text(s)
    virsh("create", str(xml), timeout=120)
    try:
        took = ns_ping(ns, f"{UPNET}.2", 120)
        print(f"domain {name} (QEMU the vhost-user server) answered {took:.1f} s after virsh create")
        for d in list(vhostni_daemon_factory.daemons):
            d.stop()
        daemon2 = vhostni_daemon_factory(idle, uplink="tap:vnlvs0", netns=ns, name="libvirt-server2",
                                         extra_args=args)
        ns.wait_link("vnlvs0")
        ns.ip("addr", "replace", f"{UPNET}.1/24", "dev", "vnlvs0")
        ns.ip("link", "set", "vnlvs0", "up")
        took = ns_ping(ns, f"{UPNET}.2", 60)
        print(f"domain {name} answered {took:.1f} s after vhostni restarted and connected to it")
        assert "NI vm1: frontend connected" in daemon2.log_text()
    finally:
        virsh("destroy", name, check=False)
        log = Path("/var/log/libvirt/qemu") / f"{name}.log"
        try:
            shutil.copy(log, vhostni_logdir / f"test_libvirt.{name}.qemu.log")
        except OSError:
            pass
        shutil.rmtree(files, ignore_errors=True)
