"""The aggregate detectors beside the worm scanner (scanners/codered/trw.py and synbomb.py) with a fake clock,
and the SYN-bomb scanner under a real NI kernel resetting the victim's half-open connections (Scanner.reset).
No VM needed: tests/test_worm_styles_guests.py runs them between real guests."""

import ipaddress
import struct
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # scanners/ is not an installed package

from scanners.codered.synbomb import SynBombConfigError, SynBombDetector  # noqa: E402
from scanners.codered.trw import TrwConfigError, TrwDetector  # noqa: E402

from scapy.layers.inet import ICMP, IP, TCP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402

from test_codered import Clock  # noqa: E402

GUEST = "10.0.0.2"
GMAC, RMAC = "52:54:00:00:00:02", "52:54:00:00:00:01"


def frame(src, dst, l4, to_guest):
    e = Ether(src=RMAC, dst=GMAC) if to_guest else Ether(src=GMAC, dst=RMAC)
    return bytes(e / IP(src=src, dst=dst) / l4)


def out_syn(dst, dport, sport=40000, seq=1000):
    return frame(GUEST, dst, TCP(sport=sport, dport=dport, flags="S", seq=seq), False)


def in_synack(src, sport, dport=40000, seq=5000, ack=1001):
    return frame(src, GUEST, TCP(sport=sport, dport=dport, flags="SA", seq=seq, ack=ack), True)


def in_rst(src, sport, dport=40000):
    return frame(src, GUEST, TCP(sport=sport, dport=dport, flags="RA", seq=0, ack=1001), True)


def trw(**cfg):
    clock = Clock()
    return TrwDetector(cfg, clock=clock), clock


def host(i):
    return f"198.18.{i // 250}.{i % 250 + 1}"


# ---- TRW: outbound -----------------------------------------------------------------------------------------


def test_trw_decides_an_outbound_scanner_in_four_failures_and_blocks_it():
    det, clock = trw()
    alerts = []
    for i in range(4):          # probes to random hosts that answer with RSTs (nothing listens)
        assert det.handle_frame("from_guest", out_syn(host(i), 445, sport=40000 + i)).action == "pass"
        alerts += det.handle_frame("to_guest", in_rst(host(i), 445, dport=40000 + i)).alerts
    assert len(alerts) == 1 and alerts[0].fields["failures"] == 4
    assert alerts[0].fields["direction"] == "outbound" and "port scan from the guest" in alerts[0].message
    assert det.handle_frame("from_guest", out_syn(host(10), 445, sport=41000)).action == "cut"
    assert det.stats.scanners_outbound == 1


def test_trw_timeouts_and_icmp_unreachables_are_failures():
    det, clock = trw()
    for i in range(2):
        det.handle_frame("from_guest", out_syn(host(i), 80, sport=40000 + i))
    clock.advance(3.1)
    assert det.tick() == [] and det.stats.timeouts == 2
    alerts = []
    for i in range(2, 4):
        det.handle_frame("from_guest", out_syn(host(i), 80, sport=40000 + i))
        quoted = IP(src=GUEST, dst=host(i)) / TCP(sport=40000 + i, dport=80, flags="S")
        alerts += det.handle_frame("to_guest", frame("10.0.0.1", GUEST, ICMP(type=3, code=1) / quoted,
                                                     True)).alerts
    assert len(alerts) == 1 and det.stats.failures == 4


def test_trw_thresholds_come_from_alpha_and_beta():
    # alpha 0.001: eta1 = 990, 4^5 = 1024: five failures
    det, clock = trw(alpha=0.001)
    n = 0
    while not det.stats.scanners_outbound:
        det.handle_frame("from_guest", out_syn(host(n), 80, sport=40000 + n))
        det.handle_frame("to_guest", in_rst(host(n), 80, dport=40000 + n))
        n += 1
    assert n == 5


