"""The Code-Red scanner's detector (scanners/codered/core.py) with a fake clock, its frame parser, and (when the
SDK is importable) the scanner process itself against a fake NI kernel; and the guests' worm (guests/worm.c),
built for the host and aimed at loopback.  No VM needed: tests/test_worm.py runs them in real guests."""

import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # scanners/ is not an installed package

from scanners.codered import CodeRedDetector, ConfigError, DnsTable  # noqa: E402
from scanners.codered.packet import PacketError, parse_frame  # noqa: E402

from scapy.layers.dns import DNS, DNSQR, DNSRR  # noqa: E402
from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop  # noqa: E402
from scapy.layers.l2 import Dot1Q, Ether  # noqa: E402

GUEST = "10.0.0.2"
GUEST6 = "fd00::2"
RESOLVER = "10.0.0.1"
RESOLVER6 = "fd00::1"
MAC = "52:54:00:00:00:01"
V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t

    def advance(self, dt):
        self.t += dt


def detector(**config):
    clock = Clock()
    return CodeRedDetector(config, clock=clock), clock


def eth(l3):
    return bytes(Ether(src="52:54:00:00:00:02", dst="52:54:00:00:00:01") / l3)


def syn(dst, dport=80, sport=40000, flags="S"):
    ip = IPv6(src=GUEST6, dst=dst) if ":" in dst else IP(src=GUEST, dst=dst)
    return eth(ip / TCP(sport=sport, dport=dport, flags=flags, seq=1))


def dns_query(qname, qtype="A", txid=0x1111, sport=33333, server=RESOLVER):
    ip = IPv6(src=GUEST6, dst=server) if ":" in server else IP(src=GUEST, dst=server)
    return eth(ip / UDP(sport=sport, dport=53) / DNS(id=txid, rd=1, qd=[DNSQR(qname=qname, qtype=qtype)]))


def dns_answer(qname, answers, qtype="A", txid=0x1111, dport=33333, server=RESOLVER, rcode=0):
    """answers: [(owner, type, rdata, ttl)]"""
    ip = IPv6(src=server, dst=GUEST6) if ":" in server else IP(src=server, dst=GUEST)
    rrs = [DNSRR(rrname=o, type=t, rdata=r, ttl=ttl) for o, t, r, ttl in answers]
    msg = DNS(id=txid, qr=1, rd=1, ra=1, rcode=rcode, qd=[DNSQR(qname=qname, qtype=qtype)], an=rrs)
    return eth(ip / UDP(sport=53, dport=dport) / msg)


def resolve(det, qname, answers, qtype="A", txid=0x1111, server=RESOLVER):
    """The guest asks, the network answers: both frames through the detector."""
    assert det.handle_frame("from_guest", dns_query(qname, qtype, txid, server=server)).action == "pass"
    assert det.handle_frame("to_guest", dns_answer(qname, answers, qtype, txid, server=server)).action is None


def scan(det, clock, addrs, dt, dport=80):
    """SYNs to each address, dt seconds apart; returns [(verdict, alert)]."""
    out = []
    for a in addrs:
        out.append(det.decide_syn(a, dport))
        clock.advance(dt)
    return out


def unknown(i):
    return f"10.99.{i // 250}.{i % 250 + 1}"


# ---- known destinations ----------------------------------------------------------------------------------------


def test_resolved_addresses_pass_and_others_count():
    det, clock = detector()
    resolve(det, "www.example.com", [("www.example.com", "A", "192.0.2.10", 300)])
    assert det.is_known(V4("192.0.2.10"))
    v = det.handle_frame("from_guest", syn("192.0.2.10"))
    assert (v.action, v.alert) == ("pass", None)
    assert det.stats.syn_known == 1 and det.unknown_count(60) == 0
    assert det.handle_frame("from_guest", syn("192.0.2.11")).action == "pass"   # unknown, below threshold
    assert det.unknown_count(60) == 1 and det.stats.syn_unknown_passed == 1


def test_cname_chain_addresses_are_known_under_the_queried_name():
    det, clock = detector()
    resolve(det, "www.example.com", [("www.example.com", "CNAME", "edge.cdn.example", 3600),
                                      ("edge.cdn.example", "A", "192.0.2.20", 20),
                                      ("edge.cdn.example", "A", "192.0.2.21", 20)])
    for a in ("192.0.2.20", "192.0.2.21"):
        e = det.table.get(V4(a))
        assert e.name == "www.example.com" and e.expires == clock.t + 20


def test_unsolicited_or_mismatched_answers_are_ignored():
    det, clock = detector()
    ans = [("evil.example", "A", "192.0.2.66", 300)]
    det.handle_frame("to_guest", dns_answer("evil.example", ans))                     # no query at all
    det.handle_frame("from_guest", dns_query("good.example", txid=7))
    det.handle_frame("to_guest", dns_answer("evil.example", ans, txid=7))             # other question
    det.handle_frame("to_guest", dns_answer("good.example", ans, txid=8))             # other ID
    det.handle_frame("to_guest", dns_answer("good.example", ans, txid=7, server="10.0.0.99"))  # other server
    assert not det.is_known(V4("192.0.2.66")) and det.stats.dns_unsolicited == 4
    det.handle_frame("to_guest", dns_answer("GOOD.example", ans, txid=7))             # 0x20 case is fine
    assert det.is_known(V4("192.0.2.66"))
    det2, _ = detector(match_queries=False)
    det2.handle_frame("to_guest", dns_answer("evil.example", ans))
    assert det2.is_known(V4("192.0.2.66"))


