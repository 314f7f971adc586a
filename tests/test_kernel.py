"""The NI kernel and the fast-path policy through a real daemon, with simulated guests.

Guest a and guest b sit on two NIs of one ``Daemon`` (tests/nikit.py steps it); policies are
files the daemon loads, scanners are real sandboxed processes (tests/scanners/decider.py
decides by markers in the frame: CUT, HOLD, LATER, else pass).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

import pytest

from nikit import (
    A_IP, A_MAC, B_IP, B_MAC, BCAST, TCP_ACK, TCP_SYN, Kit, alive, arp, bootp_request, eth, ipv4, ipv6, policy,
    scanner_spec, tcp, tcp_frame, time_limit, udp, udp_frame, write_policy, fill_fs, tiny_tmpfs,
    unsendable_configs,
)
from vhostni import alertlog as alertlog_mod
from vhostni import kernel as kernel_mod
from vhostni import scannerproc as scannerproc_mod
from vhostni.alertlog import AlertLog
from vhostni.scanner import wire


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(scannerproc_mod, "RESTART_MIN", 0.05)
    with time_limit(60, "the test"):
        yield


def decider(name="dec", subscribe=(), allow=None, **config):
    """decider.py with the given subscriptions; its rights default to exactly those."""
    subs = [dict(s) for s in subscribe]
    rights = allow if allow is not None else [dict(s["match"], contain=s.get("contain", False)) for s in subs]
    return scanner_spec(name, "decider.py", allow=rights, config=dict(config, subscribe=subs))


HTTP_CONTAIN = {"match": {"direction": "from_guest", "proto": "tcp", "dport": 80}, "contain": True}


# ---------------------------------------------------------------------------
# Anti-spoofing
# ---------------------------------------------------------------------------

def test_anti_spoofing(kits):
    k = kits({"a": policy(mac=A_MAC, addresses=[f"{A_IP}/32", "fd00::1/128"])})
    good = [
        tcp_frame(payload=b"good"),
        eth(BCAST, A_MAC, 0x0806, arp(1, A_MAC, A_IP, b"\0" * 6, B_IP)),           # who-has
        eth(BCAST, A_MAC, 0x0806, arp(1, A_MAC, "0.0.0.0", b"\0" * 6, A_IP)),      # ARP probe
        eth(BCAST, A_MAC, 0x0800, ipv4("0.0.0.0", "255.255.255.255", 17, udp(68, 67, bootp_request(A_MAC)))),
        eth(B_MAC, A_MAC, 0x86DD, ipv6("fd00::1", "fd00::2", 17, udp(1, 2, b"v6"))),
        eth(BCAST, A_MAC, 0x86DD, ipv6("::", "ff02::1:ff00:1", 58,
                                       b"\x87\0\0\0" + b"\0" * 4 + socket.inet_pton(socket.AF_INET6, "fd00::1"))),  # DAD
        eth(B_MAC, A_MAC, 0x0800, ipv4(A_IP, B_IP, 6, tcp(1, 2)), vlan=5),
    ]
    spoofed = [
        tcp_frame(src_mac=bytes.fromhex("020000000a0b")),                       # wrong source MAC
        tcp_frame(src_ip="10.0.0.99"),                                          # wrong source IP
        tcp_frame(src_ip=B_IP),                                                 # b's address
        eth(BCAST, A_MAC, 0x0806, arp(2, A_MAC, B_IP, B_MAC, B_IP)),            # ARP: forged sender IP
        eth(BCAST, A_MAC, 0x0806, arp(1, B_MAC, A_IP, b"\0" * 6, B_IP)),        # ARP: forged sender MAC
        eth(BCAST, A_MAC, 0x0800, ipv4("0.0.0.0", B_IP, 17, udp(68, 99))),      # 0.0.0.0, not DHCP
        eth(BCAST, A_MAC, 0x0800, ipv4("0.0.0.0", B_IP, 6, tcp(68, 67))),       # 0.0.0.0, TCP
        eth(B_MAC, A_MAC, 0x86DD, ipv6("fd00::99", "fd00::2", 17, udp(1, 2))),  # wrong IPv6 source
        eth(B_MAC, A_MAC, 0x0800, ipv4("10.0.0.99", B_IP, 6, tcp(1, 2)), vlan=5),  # behind a VLAN tag
    ]
    for i, f in enumerate(spoofed):
        k.send("a", f)
    assert k.recv("b", 0.3) == []
    assert k.stats("a")["drop_spoofed"] == len(spoofed)
    # a truncated ARP packet has no business leaving the guest: it is not even parsed
    k.send("a", eth(BCAST, A_MAC, 0x0806, arp(1, A_MAC, A_IP, b"\0" * 6, B_IP)[:20]))
    assert k.recv("b", 0.3) == [] and k.stats("a")["drop_unparsed_truncated"] == 1
    for f in good:
        k.send("a", f)
    got = k.recv("b", 2.0, count=len(good))
    assert got == good
    assert k.stats("a")["drop_spoofed"] == len(spoofed)
    # b has no policy: it may send anything, and what a receives is not checked
    k.send("b", tcp_frame("b", "a", src_ip="192.0.2.7"))
    assert len(k.recv("a", 1.0, 1)) == 1


def test_anti_spoofing_off(kits):
    k = kits({"a": policy(mac=A_MAC, addresses=[f"{A_IP}/32"], anti_spoof=False)})
    k.send("a", tcp_frame(src_ip="10.0.0.99"), tcp_frame(src_mac=bytes.fromhex("02000000ffff")))
    assert len(k.recv("b", 1.0, 2)) == 2
    assert k.stats("a")["drop_spoofed"] == 0


# ---------------------------------------------------------------------------
# Prevent rules
# ---------------------------------------------------------------------------

def test_prevent_rules_each_direction(kits):
    k = kits({"a": policy(prevent=[
        {"direction": "from_guest", "proto": "tcp", "dport": 23},
        {"direction": "to_guest", "proto": "udp", "sport": 53},
        {"proto": "tcp", "dport": "6660-6669"},                          # both directions
        {"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn,!ack", "dport": 25},
        {"direction": "from_guest", "dst": "10.0.0.0/30", "proto": "icmp"},
        {"direction": "to_guest", "terms": [{"offset": 0, "value": "ffffffffffff"}], "ethertype": "arp"},
    ])})
    # (sender, frame, dropped?)
    cases = [
        ("a", tcp_frame(dport=23), True),
        ("a", tcp_frame(dport=22), False),
        ("b", tcp_frame("b", "a", dport=23), False),            # rule is from_guest only
        ("b", udp_frame("b", "a", sport=53), True),             # to_guest rule
        ("a", udp_frame(sport=53), False),
        ("a", tcp_frame(dport=6667), True),
        ("b", tcp_frame("b", "a", dport=6660), True),
        ("b", tcp_frame("b", "a", dport=6670), False),
        ("a", tcp_frame(dport=25, flags=TCP_SYN), True),
        ("a", tcp_frame(dport=25, flags=TCP_SYN | TCP_ACK), False),
        ("a", tcp_frame(dport=25, flags=TCP_ACK), False),
        ("a", eth(B_MAC, A_MAC, 0x0800, ipv4(A_IP, B_IP, 1, b"\x08\0\0\0ping")), True),
        ("a", eth(B_MAC, A_MAC, 0x0800, ipv4(A_IP, "10.0.0.9", 1, b"\x08\0\0\0ping")), False),
        ("b", eth(BCAST, B_MAC, 0x0806, arp(1, B_MAC, B_IP, b"\0" * 6, A_IP)), True),
        ("b", eth(A_MAC, B_MAC, 0x0806, arp(2, B_MAC, B_IP, A_MAC, A_IP)), False),
    ]
    dropped = 0
    for i, (src, frame, drop) in enumerate(cases):
        dst = "b" if src == "a" else "a"
        k.send(src, frame)
        got = k.recv(dst, 0.15 if drop else 2.0, 1)
        assert got == ([] if drop else [frame]), f"case {i}"
        dropped += drop
        assert k.stats("a")["drop_prevented"] == dropped, f"case {i}"
    assert k.stats("b")["drop_prevented"] == 0
    # a later fragment whose first fragment was not seen cannot dodge a port rule either
    k.send("a", eth(B_MAC, A_MAC, 0x0800, ipv4(A_IP, B_IP, 6, b"x" * 24, frag_offset=100)))
    assert k.recv("b", 0.15) == [] and k.stats("a")["drop_frag_unmatched"] == 1


# ---------------------------------------------------------------------------
# Contain subscriptions and decisions
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["from_guest", "to_guest"])
def test_contain_holds_until_the_scanner_decides(kits, direction):
    sub = {"match": {"direction": direction, "proto": "tcp", "dport": 80}, "contain": True}
    k = kits({"a": policy(hold_timeout_ms=5000, scanners=[decider(subscribe=[sub])])})
    k.wait_subscribed("a", "dec")
    src, dst = ("a", "b") if direction == "from_guest" else ("b", "a")

    def frame(payload, dport=80):
        return tcp_frame(src, dst, dport=dport, payload=payload)

    # held until the scanner decides: LATER is held until the next frame reaches the scanner
    later = frame(b"LATER")
    k.send(src, later)
    k.until(lambda: k.sp("a", "dec").owed(), what="the frame to reach the scanner")
    assert k.recv(dst, 0.4) == []
    assert k.stats("a")["held"] == 1 and k.nk("a").info()["held"] == 1
    # unsubscribed traffic is not held meanwhile
    other = frame(b"other", dport=81)
    k.send(src, other)
    assert k.recv(dst, 2.0, 1) == [other]
    passed = frame(b"PASS")
    k.send(src, passed)
    assert k.recv(dst, 3.0, 2) == [later, passed]
    cut = frame(b"CUT")
    k.send(src, cut)
    k.until(lambda: k.stats("a")["held_cut"] == 1, what="the cut")
    assert k.recv(dst, 0.2) == []
    st = k.stats("a")
    assert (st["held"], st["held_passed"], st["held_cut"]) == (3, 2, 1)
    assert k.nk("a").decided_by_timeout == 0
    assert k.sp("a", "dec").counters.frames == 3


def test_every_contain_scanner_must_pass(kits):
    match = {"direction": "from_guest", "proto": "tcp", "dport": 80}
    scanners = [decider("yes", [{"match": match, "contain": True}], verdict="pass"),
                decider("no", [{"match": dict(match, sport=1000), "contain": True}], verdict="cut"),
                decider("ro", [{"match": match, "contain": False}])]
    k = kits({"a": policy(hold_timeout_ms=5000, scanners=scanners)})
    for s in ("yes", "no", "ro"):
        k.wait_subscribed("a", s)
    only_yes = tcp_frame(sport=999, payload=b"one")
    both = tcp_frame(sport=1000, payload=b"two")
    k.send("a", only_yes, both)
    assert k.recv("b", 1.0) == [only_yes]
    k.until(lambda: k.stats("a")["held_cut"] == 1, what="the cut")
    assert k.sp("a", "yes").counters.decisions == 2
    assert k.sp("a", "no").counters.decisions == 1
    assert k.sp("a", "ro").counters.frames == 2 and k.sp("a", "ro").counters.decisions == 0


@pytest.mark.parametrize("default", ["cut", "pass"])
def test_timeout_applies_the_default_decision(kits, default):
    k = kits({"a": policy(hold_timeout_ms=150, default_decision=default,
                          scanners=[decider(subscribe=[HTTP_CONTAIN])])})
    k.wait_subscribed("a", "dec")
    held = tcp_frame(payload=b"HOLD")
    t0 = time.monotonic()
    k.send("a", held)
    if default == "pass":
        assert k.recv("b", 3.0, 1) == [held]
        assert time.monotonic() - t0 >= 0.14
    else:
        k.until(lambda: k.stats("a")["held_cut"] == 1, what="the timeout")
        assert k.recv("b", 0.1) == []
    assert k.nk("a").decided_by_timeout == 1
    assert k.sp("a", "dec").counters.timeouts == 1
    assert k.nk("a").info()["held"] == 0
    missed = k.alerts_matching("decision missed", "a", "dec")
    assert len(missed) == 1 and missed[0]["fields"]["default"] == default, missed
    # a late decision is ignored, and the scanner is still trusted with the next frame
    k.send("a", tcp_frame(payload=b"next"))
    assert len(k.recv("b", 2.0, 1)) == 1
    assert k.nk("a").decided_by_timeout == 1
    assert k.sp("a", "dec").running


def test_read_only_subscription_gets_copies_without_holding(kits):
    sub = {"match": {"proto": "udp", "dport": 53}, "contain": False}
    k = kits({"a": policy(scanners=[decider(subscribe=[sub], report=True)])})
    k.wait_subscribed("a", "dec")
    frames = [udp_frame(dport=53, payload=b"HOLD query %d" % i) for i in range(3)]
    reply = udp_frame("b", "a", sport=53, dport=53, payload=b"CUT answer")
    k.send("a", *frames)
    assert k.recv("b", 2.0, 3) == frames          # not held: HOLD means nothing to a copy
    k.send("b", reply)
    assert k.recv("a", 2.0, 1) == [reply]          # CUT neither
    k.until(lambda: len(k.alerts_matching("frame")) == 4, what="the scanner's reports")
    seen = [a["fields"] for a in k.alerts_matching("frame")]
    assert [bytes.fromhex(s["data"]) for s in seen] == frames + [reply]
    first = seen[0]["number"]                      # 1 over the socket, 0 on a ring
    assert [s["number"] - first for s in seen] == [0, 1, 2, 3]
    assert [s["direction"] for s in seen] == [1, 1, 1, 2]
    assert not any(s["held"] for s in seen)
    st = k.stats("a")
    assert (st["punted_copies"] + st["ring_frames"], st["held"]) == (4, 0)


@pytest.mark.parametrize("over_cap", ["drop", "pass"])
def test_memcap_exception_policy(kits, over_cap):
    k = kits({"a": policy(hold_timeout_ms=20000, held_frames_max=3, over_cap=over_cap,
                          scanners=[decider(subscribe=[HTTP_CONTAIN])])})
    k.wait_subscribed("a", "dec")
    frames = [tcp_frame(payload=b"HOLD %d" % i) for i in range(8)]
    k.send("a", *frames)
    k.until(lambda: k.stats("a")["held_over_cap"] == 5, what="the memcap")
    got = k.recv("b", 0.3)
    assert got == (frames[3:] if over_cap == "pass" else [])
    st = k.stats("a")
    assert (st["held"], st["held_over_cap"]) == (3, 5)
    assert k.nk("a").info()["held"] == 3


def test_injection_of_a_pre_registered_frame(kits):
    canned = eth(A_MAC, B_MAC, 0x88B5, b"pre-registered RST stand-in")
    spec = decider(subscribe=[HTTP_CONTAIN], inject=[0, "to_guest"])
    spec["inject"] = [{"name": "rst", "frame": canned.hex()}]
    k = kits({"a": policy(scanners=[spec])})
    assert k.recv("a", 5.0, 1) == [canned]
    assert k.stats("a")["injected"] == 1


# ---------------------------------------------------------------------------
# Policy changes on live traffic
# ---------------------------------------------------------------------------

def _reload_policy(block: int, contain_port: int = 8080) -> dict:
    sub = {"match": {"direction": "from_guest", "proto": "tcp", "dport": contain_port}, "contain": True}
    return policy(hold_timeout_ms=5000, prevent=[{"direction": "from_guest", "proto": "tcp", "dport": block}],
                  scanners=[decider(subscribe=[sub], allow=[dict(sub["match"], contain=True)])])


def test_reload_takes_effect_on_live_traffic(kits):
    k = kits({"a": _reload_policy(block=23)})
    k.wait_subscribed("a", "dec")
    pid = k.sp("a", "dec").proc.pid
    k.send("a", tcp_frame(dport=23), tcp_frame(dport=80, payload=b"open"))
    assert k.recv("b", 1.0) == [tcp_frame(dport=80, payload=b"open")]
    # a frame held across the reload keeps its place and is decided after it
    later = tcp_frame(dport=8080, payload=b"LATER")
    k.send("a", later)
    k.until(lambda: k.sp("a", "dec").owed(), what="the held frame")
    k.reload("a", _reload_policy(block=80))
    k.send("a", tcp_frame(dport=23, payload=b"now open"), tcp_frame(dport=80, payload=b"now shut"))
    assert k.recv("b", 1.0) == [tcp_frame(dport=23, payload=b"now open")]
    k.send("a", tcp_frame(dport=8080, payload=b"go"))
    assert k.recv("b", 2.0, 2) == [later, tcp_frame(dport=8080, payload=b"go")]
    assert k.sp("a", "dec").proc.pid == pid         # the scanner kept running
    assert k.stats("a")["drop_prevented"] == 2
    assert k.sp("a", "dec").counters.restarts == 0


def test_reload_with_an_invalid_file_keeps_the_old_policy(kits, caplog):
    k = kits({"a": _reload_policy(block=23)})
    k.wait_subscribed("a", "dec")
    old = k.nk("a").policy
    for bad in ['{"ni": {"hold_timeout_ms": "soon"}}', '{"prevent": [{"dport": 99999, "proto": "tcp"}]}',
                "{not json"]:
        k.reload("a", bad)
        assert k.nk("a").policy is old
        k.send("a", tcp_frame(dport=23), tcp_frame(dport=80))
        assert k.recv("b", 1.0) == [tcp_frame(dport=80)]
    assert "not reloaded, keeping the old one" in caplog.text
    assert k.sp("a", "dec").running and k.subscribed("a", "dec")


@pytest.mark.parametrize("kind", ["oversize", "deep"])
def test_a_policy_whose_hello_cannot_be_sent_is_never_applied(kits, caplog, kind):
    """Validation refuses it (SIGHUP keeps the old policy); and were one to get past
    validation, applying it fails before anything changed or any scanner started."""
    from vhostni.policy import PolicyError, load_policy
    k = kits({"a": _reload_policy(block=23)})
    k.wait_subscribed("a", "dec")
    old, pid = k.nk("a").policy, k.sp("a", "dec").proc.pid
    bad = _reload_policy(block=80)
    bad["scanner"].append(scanner_spec("big", "decider.py", config=unsendable_configs()[kind]))
    k.reload("a", bad)
    assert k.nk("a").policy is old and "not reloaded, keeping the old one" in caplog.text
    assert "hello" in caplog.text
    # past validation (a bug, or a policy changed after it): nothing changes, nothing starts
    pol = load_policy(write_policy(os.path.join(k.dir, "ok.json"), _reload_policy(block=80)))
    pol.scanners.append(scannerproc_mod.ScannerSpec(name="big", argv=pol.scanners[0].argv,
                                               config=unsendable_configs()[kind], rights=[],
                                               injections=[]))
    for apply in (lambda: k.daemon.set_policy("a", pol),
                  lambda: k.daemon.kernel.attach("b", k.daemon.nis["b"].port, pol)):
        with pytest.raises(PolicyError, match="hello"):
            apply()
    assert k.nk("a").policy is old and set(k.nk("a").scanners) == {"dec"}
    assert k.daemon.kernel.nis.get(k.daemon.nis["b"].port.index) is None
    assert k.sp("a", "dec").proc.pid == pid and k.sp("a", "dec").running
    k.send("a", tcp_frame(dport=23), tcp_frame(dport=80))
    assert k.recv("b", 1.0) == [tcp_frame(dport=80)]


def test_reload_revokes_subscriptions_outside_new_rights(kits):
    k = kits({"a": _reload_policy(block=23, contain_port=8080)})
    k.wait_subscribed("a", "dec")
    narrower = _reload_policy(block=23, contain_port=8080)
    narrower["scanner"][0]["allow"] = [{"direction": "from_guest", "proto": "tcp", "dport": 8080,
                                        "contain": False}]            # read rights only now
    k.reload("a", narrower)
    assert not k.subscribed("a", "dec")
    k.send("a", tcp_frame(dport=8080, payload=b"HOLD"))
    assert len(k.recv("b", 1.0, 1)) == 1
    assert k.stats("a")["held"] == 0
    # a policy without the scanner stops it, and removes its staged copy
    pid, stage = k.sp("a", "dec").proc.pid, k.sp("a", "dec").stage_root
    assert os.path.isdir(stage)
    k.reload("a", policy())
    assert "dec" not in k.nk("a").scanners
    k.until(lambda: not alive(pid), what="the removed scanner to end")
    assert not os.path.exists(stage)


def test_closing_the_daemon_stops_scanners_and_removes_their_stage(kits):
    k = kits({"a": policy(scanners=[decider(subscribe=[HTTP_CONTAIN])])})
    k.wait_subscribed("a", "dec")
    pid, stage = k.sp("a", "dec").proc.pid, k.sp("a", "dec").stage_root
    k.daemon.close()
    k.daemon = None
    assert not alive(pid) and not os.path.exists(stage)


def test_the_sdks_libraries_are_staged_beside_it_and_missing_ones_skipped(tmp_path, monkeypatch):
    """The decoders the SDK uses (br, zstd) are copied from the daemon's environment, so the
    bare interpreter the scanner runs imports them from the stage alone; one the daemon cannot
    import is left out (the SDK then says that coding is undecodable)."""
    from vhostni import sandbox
    monkeypatch.setattr(sandbox, "SDK_LIBRARIES", sandbox.SDK_LIBRARIES + ("no_such_module_here",))
    argv, lib = sandbox.stage([sys.executable, os.path.join(os.path.dirname(__file__), "scanners", "decider.py")],
                              str(tmp_path / "stage"))
    assert sorted(os.listdir(lib)) == sorted(["vhostni", "backports", "brotli.py"]
                                             + [n for n in os.listdir(lib) if n.startswith("_brotli.")])
    code = ("import sys; from vhostni.scanner.http1 import MISSING_DECODERS as M; import brotli\n"
            "print(M, brotli.__file__.startswith(sys.argv[1]))")
    out = subprocess.run([argv[0], "-I", "-c", f"import sys; sys.path.insert(0, {lib!r})\n" + code, lib],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["{}", "True"]


def test_stale_stages_are_removed_and_live_ones_kept(tmp_path):
    """A daemon killed with -9 leaves its stages behind; the next one removes those whose
    owner is dead, never those of a daemon (or test run) still running beside it."""
    from vhostni import sandbox
    base = str(tmp_path)

    def stage(name: str, lock: bool = True) -> str:
        path = os.path.join(base, f"scanner-{name}-x")
        os.makedirs(os.path.join(path, "prog"))
        if lock:
            with open(os.path.join(path, sandbox.LOCK_NAME), "w") as f:
                f.write("1\n")
        return path

    dead, live = stage("dead"), stage("live")
    old, young = stage("legacy-old", lock=False), stage("legacy-young", lock=False)
    used = stage("legacy-used", lock=False)       # an old daemon's scanner runs from it
    for d in (old, used):
        os.utime(d, (time.time() - 3600, time.time() - 3600))
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                               os.path.join(used, "prog", "x.py")])
    other = tmp_path / "not-a-stage"
    other.mkdir()
    holder = subprocess.Popen(   # another daemon, alive: holds its stage's lock
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({os.path.join(live, sandbox.LOCK_NAME)!r}, os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        assert sorted(sandbox.remove_stale_stage_roots(base)) == sorted([dead, old])
        assert not os.path.exists(dead) and not os.path.exists(old)
        assert os.path.isdir(live) and os.path.isdir(young) and other.is_dir()
        assert os.path.isdir(used)
    finally:
        holder.kill()
        holder.wait()
        runner.kill()
        runner.wait()
    assert sorted(sandbox.remove_stale_stage_roots(base)) == sorted([live, used])   # owners died


def test_a_daemon_killed_hard_leaves_stages_the_next_one_removes(tmp_path):
    os.chmod(tmp_path, 0o755)
    name = f"stale{os.getpid()}"
    pol = write_policy(str(tmp_path / "a.json"),
                       policy(scanners=[decider(name, subscribe=[HTTP_CONTAIN])]))
    stats = tmp_path / "stats.json"
    base = "/run/vhostni" if os.access("/run", os.W_OK) else tempfile.gettempdir()

    def stages() -> list[str]:
        return [os.path.join(base, n) for n in os.listdir(base) if n.startswith(f"scanner-{name}-")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhostni", "run", "--ni", f"a={tmp_path}/a.sock", "--policy", f"a={pol}",
         "--alert-log", str(tmp_path / "alerts.jsonl"), "--stats-file", str(stats)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_stats(str(stats), lambda s: s["nis"]["a"]["kernel"]["scanners"][name]["locked_down"])
        left = stages()
        assert len(left) == 1
    finally:
        proc.kill()
        proc.wait(5)
    assert os.path.isdir(left[0])                   # kill -9: nothing cleaned up
    k = Kit({"a": policy()})                        # the next daemon starts
    try:
        assert stages() == []
    finally:
        k.close()
        for d in stages():
            shutil.rmtree(d, ignore_errors=True)


def _wait_stats(path: str, pred, timeout: float = 10.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                data = json.load(f)
            if pred(data):
                return data
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if time.monotonic() > end:
            raise AssertionError("stats file never showed the expected state")
        time.sleep(0.05)


def test_sighup_reloads_a_running_daemon(tmp_path):
    """`vhostni run --policy`, real loop and signal handling, guests on its sockets."""
    from vdriver import VirtioNetDriver
    d = tmp_path
    os.chmod(d, 0o755)
    pol = d / "a.json"
    write_policy(str(pol), _reload_policy(block=23))
    stats = d / "stats.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhostni", "run", "--ni", f"a={d}/a.sock", "--ni", f"b={d}/b.sock",
         "--policy", f"a={pol}", "--alert-log", str(d / "alerts.jsonl"), "--stats-file", str(stats)],
        stdout=subprocess.DEVNULL, stderr=open(d / "log", "w"))
    drivers = []
    try:
        def scanner_up(s):
            sc = s["nis"]["a"]["kernel"]["scanners"]["dec"]
            return sc["locked_down"] and s["nis"]["a"]["kernel"]["subscriptions"] == 1
        _wait_stats(str(stats), scanner_up)
        # every setup message acknowledged: no frame can race the daemon's ring set-up
        a = VirtioNetDriver.connect(str(d / "a.sock"), ack_all=True)
        b = VirtioNetDriver.connect(str(d / "b.sock"), ack_all=True)
        drivers += [a, b]
        b.post_rx_buffers(64)

        def exchange(*frames, expect=1):
            """Sends frames a->b; waits up to 3 s for `expect` of them, then 0.3 s for more."""
            for f in frames:
                a.send_frame(f)
            got = [f for _, f in b.recv_frames(timeout=3.0, count=expect)]
            got += [f for _, f in b.recv_frames(timeout=0.3, count=len(frames))]
            a.reclaim_tx()
            return got

        assert exchange(tcp_frame(dport=23), tcp_frame(dport=80)) == [tcp_frame(dport=80)]
        def log_says(text, n):
            end = time.monotonic() + 15
            while (d / "log").read_text().count(text) < n:
                assert time.monotonic() < end, f"daemon log never said {text!r} {n} times"
                time.sleep(0.05)

        write_policy(str(pol), _reload_policy(block=80))
        proc.send_signal(signal.SIGHUP)
        log_says("policy reloaded", 1)
        assert exchange(tcp_frame(dport=80), tcp_frame(dport=23)) == [tcp_frame(dport=23)]
        write_policy(str(pol), "{broken")
        proc.send_signal(signal.SIGHUP)
        log_says("not reloaded", 1)
        assert proc.poll() is None
        assert exchange(tcp_frame(dport=80), tcp_frame(dport=23)) == [tcp_frame(dport=23)]
        # a scanner config the wire cannot carry: it used to stop the daemon, every NI down
        big = _reload_policy(block=23)
        big["scanner"][0]["config"]["blob"] = unsendable_configs()["oversize"]["blob"]
        write_policy(str(pol), big)
        proc.send_signal(signal.SIGHUP)
        log_says("not reloaded", 2)
        assert proc.poll() is None
        assert exchange(tcp_frame(dport=80), tcp_frame(dport=23)) == [tcp_frame(dport=23)]
    finally:
        for drv in drivers:
            drv.close(graceful=False)
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert "not reloaded" in (d / "log").read_text()


# ---------------------------------------------------------------------------
# The alert log
# ---------------------------------------------------------------------------

def test_alert_log_lines_and_sequence_survive_a_restart(tmp_path):
    path = str(tmp_path / "sub" / "alerts.jsonl")
    log = AlertLog(path)
    heard = []
    log.listeners.append(heard.append)
    log.append("a", "s1", "first", x=1)
    log.append("b", None, "second")
    log.close()
    log = AlertLog(path)
    rec = log.append("a", "s2", "third")
    log.close()
    lines = [json.loads(l) for l in open(path)]
    assert [l["seq"] for l in lines] == [1, 2, 3] and rec["seq"] == 3
    assert [l["message"] for l in lines] == ["first", "second", "third"]
    assert lines[0]["fields"] == {"x": 1} and lines[1]["scanner"] is None
    assert all(set(l) >= {"seq", "time", "ni", "scanner", "message"} for l in lines)
    assert [h["seq"] for h in heard] == [1, 2]
    # a torn last line (crash mid-write) does not reset the sequence
    with open(path, "a") as f:
        f.write('{"seq": 4, "ti')
    assert AlertLog(path).seq == 3


def test_frames_queued_before_a_reload_keep_their_subscriptions(kits):
    """Frames the fast path matched (and queued for the kernel) under the old subscription
    list must be handed out under that list, not under the new one's shifted indices:
    else a read-only scanner would get to decide a held frame, or a held frame would
    leave without its contain scanner's decision."""
    match = {"direction": "from_guest", "proto": "tcp", "dport": 80}
    x = decider("x", [{"match": match, "contain": True}], verdict="cut")
    y = decider("y", [{"match": match, "contain": False}], report=True)
    k = kits({"a": policy(hold_timeout_ms=5000, scanners=[x, y])})
    k.wait_subscribed("a", "x")
    k.wait_subscribed("a", "y")
    first = k.nk("a").subs[0].scanner
    frame = tcp_frame(payload=b"queued across the reload")
    k.drivers["a"].send_frame(frame)
    d = k.daemon
    for _ in range(100):                       # the data plane only: the punt stays queued
        d.switch.run(2, False)
        if k.stats("a")["held"]:
            break
    assert k.stats("a")["held"] == 1 and len(k.nk("a").held) == 0      # not handed to the kernel
    new = policy(hold_timeout_ms=5000, scanners=[x, y])
    for s in new["scanner"]:
        if s["name"] == first:
            s["allow"] = []                        # its subscription (index 0) goes
    k.reload("a", new)
    assert [s.scanner for s in k.nk("a").subs] == ["y" if first == "x" else "x"]
    k.until(lambda: k.stats("a")["held_cut"] + k.stats("a")["held_passed"] == 1, what="a decision")
    assert k.stats("a")["held_cut"] == 1, "the frame left without x's decision"
    assert k.recv("b", 0.2) == []
    k.until(lambda: k.alerts_matching("frame", "a", "y"), what="y's copy")
    assert [a["fields"]["held"] for a in k.alerts_matching("frame", "a", "y")] == [False]


