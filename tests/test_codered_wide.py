"""The widened worm detector (scanners/codered/core.py) with a fake clock: every new destination counts (UDP
datagrams, ICMP echo requests, TCP SYNs), DNS over TCP is shadowed, PTR answers do not launder addresses,
peers that contacted the guest first are known, fragments it cuts are alerted, what it learned survives a
restart, and strict mode (``unknown = "queue"``) holds every unknown destination.  No VM needed."""

import ipaddress
import struct
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # scanners/ is not an installed package

from scanners.codered import CodeRedDetector  # noqa: E402
from scanners.codered.packet import FragmentError, parse_frame  # noqa: E402

from scapy.layers.dns import DNS, DNSQR, DNSRR  # noqa: E402
from scapy.layers.inet import ICMP, IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402

from test_codered import GUEST, GUEST6, RESOLVER, Clock, detector, dns_answer, dns_query, eth, resolve, syn, \
    unknown  # noqa: E402

V4 = ipaddress.IPv4Address


def udp(dst, dport=1434, sport=40000, payload=b"\x04" + b"A" * 40):
    return eth(IP(src=GUEST, dst=dst) / UDP(sport=sport, dport=dport) / payload)


def ping(dst, seq=1):
    if ":" in dst:
        return eth(IPv6(src=GUEST6, dst=dst) / ICMPv6EchoRequest(id=7, seq=seq))
    return eth(IP(src=GUEST, dst=dst) / ICMP(type=8, id=7, seq=seq))


def inbound(src, l4):
    return eth(IP(src=src, dst=GUEST) / l4)


# ---- every protocol's new destinations count --------------------------------------------------------------------


def test_a_slammer_style_udp_scan_is_detected_and_cut():
    det, clock = detector()
    out = []
    for i in range(6):
        out.append(det.handle_frame("from_guest", udp(unknown(i))))
        clock.advance(0.1)
    assert [v.action for v in out] == ["pass", "pass", "cut", "cut", "cut", "cut"]
    a = out[2].alert
    assert a.fields["event"] == "attack_detected" and a.fields["last_proto"] == "udp"
    assert a.fields["last_port"] == 1434 and "udp" in a.message
    assert det.stats.udp_unknown == 6


def test_an_icmp_echo_sweep_is_detected_and_cut_and_other_icmp_passes():
    det, clock = detector()
    out = [det.handle_frame("from_guest", ping(unknown(i))) for i in range(3)]
    assert [v.action for v in out] == ["pass", "pass", "cut"] and out[2].alert.fields["last_proto"] == "icmp"
    assert det.handle_frame("from_guest", ping("fd00::99")).action == "cut"      # ICMPv6 too, in attack mode
    # an echo reply or an error from the guest is no new destination
    reply = eth(IP(src=GUEST, dst=unknown(50)) / ICMP(type=0, id=7, seq=1))
    unreach = eth(IP(src=GUEST, dst=unknown(51)) / ICMP(type=3, code=3) / IP(src=unknown(51), dst=GUEST) / UDP())
    assert det.handle_frame("from_guest", reply).action == "pass"
    assert det.handle_frame("from_guest", unreach).action == "pass"


def test_protocols_mix_into_one_count_of_destinations():
    det, clock = detector()
    assert det.handle_frame("from_guest", syn(unknown(0))).action == "pass"
    assert det.handle_frame("from_guest", udp(unknown(0))).action == "pass"    # same address: counted once
    assert det.handle_frame("from_guest", udp(unknown(1))).action == "pass"
    assert det.handle_frame("from_guest", ping(unknown(2))).action == "cut" and det.attack


def test_udp_and_icmp_to_resolved_names_pass_in_attack_mode():
    det, clock = detector()
    resolve(det, "ntp.example", [("ntp.example", "A", "192.0.2.123", 60)])
    for i in range(3):
        det.handle_frame("from_guest", udp(unknown(i)))
    assert det.attack
    assert det.handle_frame("from_guest", udp("192.0.2.123", dport=123)).action == "pass"
    assert det.handle_frame("from_guest", ping("192.0.2.123")).action == "pass"
    assert V4("192.0.2.123") not in det.queued()


# ---- DNS servers ----------------------------------------------------------------------------------------------


def test_the_resolver_is_neither_counted_nor_delayed_but_a_udp53_scan_is():
    det, clock = detector()
    resolve(det, "a.example", [("a.example", "A", "192.0.2.1", 60)])
    assert det.unknown_count(60) == 0 and det.is_known(V4(RESOLVER))     # it answered: a known peer
    # a worm sending well-formed queries to random servers: the first four pass uncounted, then they count
    verdicts = [det.handle_frame("from_guest", dns_query("x.example", server=unknown(i), txid=i)).action
                for i in range(8)]
    assert verdicts[:6] == ["pass"] * 6 and verdicts[6] == "cut" and det.attack
    # the guest's own resolver still answers it in attack mode
    assert det.handle_frame("from_guest", dns_query("b.example", txid=77)).action == "pass"