def test_queries_time_out():
    det, clock = detector(query_timeout=5)
    det.handle_frame("from_guest", dns_query("late.example"))
    clock.advance(6)
    det.handle_frame("to_guest", dns_answer("late.example", [("late.example", "A", "192.0.2.5", 60)]))
    assert not det.is_known(V4("192.0.2.5"))


def test_error_responses_add_nothing():
    det, clock = detector()
    det.handle_frame("from_guest", dns_query("nx.example"))
    det.handle_frame("to_guest", dns_answer("nx.example", [("nx.example", "A", "192.0.2.9", 60)], rcode=3))
    assert not det.is_known(V4("192.0.2.9")) and det.stats.dns_rejected == 1


def test_ipv6_aaaa_and_ipv6_syns():
    det, clock = detector()
    resolve(det, "v6.example", [("v6.example", "AAAA", "2001:db8::80", 300)], qtype="AAAA", server=RESOLVER6)
    assert det.handle_frame("from_guest", syn("2001:db8::80")).action == "pass"
    assert det.stats.syn_known == 1
    verdicts = [det.handle_frame("from_guest", syn(f"2001:db8:1::{i}")) for i in range(1, 4)]
    assert [v.action for v in verdicts] == ["pass", "pass", "cut"]
    assert verdicts[2].alert.fields["last_dst"] == "2001:db8:1::3"


def test_known_networks():
    det, clock = detector(known_networks=["10.0.0.0/24", "fd00::/64"])
    for i in range(20):
        assert det.decide_syn(f"10.0.0.{i + 10}", 22)[0] == "pass"
        assert det.decide_syn(f"fd00::{i + 10:x}", 22)[0] == "pass"
    assert det.stats.syn_known == 40 and not det.attack


# ---- thresholds ------------------------------------------------------------------------------------------------


def test_two_unknown_in_a_second_is_fine_three_is_an_attack():
    det, clock = detector()
    res = scan(det, clock, [unknown(i) for i in range(2)], 0.3)
    assert [r for r in res] == [("pass", None), ("pass", None)]
    assert not det.attack
    verdict, alert = det.decide_syn(unknown(2), 8080)
    assert verdict == "cut" and det.attack
    assert alert.fields["event"] == "attack_detected"
    assert alert.fields["count"] == 3 and alert.fields["count_last_second"] == 3
    assert alert.fields["last_port"] == 8080 and alert.fields["last_dst"] == unknown(2)
    assert "3 unknown destinations" in alert.message and "last port 8080" in alert.message


def test_the_second_is_a_sliding_window():
    det, clock = detector()
    # two, then a pause just over a second, then two more: never more than 2 within one second
    for dt in (0.5, 0.51, 0.5, 0.6):
        assert det.decide_syn(unknown(int(dt * 1000)), 80)[0] == "pass"
        clock.advance(dt)
    assert not det.attack


def test_repeated_syns_to_one_destination_count_once():
    det, clock = detector()
    for port in range(20):   # retransmissions, reconnections and a port scan of one host
        assert det.decide_syn("10.99.0.1", port) == ("pass", None)
    assert det.unknown_count(1) == 1 and not det.attack


def test_ten_a_minute_is_fine_eleven_is_an_attack():
    det, clock = detector()
    res = scan(det, clock, [unknown(i) for i in range(10)], 5.5)    # 10 in 49.5 s
    assert all(r == ("pass", None) for r in res) and not det.attack
    verdict, alert = det.decide_syn(unknown(10), 443)
    assert verdict == "cut" and alert.fields["count"] == 11 and alert.fields["count_last_second"] == 1


def test_the_minute_is_a_sliding_window():
    det, clock = detector(max_per_10_minutes=1000)
    res = scan(det, clock, [unknown(i) for i in range(30)], 6.1)    # 10 per 61 s, forever
    assert all(r == ("pass", None) for r in res) and not det.attack


def test_ten_minutes_catch_a_slow_scanner():
    # 10 per 61 s never trips the minute; the ten-minute window (20) does, at the 21st
    det, clock = detector()
    res = scan(det, clock, [unknown(i) for i in range(21)], 6.1)
    assert all(r == ("pass", None) for r in res[:20]) and res[20][0] == "cut" and det.attack
    assert res[20][1].fields["count_last_10_minutes"] == 21
    # a slower one still: one new address per 30 s, 20 in ten minutes is fine, the window slides
    det, clock = detector()
    res = scan(det, clock, [unknown(i) for i in range(40)], 30.1)
    assert all(r == ("pass", None) for r in res) and not det.attack


