"""Quarantine and link-down of an NI, enforced in the fast path, with simulated guests.

Guest a and guest b sit on two NIs of one ``Daemon`` (tests/nikit.py).  A quarantined NI
exchanges only what its policy's ``[quarantine] allow`` rules match, both ways (counter
``drop_quarantine``); an NI whose link is down exchanges nothing (``drop_isolated``).  Both
are states of the port, not of the policy: they survive reloads, and an NI without a policy
can be contained too (then nothing is allowed).
"""
from __future__ import annotations

import time

import pytest

from nikit import (
    A_IP, A_MAC, B_MAC, BCAST, Kit, bootp_request, eth, ipv4, policy, scanner_spec, tcp_frame, time_limit,
    udp, udp_frame,
)
from vhostni import scannerproc as scannerproc_mod
from vhostni.fastpath import ISOLATE_LINK_DOWN, ISOLATE_QUARANTINE
from vhostni.policy import PolicyError, parse_policy
from vhostni.scanner import wire

RESOLVER = "10.0.0.2"          # guest b plays the resolver
QUARANTINE = {"allow": [
    {"direction": "from_guest", "proto": "udp", "sport": 68, "dport": 67},          # DHCP out
    {"direction": "to_guest", "proto": "udp", "sport": 67, "dport": 68},            # DHCP in
    {"direction": "from_guest", "proto": "udp", "dst": f"{RESOLVER}/32", "dport": 53},
    {"direction": "to_guest", "proto": "udp", "src": f"{RESOLVER}/32", "sport": 53},
]}


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(scannerproc_mod, "RESTART_MIN", 0.05)
    with time_limit(60, "the test"):
        yield


def qpolicy(**kw) -> dict:
    doc = policy(mac=A_MAC, addresses=[f"{A_IP}/32"], **kw)
    doc["quarantine"] = QUARANTINE
    return doc


def dhcp_discover() -> bytes:
    return eth(BCAST, A_MAC, 0x0800, ipv4("0.0.0.0", "255.255.255.255", 17, udp(68, 67, bootp_request(A_MAC))))


def dhcp_offer() -> bytes:
    return eth(A_MAC, B_MAC, 0x0800, ipv4(RESOLVER, "10.0.0.1", 17, udp(67, 68, b"OFFER")))


def dns_query() -> bytes:
    return udp_frame("a", "b", sport=5353, dport=53, payload=b"query")


def dns_answer() -> bytes:
    return udp_frame("b", "a", sport=53, dport=5353, payload=b"answer")


def exchange(k: Kit, allowed_out, allowed_in, blocked_out, blocked_in):
    """Sends every frame; returns (what b got from a, what a got from b)."""
    k.send("a", *allowed_out, *blocked_out)
    got_b = k.recv("b", 1.0, count=len(allowed_out) + len(blocked_out))
    k.send("b", *allowed_in, *blocked_in)
    got_a = k.recv("a", 1.0, count=len(allowed_in) + len(blocked_in))
    return got_b, got_a


def test_quarantine_allows_only_its_rules_both_ways_and_release_restores(kits):
    k = kits({"a": qpolicy()})
    d = k.daemon
    allowed_out = [dhcp_discover(), dns_query()]
    allowed_in = [dhcp_offer(), dns_answer()]
    blocked_out = [tcp_frame("a", "b", dport=80, payload=b"web"),
                   udp_frame("a", "b", sport=5353, dport=53, dst_ip="10.0.0.9", payload=b"other dns")]
    blocked_in = [tcp_frame("b", "a", sport=80, dport=40000, payload=b"web back"),
                  udp_frame("b", "a", sport=54, dport=5353, payload=b"not dns")]

    # before: everything flows
    got_b, got_a = exchange(k, allowed_out, allowed_in, blocked_out, blocked_in)
    assert got_b == allowed_out + blocked_out and got_a == allowed_in + blocked_in

    info = d.quarantine("a", True, reason="test")
    assert info["quarantined"] and info["link"] == "up" and info["reasons"] == {"quarantine": "test"}
    assert d.nis["a"].port.isolation == ISOLATE_QUARANTINE
    got_b, got_a = exchange(k, allowed_out, allowed_in, blocked_out, blocked_in)
    assert got_b == allowed_out
    assert got_a == allowed_in
    assert k.stats("a")["drop_quarantine"] == len(blocked_out) + len(blocked_in)
    assert k.stats("b")["drop_quarantine"] == 0

    # anti-spoofing still applies first (a spoofed DHCP-looking frame is spoofed, not allowed)
    k.send("a", eth(BCAST, bytes.fromhex("020000000fff"), 0x0800,
                    ipv4("0.0.0.0", "255.255.255.255", 17, udp(68, 67, b"forged"))))
    assert k.recv("b", 0.3) == []
    assert k.stats("a")["drop_spoofed"] == 1

    info = d.quarantine("a", False)
    assert not info["quarantined"] and info["reasons"] == {}
    got_b, got_a = exchange(k, allowed_out, allowed_in, blocked_out, blocked_in)
    assert got_b == allowed_out + blocked_out and got_a == allowed_in + blocked_in
    assert k.stats("a")["drop_quarantine"] == len(blocked_out) + len(blocked_in)


