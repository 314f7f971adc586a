"""threshold and detection_filter in the in-line signature stage (csrc/sigstage.c), as
Suricata 8 applies them: per rule, per tracked key, on the switch's clock (handed in here with
Switch.set_clock, so windows pass without sleeping)."""
from __future__ import annotations

import struct

import pytest

from nikit import IP6S, IPS, time_limit, udp_frame

T0 = 1_000_000 * 10**9          # the handed-in clock's start (ns)
SPOOF = "10.0.0.77"             # a second source on a's side (a has no policy: no antispoof)


@pytest.fixture(autouse=True)
def _limit():
    with time_limit(90, "the test"):
        yield


def policy(rules_path: str, **sig) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in sig.items())
    return (f'[ni]\naddresses = ["{IPS["b"]}/32", "{IP6S["b"]}/128"]\n[signatures]\nrules = ["{rules_path}"]\n'
            f'{extra}')


def kit(kits, tmp_path, rules: str, **sig):
    p = tmp_path / "th.rules"
    p.write_text(rules)
    k = kits({"b": policy(str(p), **sig)})
    k.daemon.switch.set_clock(T0)
    return k


def at(k, seconds: float) -> None:
    k.daemon.switch.set_clock(T0 + int(seconds * 10**9))


def alerts(k, sid: int) -> list[dict]:
    return [a for a in k.alerts() if a.get("fields", {}).get("alert", {}).get("signature_id") == sid]


def send(k, n: int, payload: bytes, dport: int, src: str = "a", dst: str = "b", src_ip=None) -> int:
    """Sends n matching datagrams one by one; returns how many reached the receiver."""
    got = 0
    for i in range(n):
        k.send(src, udp_frame(src, dst, 5000 + i, dport, payload, src_ip=src_ip))
        got += len(k.recv(dst, 0.05))
    return got


def stage(k):
    return k.nk("b").policy.signatures.stage


def test_limit_drops_every_match_and_alerts_the_first_n_per_window(kits, tmp_path):
    k = kit(kits, tmp_path, 'drop udp any any -> $HOME_NET 7001 (msg:"lim"; content:"BAD"; '
                            'threshold: type limit, track by_src, count 2, seconds 10; sid:1;)\n')
    assert send(k, 5, b"xBADx", 7001) == 0           # every match dropped (thresholds gate alerts)
    assert len(alerts(k, 1)) == 2
    at(k, 9.5)
    assert send(k, 2, b"BAD", 7001) == 0 and len(alerts(k, 1)) == 2     # same window
    at(k, 10.5)
    assert send(k, 3, b"BAD", 7001) == 0 and len(alerts(k, 1)) == 4     # a new window
    ts = stage(k).track_stats()
    assert ts["alerts_suppressed"] == 6 and ts["matches_filtered"] == 0 and ts["used"] == 1


def test_threshold_alerts_every_nth_match_within_the_window(kits, tmp_path):
    k = kit(kits, tmp_path,
            'alert udp any any -> $HOME_NET 7002 (msg:"thr"; content:"HIT"; '
            'threshold: type threshold, track by_dst, count 3, seconds 10; sid:2;)\n'
            'drop udp any any -> $HOME_NET 7003 (msg:"thr drop"; content:"HIT"; '
            'threshold: type threshold, track by_rule, count 3, seconds 10; sid:3;)\n')
    assert send(k, 7, b"HIT", 7002) == 7
    assert len(alerts(k, 2)) == 2                     # the 3rd and the 6th
    at(k, 11)                                         # the 7th's window is over: counting restarts
    assert send(k, 2, b"HIT", 7002) == 2 and len(alerts(k, 2)) == 2
    assert send(k, 1, b"HIT", 7002) == 1 and len(alerts(k, 2)) == 3
    # Suricata 8: a threshold-type rule's action too applies on the Nth match only
    assert send(k, 6, b"HIT", 7003) == 4 and len(alerts(k, 3)) == 2


def test_both_acts_from_the_nth_match_and_alerts_once_per_window(kits, tmp_path):
    k = kit(kits, tmp_path, 'drop udp any any -> $HOME_NET 7004 (msg:"both"; content:"HIT"; '
                            'threshold: type both, track by_src, count 2, seconds 10; sid:4;)\n')
    assert send(k, 1, b"HIT", 7004) == 1              # before the count: no match at all
    assert send(k, 4, b"HIT", 7004) == 0              # the 2nd and later: dropped
    assert len(alerts(k, 4)) == 1
    at(k, 10)                                         # the window's last instant (inclusive)
    assert send(k, 1, b"HIT", 7004) == 0 and len(alerts(k, 4)) == 1
    at(k, 10.001)
    assert send(k, 1, b"HIT", 7004) == 1 and send(k, 1, b"HIT", 7004) == 0
    assert len(alerts(k, 4)) == 2