# ---- DNS over TCP ---------------------------------------------------------------------------------------------


def framed(msg) -> bytes:
    raw = bytes(msg)
    return struct.pack("!H", len(raw)) + raw


def test_dns_over_tcp_answers_are_shadowed_across_segments():
    det, clock = detector()
    flow = (GUEST, 41000, RESOLVER)
    q = framed(DNS(id=9, rd=1, qd=[DNSQR(qname="big.example")]))
    a = framed(DNS(id=9, qr=1, rd=1, ra=1, qd=[DNSQR(qname="big.example")],
                   an=[DNSRR(rrname="big.example", type="A", rdata=f"198.51.100.{i}", ttl=60)
                       for i in range(1, 40)]))
    det.observe_dns_stream(1, "from_guest", q, flow)
    # the response arrives one byte, then a few bytes at a time: the length prefix itself is split
    added = det.observe_dns_stream(1, "to_guest", a[:1], flow)
    for k in range(1, len(a), 97):
        added += det.observe_dns_stream(1, "to_guest", a[k:k + 97], flow)
    assert added == 39 and det.stats.dns_tcp_messages == 2
    for i in range(1, 40):
        assert det.handle_frame("from_guest", syn(f"198.51.100.{i}")).action == "pass"
    assert det.unknown_count(60) == 0 and not det.attack


def test_dns_over_tcp_needs_a_matching_query_and_is_bounded():
    det, clock = detector()
    flow = (GUEST, 41001, RESOLVER)
    a = framed(DNS(id=5, qr=1, qd=[DNSQR(qname="x.example")], an=[DNSRR(rrname="x.example", rdata="203.0.113.5")]))
    assert det.observe_dns_stream(2, "to_guest", a, flow) == 0 and det.stats.dns_unsolicited == 1
    # the buffer never holds more than one unfinished message: a length prefix and 64 KiB
    det.observe_dns_stream(3, "to_guest", b"\xff\xff", flow)
    for _ in range(40):
        det.observe_dns_stream(3, "to_guest", b"\xee" * 4096, flow)
        assert all(len(s.buf) < 2 + 65535 for s in det._dns_streams.values())
    # a chunk bigger than any message could need breaks the stream's framing for good
    det.observe_dns_stream(4, "to_guest", b"\0\5" * 100000, flow)
    assert det.stats.dns_tcp_overrun == 1 and not det._dns_streams[(4, "to_guest")].buf
    assert det.observe_dns_stream(4, "to_guest", a, flow) == 0
    det.close_dns_stream(3)
    assert (3, "to_guest") not in det._dns_streams


# ---- PTR laundering -------------------------------------------------------------------------------------------


def ptr_lookup(det, addr, name, txid):
    rev = ipaddress.ip_address(addr).reverse_pointer
    resolve(det, rev, [(rev, "PTR", name, 300)], qtype="PTR", txid=txid)


def test_ptr_answers_do_not_launder_addresses():
    det, clock = detector()
    # the worm of section 5.3's evasion: reverse-resolve a random address, forward-resolve the name it got
    for i in range(5):
        ptr_lookup(det, unknown(i), f"host{i}.isp.example", 100 + i)
        resolve(det, f"host{i}.isp.example", [(f"host{i}.isp.example", "A", unknown(i), 300)], txid=200 + i)
    assert det.stats.ptr_laundered == 5 and not any(det.is_known(V4(unknown(i))) for i in range(5))
    out = [det.handle_frame("from_guest", syn(unknown(i))).action for i in range(5)]
    assert out == ["pass", "pass", "cut", "cut", "cut"] and det.attack
    # a name that came from a PTR answer but resolves to another address is an ordinary answer
    ptr_lookup(det, "192.0.2.50", "www.example", 300)
    resolve(det, "www.example", [("www.example", "A", "192.0.2.80", 300)], txid=301)
    assert det.is_known(V4("192.0.2.80"))
    # and a forward lookup the guest made without a reverse one is resolved as ever
    resolve(det, "mail.example", [("mail.example", "A", unknown(9), 300)], txid=302)
    assert det.is_known(V4(unknown(9)))


# ---- peers that contacted the guest first --------------------------------------------------------------------


def test_peers_that_contact_the_guest_first_are_known():
    det, clock = detector()
    for i in range(3):
        det.handle_frame("from_guest", syn(unknown(i)))
    assert det.attack
    # inbound: a TCP client, a UDP sender, a pinger; the guest answers each (its replies are new to it)
    assert det.handle_frame("to_guest", inbound("198.51.100.1", TCP(sport=5000, dport=22, flags="S"))).action is None
    assert det.handle_frame("to_guest", inbound("198.51.100.2", UDP(sport=5001, dport=161))).action is None
    assert det.handle_frame("to_guest", inbound("198.51.100.3", ICMP(type=8))).action is None
    assert det.handle_frame("from_guest", udp("198.51.100.2", dport=5001, sport=161)).action == "pass"
    assert det.handle_frame("from_guest", syn("198.51.100.1")).action == "pass"
    assert det.handle_frame("from_guest", ping("198.51.100.3")).action == "pass"
    assert det.stats.peers_learned == 3
    # unless the administrator says otherwise
    det, clock = detector(learn_inbound=False)
    det.handle_frame("to_guest", inbound("198.51.100.1", TCP(sport=5000, dport=22, flags="S")))
    assert not det.is_known(V4("198.51.100.1"))