def test_quarantine_survives_policy_reloads(kits):
    k = kits({"a": qpolicy()})
    d = k.daemon
    d.quarantine("a", True)
    web = tcp_frame("a", "b", dport=80, payload=b"web")
    k.send("a", web)
    assert k.recv("b", 0.3) == []
    # a reload with the same quarantine rules: still quarantined
    k.reload("a", qpolicy(prevent=[{"proto": "tcp", "dport": 23}]))
    assert d.nis["a"].port.isolation == ISOLATE_QUARANTINE
    k.send("a", web, dns_query())
    assert k.recv("b", 1.0, 2) == [dns_query()]
    # a reload whose quarantine allows the web too: the new rules apply, quarantine stays
    doc = qpolicy()
    doc["quarantine"] = {"allow": QUARANTINE["allow"] + [{"direction": "from_guest", "proto": "tcp", "dport": 80}]}
    k.reload("a", doc)
    k.send("a", web, tcp_frame("a", "b", dport=22, payload=b"ssh"))
    assert k.recv("b", 1.0, 2) == [web]
    assert d.containment("a")["quarantined"]
    # a reload without a [quarantine] section: nothing is allowed any more (fail closed)
    k.reload("a", policy(mac=A_MAC, addresses=[f"{A_IP}/32"]))
    k.send("a", web, dns_query())
    assert k.recv("b", 0.5) == []
    d.quarantine("a", False)
    k.send("a", web)
    assert k.recv("b", 1.0, 1) == [web]


def test_an_ni_without_a_policy_can_be_quarantined_and_released(kits):
    k = kits({"a": qpolicy()})
    d = k.daemon
    assert k.nk("a") is not None and d.kernel.nis.get(d.nis["b"].port.index) is None
    d.quarantine("b", True)
    k.send("b", dns_answer(), tcp_frame("b", "a", payload=b"x"))
    assert k.recv("a", 0.5) == []            # b has no policy, so no quarantine rules: nothing
    assert k.stats("b")["drop_quarantine"] == 2
    # frames to b are dropped too
    k.send("a", dns_query())
    assert k.recv("b", 0.3) == []
    assert k.stats("b")["drop_quarantine"] == 3
    d.quarantine("b", False)
    assert d.nis["b"].port.isolation == 0
    k.send("b", tcp_frame("b", "a", payload=b"y"))
    assert len(k.recv("a", 1.0, 1)) == 1


def test_link_down_drops_everything_both_ways_even_what_quarantine_allows(kits):
    k = kits({"a": qpolicy()})
    d = k.daemon
    d.quarantine("a", True)
    info = d.set_link("a", False, reason="test")
    assert info["link"] == "down" and info["quarantined"] and info["qemu"] is None
    assert d.nis["a"].port.isolation == ISOLATE_QUARANTINE | ISOLATE_LINK_DOWN
    k.send("a", dns_query(), dhcp_discover())
    k.send("b", dns_answer())
    assert k.recv("b", 0.3) == [] and k.recv("a", 0.3) == []
    assert k.stats("a")["drop_isolated"] == 3 and k.stats("a")["drop_quarantine"] == 0
    # survives a reload
    k.reload("a", qpolicy())
    k.send("a", dns_query())
    assert k.recv("b", 0.3) == []
    d.set_link("a", True)
    k.send("a", dns_query(), tcp_frame(payload=b"web"))
    assert k.recv("b", 1.0, 2) == [dns_query()]     # still quarantined
    d.quarantine("a", False)
    k.send("a", tcp_frame(payload=b"web"))
    assert len(k.recv("b", 1.0, 1)) == 1
    assert d.stats()["nis"]["a"]["link"] == "up"