def test_thresholds_come_from_the_config():
    det, clock = detector(max_per_second=5, max_per_minute=100)
    res = scan(det, clock, [unknown(i) for i in range(6)], 0.1)
    assert [r[0] for r in res] == ["pass"] * 5 + ["cut"]
    det, clock = detector(max_per_second=100, max_per_minute=3)
    res = scan(det, clock, [unknown(i) for i in range(4)], 10)
    assert [r[0] for r in res] == ["pass"] * 3 + ["cut"]


# ---- attack mode -----------------------------------------------------------------------------------------------


def enter_attack(det, clock):
    scan(det, clock, [unknown(i) for i in range(2)], 0.125)
    verdict, alert = det.decide_syn(unknown(2), 80)
    assert verdict == "cut" and alert is not None and det.attack
    return alert


def test_attack_mode_releases_one_queued_destination_every_six_seconds():
    """Williamson's delay queue: unknown destinations wait in order; one is released per tick of a fixed
    six-second clock, and a released destination's retransmitted SYN passes."""
    det, clock = detector(release_share=1)   # the paper's fixed 6 s (see the slow-scanner test)
    resolve(det, "www.example.com", [("www.example.com", "A", "192.0.2.10", 300)])
    enter_attack(det, clock)
    start = clock.t
    assert det.queued() == [V4(unknown(2))]
    i = 100
    while clock.t < start + 59:         # a worm at 8 SYN/s that never retries (exact binary steps)
        clock.advance(0.125)
        verdict, alert = det.decide_syn(unknown(i), 80)
        assert verdict == "cut" and alert is None
        i += 1
        # known destinations pass at once, whatever the mode, and are never queued
        assert det.decide_syn("192.0.2.10", 443) == ("pass", None)
    assert V4("192.0.2.10") not in det.queued()
    # nine ticks (6, 12, ..., 54 s) released the nine oldest queued destinations, whatever the worm's pace
    assert det.stats.released == 9
    assert sorted(det._granted, key=lambda a: det._granted[a])[:2] == [V4(unknown(2)), V4(unknown(100))]
    assert det.decide_syn(unknown(2), 80)[0] == "pass"          # the first one's retransmission
    assert det.decide_syn(unknown(i - 1), 80)[0] == "cut"      # the newest still waits
    assert det.stats.syn_unknown_passed == 3                    # two before the attack, one retransmission


def test_the_delay_queue_slows_a_slow_scanner_and_loses_idle_ticks():
    det, clock = detector(pass_interval=6, max_pass_interval=6, attack_duration=300)
    enter_attack(det, clock)
    clock.advance(30)                   # five idle ticks: lost, not saved up
    det.tick()
    assert det.stats.released == 1     # the one queued at detection
    # a slow worm, one new destination every 10 s, retrying each one 1 s and 3 s later (Linux SYN retries)
    out = []
    for k in range(5):
        for dt, retry in ((0, False), (1, True), (2, True)):
            clock.advance(dt)
            out.append((k, retry, det.decide_syn(unknown(300 + k), 80)[0]))
        clock.advance(7)
    passed = {k for k, _, v in out if v == "pass"}
    first = [v for k, retry, v in out if not retry]
    assert first == ["cut"] * 5          # no first SYN of a new destination ever passes in attack mode
    assert len(passed) <= 5 and det.stats.queue_full == 0


def test_a_released_destination_keeps_passing_until_reevaluation():
    det, clock = detector(release_share=1)
    enter_attack(det, clock)
    assert det.decide_syn("10.98.0.1", 80)[0] == "cut"     # queued behind unknown(2)
    assert det.decide_syn("10.98.0.2", 80)[0] == "cut"
    clock.advance(6)
    det.tick()                                              # releases unknown(2)
    assert det.decide_syn("10.98.0.1", 80)[0] == "cut"
    clock.advance(6)
    assert det.decide_syn("10.98.0.1", 80)[0] == "pass"   # its turn
    clock.advance(1)
    assert det.decide_syn("10.98.0.1", 80)[0] == "pass"   # and its retransmissions and reconnections
    assert det.decide_syn("10.98.0.2", 80)[0] == "cut"    # still waiting for a tick
    clock.advance(5)
    assert det.decide_syn("10.98.0.2", 80)[0] == "pass"


def test_the_release_interval_follows_the_scanners_pace():
    """The tick is pass_interval for a fast scanner, and long enough for a slow one that at most
    release_share of its pace gets out: a slow scanner is really slowed."""
    det, clock = detector(pass_interval=6, max_pass_interval=600)
    intervals = []
    for i in range(8 * 130):            # 8 new destinations a second for 130 s
        clock.advance(0.125)
        _, alert = det.decide_syn(unknown(1000 + i), 80)
        if alert:
            intervals.append(alert.fields["pass_interval"])
    # 8/s: 5 % of that is one every 2.5 s, below the floor of 6 s
    assert intervals == [6.0, 6.0, 6.0]
    assert len(det.queued()) == det.cfg["queue_capacity"] and det.stats.queue_full > 0
    # a slow scanner: one new destination every 5 s trips the minute window at the 11th
    det, clock = detector()
    for i in range(11):
        _, alert = det.decide_syn(unknown(i), 80)
        clock.advance(5)
    assert alert is not None and alert.fields["pass_interval"] == pytest.approx(5 / 0.05)
    # and its next addresses wait: in the next 100 s (20 more) at most one is released
    released = det.stats.released
    for i in range(11, 31):
        det.decide_syn(unknown(i), 80)
        clock.advance(5)
    assert det.stats.released - released <= 1