@pytest.mark.parametrize("track,want", [("by_src", 2), ("by_dst", 1), ("by_both", 2), ("by_rule", 1)])
def test_keys_by_src_and_by_dst_are_tracked_apart(kits, tmp_path, track, want):
    k = kit(kits, tmp_path, f'alert udp any any -> $HOME_NET 7005 (msg:"k"; content:"HIT"; '
                            f'threshold: type limit, track {track}, count 1, seconds 60; sid:5;)\n')
    send(k, 3, b"HIT", 7005)                          # 10.0.0.1 -> 10.0.0.2
    send(k, 3, b"HIT", 7005, src_ip=SPOOF)            # 10.0.0.77 -> 10.0.0.2
    got = alerts(k, 5)
    assert len(got) == want
    assert got[0]["fields"]["src_ip"] == IPS["a"]


def test_detection_filter_lets_a_brute_force_through_until_the_count_then_drops(kits, tmp_path):
    """Suricata: detection_filter count N matches (acts and alerts) on every match after the
    Nth within the window; the first N are no match at all."""
    k = kit(kits, tmp_path, 'drop udp any any -> $HOME_NET 1812 (msg:"login brute force"; '
                            'content:"LOGIN "; depth:6; detection_filter: track by_src, count 3, seconds 60; '
                            'sid:6;)\n')
    assert send(k, 3, b"LOGIN root pw1", 1812) == 3   # the first three attempts go
    assert not alerts(k, 6)
    assert send(k, 4, b"LOGIN root pw4", 1812) == 0   # from the 4th: dropped, each alerted
    assert len(alerts(k, 6)) == 4
    assert send(k, 3, b"LOGIN root", 1812, src_ip=SPOOF) == 3     # another source counts its own
    assert send(k, 1, b"hello", 1812) == 1                       # not a match: not filtered
    at(k, 61)
    assert send(k, 3, b"LOGIN root", 1812) == 3 and send(k, 1, b"LOGIN root", 1812) == 0
    assert stage(k).track_stats()["matches_filtered"] == 9
    assert k.stats("b")["sig_dropped"] == 5


def test_stream_rule_threshold_limit_blocks_each_connection_alerts_once(kits, tmp_path):
    from tcpkit import Conn
    k = kit(kits, tmp_path, 'drop tcp any any -> $HOME_NET 80 (msg:"jndi"; flow:to_server,established; '
                            'content:"${jndi:"; threshold: type limit, track by_src, count 1, seconds 60; '
                            'sid:7;)\n')
    for cport in (40001, 40002, 40003):
        c = Conn(k, client="a", server="b", cport=cport, sport=80)
        c.open()
        k.step()
        c.send("a", c.data("a", b"x=${jndi:ldap://e/a}"))
        assert b"".join(s.payload for s in c.recv("b", 0.3)) == b""
    assert len(alerts(k, 7)) == 1 and k.stats("b")["sig_dropped"] == 3


def test_the_table_is_bounded_and_evictions_are_counted(kits, tmp_path):
    rules = "".join(f'alert udp any any -> $HOME_NET 7008 (msg:"r{i}"; content:"HIT"; '
                    f'threshold: type limit, track by_src, count 1, seconds 60; sid:{100 + i};)\n'
                    for i in range(10))
    k = kit(kits, tmp_path, rules, track_entries=8)
    send(k, 1, b"HIT", 7008)
    ts = stage(k).track_stats()
    assert ts["entries"] == 8 and ts["used"] == 8 and ts["evictions"] == 2
    # an evicted key counts afresh: more than the one alert per rule of the window
    send(k, 1, b"HIT", 7008)
    assert sum(len(alerts(k, 100 + i)) for i in range(10)) > 10
    # the window over, the expired slots are reused before live ones are evicted
    at(k, 61)
    before = stage(k).track_stats()["evictions"]
    send(k, 1, b"HIT", 7008)
    assert stage(k).track_stats()["evictions"] - before <= 2


@pytest.mark.parametrize("opt,reason", [
    ("threshold: type limit, track by_src, count 1000001, seconds 60",
     "threshold count: 1000001 is outside 1..1000000"),
    ("threshold: type both, track by_dst, count 5, seconds 999999999",
     "threshold seconds: 999999999 is outside 1..604800"),
    ("detection_filter: track by_src, count 99999999999, seconds 60", "detection_filter count: expected an integer"),
    ("detection_filter: track by_src, count 0, seconds 60", "detection_filter count: 0 is outside"),
])
def test_huge_counts_and_windows_are_refused_with_file_and_line(tmp_path, opt, reason):
    from vhostni.signatures.config import SignatureConfigError, parse_section
    p = tmp_path / "h.rules"
    p.write_text(f'alert udp any any -> any 53 (msg:"ok"; content:"a"; sid:1;)\n'
                 f'alert udp any any -> any 53 (msg:"x"; content:"abc"; {opt}; sid:9;)\n')
    with pytest.raises(SignatureConfigError, match=rf"h.rules:2: sid 9: .*{reason}"):
        parse_section({"rules": [str(p)]}, str(tmp_path), [])
    with pytest.raises(SignatureConfigError, match="power of two") as e:
        parse_section({"rules": [str(p)], "track_entries": 1000}, str(tmp_path), [])
    assert e.value.where == "signatures.track_entries"