def test_a_frame_held_before_quarantine_is_dropped_when_passed_after(kits):
    sub = {"match": {"direction": "from_guest", "proto": "tcp", "dport": 80}, "contain": True}
    dec = scanner_spec("dec", "decider.py", allow=[dict(sub["match"], contain=True)],
                       config={"subscribe": [sub]})
    k = kits({"a": qpolicy(hold_timeout_ms=60000, default_decision="pass", scanners=[dec])})
    k.wait_subscribed("a", "dec")
    k.send("a", tcp_frame(payload=b"LATER"))      # held until the scanner decides
    k.until(lambda: k.sp("a", "dec").owed(), what="the frame to reach the scanner")
    k.daemon.quarantine("a", True)
    # the hold ends in a pass (the policy's default, at its deadline) while quarantined: the
    # kernel's deadline (frames punted to it), or the C core's (frames on a scanner's ring)
    for h in k.nk("a").held.values():
        h.deadline = 0
    k.daemon.switch.set_clock(time.monotonic_ns() + 61 * 10**9)
    k.until(lambda: k.stats("a")["held_passed"] == 1, what="the held frame to be passed")
    assert k.recv("b", 0.3) == []
    assert k.stats("a")["drop_quarantine"] == 1
    k.daemon.quarantine("a", False)
    k.send("a", tcp_frame(payload=b"PASS"))
    assert k.recv("b", 2.0, 1) == [tcp_frame(payload=b"PASS")]


def test_on_alert_quarantine_is_triggered_by_a_scanners_own_alert_only(kits):
    sub = {"match": {"direction": "from_guest", "proto": "tcp", "dport": 80}, "contain": False}
    dec = scanner_spec("dec", "decider.py", allow=[sub["match"]], config={"subscribe": [sub]})
    k = kits({"a": qpolicy(on_alert="quarantine", scanners=[dec])})
    d = k.daemon
    k.wait_subscribed("a", "dec")
    # decider.py alerts "ready" once subscribed: that is the scanner's own alert
    k.until(lambda: d.containment("a")["quarantined"], what="the NI to be quarantined by its policy")
    contained = k.wait_alert("NI contained by its policy", ni="a")
    ready = k.alerts_matching("ready", ni="a", scanner="dec")[0]
    assert contained["fields"]["after_seq"] == ready["seq"]
    assert contained["fields"]["action"] == "quarantine"
    assert "on_alert" in d.containment("a")["reasons"]["quarantine"]
    k.send("a", tcp_frame(payload=b"web"))
    assert k.recv("b", 0.3) == []
    # released by the administrator; an alert the kernel raises *about* the scanner does not
    # contain the NI again, the scanner's own next alert does
    d.quarantine("a", False)
    sp = k.sp("a", "dec")
    d.kernel.alerts.append("a", "dec", "scanner asked for a subscription outside its rights")
    k.run_for(0.2)
    assert not d.containment("a")["quarantined"]
    sp._alert(wire.Alert("worm seen", {}))
    k.until(lambda: d.containment("a")["quarantined"], what="quarantine after the scanner's alert")


def test_on_alert_link_down(kits):
    sub = {"match": {"direction": "from_guest", "proto": "tcp", "dport": 80}, "contain": False}
    dec = scanner_spec("dec", "decider.py", allow=[sub["match"]], config={"subscribe": [sub]})
    k = kits({"a": qpolicy(on_alert="link-down", scanners=[dec])})
    k.wait_subscribed("a", "dec")
    k.until(lambda: k.daemon.containment("a")["link"] == "down", what="the link to go down")
    assert not k.daemon.containment("a")["quarantined"]
    k.send("a", dns_query())
    assert k.recv("b", 0.3) == []
    assert k.stats("a")["drop_isolated"] == 1


def test_on_alert_none_by_default(kits):
    sub = {"match": {"direction": "from_guest", "proto": "tcp", "dport": 80}, "contain": False}
    dec = scanner_spec("dec", "decider.py", allow=[sub["match"]], config={"subscribe": [sub]})
    k = kits({"a": qpolicy(scanners=[dec])})
    k.wait_subscribed("a", "dec")
    k.wait_alert("ready", ni="a", scanner="dec")
    k.run_for(0.2)
    assert not k.daemon.containment("a")["quarantined"] and k.daemon.containment("a")["link"] == "up"


def test_learned_mac_feeds_anti_spoofing_only_when_the_policy_has_none(kits):
    no_mac = policy(addresses=[f"{A_IP}/32"])
    k = kits({"a": no_mac, "b": policy(mac=B_MAC)})
    d = k.daemon
    other = bytes.fromhex("020000000fff")
    k.send("a", tcp_frame(src_mac=other, payload=b"1"))
    assert len(k.recv("b", 1.0, 1)) == 1                 # no MAC known: any source MAC

    class Link:    # what vhostni.qemu.QemuLink hands the daemon
        def __init__(self, ni):
            self.ni = ni

    for name in ("a", "b"):
        d.nis[name].qemu = Link(name)
    d._qemu_changed(d.nis["a"].qemu, {"mac": "02:00:00:00:0a:0a"})
    d._qemu_changed(d.nis["b"].qemu, {"mac": "02:00:00:00:0b:0c"})    # not the policy's
    k.send("a", tcp_frame(src_mac=other, payload=b"2"))
    assert k.recv("b", 0.3) == []
    assert k.stats("a")["drop_spoofed"] == 1
    k.send("a", tcp_frame(payload=b"3"))
    assert len(k.recv("b", 1.0, 1)) == 1
    # the learned MAC outlives a reload of a policy that still names none
    k.reload("a", no_mac)
    k.send("a", tcp_frame(src_mac=other, payload=b"4"))
    assert k.recv("b", 0.3) == [] and k.stats("a")["drop_spoofed"] == 2
    # b's policy names its MAC: that one stands
    k.send("b", tcp_frame("b", "a", payload=b"5"))
    assert len(k.recv("a", 1.0, 1)) == 1
    for name in ("a", "b"):
        d.nis[name].qemu = None