def test_a_syn_ack_from_a_probed_host_teaches_nothing():
    det, clock = detector()
    det.handle_frame("from_guest", syn(unknown(0)))
    det.handle_frame("to_guest", inbound(unknown(0), TCP(sport=80, dport=40000, flags="SA")))
    assert not det.is_known(V4(unknown(0)))


# ---- protocol anomalies ---------------------------------------------------------------------------------------


def fragments_of_a_syn():
    """A SYN in two IPv4 fragments: 8 bytes of TCP header, then the rest (RFC 1858's tiny fragment)."""
    tcp = bytes(TCP(sport=40000, dport=80, flags="S"))
    first = eth(IP(src=GUEST, dst="203.0.113.9", proto=6, flags="MF", id=77) / tcp[:8])
    later = eth(IP(src=GUEST, dst="203.0.113.9", proto=6, frag=1, id=77) / tcp[8:])
    return first, later


def test_a_syn_hidden_in_fragments_is_cut_and_alerted():
    det, clock = detector()
    first, later = fragments_of_a_syn()
    for f in (first, later):
        try:
            parse_frame(f)
            raise AssertionError("parsed")
        except FragmentError as exc:
            assert exc.proto == 6 and str(exc.dst) == "203.0.113.9"
    v1 = det.handle_frame("from_guest", first)
    assert v1.action == "cut" and v1.alert is not None
    assert v1.alert.fields["event"] == "anomaly" and v1.alert.fields["dst"] == "203.0.113.9"
    assert "fragment" in v1.alert.message
    v2 = det.handle_frame("from_guest", later)
    assert v2.action == "cut" and v2.alert is None           # rate-limited, counted
    clock.advance(11)
    v3 = det.handle_frame("from_guest", later)
    assert v3.alert is not None and v3.alert.fields["count"] == 2
    assert det.stats.anomalies == 3
    # a fragment reaching the guest is not the guest's doing: no alert
    assert det.handle_frame("to_guest", later).alert is None


# ---- state across a restart -----------------------------------------------------------------------------------


def test_a_warm_dns_cache_peers_and_the_queue_survive_a_restart():
    det, clock = detector()
    resolve(det, "www.example", [("www.example", "A", "192.0.2.10", 300)])
    det.handle_frame("to_guest", inbound("198.51.100.1", TCP(sport=5000, dport=22, flags="S")))
    for i in range(4):
        det.handle_frame("from_guest", syn(unknown(i)))
    assert det.attack and det.queued() == [V4(unknown(2)), V4(unknown(3))]
    doc = det.snapshot(wall=1000.0)
    det2, clock2 = detector()
    assert det2.restore(doc, wall=1002.0)
    assert det2.is_known(V4("192.0.2.10")) and det2.is_known(V4("198.51.100.1")) and det2.is_known(V4(RESOLVER))
    assert det2.queued() == [V4(unknown(2)), V4(unknown(3))] and det2.attack
    # the guest's cached answer, used after the restart, is no unknown destination
    assert det2.handle_frame("from_guest", syn("192.0.2.10")).action == "pass"
    # a version-1 snapshot (no peers, no queue) still restores
    v1 = {k: v for k, v in doc.items() if k not in ("peers", "queue", "interval", "last_proto")}
    v1["v"] = 1
    det3, _ = detector()
    assert det3.restore(v1, wall=1001.0) and det3.attack and det3.is_known(V4("192.0.2.10"))


# ---- a policy written for section 5.3's scanner still runs it, narrowed ---------------------------------------


def test_a_policy_granting_only_the_old_rights_runs_the_scanner_narrowed(kits):
    from nikit import policy, scanner_spec
    from test_codered import _syn_passes
    spec = scanner_spec("codered", str(REPO / "scanners" / "codered"), allow=[
        {"direction": "from_guest", "proto": "udp", "dport": 53},
        {"direction": "to_guest", "proto": "udp", "sport": 53},
        {"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn", "contain": True}])
    k = kits({"a": policy(hold_timeout_ms=5000, default_decision="pass", scanners=[spec])})
    alert = k.wait_alert("running narrowed", "a", "codered", timeout=20)
    assert alert["fields"]["event"] == "narrowed" and len(alert["fields"]["refused"]) == 8   # 7 + DNS over TCP
    k.until(lambda: sum(s.scanner == "codered" for s in k.nk("a").subs) == 3, 20, "the narrowed scanner")
    assert [_syn_passes(k, i) for i in range(3)] == [True, True, False]
    k.wait_alert("Code-Red-like scanning detected", "a", "codered")


