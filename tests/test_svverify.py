"""The suricata-verify comparison (vhostni/bench/svverify.py) on a suricata-verify-shaped test of
its own: a capture, a rule file, a test.yaml with Suricata's expected alerts; it runs the replay
and says whether vhostni agrees."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("yaml")
from scapy.all import IP, TCP, Ether, Raw, wrpcap  # noqa: E402

from vhostni.bench import svverify  # noqa: E402

C, S = "02:00:00:00:00:0c", "02:00:00:00:00:05"


def _test_dir(root, name, rules, checks):
    d = root / "tests" / name
    d.mkdir(parents=True)
    cip, sip = "10.1.0.2", "10.1.0.1"
    c, s = 1000, 5000
    pkts = [Ether(src=C, dst=S) / IP(src=cip, dst=sip) / TCP(sport=40000, dport=80, flags="S", seq=c),
            Ether(src=S, dst=C) / IP(src=sip, dst=cip) / TCP(sport=80, dport=40000, flags="SA", seq=s, ack=c + 1),
            Ether(src=C, dst=S) / IP(src=cip, dst=sip) / TCP(sport=40000, dport=80, flags="A", seq=c + 1, ack=s + 1)]
    body = b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n"
    pkts.append(Ether(src=C, dst=S) / IP(src=cip, dst=sip) / TCP(sport=40000, dport=80, flags="PA",
                                                                  seq=c + 1, ack=s + 1) / Raw(body))
    for i, p in enumerate(pkts):
        p.time = 1.0 + i / 100
    wrpcap(str(d / "input.pcap"), pkts)
    (d / "test.rules").write_text(rules)
    (d / "test.yaml").write_text("checks:\n" + "".join(
        f"- filter:\n    count: {n}\n    match:\n      event_type: alert\n      alert.signature_id: {sid}\n"
        for sid, n in checks))


def test_a_test_it_agrees_with_and_one_it_does_not(tmp_path, capsys):
    rules = 'alert tcp any any -> any 80 (msg:"index"; content:"/index.html"; sid:1;)\n'
    _test_dir(tmp_path, "agrees", rules, [(1, 1)])
    _test_dir(tmp_path, "differs", rules, [(1, 0)])     # a test expecting no alert: vhostni's is false
    rc = svverify.main([str(tmp_path), "--work", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert "| agrees | ok |" in out
    assert "| differs | ? |" in out and "false=[1]" in out
    assert "2 runs: ok 1, ? 1" in out and rc == 1