@pytest.mark.parametrize("doc,where", [
    ({"quarantine": {"allow": [{"proto": "udp", "dport": 70000}]}}, "quarantine.allow[0].dport"),
    ({"quarantine": {"allow": {"proto": "udp"}}}, "quarantine.allow"),
    ({"quarantine": {"allow": [], "deny": []}}, "quarantine.deny"),
    ({"ni": {"on_alert": "reboot"}}, "ni.on_alert"),
])
def test_policy_errors_name_the_key(doc, where):
    with pytest.raises(PolicyError) as e:
        parse_policy(doc)
    assert e.value.where == where, str(e.value)


def test_policy_parses_quarantine_and_on_alert():
    p = parse_policy({"ni": {"on_alert": "link-down"}, "quarantine": QUARANTINE})
    assert p.on_alert == "link-down" and len(p.quarantine_allow) == 4
    c = p.compile()
    assert c.nqallow == 4 and c.qallow[2].dport_lo == 53
    assert parse_policy({}).on_alert == "none"


def test_containment_over_the_admin_plane(tmp_path):
    """ni-quarantine / ni-release / ni-set-link / query-ni-containment with qemu.qmp's client,
    and the NI_QUARANTINE / NI_LINK events, against a `vhostni run` process."""
    import asyncio
    import os
    import subprocess
    import sys

    from qemu.qmp import ExecuteError, QMPClient

    adm = str(tmp_path / "admin.qmp")
    pol = tmp_path / "a.json"
    pol.write_text('{"quarantine": {"allow": [{"proto": "udp", "dport": 53}]}}')
    log = open(tmp_path / "vhostni.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "vhostni", "run", "--ni", f"a={tmp_path / 'a.sock'}",
                             "--policy", f"a={pol}", "--admin", f"unix:{adm}",
                             "--alert-log", str(tmp_path / "alerts.jsonl")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    async def session():
        for _ in range(200):
            if os.path.exists(adm):
                break
            await asyncio.sleep(0.05)
        c = QMPClient("test")
        await c.connect(adm)
        try:
            with c.listener(("NI_QUARANTINE", "NI_LINK")) as events:
                r = await c.execute("ni-quarantine", {"name": "a", "reason": "worm"})
                assert r["quarantined"] and r["reasons"] == {"quarantine": "worm"}, r
                ev = await asyncio.wait_for(events.get(), 5)
                assert ev["event"] == "NI_QUARANTINE" and ev["data"]["quarantined"] is True
                assert ev["data"]["ni"] == "a"
                r = await c.execute("ni-set-link", {"name": "a", "up": False})
                assert r["link"] == "down" and r["qemu"] is None, r
                ev = await asyncio.wait_for(events.get(), 5)
                assert ev["event"] == "NI_LINK" and ev["data"]["up"] is False
                (st,) = await c.execute("query-ni-containment", {"name": "a"})
                assert st["quarantined"] and st["link"] == "down"
                nis = await c.execute("query-nis", {"name": "a"})
                ni = nis[0] if isinstance(nis, list) else nis
                assert ni["quarantined"] is True and ni["link"] == "down"
                # the policy changes: the NI stays contained
                await c.execute("ni-set-policy", {"name": "a", "policy": {"prevent": []}})
                (st,) = await c.execute("query-ni-containment", {"name": "a"})
                assert st["quarantined"] and st["link"] == "down"
                await c.execute("ni-release", {"name": "a"})
                await c.execute("ni-set-link", {"name": "a", "up": True})
                (st,) = await c.execute("query-ni-containment")
                assert not st["quarantined"] and st["link"] == "up"
            try:
                await c.execute("ni-quarantine", {"name": "nosuch"})
                raise AssertionError("quarantined an NI that does not exist")
            except ExecuteError as exc:
                assert exc.error_class == "DeviceNotFound"
            try:
                await c.execute("ni-set-link", {"name": "a", "up": "no"})
                raise AssertionError("accepted a string for a boolean")
            except ExecuteError as exc:
                assert exc.error_class == "GenericError"
        finally:
            await c.disconnect()

    try:
        asyncio.run(asyncio.wait_for(session(), 30))
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    assert proc.returncode == 0, (tmp_path / "vhostni.log").read_text()