# ---------------------------------------------------------------------------
# No traffic before the policy is whole: scanners not yet subscribed (ready)
# ---------------------------------------------------------------------------

SLOW = 4.0      # a scanner that sleeps this long, locked down, before it subscribes


def _slow_policy(**ni):
    return policy(scanners=[decider(subscribe=[HTTP_CONTAIN], delay=SLOW)], **ni)


def _early_frames_are_not_forwarded(k, ni="a", peer="b"):
    """Frames its contain rights cover, sent while the scanner sleeps before subscribing,
    never reach the peer; others do; once it is ready, covered frames go by its decision."""
    t0 = time.monotonic()
    early = [tcp_frame(payload=b"early %d" % i) for i in range(3)]
    k.send(ni, *early)
    other = udp_frame(payload=b"outside its rights")
    k.send(ni, other)
    assert k.recv(peer, 0.5) == [other]
    assert not k.subscribed(ni, "dec") and time.monotonic() - t0 < SLOW   # still asleep
    assert k.nk(ni).info()["scanners_not_ready"] == ["dec"]
    assert k.nk(ni).info()["cut_before_ready"] == 3
    k.wait_subscribed(ni, "dec")
    assert k.nk(ni).info()["scanners_not_ready"] == []
    k.send(ni, tcp_frame(payload=b"CUT"), tcp_frame(payload=b"seen"))
    assert k.recv(peer, 2.0, 1) == [tcp_frame(payload=b"seen")]
    assert k.recv(peer, 0.2) == []