def test_trw_normal_browsing_raises_no_alarm():
    det, clock = trw()
    # a thousand first contacts, one in five failing (a dead link now and then), in an order that puts up to
    # two failures in a row: the walk keeps drifting down to "benign"
    for i in range(1000):
        det.handle_frame("from_guest", out_syn(host(i), 443, sport=20000 + i % 30000))
        if i % 5 in (1, 2) and i % 10 < 5:
            det.handle_frame("to_guest", in_rst(host(i), 443, dport=20000 + i % 30000))
        else:
            det.handle_frame("to_guest", in_synack(host(i), 443, dport=20000 + i % 30000))
        clock.advance(0.5)
    assert det.stats.scanners_outbound == 0 and det.stats.benign_decisions > 50


def test_a_blocked_guest_still_reaches_hosts_that_answered_it():
    det, clock = trw()
    det.handle_frame("from_guest", out_syn("192.0.2.80", 80, sport=39999))
    det.handle_frame("to_guest", in_synack("192.0.2.80", 80, dport=39999))
    for i in range(6):
        det.handle_frame("from_guest", out_syn(host(i), 445, sport=40000 + i))
        det.handle_frame("to_guest", in_rst(host(i), 445, dport=40000 + i))
    assert det.stats.scanners_outbound == 1
    assert det.handle_frame("from_guest", out_syn("192.0.2.80", 80, sport=50000)).action == "pass"
    assert det.handle_frame("from_guest", out_syn(host(99), 445, sport=50001)).action == "cut"
    clock.advance(601)
    assert det.handle_frame("from_guest", out_syn(host(99), 445, sport=50002)).action == "pass"


def test_repeated_attempts_to_one_pair_count_once():
    det, clock = trw()
    for k in range(10):         # a client retrying one dead server is not a scan
        det.handle_frame("from_guest", out_syn(host(0), 80, sport=40000 + k))
        det.handle_frame("to_guest", in_rst(host(0), 80, dport=40000 + k))
    assert det.stats.failures == 1 and det.stats.scanners_outbound == 0


# ---- TRW: inbound ------------------------------------------------------------------------------------------


def test_trw_blocks_a_remote_port_scanner_and_only_it():
    det, clock = trw()
    scanner, friend = "203.0.113.66", "203.0.113.7"
    alerts = []
    for port in range(20, 26):
        v = det.handle_frame("to_guest", frame(scanner, GUEST, TCP(sport=6000, dport=port, flags="S"), True))
        assert v.action == ("pass" if port < 24 else "cut")
        # the guest answers closed ports with RSTs
        alerts += det.handle_frame("from_guest", frame(GUEST, scanner, TCP(sport=port, dport=6000, flags="RA"),
                                                       False)).alerts
    assert len(alerts) == 1 and alerts[0].fields["source"] == scanner and alerts[0].fields["direction"] == "inbound"
    # even to an open port, the scanner is cut; another client is not
    assert det.handle_frame("to_guest", frame(scanner, GUEST, TCP(sport=6001, dport=22, flags="S"), True)).action == "cut"
    assert det.handle_frame("to_guest", frame(friend, GUEST, TCP(sport=6001, dport=22, flags="S"), True)).action == "pass"
    assert det.stats.cut_inbound == 3


def test_a_server_under_inbound_load_raises_no_alarm():
    det, clock = trw()
    for i in range(2000):       # many clients, each connecting to the open port 80 (and answered)
        c = host(i % 500)
        det.handle_frame("to_guest", frame(c, GUEST, TCP(sport=30000 + i, dport=80, flags="S"), True))
        det.handle_frame("from_guest", frame(GUEST, c, TCP(sport=80, dport=30000 + i, flags="SA"), False))
        clock.advance(0.01)
    det.tick()
    assert det.stats.scanners_inbound == 0 and det.stats.failures == 0