def test_hostile_threshold_headers_are_refused_by_the_c_stage():
    """The C stage checks the threshold fields itself: a blob past the bounds, with half a
    threshold, or with thresholds and no table is refused, never built."""
    from vhostni._fastpath import ffi, lib
    from vhostni.signatures.engine import SignatureDB
    from vhostni.signatures.rules import Vars, parse_rules
    from vhostni.signatures.stage import encode_headers
    rs = parse_rules('alert udp any any -> any 53 (msg:"x"; content:"abc"; '
                     'threshold: type limit, track by_src, count 2, seconds 60; sid:1;)\n', Vars({}, home=[]))
    good = encode_headers(rs.rules, 64)
    off = 4 + 16 + 12                                 # magic, counts and limits, action..rev
    rc = ffi.new("int *")

    def builds(blob: bytes) -> bool:
        db = SignatureDB(rs.rules, "packet")
        st = lib.vn_sigstage_build(blob, len(blob), ffi.NULL, db._db, rc)
        if st == ffi.NULL:
            db.close()
            return False
        db._db = ffi.NULL
        lib.vn_sigstage_free(st)
        return True

    def patched(at: int, fmt: str, v: int) -> bytes:
        b = bytearray(good)
        struct.pack_into(fmt, b, at, v)
        return bytes(b)

    assert builds(good)
    assert not builds(patched(8, "<I", 0))                     # thresholds without a table
    assert not builds(patched(8, "<I", 100))                   # not a power of two
    assert not builds(patched(8, "<I", 1 << 21))               # past the maximum
    assert not builds(patched(off + 4, "<I", 1000001))         # count past the bound
    assert not builds(patched(off + 8, "<I", 604801))          # window past the bound
    assert not builds(patched(off + 8, "<I", 0))               # half a threshold
    assert not builds(patched(off, "<B", 9))                   # no such type
    assert not builds(patched(off + 2, "<B", 1))               # a detection_filter with no count


def test_query_nis_shows_the_threshold_table(kits, tmp_path):
    k = kit(kits, tmp_path, 'alert udp any any -> $HOME_NET 7009 (msg:"q"; content:"HIT"; '
                            'threshold: type limit, track by_src, count 1, seconds 60; sid:9;)\n')
    send(k, 3, b"HIT", 7009)
    th = k.nk("b").signature_counts()["thresholds"]
    assert th["entries"] == 16384 and th["used"] == 1 and th["alerts_suppressed"] == 2


@pytest.mark.parametrize("clock,delivered", [("capture", 4), ("system", 2)])
def test_replay_counts_windows_on_the_capture_clock(tmp_path, clock, delivered):
    """With --clock capture the windows are the capture's: a pause of 20 s in it starts a new
    one, however fast the replay runs; on the system clock the whole replay is one window."""
    import json
    from scapy.all import IP, UDP, Ether, Raw
    from test_replay import GIP, GUEST, ROUTER, Capture, out_frames
    from vhostni import cli
    rules = tmp_path / "r.rules"
    rules.write_text('drop udp any any -> $HOME_NET 1812 (msg:"brute"; content:"LOGIN"; '
                     'detection_filter: track by_src, count 2, seconds 10; sid:11;)\n')
    cap = Capture()
    for i in range(6):
        cap.add(Ether(src=ROUTER, dst=GUEST) / IP(src="10.0.0.9", dst=GIP) / UDP(sport=5000 + i, dport=1812)
                / Raw(b"LOGIN x"), gap_ns=(20 if i == 3 else 1) * 10**9)
    inp = cap.write(tmp_path / "in.pcap")
    pol = tmp_path / "policy.json"
    pol.write_text(json.dumps({"ni": {"addresses": [f"{GIP}/32"]}, "signatures": {"rules": [str(rules)]}}))
    assert cli.main(["replay", "--guest-mac", GUEST, inp, "--policy", str(pol), "--clock", clock,
                     "--out", str(tmp_path / "out.pcap"), "--alerts", str(tmp_path / "alerts.jsonl")]) == 0
    got = [d for _, d in out_frames(tmp_path / "out.pcap") if UDP in Ether(d)]
    assert len(got) == delivered