def test_multicast_and_broadcast_are_not_new_hosts():
    det, clock = detector()
    for i in range(3):
        det.handle_frame("from_guest", udp(unknown(i)))
    assert det.attack
    # DHCP, mDNS and SSDP chatter goes on in attack mode and counts for nothing
    for dst, port in (("255.255.255.255", 67), ("224.0.0.251", 5353), ("239.255.255.250", 1900)):
        assert det.handle_frame("from_guest", udp(dst, dport=port)).action == "pass"
    assert det.handle_frame("from_guest", ping("ff02::1")).action == "pass"
    assert det.stats.multicast == 4 and det.unknown_count(60) == 3


# ---- strict mode: every unknown destination waits, attack or not ----------------------------------------------


def strict(**config):
    return detector(unknown="queue", queue_interval=120.0, resolvers=[f"{RESOLVER}/32"], **config)


def test_strict_mode_holds_an_unknown_destination_below_every_threshold_without_alerting():
    det, clock = strict()
    v = det.handle_frame("from_guest", syn(unknown(0)))
    assert v.action == "cut" and v.alert is None and not det.attack
    assert det.queued() == [V4(unknown(0))] and det.stats.strict_held == 1
    # UDP and ICMP too, each once in the queue however often it is tried
    assert det.handle_frame("from_guest", udp(unknown(1))).action == "cut"
    assert det.handle_frame("from_guest", ping(unknown(1))).action == "cut"
    assert det.queued() == [V4(unknown(0)), V4(unknown(1))]
    # resolved names, peers that came first, known networks and multicast are never delayed
    resolve(det, "www.example", [("www.example", "A", "192.0.2.10", 300)])
    assert det.handle_frame("from_guest", syn("192.0.2.10")).action == "pass"
    det.handle_frame("to_guest", inbound("198.51.100.1", TCP(sport=5000, dport=22, flags="S")))
    assert det.handle_frame("from_guest", syn("198.51.100.1", dport=8080)).action == "pass"
    assert det.handle_frame("from_guest", udp("239.255.255.250", dport=1900)).action == "pass"
    det2, _ = strict(known_networks=["203.0.113.0/24"])
    assert det2.handle_frame("from_guest", syn("203.0.113.9")).action == "pass"


def test_strict_mode_releases_one_destination_per_tick_counted_from_when_the_queue_filled():
    det, clock = strict()
    clock.advance(500)                  # an idle scanner saved up no release
    det.handle_frame("from_guest", syn(unknown(0)))
    clock.advance(10)
    det.handle_frame("from_guest", syn(unknown(1)))
    clock.advance(109.9)                # 119.9 s after the first: still waiting
    assert det.handle_frame("from_guest", syn(unknown(0))).action == "cut"
    clock.advance(0.2)
    assert det.tick() is None
    assert det.queued() == [V4(unknown(1))] and det.stats.released == 1
    # the released destination passes on its next try (a retransmission, the application's retry)
    assert det.handle_frame("from_guest", syn(unknown(0))).action == "pass"
    clock.advance(60)
    assert det.handle_frame("from_guest", syn(unknown(1))).action == "cut"
    clock.advance(60)
    det.tick()
    assert det.handle_frame("from_guest", syn(unknown(1))).action == "pass"
    # a grant lasts queue_grant seconds, then the destination waits again
    clock.advance(601)
    assert det.handle_frame("from_guest", syn(unknown(0))).action == "cut"


def test_strict_mode_an_inbound_contact_frees_a_queued_peer_at_once():
    det, clock = strict()
    det.handle_frame("from_guest", syn("198.51.100.7", dport=6881))
    det.handle_frame("to_guest", inbound("198.51.100.7", UDP(sport=6881, dport=6881) / b"hi"))
    assert det.queued() == []
    assert det.handle_frame("from_guest", syn("198.51.100.7", dport=6881)).action == "pass"


def test_strict_mode_still_detects_and_attack_mode_never_releases_faster():
    det, clock = strict()
    alerts = []
    for i in range(40):
        clock.advance(0.1)
        v = det.handle_frame("from_guest", syn(unknown(i)))
        assert v.action == "cut"
        if v.alert:
            alerts.append(v.alert)
    assert det.attack and alerts and alerts[0].fields["event"] == "attack_detected"
    # a fast worm's pace would give a 6 s tick; strict mode keeps it at least queue_interval
    assert det.interval >= 120.0
    clock.advance(60)
    det.tick()
    assert det.stats.released == 0