def test_reevaluation_alerts_again_while_the_scan_goes_on():
    det, clock = detector()
    first = enter_attack(det, clock)
    assert first.fields["event"] == "attack_detected"
    start = det.attack_since
    alerts = []
    prev_port = 80
    for i in range(1040):                # 8 SYN/s for 130 s (exact binary steps)
        clock.advance(0.125)
        port = 8000 + i % 7
        verdict, alert = det.decide_syn(unknown(1000 + i), port)
        if alert:
            alerts.append((clock.t - start, prev_port, alert))
        prev_port = port
    assert [(t, a.fields["event"]) for t, _, a in alerts] == [(60.0, "attack_continues"),
                                                               (120.0, "attack_continues")]
    for _, port, a in alerts:
        # unique unknown destinations in the last minute: (t-60, t] holds 479 SYNs, the one deciding now
        # is counted after the re-evaluation
        assert a.fields["count"] == 479
        assert a.fields["last_port"] == port        # the port of the most recent SYN before the re-evaluation
        assert "continues" in a.message
    assert det.attack and det.stats.attacks == 1 and det.stats.attack_continued == 2


def test_reevaluation_ends_attack_mode_quietly_when_the_scan_stopped():
    det, clock = detector()
    enter_attack(det, clock)
    clock.advance(59.9)
    assert det.tick() is None and det.attack
    clock.advance(0.2)
    assert det.tick() is None            # re-evaluated: the 3 SYNs that started it are over a minute old
    assert not det.attack and det.stats.attack_ended == 1
    # back to normal: two unknown pass, the third starts a new attack with a new alert
    res = scan(det, clock, [unknown(500 + i) for i in range(3)], 0.1)
    assert [r[0] for r in res] == ["pass", "pass", "cut"]
    assert res[2][1].fields["event"] == "attack_detected" and det.stats.attacks == 2


def test_reevaluation_by_tick_alerts_when_the_rate_is_still_high():
    det, clock = detector(attack_duration=10, pass_interval=2)
    enter_attack(det, clock)
    scan(det, clock, [unknown(100 + i) for i in range(20)], 0.45)   # 9 s of scanning in attack mode
    clock.advance(1.5)
    alert = det.tick()
    assert alert is not None and alert.fields["event"] == "attack_continues"
    assert alert.fields["count"] == 23 and alert.fields["attack_duration"] == 10
    assert det.tick() is None            # one alert per re-evaluation


def test_reevaluation_counts_only_the_last_minute():
    det, clock = detector()
    enter_attack(det, clock)
    # a slow trickle in attack mode: 8 unknown in the minute (the 3 that triggered are > 60 s old by then)
    clock.advance(1)
    scan(det, clock, [unknown(200 + i) for i in range(8)], 7)
    clock.advance(60 - 1 - 56 + 0.1)
    assert det.tick() is None and not det.attack


# ---- the DNS table ---------------------------------------------------------------------------------------------


def test_table_keeps_expired_entries_until_space_is_needed():
    t = DnsTable(3)
    t.add(V4("192.0.2.1"), 10, "a", now=0)
    t.add(V4("192.0.2.2"), 20, "b", now=0)
    t.add(V4("192.0.2.3"), 30, "c", now=0)
    # long after every TTL: all still there (programs reuse old gethostbyname() results)
    assert all(V4(f"192.0.2.{i}") in t for i in (1, 2, 3))
    t.add(V4("192.0.2.4"), 1040, "d", now=1000)     # full: the entry that expired first goes
    assert V4("192.0.2.1") not in t and len(t) == 3 and t.evicted_expired == 1
    t.add(V4("192.0.2.5"), 1040, "e", now=1000)
    assert V4("192.0.2.2") not in t and V4("192.0.2.3") in t


def test_table_prefers_expired_entries_and_respects_ttls():
    t = DnsTable(3)
    t.add(V4("192.0.2.1"), 100, "a", now=0)    # expires at 100
    t.add(V4("192.0.2.2"), 5, "b", now=0)      # expires at 5 (added later, expires earlier)
    t.add(V4("192.0.2.3"), 200, "c", now=0)
    t.add(V4("192.0.2.4"), 60, "d", now=50)    # at 50 only b has expired: b goes, not a (the oldest added)
    assert V4("192.0.2.2") not in t and V4("192.0.2.1") in t and t.evicted_live == 0
    # nothing expired at 55: the one closest to expiring (d, at 60) goes, counted as a live eviction
    t.add(V4("192.0.2.5"), 300, "e", now=55)
    assert V4("192.0.2.4") not in t and t.evicted_live == 1