def test_frames_before_a_slow_scanner_subscribes_are_held_back(kits):
    k = kits({"a": _slow_policy()})
    _early_frames_are_not_forwarded(k)


def test_client_mode_frames_before_the_scanners_subscribe_are_held_back(kits):
    """The daemon connects to its frontend (QEMU with server=on) as it starts, long before a
    slow scanner has subscribed: the ordering is the cover's job, not timing luck."""
    k = kits({"a": _slow_policy()}, clients=("a",))
    assert k.daemon.nis["a"].client and k.daemon.nis["a"].connected
    _early_frames_are_not_forwarded(k)


def test_failed_scanner_cover_gets_the_default_decision(kits, monkeypatch):
    """A scanner that dies before it subscribes: what its rights cover gets the policy's
    default (here pass: the administrator chose availability), not a cut for ever."""
    monkeypatch.setattr(scannerproc_mod, "RESTART_MIN", 30.0)
    spec = decider(subscribe=[HTTP_CONTAIN], crash_before_subscribe=True)
    k = kits({"a": policy(default_decision="pass", scanners=[spec])})
    k.until(lambda: not k.sp("a", "dec").running, what="the scanner to die")
    f = tcp_frame(payload=b"while it is down")
    k.send("a", f)
    assert k.recv("b", 1.0, 1) == [f]