def test_first_contacts_past_max_unanswered_wait_for_answers():
    det, clock = trw(max_unanswered=3, unanswered_credit=2)
    got = [det.handle_frame("from_guest", out_syn(host(i), 443, sport=41000 + i)).action for i in range(5)]
    assert got == ["pass"] * 3 + ["cut"] * 2 and det.stats.cut_unanswered == 2
    # a retransmission of an open attempt and a repeat contact are no new first contacts
    assert det.handle_frame("from_guest", out_syn(host(0), 443, sport=41000)).action == "pass"
    # two answers come back: two more may go, and each success earns one more (up to unanswered_credit)
    for i in range(2):
        det.handle_frame("to_guest", in_synack(host(i), 443, dport=41000 + i))
    got = [det.handle_frame("from_guest", out_syn(host(10 + i), 443, sport=42000 + i)).action for i in range(5)]
    assert got == ["pass"] * 4 + ["cut"]          # 3 + 2 credit, 1 still open
    # a scanner earns nothing: its probes time out, it is decided and blocked after four failures, and no more
    # than max_unanswered were ever out at once meanwhile
    det, clock = trw(max_unanswered=3)
    out = 0
    for i in range(80):
        out += det.handle_frame("from_guest", out_syn(host(i), 445, sport=43000 + i)).action == "pass"
        clock.advance(0.1)
        det.tick()
    assert det.stats.scanners_outbound == 1 and out <= 3 + 3     # three, then the three timed-out ones' room
    # 0: no bound
    det, _ = trw(max_unanswered=0)
    assert all(det.handle_frame("from_guest", out_syn(host(i), 445, sport=44000 + i)).action == "pass"
               for i in range(50))


def test_a_guest_rotating_its_addresses_is_one_source_and_so_is_a_remote_64():
    from scapy.layers.inet6 import IPv6
    det, clock = trw(max_unanswered=0)
    # the guest's worm uses a new (privacy) address for each probe: still one walk, decided at four failures
    for i in range(4):
        f = bytes(Ether(src=GMAC, dst=RMAC) / IPv6(src=f"2001:db8:1::{i + 1:x}", dst=f"2001:db8:99::{i + 1:x}")
                  / TCP(sport=45000 + i, dport=445, flags="S"))
        assert det.handle_frame("from_guest", f).action == "pass"
    clock.advance(3.1)
    assert len(det.tick()) == 1 and det.stats.scanners_outbound == 1
    # a remote scanner rotating through one /64: one walk, blocked at four failures (the guest answers RSTs)
    alerts = []
    for port in range(20, 26):
        src = f"2001:db8:66::{port:x}"
        v = det.handle_frame("to_guest", bytes(Ether(src=RMAC, dst=GMAC) / IPv6(src=src, dst="2001:db8:1::1")
                                              / TCP(sport=6000, dport=port, flags="S")))
        assert v.action == ("pass" if port < 24 else "cut")
        alerts += det.handle_frame("from_guest", bytes(Ether(src=GMAC, dst=RMAC) / IPv6(src="2001:db8:1::1", dst=src)
                                                       / TCP(sport=port, dport=6000, flags="RA"))).alerts
    assert len(alerts) == 1 and det.stats.scanners_inbound == 1


def test_remote_hosts_cannot_make_the_detector_forget_a_blocked_guest():
    det, clock = trw(max_sources=64)
    for i in range(4):
        det.handle_frame("from_guest", out_syn(host(i), 445, sport=40000 + i))
        det.handle_frame("to_guest", in_rst(host(i), 445, dport=40000 + i))
    assert det.stats.scanners_outbound == 1
    for i in range(500):        # more remote sources than walks are kept
        det.handle_frame("to_guest", frame(f"203.0.{i // 250}.{i % 250 + 1}", GUEST,
                                           TCP(sport=7000, dport=80, flags="S"), True))
    assert det.handle_frame("from_guest", out_syn(host(99), 445, sport=40999)).action == "cut"
    assert len(det.walks) <= 64