def test_table_refresh_extends_never_shortens():
    t = DnsTable(2)
    t.add(V4("192.0.2.1"), 10, "a", now=0)
    t.add(V4("192.0.2.2"), 20, "b", now=0)
    t.add(V4("192.0.2.1"), 50, "a2", now=5)     # refreshed: now expires after b
    t.add(V4("192.0.2.1"), 15, "a3", now=6)     # a shorter TTL does not shorten it
    assert t.get(V4("192.0.2.1")).expires == 50 and t.get(V4("192.0.2.1")).name == "a2"
    t.add(V4("192.0.2.3"), 100, "c", now=30)
    assert V4("192.0.2.2") not in t and V4("192.0.2.1") in t


def test_table_heap_stays_bounded_under_refreshes():
    t = DnsTable(10)
    for i in range(10000):
        t.add(V4(f"192.0.2.{i % 10}"), i, "x", now=i)
    assert len(t) == 10 and len(t._heap) <= 2 * 10 + 64


def test_detector_table_capacity_and_ttl_from_dns():
    det, clock = detector(table_capacity=2, max_ttl=100)
    resolve(det, "a.example", [("a.example", "A", "192.0.2.1", 5)], txid=1)
    resolve(det, "b.example", [("b.example", "A", "192.0.2.2", 100000)], txid=2)
    assert det.table.get(V4("192.0.2.2")).expires == clock.t + 100     # capped at max_ttl
    clock.advance(10)
    assert det.is_known(V4("192.0.2.1"))        # expired but kept
    resolve(det, "c.example", [("c.example", "A", "192.0.2.3", 60)], txid=3)
    assert not det.is_known(V4("192.0.2.1")) and det.is_known(V4("192.0.2.2"))


# ---- configuration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,why", [
    ({"max_per_secnd": 3}, "unknown"),
    ({"max_per_second": "2"}, "integer"),
    ({"max_per_second": True}, "integer"),
    ({"max_per_minute": -1}, "below"),
    ({"pass_interval": 0}, "below"),
    ({"attack_duration": float("nan")}, "below"),
    ({"table_capacity": 0}, "below"),
    ({"match_queries": "yes"}, "true or false"),
    ({"known_networks": "10.0.0.0/8"}, "list"),
    ({"known_networks": ["10.0.0.0/33"]}, "known_networks"),
    ({"unparseable": "drop"}, "unparseable"),
    ({"dns_port": 70000}, "65535"),
])
def test_bad_config(config, why):
    with pytest.raises(ConfigError, match=why):
        CodeRedDetector(config)


def test_defaults():
    det = CodeRedDetector()
    assert (det.cfg["max_per_second"], det.cfg["max_per_minute"], det.cfg["pass_interval"],
            det.cfg["attack_duration"]) == (2, 10, 6.0, 60.0)


# ---- frames ----------------------------------------------------------------------------------------------------


def test_frame_parser_handles_vlan_ipv6_extensions_and_padding():
    p = parse_frame(bytes(Ether(dst=MAC) / Dot1Q(vlan=5) / IP(src=GUEST, dst="192.0.2.1") / TCP(dport=80, flags="S")))
    assert (p.dst, p.dport, p.is_tcp_syn) == (V4("192.0.2.1"), 80, True)
    p = parse_frame(bytes(Ether(dst=MAC) / IPv6(src=GUEST6, dst="2001:db8::1") / IPv6ExtHdrHopByHop()
                          / IPv6ExtHdrFragment(offset=0, m=0) / TCP(dport=22, flags="S")))
    assert (p.dst, p.dport, p.is_tcp_syn) == (V6("2001:db8::1"), 22, True)
    p = parse_frame(bytes(Ether(dst=MAC) / IP(src=GUEST, dst=RESOLVER) / UDP(sport=5, dport=53) / b"abc") + bytes(30))
    assert p.payload == b"abc"      # Ethernet padding is not UDP payload
    assert not parse_frame(syn("192.0.2.1", flags="SA")).is_tcp_syn
    assert not parse_frame(syn("192.0.2.1", flags="SR")).is_tcp_syn


@pytest.mark.parametrize("frame,why", [
    (b"\0" * 13, "Ethernet"),
    (bytes(Ether(dst=MAC) / IP(dst="192.0.2.1", frag=10) / TCP()), "fragment"),
    (bytes(Ether(dst=MAC) / IPv6(dst="2001:db8::1") / IPv6ExtHdrFragment(offset=3) / TCP()), "fragment"),
    (bytes(Ether(dst=MAC) / IP(dst="192.0.2.1") / TCP())[:40], "total length"),
    (bytes(Ether(dst=MAC) / IP(dst="192.0.2.1", ihl=4) / TCP()), "header length"),
    (bytes(Ether(dst=MAC) / IP(dst="192.0.2.1") / TCP(dataofs=15)), "data offset"),
    (bytes(Ether(dst=MAC) / IP(dst="192.0.2.1") / UDP(len=200) / b"x"), "UDP length"),
    (bytes(Ether(dst=MAC) / IP(dst="192.0.2.1", proto=47) / (b"x" * 20)), "protocol 47"),
    (bytes(Ether(dst=MAC, type=0x0806) / (b"x" * 28)), "ethertype"),
])
def test_frame_parser_rejects(frame, why):
    with pytest.raises(PacketError, match=why):
        parse_frame(frame)