@pytest.mark.parametrize("how", ["reload", "admin"])
def test_a_scanner_added_by_a_new_policy_holds_back_until_ready(kits, how):
    k = kits({"a": policy()})
    f = tcp_frame(payload=b"before")
    k.send("a", f)
    assert k.recv("b", 1.0, 1) == [f]
    if how == "reload":
        k.reload("a", _slow_policy())
    else:
        from vhostni.policy import parse_policy
        k.daemon.set_policy("a", parse_policy(_slow_policy()))
    _early_frames_are_not_forwarded(k)


def test_scanner_that_never_says_ready_is_taken_as_ready_after_the_grace(kits, monkeypatch):
    monkeypatch.setattr(kernel_mod, "READY_GRACE", 1.0)
    spec = decider(subscribe=[HTTP_CONTAIN], no_ready=True)
    k = kits({"a": policy(scanners=[spec])})
    k.until(lambda: any(s.scanner == "dec" for s in k.nk("a").subs), what="the subscription")
    assert not k.sp("a", "dec").ready
    k.wait_alert("did not say it was ready", "a", "dec")
    assert k.sp("a", "dec").ready and k.nk("a").info()["scanners_not_ready"] == []


# ---------------------------------------------------------------------------
# Stream edits: a contain scanner's cut and inject requests
# ---------------------------------------------------------------------------

