"""The worm scanner holds only the UDP datagrams and ICMP echoes that open a flow (``"flow": "new"``): an
established UDP flow no longer waits for it per datagram, while every new destination is still decided, a
cut probe's retries are still cut, and every DNS query is still read (its response is matched against it).
Through the daemon with the real scanner process and the in-process virtio driver (no VM)."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # scanners/ is not an installed package

from scapy.layers.dns import DNS, DNSQR, DNSRR  # noqa: E402

from nikit import A_IP, A_MAC, B_IP, B_MAC, TCP_SYN, eth, ipv4, tcp, udp, udp_frame  # noqa: E402
from test_codered import _codered_kit, _syn_passes  # noqa: E402

UNKNOWN = "198.19.0.1"


def _send_udp(k, sport: int, dport: int = 4433, dst: str = UNKNOWN, payload: bytes = b"d" * 64,
              wait: float = 2.0) -> bool:
    """Guest a sends a datagram to ``dst`` (guest b's MAC: b plays the router): does b get it (within
    ``wait`` seconds)?"""
    k.send("a", udp_frame("a", "b", sport, dport, payload, dst_ip=dst))
    return len(k.recv("b", wait=wait, count=1)) == 1


def _held(k) -> int:
    return k.nk("a").port.stats()["held"]


def test_only_the_first_datagram_of_a_udp_flow_waits_for_the_scanner(kits):
    k = _codered_kit(kits)
    sp = k.sp("a", "codered")
    held, decided = _held(k), sp.counters.decisions
    assert _send_udp(k, 50000)                                     # the opener: decided (passed)
    k.until(lambda: sp.counters.decisions == decided + 1, 10, "the opener's decision")
    assert _held(k) == held + 1
    for _ in range(5):                                             # the rest of the flow: not held
        assert _send_udp(k, 50000)
    assert _held(k) == held + 1 and sp.counters.decisions == decided + 1
    assert _send_udp(k, 50001)                                     # another flow: decided again
    assert _held(k) == held + 2


def test_a_cut_udp_probe_stays_cut_on_its_retries(kits):
    k = _codered_kit(kits)
    assert [_syn_passes(k, i) for i in range(3)] == [True, True, False]      # attack mode
    held = _held(k)
    for i in range(3):               # the same flow to an unknown host, again and again: each one held and cut
        assert not _send_udp(k, 50002, dst="198.19.0.2", wait=0.5)
    assert _held(k) == held + 3


def test_every_dns_query_is_read_so_a_second_on_one_flow_is_answered(kits):
    """A resolver that sends A and AAAA queries over one socket: the second query does not open a flow (not
    held) but is still read, so its answer is accepted and the address it gives is known in attack mode."""
    k = _codered_kit(kits)
    sp = k.sp("a", "codered")
    assert [_syn_passes(k, i) for i in range(3)] == [True, True, False]      # attack mode
    for qid, name, addr in ((1, "one.example", "203.0.113.1"), (2, "two.example", "203.0.113.2")):
        frames = sp.counters.frames
        q = bytes(DNS(id=qid, rd=1, qd=DNSQR(qname=name)))
        assert _send_udp(k, 5300, 53, B_IP, q)
        k.until(lambda: sp.counters.frames > frames, 10, "the query read")
        a = bytes(DNS(id=qid, qr=1, rd=1, ra=1, qd=DNSQR(qname=name), an=DNSRR(rrname=name, rdata=addr, ttl=60)))
        frames = sp.counters.frames
        k.send("b", eth(A_MAC, B_MAC, 0x0800, ipv4(B_IP, A_IP, 17, udp(53, 5300, a))))
        k.until(lambda: sp.counters.frames > frames, 10, "the answer read")
    assert _held(k) >= 1
    before = sp.counters.decisions
    k.send("a", eth(B_MAC, A_MAC, 0x0800, ipv4(A_IP, "203.0.113.2", 6, tcp(40100, 443, TCP_SYN))))
    k.until(lambda: sp.counters.decisions > before, 10, "the SYN's decision")
    assert len(k.recv("b", wait=2.0, count=1)) == 1        # resolved through the flow's second query: passes


def test_hold_established_subscribes_without_the_flow_key_and_is_validated():
    import pytest
    from scanners.codered import CodeRedDetector
    from scanners.codered.__main__ import subscriptions
    from scanners.codered.core import ConfigError
    new = subscriptions(53)
    every = subscriptions(53, hold_established=True)
    assert any(m.get("flow") == "new" and c for m, c, _ in new)
    assert len(every) == len(new) and not any("flow" in m for m, _, _ in every)
    with pytest.raises(ConfigError):
        CodeRedDetector({"hold_established": "yes"})
