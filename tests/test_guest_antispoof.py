"""Real guests behind NIs with anti-spoofing and prevent rules: what a Linux guest really sends
(DHCP, ARP, IPv6 duplicate address detection, neighbour discovery from its EUI-64 link-local
address, MLD, fragmented pings) gets through the parser and the checks untouched, and what it
sends from an address it was not given does not.

The LAN is 192.0.2.0/24 (TEST-NET-1) and fd00:77::/64; guest b serves DHCP (busybox udhcpd)
from a pool inside the addresses a's policy gives it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vhostni.testing import VhostUserNic

pytestmark = pytest.mark.guest

LAN, LAN6 = "192.0.2", "fd00:77::"
A_MAC, B_MAC = "52:54:00:78:00:01", "52:54:00:78:00:02"
B_LL = "fe80::5054:ff:fe78:2"      # b's EUI-64 link-local address
POOL = f"{LAN}.96/28"
UNPARSED = ("drop_unparsed_truncated", "drop_unparsed_bad_header", "drop_unparsed_vlan_depth",
            "drop_unparsed_encap", "drop_unparsed_ipv6_chain", "drop_unparsed_fragment",
            "drop_unparsed_tunnel", "drop_unparsed_source_route")

WAIT_DAD = ("i=0; while ip -6 addr show dev eth0 | grep -q tentative && [ $i -lt 50 ]; "
            "do sleep 0.2; i=$((i+1)); done; ! ip -6 addr show dev eth0 | grep -q tentative")


def fresh_stats(path: Path) -> dict:
    """The stats file is rewritten every 250 ms: wait for a write after now."""
    t0 = time.time()
    deadline = time.monotonic() + 10
    while True:
        try:
            s = json.loads(path.read_text())
            if s["time"] > t0 + 0.05:
                return s
        except (OSError, ValueError):
            pass
        assert time.monotonic() < deadline, "no fresh stats file"
        time.sleep(0.1)


def policy_text(mac: str, addresses: list[str], dhcp_server: bool = False) -> str:
    addrs = ", ".join(f'"{a}"' for a in addresses)
    # a UDP port rule: fragments of other datagrams must still pass (matched by datagram)
    return (f'[ni]\nmac = "{mac}"\naddresses = [{addrs}]\n'
            + ("dhcp_server = true\n" if dhcp_server else "")
            + '\n[[prevent]]\nproto = "udp"\ndport = 9\n')


@pytest.fixture(scope="module")
def lab(vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir, tmp_path_factory):
    work = tmp_path_factory.mktemp("antispoof")
    pa, pb = work / "a.toml", work / "b.toml"
    pa.write_text(policy_text(A_MAC, [POOL, f"{LAN6}1/128"]))
    # b is the LAN's DHCP server: its policy says so (DHCP answers are dropped otherwise)
    pb.write_text(policy_text(B_MAC, [f"{LAN}.2/32", f"{LAN6}2/128"], dhcp_server=True))
    stats_file = work / "stats.json"
    socks = {n: str(vhostni_sockdir / f"{n}.sock") for n in ("a", "b")}
    daemon = vhostni_daemon_factory(socks, name="antispoof", extra_args=[
        "--policy", f"a={pa}", "--policy", f"b={pb}", "--stats-file", str(stats_file)])
    a, b = vhostni_guest_factory.many([
        ("a", dict(nics=[VhostUserNic(socket=socks["a"], mac=A_MAC)], ip="none")),
        ("b", dict(nics=[VhostUserNic(socket=socks["b"], mac=B_MAC)], ip=f"{LAN}.2/24")),
    ])
    b.check("mkdir -p /var/lib/misc && touch /tmp/leases && printf '%s\\n' "
            f"'start {LAN}.100' 'end {LAN}.110' 'interface eth0' 'lease_file /tmp/leases' "
            "'opt subnet 255.255.255.0' > /tmp/udhcpd.conf && (udhcpd -f /tmp/udhcpd.conf "
            "> /tmp/udhcpd.log 2>&1 &)")
    return daemon, a, b, stats_file


def test_dhcp_arp_dad_ndp_and_fragments_of_real_guests_pass(lab):
    _, a, b, stats_file = lab
    # DHCP from 0.0.0.0 with a's own chaddr, then its lease; ARP on the way
    out = a.check("udhcpc -i eth0 -q -n -t 5 -T 2 -s /etc/vhostni/udhcpc.script 2>&1; "
                  "ip -4 addr show dev eth0", timeout=60)
    assert f"inet {LAN}.10" in out, out
    a.check(f"ping -c 1 -W 3 {LAN}.2 || ping -c 1 -W 3 {LAN}.2")
    # IPv6: DAD (from ::, with MLD reports), then NDP from link-local and global addresses
    # (the guest kernel loads IPv6 with the first `ip -6`: the link goes down and up again
    # for its link-local address, then every address goes through DAD)
    for g, me in ((a, 1), (b, 2)):
        g.check(f"ip -6 addr add {LAN6}{me}/64 dev eth0; ip link set eth0 down; ip link set eth0 up; "
                f"ip -6 addr show dev eth0 | grep -q {LAN6}{me}/ || ip -6 addr add {LAN6}{me}/64 dev eth0")
    for g in (a, b):
        g.check(WAIT_DAD)
    a.check(f"ping6 -c 1 -W 3 {LAN6}2 || ping6 -c 1 -W 3 {LAN6}2")
    a.check(f"ping6 -c 1 -W 3 {B_LL}%eth0 || ping6 -c 1 -W 3 {B_LL}%eth0")
    # fragmented datagrams both ways, on NIs with a UDP port rule
    a.check(f"ping -c 2 -W 3 -s 3000 {LAN}.2")
    a.check(f"ping6 -c 2 -W 3 -s 3000 {LAN6}2")
    s = fresh_stats(stats_file)["nis"]
    for name in ("a", "b"):
        bad = {k: s[name][k] for k in ("drop_spoofed", "drop_frag_unmatched", "drop_prevented", *UNPARSED)
               if s[name][k]}
        assert bad == {}, f"{name}: {bad}"


def test_a_real_guest_cannot_use_an_address_it_was_not_given(lab):
    _, a, b, stats_file = lab
    before = fresh_stats(stats_file)["nis"]["a"]["drop_spoofed"]
    a.check(f"ip addr add {LAN}.50/24 dev eth0 && ip -6 addr add {LAN6}50/64 dev eth0")
    a.check(WAIT_DAD)
    out, status = a.run(f"ping -c 2 -W 2 -I {LAN}.50 {LAN}.2")
    assert status != 0, out
    out, status = a.run(f"ping6 -c 2 -W 2 -I {LAN6}50 {LAN6}2")
    assert status != 0, out
    after = fresh_stats(stats_file)["nis"]["a"]["drop_spoofed"]
    assert after >= before + 4