def _stream_editors(kits):
    """Guest a's NI with stream scanner "ed" holding port 25 (it never passes by itself) with
    a frame and a stream injection, and "ro" reading it (with a stream injection but no
    contain rights); a connection to b with 11 bytes from a read."""
    from tcpkit import Conn
    sub = {"port": 25, "direction": "both"}
    ed = scanner_spec("ed", "stream_decider.py", allow=[dict(sub, stream=True, contain=True)],
                      config={"subscribe": [dict(sub, contain=True)], "mode": "hold"},
                      inject=[{"name": "rst", "frame": eth(A_MAC, B_MAC, 0x88B5, b"x").hex()},
                              {"name": "note", "stream": "NOTE"}])
    ro = scanner_spec("ro", "stream_decider.py", allow=[dict(sub, stream=True)],
                      config={"subscribe": [sub], "mode": "pass"}, inject=[{"name": "note", "stream": "NOTE"}])
    k = kits({"a": policy(scanners=[ed, ro], hold_timeout_ms=10000)})
    k.wait_alert("ready", "a", "ed")
    k.wait_alert("ready", "a", "ro")
    c = Conn(k)
    c.open()
    c.send("a", c.data("a", b"hello world"))
    st = k.until(lambda: next((s for s in k.nk("a").streams.values() if s.read_off[1] == 11), None),
                 what="the bytes read")
    return k, c, st