def test_strict_mode_queue_and_grants_survive_a_restart_and_no_release_comes_sooner():
    det, clock = strict()
    det.handle_frame("from_guest", syn(unknown(0)))
    clock.advance(30)
    det.handle_frame("from_guest", syn(unknown(1)))
    doc = det.snapshot(wall=2000.0)
    det2, clock2 = strict()
    assert det2.restore(doc, wall=2010.0)           # 10 s later, on another monotonic origin
    assert det2.queued() == [V4(unknown(0)), V4(unknown(1))]
    clock2.advance(79)                              # 119 s after the first was queued
    det2.tick()
    assert det2.stats.released == 0
    clock2.advance(2)
    det2.tick()
    assert det2.queued() == [V4(unknown(1))]
    doc = det2.snapshot(wall=2100.0)
    det3, _ = strict()
    assert det3.restore(doc, wall=2100.0)
    assert det3.handle_frame("from_guest", syn(unknown(0))).action == "pass"     # its grant came along


@pytest.mark.parametrize("config, why", [
    ({"unknown": "hold"}, "unknown"),
    ({"unknown": "queue", "queue_interval": 0.5, "resolvers": ["10.0.0.1/32"]}, "queue_interval"),
    ({"unknown": "queue"}, "needs resolvers"),
    ({"queue_grant": "long"}, "queue_grant"),
    ({"resolvers": "10.0.0.1"}, "resolvers"),
    ({"resolvers": ["not an address"]}, "resolvers"),
    ({"zone_networks_max": 0}, "zone_networks_max"),
    ({"zone_exempt": [""]}, "zone_exempt"),
    ({"zone_exempt": "amazonaws.com"}, "zone_exempt"),
])
def test_strict_mode_and_dns_settings_are_checked(config, why):
    from scanners.codered import ConfigError
    with pytest.raises(ConfigError, match=why):
        detector(**config)


# ---- DNS a worm controls launders no address --------------------------------------------------------------------


def test_names_that_spell_their_address_out_vouch_for_a_few_addresses_per_domain():
    from scanners.codered.core import EMBEDDED_ADDRESSES, EMBEDDED_NETWORKS
    det, clock = detector()
    # a cloud host's or a cluster's own names: a few work (a client and its three brokers)
    for i in range(3):
        name = f"ip-10-0-1-{15 + i}.eu-west-1.compute.internal"
        resolve(det, name, [(name, "A", f"10.0.1.{15 + i}", 60)], txid=0x2000 + i)
        assert det.is_known(V4(f"10.0.1.{15 + i}"))
    # a wildcard service spells any target out: past its allowance (per domain, ten minutes), nothing
    got = []
    for i in range(EMBEDDED_ADDRESSES + 8):
        dst = f"10.{i % EMBEDDED_NETWORKS}.{i}.1"
        name = f"app-{dst.replace('.', '-')}.nip.io"
        resolve(det, name, [(name, "A", dst, 60)], txid=0x2100 + i)
        got.append(det.is_known(V4(dst)))
    assert got == [True] * EMBEDDED_ADDRESSES + [False] * 8 and det.stats.name_laundered == 8
    # so does a CNAME to such a name from a domain of the worm's own: charged to the asked domain's
    # embedded allowance (its networks: four)
    for i in range(6):
        resolve(det, f"x{i}.evil-worm.com", [(f"x{i}.evil-worm.com", "CNAME", f"10-{60 + i}-7-5.nip.io", 300),
                                             (f"10-{60 + i}-7-5.nip.io", "A", f"10.{60 + i}.7.5", 300)],
                txid=0x2200 + i)
    assert [det.is_known(V4(f"10.{60 + i}.7.5")) for i in range(6)] == [True] * 4 + [False] * 2


@pytest.mark.parametrize("name, addr, spelled", [
    ("10.99.7.1.nip.io", "10.99.7.1", True),
    ("app-10.99-7.1.nip.io", "10.99.7.1", True),          # mixed separators (the older nip.io backend)
    ("010.099.007.001.example.com", "10.99.7.1", True),   # leading zeros
    ("0a630701.nip.io", "10.99.7.1", True),
    ("magic-0a630701.nip.io", "10.99.7.1", True),
    ("host110.99.7.12.example.com", "10.99.7.1", False),  # digits that only look alike
    ("a10-99-7-1b.example.com", "10.99.7.1", False),
    ("10.99.7.10.example.com", "10.99.7.1", False),
    ("fd00-0-0-0-0-0-0-7.sslip.io", "fd00::7", True),
    ("fd00-00-000-0000--0007.sslip.io", "fd00::7", True),
    ("x.fd00--7.sslip.io", "fd00::7", True),
    ("2001-db8-0-0-1--1.sslip.io", "2001:db8:0:0:1::1", True),
    ("--1.sslip.io", "::1", True),
    ("fd00--8.sslip.io", "fd00::7", False),
])
def test_the_forms_wildcard_services_read_are_recognised(name, addr, spelled):
    from scanners.codered.core import embeds_address
    assert embeds_address([name], ipaddress.ip_address(addr)) is spelled