def test_held_frames_that_are_not_syns_follow_the_unparseable_setting():
    det, _ = detector()
    assert det.handle_frame("from_guest", b"garbage").action == "cut"
    assert det.handle_frame("from_guest", syn("192.0.2.1", flags="SA")).action == "cut"
    det, _ = detector(unparseable="pass")
    assert det.handle_frame("from_guest", b"garbage").action == "pass"


frame_bytes = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda head, tail: head + tail,
              st.sampled_from([syn("192.0.2.1")[:34], syn("2001:db8::1")[:54],
                               dns_answer("a.example", [("a.example", "A", "192.0.2.1", 5)])[:42]]),
              st.binary(max_size=200)),
)


@settings(max_examples=1500, deadline=None)
@given(frames=st.lists(st.tuples(st.sampled_from(["from_guest", "to_guest", 1, 2]), frame_bytes,
                                 st.floats(0, 5)), max_size=12))
def test_hostile_frames_never_raise(frames):
    det, clock = detector(match_queries=False)
    for direction, data, dt in frames:
        clock.advance(dt)
        v = det.handle_frame(direction, data)
        assert v.action in (None, "pass", "cut")


# ---- the scanner process, against a fake NI kernel (needs the SDK) -----------------------------------------------


def test_scanner_process_with_fake_kernel(tmp_path):
    from vhostni.scanner import wire
    kernel, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = dict(os.environ, VHOSTNI_SCANNER_FD=str(child.fileno()))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, str(REPO / "scanners" / "codered")], env=env,
                            pass_fds=[child.fileno()], stderr=subprocess.PIPE, cwd=tmp_path)
    child.close()
    kernel.settimeout(20)

    def recv():
        return wire.decode(kernel.recv(wire.MAX_MESSAGE))

    try:
        kernel.send(wire.encode_control({
            "op": "hello", "version": 1, "scanner": "codered", "ni": "vm1",
            "config": {"pass_interval": 0.5, "release_share": 1, "attack_duration": 2.0}, "injections": []}))
        subs = []
        while not subs or "stream" not in subs[-1][0]:
            msg = recv()
            assert msg.body["op"] == "subscribe"
            subs.append((msg.body.get("match") or msg.body, msg.body["contain"]))
            kernel.send(wire.encode_control({"op": "reply", "id": msg.body["id"], "ok": True}))
        held = sorted((m["direction"], m["proto"]) for m, c in subs if c)
        assert held == [("from_guest", "icmp"), ("from_guest", "icmpv6"), ("from_guest", "tcp"),
                        ("from_guest", "udp")]
        assert [m["tcp_flags"] for m, c in subs if c and m["proto"] == "tcp"] == ["syn,!ack"]
        assert subs[-1] == ({"op": "subscribe", "stream": True, "port": 53, "direction": "both",
                             "contain": False, "id": subs[-1][0]["id"]}, False)

        number = 0

        def send(direction, data, held):
            nonlocal number
            number += 1
            kernel.send(wire.encode_frame(number, direction, held, time.time_ns(), data))
            return number

        send(wire.FROM_GUEST, dns_query("www.example.com"), False)
        send(wire.TO_GUEST, dns_answer("www.example.com", [("www.example.com", "A", "192.0.2.10", 300)]), False)
        decisions, alerts = {}, []

        def collect(n):
            while len(decisions) < n:
                msg = recv()
                if isinstance(msg, wire.Decision):
                    decisions[msg.number] = msg.verdict
                else:
                    assert msg.body["op"] == "alert"
                    alerts.append(msg.body)

        known = send(wire.FROM_GUEST, syn("192.0.2.10"), True)
        scans = [send(wire.FROM_GUEST, syn(unknown(i), dport=445), True) for i in range(3)]
        collect(4)
        assert decisions[known] == wire.PASS
        assert [decisions[n] for n in scans] == [wire.PASS, wire.PASS, wire.CUT]
        while not alerts:
            alerts.append(recv().body)
        assert alerts[0]["fields"]["event"] == "attack_detected"
        assert alerts[0]["fields"]["count"] == 3 and alerts[0]["fields"]["last_port"] == 445
        # keep scanning: after the 2 s attack period the timer re-evaluates and alerts again
        deadline = time.monotonic() + 10
        i = 3
        while len(alerts) < 2 and time.monotonic() < deadline:
            send(wire.FROM_GUEST, syn(unknown(i)), True)
            i += 1
            time.sleep(0.1)
            kernel.setblocking(False)
            try:
                while True:
                    msg = wire.decode(kernel.recv(wire.MAX_MESSAGE))
                    if isinstance(msg, wire.Control):
                        alerts.append(msg.body)
                    else:
                        decisions[msg.number] = msg.verdict
            except BlockingIOError:
                pass
            finally:
                kernel.settimeout(20)
        assert len(alerts) >= 2 and alerts[1]["fields"]["event"] == "attack_continues"
        passed = [n for n in range(scans[-1] + 1, number + 1) if decisions.get(n) == wire.PASS]
        assert passed == []            # new destinations wait in the delay queue, none passes at once
        # the first one queued (the SYN cut at detection) was released long since: its retransmission passes
        again = send(wire.FROM_GUEST, syn(unknown(2), dport=445), True)
        collect(len(decisions) + 1)
        assert decisions[again] == wire.PASS
    finally:
        kernel.close()
        try:
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = proc.stderr.read().decode()
    assert proc.returncode == 0, err
    assert "scanning on vm1 as codered" in err