@pytest.mark.parametrize("cfg, why", [({"theta0": 0.2, "theta1": 0.8}, "theta1 must be below"),
                                     ({"alpha": 1.5}, "alpha"), ({"timeout": 0}, "timeout"), ({"x": 1}, "unknown")])
def test_trw_bad_config(cfg, why):
    with pytest.raises(TrwConfigError, match=why):
        TrwDetector(cfg)


# ---- SYN bomb --------------------------------------------------------------------------------------------------


VICTIM = "192.0.2.20"


def bomb(det, clock, n, retransmit=True, port=80, first_port=30000):
    """The guest sends n SYNs to VICTIM:port; the victim answers each, and retransmits each SYN-ACK 1 s later
    when nothing came back.  Returns (verdicts, alerts, resets)."""
    verdicts, alerts, resets = [], [], []
    for k in range(n):
        verdicts.append(det.handle_frame("from_guest", out_syn(VICTIM, port, sport=first_port + k,
                                                               seq=1000 * k)).action)
        v = det.handle_frame("to_guest", in_synack(VICTIM, port, dport=first_port + k, seq=77000 + k,
                                                   ack=1000 * k + 1))
        clock.advance(0.01)
    clock.advance(1)
    if retransmit:
        for k in range(n):
            if verdicts[k] != "pass":
                continue
            v = det.handle_frame("to_guest", in_synack(VICTIM, port, dport=first_port + k, seq=77000 + k,
                                                       ack=1000 * k + 1))
            alerts += v.alerts
            resets += v.resets
    return verdicts, alerts, resets


def test_a_syn_bomb_is_alerted_throttled_and_the_victim_repaired():
    clock = Clock()
    det = SynBombDetector({"max_half_open": 8}, clock=clock)
    verdicts, alerts, resets = bomb(det, clock, 20)
    assert verdicts == ["pass"] * 20            # nothing to see before the victim's SYN-ACKs come again
    # more than 8 half-open, and half of the 20 handshakes answered over a second ago: the 10th
    assert len(alerts) == 1 and alerts[0].fields["victim"] == VICTIM and alerts[0].fields["half_open"] == 10
    assert "SYN bomb" in alerts[0].message
    # every half-open connection is reset, each with the numbers the victim accepts
    assert len(resets) == 20
    by_port = {r.sport: r for r in resets}
    for k in range(20):
        r = by_port[30000 + k]
        assert (r.src, r.dst, r.dport) == (GUEST, VICTIM, 80)
        assert r.seq == 1000 * k + 1 and r.ack == 77000 + k + 1 and r.mac == RMAC
    # the bomb goes on: throttled to one SYN every 5 s
    more = [det.handle_frame("from_guest", out_syn(VICTIM, 80, sport=31000 + k, seq=5)).action for k in range(50)]
    assert more.count("pass") <= 1 and det.stats.throttled >= 49
    clock.advance(5.01)
    assert det.handle_frame("from_guest", out_syn(VICTIM, 80, sport=32000, seq=5)).action == "pass"
    # other hosts are not throttled
    assert det.handle_frame("from_guest", out_syn("192.0.2.21", 80, sport=32001, seq=5)).action == "pass"


def test_completed_or_refused_handshakes_are_not_half_open():
    clock = Clock()
    det = SynBombDetector({"max_half_open": 8}, clock=clock)
    # a client opening 50 connections that complete: the victim never repeats its SYN-ACK
    verdicts, alerts, resets = bomb(det, clock, 50, retransmit=False)
    # and SYN-ACKs the guest refused with a RST (its kernel had no socket for them)
    for k in range(20):
        det.handle_frame("from_guest", out_syn(VICTIM, 443, sport=33000 + k, seq=9 * k))
        det.handle_frame("to_guest", in_synack(VICTIM, 443, dport=33000 + k, seq=1, ack=9 * k + 1))
        det.handle_frame("from_guest", frame(GUEST, VICTIM, TCP(sport=33000 + k, dport=443, flags="R",
                                                                  seq=9 * k + 1), False))
    assert det.stats.half_open == 0 and det.stats.bombs == 0 and det.stats.refused_by_guest == 20
    # a forged SYN-ACK that acknowledges nothing the guest sent teaches nothing
    det.handle_frame("to_guest", in_synack(VICTIM, 80, dport=30000, seq=1, ack=12345))
    det.handle_frame("to_guest", in_synack(VICTIM, 80, dport=30000, seq=1, ack=12345))
    assert det.stats.half_open == 0


