"""Offline replay (vhostni/replay.py, ``vhostni replay``): the NI's policy and scanners over
capture files, and the sink ports of the C switch it is built on."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

from nikit import policy, scanner_spec, time_limit, write_policy  # tests/ is on sys.path
from vhostni import cli, pcap
from vhostni.fastpath import Switch
from vhostni.policy import parse_policy
from vhostni.replay import FROM_GUEST, TO_GUEST, Replay, direction_of, flow_of, parse_mac

import scapy.all as scapy  # noqa: E402
from scapy.all import ARP, DNS, DNSQR, DNSRR, IP, TCP, UDP, Ether, Raw  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODERED = os.path.join(ROOT, "examples", "codered.toml")

GUEST = "52:54:00:12:34:56"
ROUTER = "52:54:00:00:00:01"
OTHER = "52:54:00:00:00:99"
GIP, NS = "10.0.0.5", "10.0.0.53"
T0 = 1_700_000_000


@pytest.fixture(autouse=True)
def _limit():
    with time_limit(120, "the test"):
        yield


class Capture:
    """Frames with timestamps 1 ms apart, written as a pcap file."""

    def __init__(self):
        self.frames: list[tuple[int, bytes]] = []

    def add(self, pkt, gap_ns: int = 1_000_000) -> bytes:
        ts = (self.frames[-1][0] if self.frames else T0 * 10**9) + gap_ns
        data = bytes(pkt)
        self.frames.append((ts, data))
        return data

    def write(self, path, nano: bool = True) -> str:
        with open(path, "wb") as f:
            w = pcap.PcapWriter(f, snaplen=65535, nanosecond=nano)
            for ts, d in self.frames:
                w.write(ts, d)
        return str(path)


def out_frames(path) -> list[tuple[int, bytes]]:
    with open(path, "rb") as f:
        return [(r.ts_ns, r.data) for r in pcap.decode(f.read())[1]]


def alerts_of(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def from_guest(payload, dst_mac=ROUTER, src_ip=GIP, dst_ip="10.0.0.9"):
    return Ether(src=GUEST, dst=dst_mac) / IP(src=src_ip, dst=dst_ip) / payload


def to_guest(payload, src_ip="10.0.0.9", dst_mac=GUEST):
    return Ether(src=ROUTER, dst=dst_mac) / IP(src=src_ip, dst=GIP) / payload


def mixed_capture() -> Capture:
    """A little of everything between the guest and the network, all of it the guest's."""
    c = Capture()
    c.add(Ether(src=ROUTER, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.9", pdst=GIP))
    c.add(Ether(src=GUEST, dst=ROUTER) / ARP(op=2, hwsrc=GUEST, psrc=GIP, hwdst=ROUTER, pdst="10.0.0.9"))
    for i in range(5):
        c.add(from_guest(TCP(sport=40000 + i, dport=80, flags="S")))
        c.add(to_guest(TCP(sport=80, dport=40000 + i, flags="SA")))
        c.add(from_guest(TCP(sport=40000 + i, dport=23, flags="PA") / Raw(b"telnet %d" % i)))
        c.add(to_guest(UDP(sport=9999, dport=5000) / Raw(b"x" * (100 + i))))
    c.add(Ether(src=ROUTER, dst="33:33:00:00:00:01") / Raw(b"\x86\xdd" + bytes(60)))
    return c


def run_replay(tmp_path, cap: Capture, doc=None, nano=True, **kw):
    """Replays ``cap`` through the CLI entry point; returns (status, frames out, alerts)."""
    inp = cap.write(tmp_path / "in.pcap", nano)
    argv = ["replay", "--guest-mac", GUEST, inp, "--out", str(tmp_path / "out.pcap"),
            "--alerts", str(tmp_path / "alerts.jsonl")]
    if doc is not None:
        argv += ["--policy", write_policy(str(tmp_path / "policy.json"), doc)]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    rc = cli.main(argv)
    return rc, out_frames(tmp_path / "out.pcap"), alerts_of(tmp_path / "alerts.jsonl")


# ---------------------------------------------------------------------------
# Sink ports (csrc/switch.c)
# ---------------------------------------------------------------------------

def test_sink_ports_queue_deliveries_in_order_and_apply_the_policy():
    g_mac, n_mac = parse_mac(GUEST), parse_mac(ROUTER)
    pol = parse_policy({"ni": {"mac": GUEST, "addresses": [GIP + "/32"]},
                        "prevent": [{"direction": "to_guest", "proto": "udp", "sport": 9999}]})
    with Switch() as sw:
        g, n = sw.add_sink_port(), sw.add_sink_port()
        g.set_policy(pol.compile())
        ok = bytes(from_guest(TCP(dport=80)))
        forged = bytes(from_guest(TCP(dport=80), src_ip="10.0.0.66"))
        blocked = bytes(to_guest(UDP(sport=9999, dport=1)))
        fine = bytes(to_guest(UDP(sport=53, dport=1)))
        bcast = bytes(Ether(src=ROUTER, dst="ff:ff:ff:ff:ff:ff") / ARP())
        g.inject_from(ok)          # ingress policy of the guest's port: passes
        g.inject_from(forged)      # anti-spoofing
        n.inject_from(blocked)     # egress policy of the guest's port: prevent rule
        n.inject_from(fine)
        n.inject_from(bcast)
        assert list(sw.sink_frames()) == [(n.index, ok), (g.index, fine), (g.index, bcast)]
        assert list(sw.sink_frames()) == []
        gs, ns = g.stats(), n.stats()
        assert (gs["in_frames"], gs["out_frames"], gs["drop_spoofed"], gs["drop_prevented"]) == (2, 2, 1, 1)
        assert (ns["in_frames"], ns["out_frames"]) == (3, 1)
        assert g_mac != n_mac
        # removing a port forgets what was queued for it, not what was queued for others
        n.inject_from(fine)
        g.inject_from(ok)
        g.remove()
        assert list(sw.sink_frames()) == [(n.index, ok)]


def test_direction_and_flow_helpers():
    mac = parse_mac(GUEST)
    assert direction_of(bytes(from_guest(TCP())), mac) == FROM_GUEST
    assert direction_of(bytes(to_guest(TCP())), mac) == TO_GUEST
    assert direction_of(bytes(Ether(src=ROUTER, dst="01:00:5e:00:00:01") / IP()), mac) == TO_GUEST
    assert direction_of(bytes(Ether(src=ROUTER, dst=OTHER) / IP()), mac) is None
    assert direction_of(b"\x00" * 13, mac) is None
    assert flow_of(bytes(from_guest(TCP(sport=1, dport=2)))) == {
        "proto": "tcp", "src": GIP, "dst": "10.0.0.9", "sport": 1, "dport": 2}
    assert flow_of(bytes(Ether() / scapy.IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=3, dport=4))) == {
        "proto": "udp", "src": "fd00::1", "dst": "fd00::2", "sport": 3, "dport": 4}
    assert flow_of(bytes(Ether() / ARP())) is None
    assert flow_of(b"\x00" * 20) is None
    for bad in ("52:54:00:12:34", "zz:54:00:12:34:56", "01:00:5e:00:00:01", "52:54:00:12:34:56:78"):
        with pytest.raises(ValueError):
            parse_mac(bad)
    assert parse_mac("52-54-00-12-34-56") == parse_mac("525400123456") == mac


# ---------------------------------------------------------------------------
# Policies without scanners
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("nano", [False, True])
def test_without_a_policy_the_output_is_the_input(tmp_path, nano):
    cap = mixed_capture()
    rc, out, alerts = run_replay(tmp_path, cap, nano=nano)
    assert rc == 0 and alerts == []
    want = cap.frames if nano else [(ts // 1000 * 1000, d) for ts, d in cap.frames]
    assert out == want
    # byte for byte, header included
    assert (tmp_path / "out.pcap").read_bytes() == (tmp_path / "in.pcap").read_bytes()


def test_frames_that_are_not_the_guests_are_left_out(tmp_path):
    cap = mixed_capture()
    stranger = cap.add(Ether(src=ROUTER, dst=OTHER) / IP() / UDP())
    rc, out, _ = run_replay(tmp_path, cap)
    assert rc == 0
    assert [d for _, d in out] == [d for _, d in cap.frames if d != stranger]


def test_a_prevent_rule_removes_its_frames_each_way(tmp_path):
    cap = mixed_capture()
    doc = policy(prevent=[{"direction": "from_guest", "proto": "tcp", "dport": 23},
                          {"direction": "to_guest", "proto": "udp", "sport": 9999}])
    rc, out, _ = run_replay(tmp_path, cap, doc)
    assert rc == 0

    def blocked(d: bytes) -> bool:
        p = Ether(d)
        return (TCP in p and p[TCP].dport == 23) or (UDP in p and p[UDP].sport == 9999)

    assert sum(map(blocked, (d for _, d in cap.frames))) == 10
    assert out == [(ts, d) for ts, d in cap.frames if not blocked(d)]


def test_anti_spoofing_removes_forged_frames(tmp_path):
    cap = Capture()
    good = [cap.add(from_guest(UDP(sport=1000 + i, dport=7))) for i in range(3)]
    forged_ip = cap.add(from_guest(UDP(dport=7), src_ip="10.0.0.66"))
    good.append(cap.add(to_guest(UDP(sport=7, dport=1000))))
    forged_arp = cap.add(Ether(src=GUEST, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=GUEST, psrc="10.0.0.1"))
    good.append(cap.add(Ether(src=GUEST, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=GUEST, psrc=GIP)))
    forged_mac_in_arp = cap.add(Ether(src=GUEST, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=OTHER, psrc=GIP))
    good.append(cap.add(from_guest(UDP(sport=2000, dport=7))))
    # no [ni] mac in the policy: the guest's MAC from the command line is its identity
    rc, out, _ = run_replay(tmp_path, cap, policy(addresses=[GIP + "/32"]))
    assert rc == 0
    assert [d for _, d in out] == good
    assert not {forged_ip, forged_arp, forged_mac_in_arp} & {d for _, d in out}


# ---------------------------------------------------------------------------
# Scanners
# ---------------------------------------------------------------------------

def decider_policy(**ni) -> dict:
    """tests/scanners/decider.py holding every UDP frame either way (markers decide)."""
    sub = {"match": {"proto": "udp"}, "contain": True}
    return policy(scanners=[scanner_spec("dec", "decider.py", allow=[{"proto": "udp", "contain": True}],
                                         config={"subscribe": [sub]})], **ni)


def test_held_frames_follow_the_scanner_and_the_timing_model(tmp_path):
    cap = Capture()
    f = [cap.add(from_guest(UDP(sport=1, dport=2) / Raw(m))) for m in
         (b"pass-1", b"CUT-2", b"LATER-3", b"pass-4", b"HOLD-5", b"pass-6")]
    tcp = cap.add(from_guest(TCP(dport=80)))          # not subscribed: straight through
    # on the capture's clock, so that a loaded machine's pace cannot move the hold timeout
    rc, out, alerts = run_replay(tmp_path, cap, decider_policy(hold_timeout_ms=300,
                                                               default_decision="pass"),
                                 clock="capture")
    assert rc == 0
    ts = [t for t, _ in cap.frames]
    # CUT is missing; LATER leaves once the next held frame arrives, with that frame's time;
    # HOLD is decided by the default (pass) after the hold timeout, at the end, when time runs
    # on to its deadline (300 ms after it was held)
    assert out[:-1] == [(ts[0], f[0]), (ts[3], f[2]), (ts[3], f[3]), (ts[5], f[5]), (ts[6], tcp)]
    assert out[-1][1] == f[4] and abs(out[-1][0] - (ts[4] + 300_000_000)) < 10_000
    # HOLD's missed decision is alerted too (the policy's default stood in for the scanner)
    assert [a["message"] for a in alerts] == [
        "ready", "decision missed: the policy's default applied after the hold timeout"]
    assert alerts[1]["fields"]["default"] == "pass"
    assert alerts[0]["frame"] is None and alerts[0]["ni"] == "replay" and alerts[0]["scanner"] == "dec"


def test_alerts_are_attributed_to_the_frame_that_caused_them(tmp_path):
    cap = Capture()
    for i in range(6):
        cap.add(from_guest(UDP(sport=1000 + i, dport=53)) if i % 2
                else to_guest(UDP(sport=53, dport=1000 + i)))
    sub = {"match": {"proto": "udp"}, "contain": False}
    doc = policy(scanners=[scanner_spec("rep", "decider.py", allow=[{"proto": "udp"}],
                                        config={"subscribe": [sub], "report": True})])
    rc, out, alerts = run_replay(tmp_path, cap, doc, ni="web1")
    assert rc == 0 and len(out) == 6
    frames = [a for a in alerts if a["message"] == "frame"]
    assert [a["frame"] for a in frames] == [1, 2, 3, 4, 5, 6]
    for a in frames:
        ts, data = cap.frames[a["frame"] - 1]
        assert a["capture_time"] == ts / 1e9
        assert bytes.fromhex(a["fields"]["data"]) == data
        assert a["fields"]["direction"] == (FROM_GUEST if a["frame"] % 2 == 0 else TO_GUEST)
        p = Ether(data)
        assert a["flow"] == {"proto": "udp", "src": p[IP].src, "dst": p[IP].dst,
                             "sport": p[UDP].sport, "dport": p[UDP].dport}
        assert a["ni"] == "web1" and isinstance(a["time"], float) and a["seq"] >= 1


def codered_capture(rnd: random.Random) -> tuple[Capture, list[bytes], list[bytes]]:
    """DNS lookups and SYNs to what they resolved (legitimate), then a worm's burst of SYNs
    to random addresses."""
    cap = Capture()
    names = {"www.example.com": "93.184.216.34", "mail.example.org": "198.51.100.7"}
    legit = []
    for i, (name, addr) in enumerate(names.items()):
        legit.append(cap.add(Ether(src=GUEST, dst=ROUTER) / IP(src=GIP, dst=NS)
                             / UDP(sport=5000 + i, dport=53) / DNS(id=100 + i, rd=1, qd=DNSQR(qname=name))))
        legit.append(cap.add(Ether(src=ROUTER, dst=GUEST) / IP(src=NS, dst=GIP)
                             / UDP(sport=53, dport=5000 + i)
                             / DNS(id=100 + i, qr=1, aa=1, qd=DNSQR(qname=name),
                                   an=DNSRR(rrname=name, ttl=300, rdata=addr))))
        for k in range(3):
            legit.append(cap.add(from_guest(TCP(sport=40000 + 10 * i + k, dport=80, flags="S"), dst_ip=addr)))
            legit.append(cap.add(to_guest(TCP(sport=80, dport=40000 + 10 * i + k, flags="SA"), src_ip=addr)))
    worm = []
    for k in range(40):
        dst = f"{rnd.randint(11, 99)}.{rnd.randint(0, 255)}.{rnd.randint(0, 255)}.{rnd.randint(1, 254)}"
        worm.append(cap.add(from_guest(TCP(sport=50000 + k, dport=rnd.choice([80, 443, 8080]), flags="S"),
                                       dst_ip=dst)))
    return cap, legit, worm


def test_codered_scanner_on_a_synthetic_capture(tmp_path):
    cap, legit, worm = codered_capture(random.Random(7))
    with open(CODERED) as f:
        doc = f.read().replace('program = "../scanners/codered"',
                               f'program = "{os.path.join(ROOT, "scanners", "codered")}"')
    inp = cap.write(tmp_path / "in.pcap")
    pol = write_policy(str(tmp_path / "codered.toml"), doc)
    rc = cli.main(["replay", "--policy", pol, "--guest-mac", GUEST, inp, "--out", str(tmp_path / "out.pcap"),
                   "--alerts", str(tmp_path / "alerts.jsonl")])
    assert rc == 0
    out = [d for _, d in out_frames(tmp_path / "out.pcap")]
    # every DNS frame and every SYN to a resolved address passed, in order
    assert [d for d in out if d in legit] == legit
    # the worm's burst: once more than 2 unknown destinations in a second, each is cut
    passed = [d for d in out if d in worm]
    assert passed == worm[:len(passed)] and len(passed) <= 2
    assert len(out) == len(legit) + len(passed)
    alerts = alerts_of(tmp_path / "alerts.jsonl")
    assert len(alerts) == 1, alerts
    a = alerts[0]
    assert a["scanner"] == "codered" and a["ni"] == "replay" and "Code-Red" in a["message"]
    assert a["fields"]["event"] == "attack_detected" and a["fields"]["count"] == 3
    # attributed to the SYN that crossed the threshold: the first one cut
    crossing = cap.frames[a["frame"] - 1][1]
    assert crossing == worm[len(passed)]
    assert a["flow"]["dport"] == a["fields"]["last_port"] == Ether(crossing)[TCP].dport
    assert a["flow"]["dst"] == a["fields"]["last_dst"]


def test_replay_api_and_pacing(tmp_path):
    """The Replay class as tests and benchmarks use it, with --speed pacing."""
    got, alerts = [], []
    frames = [bytes(from_guest(UDP(sport=1, dport=2) / Raw(b"m%d" % i))) for i in range(5)]
    pol = parse_policy(decider_policy(), base=str(tmp_path))
    with Replay(parse_mac(GUEST), pol, on_frame=lambda ts, f, d: got.append((ts, f, d)),
                on_alert=alerts.append, speed=4.0) as r:
        r.start()
        t = time.monotonic()
        for i, f in enumerate(frames):
            r.feed(i * 100_000_000, f)          # 0.1 s apart in the capture: 0.025 s at 4x
        r.finish()
        elapsed = time.monotonic() - t
        s = r.summary()
    assert got == [(i * 100_000_000, f, FROM_GUEST) for i, f in enumerate(frames)]
    assert 0.09 <= elapsed < 5
    assert s["ni"]["held"] == s["ni"]["held_passed"] == 5 and s["scanners"]["dec"]["decisions"] == 5
    assert s["syncs"] == 5 and s["scanners_not_synced"] == [] and s["scanners"]["dec"]["refused"] == 0


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

def _cli(args, capsys) -> tuple[int, str]:
    try:
        rc = cli.main(["replay", *args])
    except SystemExit as exc:       # argparse's own errors
        rc = exc.code
    return rc, capsys.readouterr().err


def test_cli_errors_are_clear_and_exit_2(tmp_path, capsys):
    good = mixed_capture().write(tmp_path / "in.pcap")
    out = str(tmp_path / "out.pcap")
    rc, err = _cli(["--guest-mac", "52:54:00:12:34", good, "--out", out], capsys)
    assert rc == 2 and "--guest-mac" in err and "not a MAC address" in err
    rc, err = _cli(["--guest-mac", "01:00:5e:00:00:01", good, "--out", out], capsys)
    assert rc == 2 and "multicast" in err
    rc, err = _cli(["--guest-mac", GUEST, str(tmp_path / "nope.pcap"), "--out", out], capsys)
    assert rc == 2 and "nope.pcap: no such file" in err
    rc, err = _cli([good, "--out", out], capsys)
    assert rc == 2 and "--guest-mac" in err
    sll = tmp_path / "sll.pcap"
    sll.write_bytes(pcap.encode_header(linktype=113) + pcap.encode_record(1, b"x" * 20))
    rc, err = _cli(["--guest-mac", GUEST, str(sll), "--out", out], capsys)
    assert rc == 2 and "link type 113 (LINUX_SLL" in err and "Ethernet" in err
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"hello, not a capture at all")
    rc, err = _cli(["--guest-mac", GUEST, str(junk), "--out", out], capsys)
    assert rc == 2 and "not a pcap or pcapng file" in err
    bad_pol = write_policy(str(tmp_path / "bad.json"), {"prevent": [{"dport": 70000, "proto": "tcp"}]})
    rc, err = _cli(["--guest-mac", GUEST, good, "--policy", bad_pol, "--out", out], capsys)
    assert rc == 2 and "prevent[0].dport" in err
    rc, err = _cli(["--guest-mac", GUEST, good, "--policy", str(tmp_path / "none.toml")], capsys)
    assert rc == 2 and "none.toml" in err
    rc, err = _cli(["--guest-mac", GUEST, good, "--out", str(tmp_path / "no" / "dir.pcap")], capsys)
    assert rc == 2 and "dir.pcap" in err
    rc, err = _cli(["--guest-mac", GUEST, good, "--speed", "0"], capsys)
    assert rc == 2 and "--speed" in err
    assert "Traceback" not in capsys.readouterr().err


def test_a_truncated_capture_is_replayed_up_to_the_damage(tmp_path, capsys):
    cap = mixed_capture()
    inp = cap.write(tmp_path / "in.pcap")
    data = open(inp, "rb").read()
    open(inp, "wb").write(data[:-10])
    rc, err = _cli(["--guest-mac", GUEST, inp, "--out", str(tmp_path / "out.pcap")], capsys)
    n = len(cap.frames)
    assert rc == 2 and f"record {n} truncated" in err and f"replayed the {n - 1} records before it" in err
    assert out_frames(tmp_path / "out.pcap") == cap.frames[:-1]


def test_the_installed_command(tmp_path):
    """End to end in a process of its own: exit status, summary, no traceback."""
    cap = mixed_capture()
    inp = cap.write(tmp_path / "in.pcap")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "vhostni", "replay", "--guest-mac", GUEST, inp,
                        "--out", str(tmp_path / "out.pcap")], capture_output=True, text=True, env=env,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stderr)
    delivered = summary["delivered_to_guest"] + summary["delivered_from_guest"]
    assert summary["records"] == delivered == len(cap.frames)
    p = subprocess.run([sys.executable, "-m", "vhostni", "replay", "--guest-mac", "nonsense", inp],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "not a MAC address" in p.stderr


def test_a_scanner_that_does_not_answer_syncs_is_waited_for_by_its_decisions(tmp_path, caplog):
    prog = tmp_path / "rawloop.py"
    prog.write_text(
        "import os\n"
        "from vhostni.scanner import Scanner, wire\n"
        "os.environ.pop('VHOSTNI_RING_FDS', None)   # the socket protocol by hand: no ring\n"
        "sc = Scanner.connect()\n"
        "sc.subscribe({'proto': 'udp'}, contain=True)\n"
        "while True:\n"
        "    msg = wire.decode(sc.sock.recv(wire.MAX_MESSAGE))   # its own loop: syncs unanswered\n"
        "    if isinstance(msg, wire.Frame) and msg.held:\n"
        "        sc.cut(msg.number) if b'CUT' in msg.data else sc.pass_(msg.number)\n")
    doc = policy(scanners=[scanner_spec("raw", str(prog), allow=[{"proto": "udp", "contain": True}])])
    frames = [bytes(from_guest(UDP(sport=1, dport=2) / Raw(m))) for m in (b"a", b"CUT", b"b")]
    got = []
    with Replay(parse_mac(GUEST), parse_policy(doc), on_frame=lambda ts, f, d: got.append(f),
                start_timeout=1.0, sync_timeout=0.5) as r:
        r.start()
        for i, f in enumerate(frames):
            r.feed(i, f)
        r.finish()
        s = r.summary()
    assert got == [frames[0], frames[2]]
    assert s["scanners_not_synced"] == ["raw"] and s["ni"]["decided_by_timeout"] == 0
    assert "not ready" in caplog.text


def test_a_window_lets_scanners_fall_behind_without_changing_what_is_delivered(tmp_path):
    cap = Capture()
    for i in range(60):
        cap.add(from_guest(UDP(sport=1, dport=2) / Raw(b"CUT" if i % 7 == 3 else b"ok %d" % i)))
        cap.add(from_guest(TCP(sport=i, dport=80)))
    inp = cap.write(tmp_path / "in.pcap")
    pol = write_policy(str(tmp_path / "p.json"), decider_policy())
    results = []
    for window in (1, 16):
        out = tmp_path / f"out{window}.pcap"
        assert cli.main(["replay", "--guest-mac", GUEST, "--policy", pol, inp, "--out", str(out),
                         "--window", str(window)]) == 0
        results.append(out_frames(out))
    lockstep, windowed = results
    assert lockstep == [(ts, d) for ts, d in cap.frames if b"CUT" not in d]
    assert sorted(d for _, d in windowed) == sorted(d for _, d in lockstep)


def test_finish_waits_for_stream_bytes_still_owed_a_decision(tmp_path):
    # A stream scanner that never passes: the data's only way out is the hold timeout
    # (default pass).  finish() must wait for it, as it does for held frames.
    spec = scanner_spec("sd", "stream_decider.py",
                        allow=[{"stream": True, "port": 25, "direction": "both", "contain": True}],
                        config={"subscribe": [{"port": 25, "direction": "both", "contain": True}],
                                "mode": "hold"})
    doc = policy(scanners=[spec], hold_timeout_ms=400, default_decision="pass")
    cs, ss = 1000, 5000
    frames = [from_guest(TCP(sport=40000, dport=25, flags="S", seq=cs - 1)),
              to_guest(TCP(sport=25, dport=40000, flags="SA", seq=ss - 1, ack=cs)),
              from_guest(TCP(sport=40000, dport=25, flags="A", seq=cs, ack=ss)),
              from_guest(TCP(sport=40000, dport=25, flags="PA", seq=cs, ack=ss) / Raw(b"HELO owed\r\n"))]
    got = []
    with Replay(parse_mac(GUEST), parse_policy(doc), on_frame=lambda ts, f, d: got.append(f)) as r:
        r.start()
        for i, f in enumerate(frames):
            r.feed(i, bytes(f))
        t0 = time.monotonic()
        r.finish()
        waited = time.monotonic() - t0
        s = r.summary()
        assert any(b"HELO owed" in f for f in got), "finish() returned with stream bytes still held"
    assert waited >= 0.2 and s["ni"]["decided_by_timeout"] == 1


def test_email_scanner_replaces_an_infected_attachment_in_a_capture(tmp_path):
    """examples/email.toml as it ships, over a capture of the guest sending an infected
    message: the output's SMTP stream carries the message with the attachment replaced by
    the policy's injection (sequence numbers rewritten), and the alert names the flow."""
    import base64
    eicar = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
    part = (b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(eicar).replace(b"\n", b"\r\n"))
    msg = (b"From: a@x\r\nTo: b@y\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\n"
           b"hello\r\n" + b"filler\r\n" * 200 + b"--B\r\n" + part + b"--B--\r\n")
    client = [b"EHLO me\r\n", b"MAIL FROM:<a@x>\r\n", b"RCPT TO:<b@y>\r\n", b"DATA\r\n", msg + b".\r\n",
              b"QUIT\r\n"]
    server = [b"220 hi\r\n", b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n", b"250 queued\r\n",
              b"221 bye\r\n"]
    cap, cs, ss = Capture(), 1000, 5000
    co, so = 0, 0

    def c2s(flags, data=b""):
        nonlocal co
        cap.add(from_guest(TCP(sport=40000, dport=25, flags=flags, seq=cs + co, ack=ss + so) / Raw(data)))
        co += len(data)

    def s2c(flags, data=b""):
        nonlocal so
        cap.add(to_guest(TCP(sport=25, dport=40000, flags=flags, seq=ss + so, ack=cs + co) / Raw(data)))
        so += len(data)

    cap.add(from_guest(TCP(sport=40000, dport=25, flags="S", seq=cs - 1)))
    cap.add(to_guest(TCP(sport=25, dport=40000, flags="SA", seq=ss - 1, ack=cs)))
    c2s("A")
    s2c("PA", server[0])
    for cmd, reply in zip(client, server[1:]):
        for i in range(0, len(cmd), 1000):
            c2s("PA", cmd[i:i + 1000])
        s2c("PA", reply)
    with open(os.path.join(ROOT, "examples", "email.toml")) as f:
        doc = f.read().replace('program = "../scanners/email"',
                               f'program = "{os.path.join(ROOT, "scanners", "email")}"')
    inp = cap.write(tmp_path / "in.pcap")
    pol = write_policy(str(tmp_path / "email.toml"), doc)
    rc = cli.main(["replay", "--policy", pol, "--guest-mac", GUEST, inp, "--out", str(tmp_path / "out.pcap"),
                   "--alerts", str(tmp_path / "alerts.jsonl")])
    assert rc == 0
    stream = {}
    for _, d in out_frames(tmp_path / "out.pcap"):
        p = Ether(d)
        if TCP in p and p[TCP].dport == 25 and Raw in p:
            off = p[TCP].seq - cs
            for i, b in enumerate(bytes(p[Raw].load)):
                assert stream.setdefault(off + i, b) == b, f"byte {off + i} sent twice, differently"
    got = bytes(stream[i] for i in range(len(stream)))
    from vhostni.policy import load_policy
    (rep,) = [b for n, b in load_policy(pol).scanners[0].stream_injections if n == "replacement"]
    start = msg.index(b"--B\r\n" + part) + len(b"--B\r\n")
    edited = msg[:start] + rep + msg[start + len(part) - 2:]
    assert got == b"".join(client[:4]) + edited + b".\r\n" + b"QUIT\r\n"
    virus = [a for a in alerts_of(tmp_path / "alerts.jsonl") if a["fields"].get("event") == "virus"]
    assert len(virus) == 1 and virus[0]["fields"]["action"] == "replace", virus
    assert virus[0]["flow"]["dport"] == 25 and virus[0]["fields"]["verdict"] == "EICAR-Test-File"


@pytest.mark.parametrize("kind", ["oversize", "deep"])
def test_a_policy_whose_scanner_hello_cannot_be_sent_is_a_clear_error(tmp_path, kind):
    """It used to pass validation and crash replay with a traceback when the kernel could
    not encode the scanner's hello."""
    from nikit import unsendable_configs
    good = mixed_capture().write(tmp_path / "in.pcap")
    pol = write_policy(str(tmp_path / "big.json"), policy(scanners=[
        scanner_spec("big", "decider.py", config=unsendable_configs()[kind])]))
    p = subprocess.run([sys.executable, "-m", "vhostni", "replay", "--guest-mac", GUEST, good,
                        "--policy", pol, "--out", str(tmp_path / "out.pcap")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "scanner[0].config" in p.stderr and "hello" in p.stderr
    assert "Traceback" not in p.stderr
    # an NI name longer than any NI can have is refused (the hello carries it)
    p = subprocess.run([sys.executable, "-m", "vhostni", "replay", "--guest-mac", GUEST, good,
                        "--ni", "n" * 33], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--ni" in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------------------
# --clock capture: the whole NI, scanners included, on the capture's timestamps
# ---------------------------------------------------------------------------

def test_hold_timeouts_run_on_the_capture_clock(tmp_path):
    """A frame nobody decides is settled by the hold timeout when *capture* time says so:
    before a frame ten capture-seconds later (on the system clock, replay feeds that frame
    within milliseconds, and the held one leaves only at the end)."""
    cap = Capture()
    held = cap.add(from_guest(UDP(sport=1, dport=2) / Raw(b"HOLD-1")))
    later = cap.add(from_guest(UDP(sport=1, dport=2) / Raw(b"pass-2")), gap_ns=10 * 10**9)
    # 2 s: long enough that feeding two frames on a loaded machine never takes that long
    doc = decider_policy(hold_timeout_ms=2000, default_decision="pass")
    ts = [t for t, _ in cap.frames]
    rc, out, alerts = run_replay(tmp_path, cap, doc, clock="capture")
    assert rc == 0
    assert out == [(ts[1], held), (ts[1], later)]
    missed = [a for a in alerts if a["message"].startswith("decision missed")]
    assert len(missed) == 1
    rc, out, _ = run_replay(tmp_path, cap, doc)          # the system clock, as before
    assert rc == 0 and [d for _, d in out] == [later, held]


def test_scanners_time_and_timeouts_follow_the_capture(tmp_path):
    """The SDK's clock(), time(), frame times and frames(timeout=...) run on capture time:
    a 4.5 s gap in the capture is one quiet interval for the scanner, however fast it is fed,
    and two runs say exactly the same."""
    cap = Capture()
    for gap in (1_000_000, 500_000_000, 4_500_000_000, 200_000_000):
        cap.add(from_guest(UDP(sport=7, dport=9) / Raw(b"x")), gap_ns=gap)
    ts = [t / 1e9 for t, _ in cap.frames]
    doc = policy(scanners=[scanner_spec("cw", "clockwatch.py", allow=[{"proto": "udp"}],
                                        config={"timeout": 1.0})])
    runs = []
    for _ in range(2):
        rc, out, alerts = run_replay(tmp_path, cap, doc, clock="capture")
        assert rc == 0 and len(out) == 4
        runs.append([(a["message"], a["fields"], a["frame"]) for a in alerts])
    assert runs[0] == runs[1]
    got = runs[0]
    assert got[0][0] == "hello" and got[0][1]["mode"] == "capture"
    assert got[0][1]["clock"] == got[0][1]["time"] == ts[0]        # started at the first frame's time
    frames = [(f, n) for m, f, n in got if m == "frame"]
    assert [n for _, n in frames] == [1, 2, 3, 4]
    for (f, n) in frames:
        assert f["frame_time"] == f["clock"] == f["time"] == ts[n - 1]
    # one quiet interval, in the gap, told when capture time reached the third frame
    order = [m for m, _, _ in got[1:]]
    assert order == ["frame", "frame", "quiet", "frame", "frame"]
    quiet = [f for m, f, _ in got if m == "quiet"][0]
    assert quiet["clock"] == ts[2]


def test_codered_sees_a_slow_scan_at_its_own_pace_on_the_capture_clock(tmp_path):
    """A scan of one unknown address every 7 s (8-9 a minute, under Code-Red's 10) is not an
    attack; compressed into milliseconds on the system clock it looks like one.  On the
    capture's clock the scanner sees the capture's rates: no alert, every SYN through."""
    cap = Capture()
    rnd = random.Random(3)
    syns = [cap.add(from_guest(TCP(sport=50000 + k, dport=80, flags="S"),
                               dst_ip=f"{rnd.randint(11, 99)}.{rnd.randint(0, 255)}.1.{k + 1}"),
                    gap_ns=7 * 10**9) for k in range(20)]
    with open(CODERED) as f:
        doc = f.read().replace('program = "../scanners/codered"',
                               f'program = "{os.path.join(ROOT, "scanners", "codered")}"')
    pol = write_policy(str(tmp_path / "codered.toml"), doc)
    inp = cap.write(tmp_path / "in.pcap")
    results = {}
    for clock in ("capture", "system"):
        rc = cli.main(["replay", "--policy", pol, "--guest-mac", GUEST, inp, "--clock", clock,
                       "--out", str(tmp_path / f"{clock}.pcap"), "--alerts", str(tmp_path / f"{clock}.jsonl")])
        assert rc == 0
        results[clock] = ([d for _, d in out_frames(tmp_path / f"{clock}.pcap")],
                          [a["fields"].get("event") for a in alerts_of(tmp_path / f"{clock}.jsonl")])
    assert results["capture"] == (syns, [])
    out, events = results["system"]
    assert "attack_detected" in events and len(out) < len(syns)


def test_clock_arguments_are_checked(tmp_path, capsys):
    cap = Capture()
    cap.add(from_guest(UDP(sport=1, dport=2)))
    inp = cap.write(tmp_path / "in.pcap")
    rc = cli.main(["replay", "--guest-mac", GUEST, inp, "--clock", "capture", "--speed", "1"])
    assert rc == 2 and "--speed" in capsys.readouterr().err
    with pytest.raises(ValueError):
        Replay(parse_mac(GUEST), clock="sundial")
    sw = Switch()
    try:
        sw.set_clock(2 * 10**18)
        with pytest.raises(ValueError):
            sw.set_clock(10**18)                           # never back
        with pytest.raises(ValueError):
            sw.set_clock(0)                                # nor back to the system's
    finally:
        sw.close()


# ---- hostile captures and scanners on the capture clock ----------------------------------

def _pcapng(path, ticks, tsresol: int) -> str:
    """A little-endian pcapng file: one Ethernet interface of resolution 10^-tsresol s,
    one enhanced packet block per (ticks, frame)."""
    import struct

    def block(t, body):
        body += b"\0" * (-len(body) % 4)
        return struct.pack("<II", t, 12 + len(body)) + body + struct.pack("<I", 12 + len(body))
    opts = struct.pack("<HHB3x", 9, 1, tsresol) + struct.pack("<HH", 0, 0)
    out = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    out += block(1, struct.pack("<HHI", 1, 0, 65535) + opts)
    for t, d in ticks:
        out += block(6, struct.pack("<IIIII", 0, t >> 32, t & 0xFFFFFFFF, len(d), len(d)) + d)
    with open(path, "wb") as f:
        f.write(out)
    return str(path)


def test_the_switch_clock_refuses_times_it_cannot_hold():
    """A time past what the C clock holds (a timer added to it would wrap) or below zero is a
    ValueError, not an OverflowError from cffi or a clock that wraps its timers."""
    from vhostni.fastpath import lib
    with Switch() as sw:
        for bad in (-1, 1 << 64, (1 << 64) - 1, lib.VN_CLOCK_MAX_NS + 1):
            with pytest.raises(ValueError):
                sw.set_clock(bad)
        sw.set_clock(lib.VN_CLOCK_MAX_NS)
        for back in (5, 0):
            with pytest.raises(ValueError):
                sw.set_clock(back)


def test_capture_clock_survives_hostile_timestamps(tmp_path):
    """pcapng timestamps in seconds up to 2^64 - 1 (past any clock), going back, zero: on the
    capture's clock every frame is replayed (times past the pcap range count as its end),
    with no traceback."""
    from vhostni.replay import replay_file
    frames = [bytes(from_guest(UDP(sport=1, dport=2) / Raw(b"f%d" % i))) for i in range(5)]
    top = (1 << 64) - 1
    inp = _pcapng(tmp_path / "in.pcapng", list(zip([top, top, 5, 0, 1 << 40], frames)), tsresol=0)
    out = tmp_path / "out.pcap"
    s = replay_file(inp, parse_mac(GUEST), parse_policy(decider_policy(hold_timeout_ms=200)),
                    out_path=str(out), clock="capture")
    assert s["records"] == 5
    assert [d for _, d in out_frames(out)] == frames


def test_capture_clock_replay_does_not_wait_forever_for_a_silent_scanner(tmp_path):
    """A scanner that holds frames and then neither answers syncs nor decides: on the
    system clock hold timeouts end replay's wait; on the capture's clock time stands still
    while replay waits, so it used to wait forever.  Now it stops waiting for such a scanner
    after sync_timeout and its frames go when capture time passes their hold deadline."""
    from nikit import time_limit
    frames = [bytes(from_guest(UDP(sport=1, dport=2) / Raw(b"HOLD-%d" % i))) for i in range(4)]
    doc = policy(hold_timeout_ms=300, default_decision="pass", scanners=[
        scanner_spec("mute", "decider.py", allow=[{"proto": "udp", "contain": True}],
                     config={"subscribe": [{"match": {"proto": "udp"}, "contain": True}], "no_ready": True})])
    got = []
    with time_limit(40, "replay"):
        with Replay(parse_mac(GUEST), parse_policy(doc, base=str(tmp_path)),
                    on_frame=lambda ts, f, d: got.append((ts, f)), clock="capture",
                    sync_timeout=0.5, start_timeout=1.0) as r:
            r.start(at_ns=T0 * 10**9)
            for i, f in enumerate(frames):
                r.feed(T0 * 10**9 + i * 10**9, f)       # a second apart: each hold times out by the next
            r.finish()
    assert [f for _, f in got] == frames
    # each left when capture time passed its deadline: at the next frame's time, the last at the end
    assert [ts for ts, _ in got[:3]] == [T0 * 10**9 + (i + 1) * 10**9 for i in range(3)]


def test_ticks_are_not_queued_past_the_limit_for_a_scanner_that_stopped_reading(kits):
    """A tick behind a full output queue used to be queued regardless (forced, as a close
    is), one per advance of the capture's clock, without bound; it is dropped instead (the
    next tick says a later time) and the queue stays within OUTQ_MAX."""
    from vhostni.scannerproc import OUTQ_MAX
    k = kits({"a": policy(scanners=[scanner_spec("cw", "clockwatch.py", allow=[{"proto": "udp"}])])})
    k.until(lambda: k.sp("a", "cw").running and k.subscribed("a", "cw"), 20, "the scanner")
    sp = k.sp("a", "cw")
    saved = (sp.outq.copy(), sp.outq_bytes)
    sp.outq.append(b"")                  # a backlog at the limit (not sent: restored below)
    sp.outq_bytes = OUTQ_MAX
    try:
        before = len(sp.outq)
        assert not any(sp.send_tick(1000.0 + i) for i in range(100))
        assert len(sp.outq) == before and sp.outq_bytes == OUTQ_MAX
    finally:
        sp.outq.clear()
        sp.outq.extend(saved[0])
        sp.outq_bytes = saved[1]


def replay_rules(tmp_path, pcap_path, rules: str, mac: str, addresses=()):
    """``vhostni replay --clock capture`` of a capture through an NI with these signature rules:
    (the signature alerts' fields, the delivered frames)."""
    rf = tmp_path / "t.rules"
    rf.write_text(rules)
    pol = tmp_path / "policy.json"
    pol.write_text(json.dumps({"ni": {"addresses": list(addresses), "anti_spoof": False},
                               "signatures": {"rules": [str(rf)]}}))
    assert cli.main(["replay", "--guest-mac", mac, str(pcap_path), "--policy", str(pol), "--out",
                     str(tmp_path / "out.pcap"), "--alerts", str(tmp_path / "alerts.jsonl"),
                     "--clock", "capture"]) == 0
    alerts = [a["fields"] for a in alerts_of(tmp_path / "alerts.jsonl") if a.get("fields", {}).get("alert")]
    return alerts, [d for _, d in out_frames(tmp_path / "out.pcap")]