def _ask(k, scanner: str, body: dict) -> Optional[str]:
    """Hands the kernel one control request as if ``scanner`` had sent it: its reply's error."""
    sp = k.sp("a", scanner)
    replies = []
    real = sp._reply
    sp._reply = lambda b, error=None: (replies.append(error), real(b, error))
    try:
        sp._handle(wire.Control(dict(body, id=99)))
    finally:
        del sp._reply
    (error,) = replies
    return error


def test_stream_cut_and_inject_are_checked_and_edit_the_stream(kits):
    from tcpkit import segments
    k, c, st = _stream_editors(kits)
    sid = st.id
    edit = {"stream": sid, "direction": "from_guest"}
    # malformed: refused with a reason, counted
    for body, why in (({"stream": "x"}, "stream id"), ({"direction": "up"}, "direction"),
                      ({"offset": -1}, "offset"), ({"offset": True}, "offset"),
                      ({"offset": 0, "length": 0}, "length"), ({"offset": 0, "length": True}, "length"),
                      ({"offset": 0, "length": 2**64}, "length")):
        assert why in _ask(k, "ed", {**edit, "op": "cut", "offset": 0, "length": 1, **body})
    assert "no stream 12345" in _ask(k, "ed", dict(edit, op="cut", stream=12345, offset=0, length=1))
    # outside its rights: no contain rights on the stream, an injection it does not have
    assert "no contain rights" in _ask(k, "ro", dict(edit, op="cut", offset=0, length=1))
    assert k.alerts_matching("scanner asked to cut a stream it has no contain rights on", "a", "ro")
    assert "no contain rights" in _ask(k, "ro", dict(edit, op="inject", offset=0, index=0))
    assert k.alerts_matching("scanner asked to inject into a stream it has no contain rights on", "a", "ro")
    for which in ({"index": 1}, {"index": True}, {"name": "rst"}, {"name": "none"}, {"index": 0, "name": "note"}):
        assert "no pre-registered stream injection" in _ask(k, "ed", dict(edit, op="inject", offset=0, **which))
    assert len(k.alerts_matching("scanner asked for an injection it does not have", "a", "ed")) == 5
    refused = k.sp("a", "ed").counters.refused
    assert refused == 7 + 1 + 5 and k.sp("a", "ro").counters.refused == 2
    # replace "world" by the pre-registered "NOTE": inject at 6, then cut [6, 11)
    assert _ask(k, "ed", dict(edit, op="inject", offset=6, name="note")) is None
    assert _ask(k, "ed", dict(edit, op="cut", offset=6, length=5)) is None
    ctr = k.sp("a", "ed").counters
    assert (ctr.stream_injects, ctr.stream_inject_bytes, ctr.stream_cuts, ctr.stream_cut_bytes) == (1, 4, 1, 5)
    # the cut is ed's decision on [6, 11) and it holds alone: everything up to 11 leaves, edited
    assert st.passed[("ed", 1)] == 11 and st.released[1] == 11
    got = b""
    end = time.monotonic() + 5
    while len(got) < 10 and time.monotonic() < end:
        got += b"".join(s.payload for s in segments(k.recv("b", 0.1)))
    assert got[:10] == b"hello NOTE"
    # what ed passed (its cut) cannot be edited any more
    assert "before what this scanner passed" in _ask(k, "ed", dict(edit, op="cut", offset=8, length=1))
    assert "before what this scanner passed" in _ask(k, "ed", dict(edit, op="inject", offset=3, index=0))
    assert k.nk("a").streams_killed == 0 and k.sp("a", "ed").counters.refused == refused + 2