def test_a_busy_client_with_some_lost_acks_is_no_bomb():
    clock = Clock()
    det = SynBombDetector({"max_half_open": 8}, clock=clock)
    # 300 handshakes in 3 s, 20 of them left half-open (their final ACK lost): a small share
    for k in range(300):
        det.handle_frame("from_guest", out_syn(VICTIM, 80, sport=20000 + k, seq=10 * k))
        det.handle_frame("to_guest", in_synack(VICTIM, 80, dport=20000 + k, seq=5 + k, ack=10 * k + 1))
        clock.advance(0.01)
    for k in range(0, 300, 15):
        assert det.handle_frame("to_guest", in_synack(VICTIM, 80, dport=20000 + k, seq=5 + k,
                                                      ack=10 * k + 1)).alerts == ()
    assert det.stats.half_open == 20 and det.stats.bombs == 0


def test_a_few_lost_acks_are_no_bomb():
    clock = Clock()
    det = SynBombDetector({"max_half_open": 8}, clock=clock)
    _, alerts, resets = bomb(det, clock, 8)
    assert alerts == [] and resets == [] and det.stats.half_open == 8


def test_repair_can_be_turned_off():
    clock = Clock()
    det = SynBombDetector({"max_half_open": 2, "repair": False}, clock=clock)
    _, alerts, resets = bomb(det, clock, 5)
    assert len(alerts) == 1 and resets == []
    with pytest.raises(SynBombConfigError):
        SynBombDetector({"window": -1})


# ---- the SYN-bomb scanner under a real NI kernel: the victim gets RSTs it accepts ---------------------------


def test_syn_bomb_scanner_resets_the_victims_half_open_connections(kits):
    from nikit import A_IP, A_MAC, B_IP, B_MAC, TCP_ACK, TCP_RST, TCP_SYN, eth, ipv4, policy, scanner_spec

    def tcp(sport, dport, flags, seq, ack):
        return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)

    def spec(resets):
        return scanner_spec("synbomb", str(REPO / "scanners" / "codered"), allow=[
            {"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn", "contain": True},
            {"direction": "to_guest", "proto": "tcp", "tcp_flags": "syn"},
            {"direction": "from_guest", "proto": "tcp", "tcp_flags": "rst"}],
            config={"detector": "synbomb", "max_half_open": 3}, resets=resets)

    for resets in (True, False):
        k = kits({"a": policy(mac=A_MAC, addresses=[f"{A_IP}/32"], hold_timeout_ms=5000, default_decision="cut",
                              scanners=[spec(resets)])})
        k.until(lambda: k.sp("a", "synbomb").locked and k.subscribed("a", "synbomb"), 20, "the scanner")
        n = 6
        for i in range(n):      # a's half-open handshakes to b:80
            k.send("a", eth(B_MAC, A_MAC, 0x0800, ipv4(A_IP, B_IP, 6, tcp(30000 + i, 80, TCP_SYN, 1000 * i, 0))))
        assert len([f for f in k.recv("b", wait=1.0) if f[47] == TCP_SYN]) == n
        for _ in range(2):      # b answers each, then retransmits its SYN-ACKs
            for i in range(n):
                k.send("b", eth(A_MAC, B_MAC, 0x0800, ipv4(B_IP, A_IP, 6, tcp(80, 30000 + i, TCP_SYN | TCP_ACK,
                                                                             7000 + i, 1000 * i + 1))))
            k.recv("a", wait=0.3)
        if resets:
            k.wait_alert("SYN bomb", "a", "synbomb")
            got = k.recv("b", wait=3.0, count=n)
            rsts = sorted((struct.unpack("!HHII", f[34:46]), f[47], f[6:12], f[26:30]) for f in got
                          if len(f) >= 54 and f[23] == 6 and f[47] & TCP_RST)
            assert [(r[0][0], r[0][1], r[0][2], r[0][3]) for r in rsts] == \
                [(30000 + i, 80, 1000 * i + 1, 7000 + i + 1) for i in range(n)]
            assert all(flags == TCP_RST | TCP_ACK and smac == A_MAC and src == ipaddress.ip_address(A_IP).packed
                       for _, flags, smac, src in rsts)
            assert k.sp("a", "synbomb").counters.resets == n
        else:
            # without the right the kernel refuses the resets: none reaches b, and the administrator hears of it
            k.wait_alert("without the right", "a", "synbomb")
            assert not [f for f in k.recv("b", wait=1.0) if len(f) >= 54 and f[47] & TCP_RST]


