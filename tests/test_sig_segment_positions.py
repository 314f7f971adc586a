"""A `tcp` rule's absolute positions (content `offset`/`depth`) as Suricata reads them.

Suricata inspects a `tcp` rule over each packet's payload as well as over the stream, and a
content's `offset`/`depth` count from the start of what it inspects: a packet's first byte.
Over the stream alone they count from the stream's first byte, so a message that does not open
the connection (the second SMB message, a request after a benign one on a keep-alive
connection) never matched such a rule: found by replaying OISF suricata-verify's bug-5162
capture (Suricata: 2 alerts per rule; vhostni: none).  The stage now also matches these rules
over each in-order segment's payload (csrc/sigstage.c, `vn_sigstage_add_seg`)."""
import os

from scapy.all import IP, TCP, Ether, Raw

from test_replay import GIP, GUEST, ROUTER, Capture, replay_rules

HERE = os.path.dirname(os.path.abspath(__file__))
# The port-445 connections of suricata-verify's tests/bug-5162/input.pcap (commit
# 10a45e4bad6d29d0f1239d93119ea24e1bbdab19; MIT licence, tests/data/signatures/
# LICENSE.suricata-verify.txt), IPv4/TCP checksums recomputed (that test runs Suricata with -k none).
SMB445 = os.path.join(HERE, "data", "signatures", "sv-bug-5162-smb445.pcap")
SMB_SERVER_MAC = "00:0c:29:26:e6:21"

# sid 6 of that test's test.rules (action and nothing else changed)
SVCCTL = ('alert tcp any any -> any 445 (msg:"SVCCTL CreateService Command via SMB"; '
          'flow:established,to_server; content:"SMB"; depth:8; content:"|09 00|"; distance:8; within:2; '
          'content:"|05 00 00|"; distance:0; content:"|0c 00|"; distance:19; within:2; '
          'content:"|15 00 00 00|"; distance:20; within:4; sid:6;)\n')

CODE_RED = (b"GET /default.ida?" + b"N" * 224 + b"%u9090%u6858%ucbd3%u7801%u9090%u6858%ucbd3%u7801"
            b"%u9090%u6858%ucbd3%u7801%u9090%u9090%u8190%u00c3%u0003%u8b00%u531b%u53ff%u0078%u0000%u00=a"
            b" HTTP/1.0\r\n\r\n")


replay = replay_rules


def test_real_capture_a_later_smb_message_matches_a_depth_rule_as_in_suricata(tmp_path):
    alerts, _ = replay(tmp_path, SMB445, SVCCTL, SMB_SERVER_MAC)
    sids = [a["alert"]["signature_id"] for a in alerts]
    assert sids == [6, 6]                      # test.yaml: count 2 (one per connection)
    assert all(a["dest_port"] == 445 and a["stream_offset"] > 8 for a in alerts)


def keepalive(tmp_path, second: bytes, first: bytes = b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"):
    def to_guest(flags, seq, ack, data=b""):
        p = Ether(src=ROUTER, dst=GUEST) / IP(src="10.0.0.9", dst=GIP) / TCP(
            sport=41000, dport=80, flags=flags, seq=seq, ack=ack, window=65535)
        return p / Raw(data) if data else p

    def from_guest(flags, seq, ack):
        return Ether(src=GUEST, dst=ROUTER) / IP(src=GIP, dst="10.0.0.9") / TCP(
            sport=80, dport=41000, flags=flags, seq=seq, ack=ack, window=65535)

    cap = Capture()
    cs, ss = 1000, 5000
    cap.add(to_guest("S", cs - 1, 0))
    cap.add(from_guest("SA", ss - 1, cs))
    cap.add(to_guest("A", cs, ss))
    cap.add(to_guest("PA", cs, ss, first))
    cap.add(from_guest("A", ss, cs + len(first)))
    cap.add(to_guest("PA", cs + len(first), ss, second))
    return cap.write(tmp_path / "in.pcap")


def code_red_rule(action: str) -> str:
    """examples/signatures/web.rules' Code-Red rule ("GET " depth:4 opens it)."""
    path = os.path.join(os.path.dirname(HERE), "examples", "signatures", "web.rules")
    text = open(path).read().replace("\\\n", "")
    line = next(l for l in text.splitlines() if "sid:1000001;" in l)
    return line.replace("drop tcp", f"{action} tcp", 1) + "\n"


def test_code_red_as_the_second_request_of_a_connection_is_stopped(tmp_path):
    inp = keepalive(tmp_path, CODE_RED)
    alerts, out = replay(tmp_path, inp, code_red_rule("drop"), GUEST, [f"{GIP}/32"])
    assert [a["alert"]["signature_id"] for a in alerts] == [1000001]
    assert alerts[0]["stream_offset"] > len(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    payloads = [bytes(Ether(d)[TCP].payload) for d in out if TCP in Ether(d)]
    assert b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n" in payloads
    assert not any(b"default.ida" in p for p in payloads)


def test_a_depth_rule_does_not_match_past_its_depth_in_a_segment(tmp_path):
    # "GET " one byte into the segment: outside depth 4 from the segment's start and from the
    # stream's, so neither reading matches (Suricata's neither)
    inp = keepalive(tmp_path, b"X" + CODE_RED)
    alerts, out = replay(tmp_path, inp, code_red_rule("drop"), GUEST, [f"{GIP}/32"])
    assert alerts == []
    assert any(b"default.ida" in bytes(Ether(d)[TCP].payload) for d in out if TCP in Ether(d))


def test_tcp_stream_rules_keep_counting_from_the_stream_start(tmp_path):
    # tcp-stream (Suricata: the stream only) is not also read per segment
    rule = code_red_rule("alert").replace("alert tcp ", "alert tcp-stream ", 1)
    alerts, _ = replay(tmp_path, keepalive(tmp_path, CODE_RED), rule, GUEST, [f"{GIP}/32"])
    assert alerts == []


def test_a_start_anchored_pcre_matches_the_second_request(tmp_path):
    # pcre's ^ (no R) is the buffer's start: in Suricata's packet view the segment's
    rule = 'alert tcp any any -> any 80 (msg:"ida"; flow:to_server,established; pcre:"/^GET \\/default\\.ida\\?N+/"; sid:9;)\n'
    alerts, _ = replay(tmp_path, keepalive(tmp_path, CODE_RED), rule, GUEST, [f"{GIP}/32"])
    assert [a["alert"]["signature_id"] for a in alerts] == [9]