def test_a_frame_another_scanner_cut_is_not_owed_forever(kits):
    """A frame two contain scanners hold, cut by one: the other's entry for it must go even
    if it never decides (nothing times that frame out any more), or a scanner that ignores
    such frames grows the kernel's table without bound (issue 16, item 6)."""
    match = {"direction": "from_guest", "proto": "tcp", "dport": 80}
    scanners = [decider("cutter", [{"match": match, "contain": True}], verdict="cut"),
                decider("mute", [{"match": match, "contain": True}])]
    k = kits({"a": policy(hold_timeout_ms=60000, scanners=scanners)})
    for s in ("cutter", "mute"):
        k.wait_subscribed("a", s)
    k.send("a", *[tcp_frame(sport=2000 + i, payload=b"HOLD") for i in range(20)])
    k.until(lambda: k.stats("a")["held_cut"] == 20, what="the cuts")
    k.until(lambda: k.sp("a", "mute").counters.frames == 20, what="the frames to reach the mute scanner")
    k.run_for(0.3)
    assert k.sp("a", "mute").pending == {} and k.nk("a").held == {}
    assert k.recv("b", 0.2) == []


def _strict(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"{name} in the alert log")
    return json.loads(line, parse_constant=refuse)


def test_alert_log_is_strict_json_and_the_daemon_log_a_bounded_escaped_summary(tmp_path, caplog):
    path = str(tmp_path / "alerts.jsonl")
    log = AlertLog(path)
    heard = []
    log.listeners.append(heard.append)
    caplog.set_level("WARNING", logger="vhostni.kernel")
    forged = "worm found\n2026-01-01 vhostni INFO all clear \x1b[2J\u202egnp.exe\\x41"
    log.append("a", "mail", forged, ratio=float("nan"), rates=[float("inf"), -float("inf"), 1.5],
               message_b64="QUJD" * 2_500_000, nested={"x": {"y": float("nan")}})
    log.close()
    [line] = open(path).read().splitlines()
    rec = _strict(line)
    assert rec["message"] == forged                       # the record keeps it all, as data
    assert rec["fields"]["ratio"] == "NaN" and rec["fields"]["rates"] == ["Infinity", "-Infinity", 1.5]
    assert rec["fields"]["nested"] == {"x": {"y": "NaN"}}
    assert len(rec["fields"]["message_b64"]) == 10_000_000
    assert heard[0]["fields"]["ratio"] == "NaN"            # listeners (QMP events) get the same
    [logged] = [r.getMessage() for r in caplog.records if "ALERT #1" in r.getMessage()]
    assert "\n" not in logged and "\x1b" not in logged and "\u202e" not in logged
    assert "worm found\\x0a2026-01-01" in logged and "\\x1b[2J" in logged and "\\u202e" in logged
    assert "\\\\x41" in logged                           # a backslash is escaped too: no ambiguity
    assert len(logged) < 1000 and "message_b64=<str of 10000000>" in logged


def test_a_full_alert_log_file_system_holds_counts_and_marks_what_was_lost(monkeypatch):
    """ENOSPC (a 64 KiB tmpfs): appends go on, nothing is raised, alerts reach their
    listeners marked not durable, a bounded number are held, the rest counted; when space
    returns the held ones are written, then a marker for the lost ones."""
    monkeypatch.setattr(alertlog_mod, "ALERT_RETRY_S", 0.0)
    with tiny_tmpfs(64) as d:
        path = os.path.join(d, "alerts.jsonl")
        log = AlertLog(path, max_pending=4)
        heard, status = [], []
        log.listeners.append(heard.append)
        log.on_status.append(lambda name, data: status.append((name, data)))
        log.append("a", "s", "before")
        filler = fill_fs(d, leave_pages=1)
        size0 = os.path.getsize(path)
        for i in range(7):                  # the first write is torn: one page, then ENOSPC
            log.append("a", "s", f"during {i}", pad="p" * 9000, i=i)
        assert os.path.getsize(path) == size0             # cut back: no torn line left
        assert [n for n, _ in status] == ["ALERT_LOG_FAILED"]
        assert "No space left" in status[0][1]["error"]
        assert [h.get("durable", True) for h in heard] == [True] + [False] * 7
        info = log.info()
        assert (info["pending"], info["lost"]) == (4, 3) and info["error"] and info["write_errors"] >= 1
        log.retry()                                        # still full: still failing, quietly
        assert len(status) == 1 and log.info()["pending"] == 4
        os.unlink(filler)
        log.retry()
        assert [n for n, _ in status] == ["ALERT_LOG_FAILED", "ALERT_LOG_RECOVERED"]
        assert status[1][1]["lost"] == 3
        after = log.append("a", "s", "after")
        assert "durable" not in heard[-1] and log.info()["error"] is None
        log.close()
        recs = [_strict(line) for line in open(path).read().splitlines()]
        assert [r["message"] for r in recs[:5]] == ["before"] + [f"during {i}" for i in range(4)]
        marker = recs[5]
        assert marker["ni"] is None and marker["fields"]["lost"] == 3
        assert (marker["fields"]["first_seq"], marker["fields"]["last_seq"]) == (6, 8)
        assert recs[6]["message"] == "after" and recs[6]["seq"] == after["seq"]
        seqs = [r["seq"] for r in recs]
        assert seqs == sorted(set(seqs)) and seqs == [1, 2, 3, 4, 5, 9, 10]
        assert AlertLog(path).seq == 10