def test_reset_requests_are_checked_at_the_boundary():
    from vhostni.scanner import wire
    ok = {"op": "reset", "id": 1, "src": "10.0.0.1", "sport": 1, "dst": "10.0.0.2", "dport": 80, "seq": 5,
          "ack": 6, "mac": "02:00:00:00:0b:0b"}
    assert isinstance(wire.decode_request(ok), wire.Reset)
    for bad in ({"src": "nope"}, {"dst": "fd00::1"}, {"sport": 0}, {"dport": 70000}, {"seq": -1},
                {"ack": 1 << 32}, {"mac": "02:00"}, {"seq": True}):
        with pytest.raises(wire.RequestError):
            wire.decode_request(dict(ok, **bad))


def test_reset_requests_name_unicast_peers_only():
    """A reset goes to one peer host: group, broadcast, unspecified and loopback addresses, a
    multicast or broadcast MAC (it would flood every NI on the switch), an address that is a
    number, not a string, or has an IPv6 scope are refused before the kernel builds anything."""
    from vhostni.scanner import wire
    ok = {"op": "reset", "id": 1, "src": "10.0.0.1", "sport": 1, "dst": "10.0.0.2", "dport": 80, "seq": 5,
          "ack": 6, "mac": "02:00:00:00:0b:0b"}
    for bad in ({"mac": "ff:ff:ff:ff:ff:ff"}, {"mac": "01:00:5e:00:00:01"}, {"mac": "33:33:00:00:00:01"},
                {"mac": "00:00:00:00:00:00"}, {"dst": "255.255.255.255"}, {"dst": "224.0.0.1"},
                {"dst": "0.0.0.0"}, {"dst": "127.0.0.1"}, {"src": "0.0.0.0"}, {"dst": "10.0.0.1"},
                {"src": 167772161}, {"dst": 167772162}, {"src": "fe80::1%eth0", "dst": "fe80::2"},
                {"src": "fd00::1", "dst": "ff02::1"}, {"src": "fd00::1", "dst": "::1"}):
        with pytest.raises(wire.RequestError):
            wire.decode_request(dict(ok, **bad))
    assert isinstance(wire.decode_request(dict(ok, src="fd00::1", dst="fe80::2")), wire.Reset)