def test_one_domain_vouches_for_a_bounded_number_of_networks_and_addresses():
    det, clock = detector(zone_networks_max=4, zone_addresses_max=6)
    # a worm's own domain: each name answers a target in another /16
    for i in range(6):
        resolve(det, f"h{i}.evil-worm.com", [(f"h{i}.evil-worm.com", "A", f"10.{i}.0.1", 60)], txid=0x3000 + i)
    known = [det.is_known(V4(f"10.{i}.0.1")) for i in range(6)]
    assert known == [True] * 4 + [False] * 2 and det.stats.zone_spread == 2
    # inside the networks it already vouched for, up to the address budget
    for i in range(4):
        resolve(det, f"k{i}.evil-worm.com", [(f"k{i}.evil-worm.com", "A", f"10.0.1.{i}", 60)], txid=0x3100 + i)
    assert [det.is_known(V4(f"10.0.1.{i}")) for i in range(4)] == [True, True, False, False]
    # one answer carrying many addresses is held to the same budget, glue included
    resolve(det, "bulk.other-worm.net", [("bulk.other-worm.net", "A", f"10.{50 + i}.0.1", 60) for i in range(8)],
            txid=0x3200)
    assert sum(det.is_known(V4(f"10.{50 + i}.0.1")) for i in range(8)) == 4
    # the same name again (its TTL renewed) is no new address; other domains have their own budget
    resolve(det, "h0.evil-worm.com", [("h0.evil-worm.com", "A", "10.0.0.1", 60)], txid=0x3300)
    resolve(det, "www.site.co.uk", [("www.site.co.uk", "A", "10.77.0.1", 60)], txid=0x3301)
    assert det.is_known(V4("10.0.0.1")) and det.is_known(V4("10.77.0.1"))
    # ten minutes later the budget is back
    clock.advance(601)
    resolve(det, "h9.evil-worm.com", [("h9.evil-worm.com", "A", "10.9.0.1", 60)], txid=0x3400)
    assert det.is_known(V4("10.9.0.1"))


def test_looking_up_many_other_domains_buys_no_fresh_budget():
    det, clock = detector(zone_networks_max=4, zone_addresses_max=6)
    for i in range(6):
        resolve(det, f"h{i}.evil-worm.com", [(f"h{i}.evil-worm.com", "A", f"10.{i}.0.1", 60)], txid=0x3500 + i)
    # three hundred ordinary lookups of other domains (more than the domains tracked at once) ...
    for i in range(300):
        name = f"www.site{i}.com"
        resolve(det, name, [(name, "A", f"172.16.{i // 250}.{i % 250 + 1}", 60)], txid=0x4000 + i)
    # ... and the worm's domain is still spent
    resolve(det, "h7.evil-worm.com", [("h7.evil-worm.com", "A", "10.7.0.1", 60)], txid=0x3600)
    assert not det.is_known(V4("10.7.0.1"))


def test_a_restart_does_not_renew_a_domains_budget():
    import json
    det, clock = detector(zone_networks_max=4, zone_addresses_max=6)
    for i in range(3):                  # three of the worm's four networks
        resolve(det, f"h{i}.evil-worm.com", [(f"h{i}.evil-worm.com", "A", f"10.{i}.0.1", 60)], txid=0x3800 + i)
    for i in range(2):                  # two wildcard names: two of the embedded allowance's four networks
        name = f"10-{40 + i}-0-1.nip.io"
        resolve(det, name, [(name, "A", f"10.{40 + i}.0.1", 60)], txid=0x3880 + i)
    clock.advance(300)
    resolve(det, "h3.evil-worm.com", [("h3.evil-worm.com", "A", "10.0.0.2", 60)], txid=0x3810)   # a fourth address
    doc = json.loads(json.dumps(det.snapshot(wall=5000.0)))    # what the NI keeps, as it keeps it
    # a new process, 60 s later by the wall clock: one network left for the domain, two for the wildcard
    det2, clock2 = detector(zone_networks_max=4, zone_addresses_max=6)
    assert det2.restore(doc, wall=5060.0)
    got = []
    for i in range(3, 6):
        resolve(det2, f"h{i}.evil-worm.com", [(f"h{i}.evil-worm.com", "A", f"10.{i}.0.1", 60)], txid=0x3900 + i)
        got.append(det2.is_known(V4(f"10.{i}.0.1")))
    assert got == [True, False, False] and det2.stats.zone_spread >= 2
    # the addresses count too: 4 + 1 = 5 of 6 used, so one more in a network already vouched for
    resolve(det2, "k0.evil-worm.com", [("k0.evil-worm.com", "A", "10.1.0.9", 60)], txid=0x3a00)
    resolve(det2, "k1.evil-worm.com", [("k1.evil-worm.com", "A", "10.1.0.10", 60)], txid=0x3a01)
    assert det2.is_known(V4("10.1.0.9")) and not det2.is_known(V4("10.1.0.10"))
    got = []
    for i in range(3):
        name = f"10-{50 + i}-0-1.nip.io"
        resolve(det2, name, [(name, "A", f"10.{50 + i}.0.1", 60)], txid=0x3b00 + i)
        got.append(det2.is_known(V4(f"10.{50 + i}.0.1")))
    assert got == [True, True, False]
    # what was saved leaves the window no sooner than it would have: the first three networks at 600 s
    # after they were seen (240 s from now on this clock), not before
    clock2.advance(230)
    resolve(det2, "h7.evil-worm.com", [("h7.evil-worm.com", "A", "10.7.0.1", 60)], txid=0x3c00)
    assert not det2.is_known(V4("10.7.0.1"))
    clock2.advance(20)
    resolve(det2, "h8.evil-worm.com", [("h8.evil-worm.com", "A", "10.8.0.1", 60)], txid=0x3c01)
    assert det2.is_known(V4("10.8.0.1"))
    # a restart ten minutes after the last answer: nothing is left to carry
    det3, _ = detector(zone_networks_max=4, zone_addresses_max=6)
    assert det3.restore(doc, wall=5000.0 + 601)
    resolve(det3, "h9.evil-worm.com", [("h9.evil-worm.com", "A", "10.9.0.1", 60)], txid=0x3d00)
    assert det3.is_known(V4("10.9.0.1"))