# ---- guests/worm.c, built for the host and run against loopback (127/8 never leaves this machine) -------------



@pytest.fixture(scope="module")
def worm(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    exe = tmp_path_factory.mktemp("worm") / "worm"
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                    str(REPO / "guests" / "worm.c")], check=True, capture_output=True)
    return exe


def run_worm(exe, *args, timeout=30):
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)


def test_worm_scans_inside_the_prefix_at_the_rate(worm):
    r = run_worm(worm, "-n", "20", "-r", "40", "-p", "9", "-s", "42", "-w", "1", "127.0.3.0/24")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "worm: seed 42 target 127.0.3.0/24 port 9 count 20 rate 40"
    attempts = [re.fullmatch(r"attempt (\d+) ([\d.]+):9", ln) for ln in lines if ln.startswith("attempt")]
    assert [int(m[1]) for m in attempts] == list(range(1, 21))
    addrs = [ipaddress.ip_address(m[2]) for m in attempts]
    assert len(set(addrs)) == 20
    assert all(a in ipaddress.ip_network("127.0.3.0/24") and a.packed[3] not in (0, 255) for a in addrs)
    sent = re.search(r"^sent 20 attempts in ([\d.]+) s$", r.stdout, re.M)
    assert sent and 19 / 40 * 0.9 <= float(sent[1]) < 19 / 40 + 1.0      # 20 attempts at 40/s: ~0.475 s
    # nothing listens on port 9 of 127.0.3.x: every SYN is answered by a RST
    assert lines[-1] == "done: connected 0 refused 20 failed 0 pending 0"
    again = run_worm(worm, "-n", "20", "-r", "1000", "-p", "9", "-s", "42", "127.0.3.0/24")
    assert [ln for ln in again.stdout.splitlines() if ln.startswith("attempt")] == \
           [ln for ln in lines if ln.startswith("attempt")]                  # same seed, same targets


def test_worm_small_prefixes(worm):
    r = run_worm(worm, "-n", "2", "-r", "1000", "-s", "1", "127.0.0.4/31")
    assert sorted(re.findall(r"attempt \d+ ([\d.]+):80", r.stdout)) == ["127.0.0.4", "127.0.0.5"]
    r = run_worm(worm, "-n", "1", "127.0.0.9/32")
    assert "attempt 1 127.0.0.9:80" in r.stdout


@pytest.mark.parametrize("args,why", [
    (["10.0.0.0/7"], "refusing prefix /7"),
    (["0.0.0.0/0"], "refusing prefix /0"),
    ([], "usage"),
    (["127.0.0.1/24"], "host bits"),
    (["-n", "255", "127.0.0.0/24"], "only 254 addresses"),
    (["-r", "0", "127.0.0.0/24"], "bad rate"),
    (["-p", "65536", "127.0.0.0/24"], "bad port"),
    (["-n", "x", "127.0.0.0/24"], "bad count"),
    (["example.com/24"], "bad prefix"),
    (["127.0.0.0/24", "127.0.1.0/24"], "usage"),
    (["-m", "ptr", "127.0.0.0/24"], "needs -d DNS"),
    (["-m", "lookup", "www.test"], "needs -d DNS"),
    (["-m", "synbomb", "127.0.0.1/32"], "needs -S SRC"),
    (["-m", "worm", "127.0.0.0/24"], "bad mode"),
    (["-m", "synbomb", "-S", "10.0.0.300", "127.0.0.1/32"], "bad address"),
])
def test_worm_refuses(worm, args, why):
    r = run_worm(worm, *args)
    assert r.returncode == 2 and why in r.stderr and "attempt" not in r.stdout


@pytest.mark.parametrize("mode, port", [("udp", 1434), ("icmp", 0), ("synbomb", 9)])
def test_worm_datagram_styles_send_once_per_address(worm, mode, port):
    extra = ["-S", "127.0.0.9"] if mode == "synbomb" else []
    target = "127.0.0.1/32" if mode == "synbomb" else "127.0.3.0/24"
    r = run_worm(worm, "-m", mode, "-n", "5", "-r", "100", "-s", "3", *(["-p", "9"] if mode == "synbomb" else []),
                 *extra, target)
    assert r.returncode == 0, r.stderr
    attempts = [ln for ln in r.stdout.splitlines() if ln.startswith("attempt")]
    assert len(attempts) == 5 and all(ln.endswith(f":{port}") for ln in attempts), r.stdout
    assert "done: connected 0 refused 0 failed 0 pending 0" in r.stdout
    if mode != "synbomb":
        assert len({ln.split()[2] for ln in attempts}) == 5     # distinct addresses


# ---- the scanner under a real NI kernel: its state survives a kill and a daemon restart (Scanner.checkpoint) ----