def test_the_kernel_refuses_resets_to_the_guest_or_a_broadcast_and_past_their_rate(kits):
    """A scanner with the reset right still cannot have the NI send RSTs to the guest's own MAC
    or its prefix's broadcast address, nor flood them: past ``resets_per_second`` they are
    refused, counted and alerted, and no more reach the network."""
    from nikit import A_MAC, B_MAC, mac_str, policy, scanner_spec
    from vhostni.scanner import wire
    spec = scanner_spec("resetter", "clockwatch.py", allow=[{"proto": "udp"}], resets=True,
                        resets_per_second=50)
    k = kits({"a": policy(mac=A_MAC, addresses=["10.0.0.0/24"], scanners=[spec])})
    k.until(lambda: k.sp("a", "resetter").running and k.subscribed("a", "resetter"), 20, "the scanner")
    sp = k.sp("a", "resetter")

    def ask(dst="10.0.0.3", mac=B_MAC, sport=1000):
        sp._handle(wire.decode(wire.encode_control(
            {"op": "reset", "id": 7, "src": "10.0.0.1", "sport": sport, "dst": dst, "dport": 80,
             "seq": 1, "ack": 2, "mac": mac_str(mac)})))

    def rsts():
        return [f for f in k.recv("b", wait=0.5) if len(f) >= 54 and f[12:14] == b"\x08\x00" and f[47] & 0x04]

    ask(mac=A_MAC)                  # to the guest's own MAC
    ask(dst="10.0.0.255")           # to its prefix's broadcast address
    assert rsts() == [] and sp.counters.resets == 0 and sp.counters.resets_refused == 2
    k.wait_alert("to the guest itself or a broadcast", "a", "resetter")
    for i in range(400):            # a flood: the bucket holds one second's worth
        ask(sport=1000 + i)
    assert 50 <= sp.counters.resets < 100
    assert sp.counters.resets_refused >= 300
    assert len(rsts()) == sp.counters.resets
    k.wait_alert("faster than its policy allows", "a", "resetter")


def test_reset_rate_in_the_policy_is_checked(tmp_path):
    from vhostni.policy import PolicyError, load_policy
    for bad in ("0", "true", "1e9", "nan"):
        p = tmp_path / "p.toml"
        p.write_text(f'[[scanner]]\nname = "s"\nprogram = "/bin/true"\nresets_per_second = {bad}\n')
        with pytest.raises(PolicyError):
            load_policy(str(p))
    p.write_text('[[scanner]]\nname = "s"\nprogram = "/bin/true"\nresets_per_second = 20\n')
    assert load_policy(str(p)).scanners[0].resets_per_second == 20


def test_reset_frames_are_well_formed():
    from scapy.layers.inet6 import IPv6
    from vhostni.scannerproc import tcp_reset_frame
    f = tcp_reset_frame(b"\x02" * 6, b"\x04" * 6, ipaddress.ip_address("10.0.0.1"), 1234,
                        ipaddress.ip_address("10.0.0.2"), 80, 0xFFFFFFFF, 7)
    p = Ether(f)
    assert p[TCP].flags == "RA" and p[TCP].seq == 0xFFFFFFFF and p[TCP].ack == 7 and p[IP].src == "10.0.0.1"
    # scapy recomputes the checksums: they must be what we sent
    assert bytes(Ether(bytes(p.__class__(f)))) == f
    p2 = Ether(f)
    del p2[IP].chksum, p2[TCP].chksum
    assert bytes(p2) == f
    f6 = tcp_reset_frame(b"\x02" * 6, b"\x04" * 6, ipaddress.ip_address("fd00::1"), 1234,
                         ipaddress.ip_address("fd00::2"), 80, 1, 2)
    p6 = Ether(f6)
    assert p6[IPv6].nh == 6 and p6[TCP].flags == "RA"
    del p6[TCP].chksum
    assert bytes(p6) == f6