def test_saved_budgets_fit_the_checkpoint_and_bad_ones_are_refused_whole():
    import json
    det, clock = detector()
    for d in range(300):                # more domains than any checkpoint keeps, each with 32 networks
        for i in range(32 if d < 40 else 1):
            name = f"h{i}.worm{d}.com"
            resolve(det, name, [(name, "A", f"10.{i}.{d % 250}.{d // 250 + 1}", 60)], txid=(d * 32 + i) & 0xffff)
    doc = det.snapshot(max_bytes=65536, wall=5000.0)
    assert len(json.dumps(doc, separators=(",", ":"))) <= 65536
    used = [sum(z[2]) for z in doc["zones"]]
    assert len(used) == det.SNAPSHOT_ZONES and used == sorted(used, reverse=True) and min(used) == 32
    assert doc["zones"][0][0] == "(overflow)"      # the 44 domains past the 256 tracked share one, and keep it
    det2, _ = detector()
    assert det2.restore(doc, wall=5001.0)
    for bad in ([["x.com", [["not an address", 1]], [1]]], [["x.com", [], [-1]]], [["x.com", [], ["1"]]],
                [[5, [], [1]]], [["x.com", [[167772160, 1]], [1]]], "x", [["x.com"]]):
        det3, _ = detector()
        assert not det3.restore(dict(doc, zones=bad)) and det3.unknown_count(60) == 0 and not det3._zones.zones


def test_a_response_without_a_usable_question_is_charged_to_one_domain():
    det, clock = detector(zone_networks_max=4, zone_addresses_max=6)
    # the root's question, answered with records owned by a thousand made-up domains
    resolve(det, ".", [(f"t{i}.made-up{i}.com", "A", f"10.{i % 200}.{i // 200}.1", 60) for i in range(40)],
            txid=0x3700)
    assert sum(det.is_known(V4(f"10.{i % 200}.{i // 200}.1")) for i in range(40)) == 4


def test_a_stuffed_answer_costs_bounded_time():
    import time as _time
    from scanners.codered.core import MAX_ADDRESS_RECORDS
    det, clock = detector()
    cn = [(f"c{i}.evil-worm.com", "CNAME", f"c{i + 1}.evil-worm.com", 60) for i in range(300)]
    recs = [(f"a{i}.evil-worm.com", "A", f"10.{i % 250}.{i // 250}.9", 60) for i in range(1200)]
    t0 = _time.perf_counter()
    resolve(det, "q.evil-worm.com", cn + recs, txid=0x3800)
    assert _time.perf_counter() - t0 < 2.0
    assert det.stats.dns_records_cut == 1 and len(det.table) <= MAX_ADDRESS_RECORDS


def test_exempt_domains_and_the_registered_domain():
    from scanners.codered.core import UNLISTED, registered_domain
    assert registered_domain("a.b.example.co.uk") == "example.co.uk"
    assert registered_domain("t1.go.tv") == "go.tv"
    assert registered_domain("q1.made-up-tld") == registered_domain("x.local") == UNLISTED
    assert registered_domain(".") == UNLISTED
    det, clock = detector(zone_networks_max=2, zone_exempt=["cloud-provider.com"])
    for i in range(5):
        name = f"bucket{i}.storage.cloud-provider.com"
        resolve(det, name, [(name, "A", f"10.{i}.0.1", 60)], txid=0x3900 + i)
    assert all(det.is_known(V4(f"10.{i}.0.1")) for i in range(5))
    # a customer's CNAME out of the exempt domain is charged as usual
    for i in range(5):
        q = f"w{i}.cloud-provider.com"
        resolve(det, q, [(q, "CNAME", f"t{i}.evil-worm.com", 60), (f"t{i}.evil-worm.com", "A", f"10.{20 + i}.0.1", 60)],
                txid=0x3a00 + i)
    assert sum(det.is_known(V4(f"10.{20 + i}.0.1")) for i in range(5)) == 2