def test_the_alert_log_writer_group_commits_off_the_callers_thread(tmp_path, monkeypatch):
    """With a writer thread an fsync never stalls the thread that appends (the data plane's):
    appends return at once, one fsync covers a batch, and each alert is heard only after
    the fsync that made it durable, in order, on the appending thread."""
    import select
    real_fsync, fsyncs = os.fsync, []

    def slow_fsync(fd):
        time.sleep(0.2)
        real_fsync(fd)
        fsyncs.append(time.monotonic())
    monkeypatch.setattr(alertlog_mod.os, "fsync", slow_fsync)
    path = str(tmp_path / "alerts.jsonl")
    log = AlertLog(path)
    handlers = {}
    log.start_writer(handlers.__setitem__, lambda fd: handlers.pop(fd, None))
    heard, when = [], []

    def listener(rec):
        assert any(json.loads(line)["seq"] == rec["seq"] for line in open(path))
        heard.append(rec["seq"])
        when.append(time.monotonic())
    log.listeners.append(listener)
    t0 = time.monotonic()
    for i in range(50):
        log.append("a", "s", "m", i=i)
    assert time.monotonic() - t0 < 0.15 and heard == []
    [(fd, on_wake)] = handlers.items()
    end = time.monotonic() + 10
    while len(heard) < 50 and time.monotonic() < end:
        if select.select([fd], [], [], 1)[0]:
            on_wake()
    assert heard == list(range(1, 51))
    assert len(fsyncs) <= 3                           # group commit: not one fsync per alert
    assert all(w >= fsyncs[0] for w in when)
    log.close()
    assert not handlers and [json.loads(line)["fields"]["i"] for line in open(path)] == list(range(50))


def test_listeners_hear_alerts_in_seq_order_even_when_one_raises_another(tmp_path):
    log = AlertLog(str(tmp_path / "alerts.jsonl"))
    heard = []

    def containment(rec):             # as a listener that alerts about what it did
        heard.append(rec["seq"])
        if rec["message"] == "worm":
            log.append("a", None, "contained", after=rec["seq"])
    log.listeners.append(containment)
    log.listeners.append(lambda rec: 1 / 0)          # a broken listener stops nothing
    log.append("a", "s", "worm")
    log.append("a", "s", "more")
    log.close()
    assert heard == [1, 2, 3]
    assert [json.loads(line)["message"] for line in open(tmp_path / "alerts.jsonl")] == ["worm", "contained", "more"]


def test_a_scanner_cannot_forge_log_lines_or_put_nan_in_the_alert_log(kits, caplog):
    caplog.set_level("INFO", logger="vhostni.kernel")
    spec = scanner_spec("forger", "flood.py", config={"mode": "forge"})
    k = kits({"a": policy(scanners=[spec])})
    alert = k.wait_alert("scanner broke the protocol", "a", "forger")
    assert "NaN is not JSON" in alert["message"]
    for line in open(k.alert_log):
        _strict(line)
    k.until(lambda: "all clear" in caplog.text, what="the scanner's stderr line")
    [line] = [r.getMessage() for r in caplog.records if "all clear" in r.getMessage()]
    assert "\r" not in line and "\x1b" not in line
    assert line.endswith("ok\\x0d2026-01-01 00:00:00 vhostni INFO all clear\\x1b[2K")


def test_an_unexpected_exception_in_control_work_does_not_end_the_daemon(kits, caplog):
    """A bug (here: a housekeeper that raises) is logged and counted; the loop goes on."""
    k = kits({})
    calls = []

    def buggy():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in some housekeeping")
        if len(calls) >= 3:
            k.daemon.request_stop()
    k.daemon.housekeepers.append(buggy)
    with time_limit(10, "the daemon loop"):
        k.daemon.run()
    assert len(calls) >= 3 and k.daemon.uncaught == 1
    assert k.daemon.stats()["internal_errors"] == 1
    assert "a bug in some housekeeping" in caplog.text and "the daemon goes on" in caplog.text
    k.send("a", tcp_frame(payload=b"still forwarding"))
    assert k.recv("b", 1.0) == [tcp_frame(payload=b"still forwarding")]


def test_killing_a_scanner_does_not_wait_for_its_process_on_the_data_plane(kits, monkeypatch):
    """A killed scanner that does not go at once (here its SIGKILL becomes a SIGSTOP, as
    for a process stuck in uninterruptible sleep) is not waited for on the thread that moves
    frames: kill returns at once, and housekeeping reaps the process once it is gone and
    only then gives its uid back."""
    import signal as signal_mod
    import types
    k = kits({"a": policy(scanners=[decider()])})
    k.wait_alert("ready", "a", "dec")
    sp = k.sp("a", "dec")
    proc, uid, pid = sp.proc, sp.uid, sp.pid
    monkeypatch.setattr(scannerproc_mod, "signal", types.SimpleNamespace(
        SIGKILL=signal_mod.SIGSTOP, NSIG=signal_mod.NSIG, Signals=signal_mod.Signals))
    kernel = k.daemon.kernel
    try:
        t = time.monotonic()
        sp.kill("test", restart=False)
        assert time.monotonic() - t < 1.0
        assert sp.state == "stopped" and proc.poll() is None
        k.step()
        assert (proc, uid) in kernel.dying and uid in kernel.uids.used
    finally:
        for target in (pid, -proc.pid):
            os.kill(target, signal_mod.SIGKILL)
    k.until(lambda: not kernel.dying, 10, "the killed scanner reaped")
    assert proc.poll() is not None and uid not in kernel.uids.used


def test_a_scanner_whose_socket_closes_is_not_waited_for_on_the_data_plane(kits):
    """The socket closed but the scanner's process has not ended (here: it is stopped):
    the data-plane thread goes on at once; housekeeping kills it LOST_GRACE later, settles
    what it owed and restarts it."""
    k = kits({"a": policy(scanners=[decider()])})
    k.wait_alert("ready", "a", "dec")
    sp = k.sp("a", "dec")
    first = sp.proc.pid
    os.kill(sp.pid, signal.SIGSTOP)
    sp.sock.shutdown(socket.SHUT_RDWR)          # reads see the end, as if it closed its socket
    t = time.monotonic()
    sp.on_readable()
    assert time.monotonic() - t < 0.1
    assert sp.running and sp.lost is not None and sp.sock is None
    alert = k.wait_alert("scanner stopped", "a", "dec")
    assert alert["message"].startswith("scanner stopped: closed its socket")
    k.until(lambda: sp.running and sp.proc.pid != first, 10, "the restart")
    assert sp.lost is None