def test_trw_scanner_blocks_a_remote_port_scanner_under_a_real_kernel(kits):
    """b scans a's ports; a's stack answers closed ports with RSTs: after four, b's SYNs no longer reach a."""
    from nikit import A_IP, A_MAC, B_IP, B_MAC, TCP_ACK, TCP_RST, TCP_SYN, eth, ipv4, policy, scanner_spec

    def tcp(sport, dport, flags):
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)

    spec = scanner_spec("trw", str(REPO / "scanners" / "codered"), allow=[
        {"direction": "both", "proto": "tcp", "tcp_flags": "syn", "contain": True},
        {"direction": "both", "proto": "tcp", "tcp_flags": "rst"},
        {"direction": "both", "proto": "icmp"}], config={"detector": "trw"})
    k = kits({"a": policy(hold_timeout_ms=5000, default_decision="pass", scanners=[spec])})
    k.until(lambda: k.sp("a", "trw").locked and k.subscribed("a", "trw"), 20, "the scanner")
    reached = []
    for port in range(20, 27):
        k.send("b", eth(A_MAC, B_MAC, 0x0800, ipv4(B_IP, A_IP, 6, tcp(6000, port, TCP_SYN))))
        got = [f for f in k.recv("a", wait=0.5) if len(f) >= 54 and f[23] == 6 and f[47] == TCP_SYN]
        reached.append(bool(got))
        if got:         # a's closed port answers
            k.send("a", eth(B_MAC, A_MAC, 0x0800, ipv4(A_IP, B_IP, 6, tcp(port, 6000, TCP_RST | TCP_ACK))))
            k.recv("b", wait=0.3)
    assert reached == [True] * 4 + [False] * 3
    alert = k.wait_alert("port scan of the guest from 10.0.0.2", "a", "trw")
    assert alert["fields"]["direction"] == "inbound" and alert["fields"]["failures"] == 4


# ---- hostile input: nothing a frame or a stream carries makes a detector raise -----------------------------

from hypothesis import given, settings, strategies as hst  # noqa: E402

_seeds = [out_syn(host(1), 80), in_synack(host(1), 80), in_rst(host(1), 80),
          frame("10.0.0.1", GUEST, ICMP(type=3, code=1) / IP(src=GUEST, dst=host(1)) / TCP(sport=40000, dport=80),
                True)]
_frames = hst.one_of(hst.binary(max_size=120),
                     hst.builds(lambda i, cut, tail: _seeds[i][:cut] + tail, hst.integers(0, len(_seeds) - 1),
                                hst.integers(0, 90), hst.binary(max_size=40)))


@settings(max_examples=800, deadline=None)
@given(hst.lists(hst.tuples(hst.sampled_from(["from_guest", "to_guest", 3]), _frames, hst.floats(0, 4)),
                 max_size=10))
def test_hostile_frames_never_raise_in_trw_or_synbomb(steps):
    clock = Clock()
    dets = [TrwDetector({}, clock=clock), SynBombDetector({"max_half_open": 0}, clock=clock)]
    for d, f, dt in steps:
        clock.advance(dt)
        for det in dets:
            v = det.handle_frame(d, f)
            assert v.action in (None, "pass", "cut")
            det.tick()


@settings(max_examples=400, deadline=None)
@given(hst.lists(hst.tuples(hst.sampled_from(["from_guest", "to_guest", "x"]), hst.binary(max_size=300)),
                 max_size=12))
def test_hostile_dns_streams_never_raise(chunks):
    from scanners.codered import CodeRedDetector
    det = CodeRedDetector({"match_queries": False}, clock=Clock())
    for d, data in chunks:
        assert det.observe_dns_stream(1, d, data, (GUEST, 1234, "10.0.0.1")) >= 0
    assert det.observe_dns_stream(2, "to_guest", b"\0\1x", ("not an address", 1, 2)) == 0


def test_the_reset_right_is_off_unless_the_policy_says_so(tmp_path):
    from vhostni.policy import PolicyError, load_policy
    base = f'[[scanner]]\nname = "s"\nprogram = "{REPO / "scanners" / "codered"}"\n'
    p = tmp_path / "p.toml"
    p.write_text(base)
    assert load_policy(str(p)).scanners[0].resets is False
    p.write_text(base + "resets = true\n")
    assert load_policy(str(p)).scanners[0].resets is True
    p.write_text(base + 'resets = "yes"\n')
    with pytest.raises(PolicyError, match=r"scanner\[0\]\.resets"):
        load_policy(str(p))