CODERED_RIGHTS = [
    {"direction": "from_guest", "proto": "udp", "contain": True},
    {"direction": "from_guest", "proto": "icmp", "contain": True},
    {"direction": "from_guest", "proto": "icmpv6", "contain": True},
    {"direction": "to_guest", "proto": "udp"},
    {"direction": "to_guest", "proto": "icmp"},
    {"direction": "to_guest", "proto": "icmpv6"},
    {"direction": "to_guest", "proto": "tcp", "tcp_flags": "syn"},
    {"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn", "contain": True},
    {"stream": True, "port": 53, "direction": "both"}]


def _codered_kit(kits, **kw):
    from nikit import policy, scanner_spec
    spec = scanner_spec("codered", str(REPO / "scanners" / "codered"), allow=CODERED_RIGHTS,
                        config={"pass_interval": 30.0, "attack_duration": 60.0})
    # default pass: a SYN the scanner failed to decide would get through, so "cut" means the scanner cut it
    k = kits({"a": policy(hold_timeout_ms=5000, default_decision="pass", scanners=[spec])}, **kw)
    _codered_ready(k)
    return k


def _codered_ready(k):
    k.until(lambda: k.sp("a", "codered").locked
            and sum(s.scanner == "codered" for s in k.nk("a").subs) == 10, 20, "the Code-Red scanner")


def _syn_passes(k, i: int) -> bool:
    """Guest a opens a connection to unknown address 198.18.x.y: does its SYN reach the network (guest b)?"""
    from nikit import A_IP, A_MAC, B_MAC, TCP_SYN, eth, ipv4, tcp
    sp = k.sp("a", "codered")
    before = sp.counters.decisions
    k.send("a", eth(B_MAC, A_MAC, 0x0800, ipv4(A_IP, f"198.18.{i // 250}.{i % 250 + 1}", 6,
                                                tcp(40000 + i, 445, TCP_SYN))))
    k.until(lambda: sp.counters.decisions > before, 10, "the scanner's decision")
    return len(k.recv("b", wait=0.2)) == 1


def test_attack_mode_survives_a_scanner_kill(kits):
    k = _codered_kit(kits)
    assert [_syn_passes(k, i) for i in range(3)] == [True, True, False]      # the third starts attack mode
    k.wait_alert("Code-Red-like scanning detected", "a", "codered")
    pid = k.sp("a", "codered").proc.pid
    os.kill(pid, 9)
    k.until(lambda: k.sp("a", "codered").proc.pid != pid, 10, "the restart")
    _codered_ready(k)
    # without its checkpoint the new process would start afresh and let two more unknown destinations out
    assert [_syn_passes(k, i) for i in range(3, 8)] == [False] * 5
    assert k.sp("a", "codered").counters.restarts == 1


def test_attack_mode_survives_a_daemon_restart(kits, tmp_path):
    state = str(tmp_path / "state")
    k = _codered_kit(kits, state_dir=state)
    assert [_syn_passes(k, i) for i in range(3)] == [True, True, False]
    k.daemon.close()
    k.daemon = None
    k2 = _codered_kit(kits, state_dir=state)
    assert [_syn_passes(k2, i) for i in range(3, 8)] == [False] * 5
    # and without the state directory a new daemon starts afresh (what the checkpoint prevents)
    k3 = _codered_kit(kits)
    assert [_syn_passes(k3, i) for i in range(3)] == [True, True, False]


def test_snapshot_round_trip_ages_by_wall_time_and_fits():
    det, clock = detector(pass_interval=6, attack_duration=60)
    resolve(det, "www.example.com", [("www.example.com", "A", "192.0.2.10", 300)])
    assert det.dirty and not det.urgent
    for i in range(3):
        det.decide_syn(unknown(i), 80)
        clock.advance(0.1)
    assert det.attack and det.urgent
    doc = det.snapshot(wall=5000.0)
    assert not det.dirty and not det.urgent
    # a new process, another monotonic origin, 10 s later by the wall clock
    det2, clock2 = detector(pass_interval=6, attack_duration=60)
    clock2.t = 7.0
    assert det2.restore(doc, wall=5010.0)
    assert det2.attack and det2.is_known(V4("192.0.2.10")) and det2.unknown_count(60) == 3
    assert abs(det2.attack_until - (7.0 - 10 + 60 - 0.1)) < 0.01
    # 10 s after detection, more than pass_interval: the delay queue's head (the SYN cut at detection) is
    # released, a new destination waits
    assert det2.queued() == [V4(unknown(2))]
    assert det2.decide_syn("203.0.113.77", 80)[0] == "cut"
    assert det2.decide_syn(unknown(2), 80)[0] == "pass"
    # bounded: a big DNS table is shortened to fit
    for i in range(2000):
        det.table.add(ipaddress.ip_address(f"10.9.{i // 250}.{i % 250}"), clock() + 100 + i, "x" * 200, clock())
    small = det.snapshot(max_bytes=4096, wall=5000.0)
    assert len(json.dumps(small, separators=(",", ":"))) <= 4096 and small["attack"] and len(small["unknown"]) == 3
    # anything else is refused whole
    for bad in (None, [], {"v": 3}, {"v": 2}, dict(doc, unknown=[["not an address", 1]]), dict(doc, wall="x")):
        det3, _ = detector()
        assert not det3.restore(bad) and not det3.attack and det3.unknown_count(60) == 0