def test_with_resolvers_set_only_their_answers_are_shadowed_and_other_servers_are_new_destinations():
    det, clock = detector(resolvers=[f"{RESOLVER}/32"])
    resolve(det, "www.example", [("www.example", "A", "192.0.2.10", 300)])
    assert det.is_known(V4("192.0.2.10"))
    # the worm's own DNS server: its query is a new destination (counted), its answer shadows nothing
    evil = "203.0.113.53"
    v = det.handle_frame("from_guest", dns_query("t1.evil.example", txid=0x4000, server=evil))
    assert v.action == "pass" and det.stats.udp_unknown == 1       # below the thresholds: it passes, counted
    det.handle_frame("to_guest", dns_answer("t1.evil.example", [("t1.evil.example", "A", "10.98.0.1", 300)],
                                            txid=0x4000, server=evil))
    assert not det.is_known(V4("10.98.0.1")) and not det.is_known(V4(evil))
    assert det.stats.dns_not_resolver == 1
    # without the setting, the same server becomes a known resolver and its answers count (the default)
    det2, _ = detector()
    assert det2.handle_frame("from_guest", dns_query("t1.evil.example", txid=0x4000, server=evil)).action == "pass"
    det2.handle_frame("to_guest", dns_answer("t1.evil.example", [("t1.evil.example", "A", "10.98.0.1", 300)],
                                             txid=0x4000, server=evil))
    assert det2.is_known(V4("10.98.0.1")) and det2.stats.udp_unknown == 0


def test_strict_mode_grants_keep_their_age_across_restarts_and_expired_ones_stay_expired():
    det, clock = strict()
    for i in range(3):                      # 2 s apart: below max_per_second
        det.handle_frame("from_guest", syn(unknown(i)))
        clock.advance(2)
    clock.advance(355)                      # three ticks: all three released, at 120, 240 and 360 s
    det.tick()
    assert det.stats.released == 3 and not det.attack
    clock.advance(400)                      # grants 641, 521 and 401 s old; they last 600 s ...
    doc = det.snapshot(wall=1000.0)
    det2, _ = strict()
    assert det2.restore(doc, wall=1100.0)   # ... and 100 s of downtime later the third (ages 401 + 100) is left
    assert det2.handle_frame("from_guest", syn(unknown(2))).action == "pass"
    assert det2.handle_frame("from_guest", syn(unknown(0))).action == "cut"
    # restarted a day later: nothing comes back
    det3, _ = strict()
    assert det3.restore(doc, wall=1000.0 + 86400)
    assert det3.handle_frame("from_guest", syn(unknown(2))).action == "cut"


def test_strict_mode_a_dns_query_to_a_server_not_among_the_resolvers_waits_its_turn():
    det, clock = strict()
    v = det.handle_frame("from_guest", dns_query("x.example", txid=0x5000, server="203.0.113.53"))
    assert v.action == "cut" and det.queued() == [V4("203.0.113.53")]
    assert det.handle_frame("from_guest", dns_query("x.example", txid=0x5001)).action == "pass"   # the resolver


def test_a_domain_past_its_budget_is_alerted_once_per_ten_minutes():
    det, clock = detector(zone_networks_max=2, zone_addresses_max=6)
    alerts = []
    for i in range(6):
        name = f"h{i}.evil-worm.com"
        det.handle_frame("from_guest", dns_query(name, txid=0x6000 + i))
        v = det.handle_frame("to_guest", dns_answer(name, [(name, "A", f"10.{i}.0.1", 60)], txid=0x6000 + i))
        alerts.append(v.alert)
    fired = [a for a in alerts if a is not None]
    assert alerts[:2] == [None, None] and len(fired) == 1
    f = fired[0].fields
    assert (f["event"], f["domain"], f["name"], f["address"]) == ("dns_spread", "evil-worm.com", "h2.evil-worm.com",
                                                                 "10.2.0.1")
    clock.advance(601)
    for i in range(6, 9):
        name = f"h{i}.evil-worm.com"
        det.handle_frame("from_guest", dns_query(name, txid=0x6000 + i))
        det.handle_frame("to_guest", dns_answer(name, [(name, "A", f"10.{i}.0.1", 60)], txid=0x6000 + i))
    assert det.take_alert() is None and det.stats.zone_spread == 5       # alerted above, in the verdict


def test_names_built_to_make_the_ipv6_spelling_check_slow_cost_little():
    # a DNS-over-TCP-sized answer: 200 AAAA records, each owner a 250-character name of zero groups
    import time as _time
    lab = "-".join(["0"] * 31)
    recs = [(f"{lab}.{lab}.{lab}.x{i}.evil-worm.com", "AAAA", f"0:1::{i:x}:0", 60) for i in range(200)]
    det, clock = detector()
    t0 = _time.perf_counter()
    resolve(det, "q.evil-worm.com", recs, qtype="AAAA", txid=0x7000)
    assert _time.perf_counter() - t0 < 1.5
