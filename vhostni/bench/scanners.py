"""Scanner overheads: what holding a guest's SYNs for a scanner costs, against plain forwarding.

Two TCG guests behind one ``vhostni run``.  Guest b serves: busybox ``httpd``, the guests' ``dnsd`` (a name
for b's address, one for the handshake targets below) and ``iperf3 -s``.  Guest a's NI gets, in turn, by rewriting its policy file and sending the
daemon SIGHUP (the guests boot once):

* ``plain``: a policy with nothing in it (no scanner, no rule, anti-spoofing off): plain forwarding;
* ``null``: examples/null-scanner.toml: every TCP SYN a sends is held until the null scanner passes it;
* ``codered``: examples/codered.toml with a's MAC and address filled in: the Code-Red scanner reads the DNS
  exchanges (copies, nothing held) and holds each SYN until it has checked the destination.
* ``trw``: examples/trw.toml: the Threshold Random Walk port-scan detector holds every SYN, both ways, and
  watches what answers it (issue 13's per-detector overhead);
* ``synbomb``: examples/synbomb.toml: the SYN-bomb detector holds the SYNs a sends and reads the SYN-ACKs;
* ``null_stream``: the null stream scanner (scanners/null_stream.py) holds iperf3's connections (port 5201)
  both ways, every byte passed by the scanner process before it goes on: what a stream scanner costs a bulk
  transfer in the running daemon (not in lockstep, unlike the streams section's replay figure).
* ``signatures``: the in-line signature stage with the signatures bench's 1,500 rules (10% with a pcre,
  never matching; vhostni.bench.signatures.make_rules) over every TCP connection a opens to b: each byte
  a sends is held until the stage scanned it (issue 12's "two TCG guests' iperf3 with those rules").

Before measuring, the daemon's stats file must show the new scanner running, locked down and subscribed (or
no scanner for ``plain``).  Then, from guest a, timed inside the guest (busybox ``ts %.s`` stamps each loop
iteration in microseconds; the figure per operation is the median of one round's iterations):

* ``handshake``: TCP handshakes to port 80 of b's extra addresses 10.77.1.1-14 (all on b's loopback, routed
  through b; a resolves their name first, so the Code-Red scanner knows them), from ``connect()`` to
  connected: the guests' ``worm`` program makes one attempt every 50 ms and prints a line at each step, which
  ``ts`` stamps while the program sleeps in ``poll()``: no process start in the figure, so this is where a
  held SYN shows most clearly;
* ``connect``: ``timeout 5 wget -q -O /dev/null http://B/`` in a loop: a TCP connection and a GET, what a
  program sees;
* ``dns``: ``nslookup NAME B`` in a loop (A and AAAA queries; the paper's figure: 1.5 ms without an NI,
  2.9 ms with its Code-Red scanner);
* ``ping``: the RTT of ``ping -i 0.02`` (ICMP is never held: it should not change);
* ``iperf3``: TCP throughput a -> b for a few seconds (only the SYN is held: it should not change);
* ``spawn``: the same loop running ``busybox true``: what starting a process costs in the guest under TCG,
  which is most of each connect and lookup figure (the scanner's cost is the difference to ``plain``).

And first, with no guest running, ``hold``: the NI's own cost per SYN, host-side.  The offline-replay harness
(vhostni.replay: the same C switch, NI kernel and sandboxed scanner processes as the daemon, with sink ports
instead of virtio rings) takes SYNs from a's MAC one at a time; the figure is the time from handing a SYN to
the switch to its delivery on the far port: the C path alone under ``plain``, plus the punt, the scanner's
round trip and the release under a scanner.  (Code-Red is first shown a DNS query and answer for the SYNs'
destinations.)  The guests' figures carry TCG's and the machine's noise; this one isolates the hold.

Each round measures every configuration once, in an order that rotates from round to round, so drift and
bursts of load on this shared machine hit all alike: many short latency rounds first, then a few throughput
rounds.  Each block records the CPU others used meanwhile (``foreign_cpus``).  A configuration's figure is the
median over rounds of each round's median; ratios and differences are against ``plain`` of the same
invocation (``paired_ratios_to_plain``: the median over rounds of the ratio within each round).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .backends import pdeathsig_prefix
from .frameloop import _HZ, _cpu_busy_ticks, _proc_ticks, summarize
from .guest_tcp import parse_iperf3

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ("plain", "null", "codered", "trw", "synbomb", "null_stream", "signatures")
SIG_RULES, SIG_PCRE_SHARE = 1500, 0.1
ADDR_A, ADDR_B = "10.77.0.1", "10.77.0.2"
MAC_A, MAC_B = "52:54:00:5c:00:01", "52:54:00:5c:00:02"
NAME = "www.bench.test"
HS_NAME, HS_NET, HS_HOSTS = "hs.bench.test", "10.77.1.0/28", 14     # handshake targets: b's 10.77.1.1-14
# Figures from the Siphon paper (section 5.1, table 2; section 5.3) to set ours beside.
PAPER = {
    "ping_rtt_ms": {"no_ni_machine": 0.84, "no_scanners": 0.88, "reconstruct_all_tcp": 0.88},
    "bandwidth_MB_s": {"no_ni_machine": 7.73, "no_scanners": 4.37, "reconstruct_all_tcp": 4.30},
    "dns_ms": {"no_ni_machine": 1.5, "codered": 2.9},
    "note": "a separate 300 MHz NI machine on 100 Mbit/s Ethernet (2003); here the NI is a host process and "
            "the guests run under TCG, so compare ratios, not times",
}
_TS_LINE = re.compile(r"^(\d+\.\d+) (s|t|FAIL)\s*$", re.M)
_TS_WORM = re.compile(r"^(\d+\.\d+) (worm:|attempt|connected|refused|failed|done:) ?(\d*)", re.M)
_PING_TIME = re.compile(r"time=([\d.]+) ms")


@dataclass
class ScannerBenchConfig:
    configs: Sequence[str] = CONFIGS
    rounds: int = 10                 # latency rounds: each measures every configuration
    count: int = 20                  # handshakes, connects, lookups, pings, spawns per configuration and round
    ping_interval: float = 0.02
    iperf_rounds: int = 3            # throughput rounds (after the latency rounds)
    hold_rounds: int = 3             # host-side hold rounds (before the guests boot)
    hold_count: int = 1000           # SYNs per configuration and hold round
    iperf_seconds: int = 5
    wait_quiet: float = 3.0          # before each round, wait up to this many s for others to idle
    quiet_cpus: float = 0.3
    ready_timeout: float = 30.0      # for a new policy's scanners to run, lock down and subscribe
    vhostni_args: Sequence[str] = ()
    vhostni_command: Sequence[str] | None = None
    images: str | None = None
    examples: str | None = None      # directory with null-scanner.toml and codered.toml (default: the repo's)
    boot_timeout: float = 240.0
    logdir: Path = field(default_factory=lambda: Path("bench/out/logs"))


class Skip(Exception):
    """This part cannot run here; the message says why."""


# --- policies ------------------------------------------------------------------------------------------

def _example(cfg: ScannerBenchConfig, name: str) -> Path:
    return Path(cfg.examples) / name if cfg.examples else REPO / "examples" / name


def signature_rules() -> Path:
    """The rules file of the ``signatures`` configuration (written once; make_rules is seeded)."""
    from .signatures import make_rules
    text = make_rules(SIG_RULES, SIG_PCRE_SHARE) + "\n"
    path = Path(tempfile.gettempdir()) / f"vhostni-bench-{SIG_RULES}.rules"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def policy_doc(config: str, cfg: ScannerBenchConfig) -> dict:
    """The policy (as a JSON-able dict) guest a's NI gets in ``config``."""
    if config == "plain":
        return {"comment": "bench: no scanner, no rule: plain forwarding", "ni": {"anti_spoof": False}}
    if config == "signatures":
        return {"comment": f"bench: {SIG_RULES} never-matching signature rules over a's connections to b",
                "ni": {"mac": MAC_A, "addresses": [f"{ADDR_A}/32"]},
                "signatures": {"rules": [str(signature_rules())], "vars": {"HOME_NET": f"[{ADDR_B},{HS_NET}]"}}}
    if config == "null_stream":
        return {"comment": "bench: the null stream scanner holds iperf3's connection both ways",
                "ni": {"mac": MAC_A, "addresses": [f"{ADDR_A}/32"], "hold_timeout_ms": 10000},
                "scanner": [{"name": "null_stream", "program": str(REPO / "scanners" / "null_stream.py"),
                             "messages_per_second": 1_000_000,
                             "allow": [{"stream": True, "port": 5201, "direction": "both", "contain": True}],
                             "config": {"port": 5201}}]}
    files = {"null": "null-scanner.toml", "codered": "codered.toml", "trw": "trw.toml", "synbomb": "synbomb.toml"}
    if config not in files:
        raise ValueError(f"unknown configuration {config!r} (known: {', '.join(CONFIGS)})")
    path = _example(cfg, files[config])
    doc = tomllib.loads(path.read_text())
    doc.setdefault("ni", {}).update(mac=MAC_A, addresses=[f"{ADDR_A}/32"])
    for sc in doc.get("scanner", []):
        prog = Path(sc["program"])
        if not prog.is_absolute():     # relative to the example file; the bench's copy lives elsewhere
            sc["program"] = str((path.parent / prog).resolve())
    return doc


def _expected_scanners(doc: dict) -> dict[str, int]:
    """Scanner name -> how many subscriptions it is expected to hold (one per right it has)."""
    return {sc["name"]: len(sc.get("allow", [])) for sc in doc.get("scanner", [])}


def _expected_rules(doc: dict) -> int:
    return SIG_RULES if doc.get("signatures") else 0


# --- the hold, host-side (no guests) -------------------------------------------------------------------

def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _ipv4_frame(src_mac: str, dst_mac: str, src: str, dst: str, proto: int, l4: bytes) -> bytes:
    import ipaddress
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    off = 16 if proto == 6 else 6          # where the TCP / UDP checksum sits
    pseudo = s + d + bytes([0, proto]) + len(l4).to_bytes(2, "big")
    l4 = l4[:off] + b"\0\0" + l4[off + 2:]
    l4 = l4[:off] + _csum(pseudo + l4).to_bytes(2, "big") + l4[off + 2:]
    ip = bytearray(b"\x45\0" + (20 + len(l4)).to_bytes(2, "big") + b"\0\x01\x40\0\x40" + bytes([proto])
                   + b"\0\0" + s + d)
    ip[10:12] = _csum(bytes(ip)).to_bytes(2, "big")
    return _mac(dst_mac) + _mac(src_mac) + b"\x08\x00" + bytes(ip) + l4


def syn_frame(dst: str, sport: int, dport: int = 80) -> bytes:
    """An Ethernet/IPv4/TCP SYN from guest a to ``dst`` (via b's MAC), checksums correct."""
    tcp = (sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (sport * 7919).to_bytes(4, "big")
           + b"\0\0\0\0" + b"\x50\x02" + b"\xfa\xf0" + b"\0\0\0\0")
    return _ipv4_frame(MAC_A, MAC_B, ADDR_A, dst, 6, tcp)


def synack_frame(src: str, sport: int, dport: int = 80) -> bytes:
    """``src``'s SYN-ACK to the SYN that :func:`syn_frame` sent from ``sport`` (to guest a)."""
    tcp = (dport.to_bytes(2, "big") + sport.to_bytes(2, "big") + (dport * 104729).to_bytes(4, "big")
           + ((sport * 7919 + 1) & 0xFFFFFFFF).to_bytes(4, "big") + b"\x50\x12" + b"\xfa\xf0" + b"\0\0\0\0")
    return _ipv4_frame(MAC_B, MAC_A, src, ADDR_A, 6, tcp)


def _dns_name(name: str) -> bytes:
    return b"".join(bytes([len(x)]) + x.encode() for x in name.split(".")) + b"\0"


def dns_frames(name: str, addrs: Sequence[str], qid: int = 0x4242, sport: int = 40000) -> tuple[bytes, bytes]:
    """A's query for ``name`` (type A) to b, and b's answer listing ``addrs`` (TTL 300)."""
    import ipaddress
    question = _dns_name(name) + b"\0\x01\0\x01"
    query = qid.to_bytes(2, "big") + b"\x01\x00\0\x01\0\0\0\0\0\0" + question
    answers = b"".join(b"\xc0\x0c\0\x01\0\x01" + (300).to_bytes(4, "big") + b"\0\x04"
                       + ipaddress.IPv4Address(a).packed for a in addrs)
    resp = (qid.to_bytes(2, "big") + b"\x85\x80\0\x01" + len(addrs).to_bytes(2, "big") + b"\0\0\0\0"
            + question + answers)

    def udp(sp: int, dp: int, payload: bytes) -> bytes:
        return sp.to_bytes(2, "big") + dp.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big") + b"\0\0" \
            + payload
    return (_ipv4_frame(MAC_A, MAC_B, ADDR_A, ADDR_B, 17, udp(sport, 53, query)),
            _ipv4_frame(MAC_B, MAC_A, ADDR_B, ADDR_A, 17, udp(53, sport, resp)))


def measure_hold(config: str, cfg: ScannerBenchConfig, n: int) -> dict:
    """``n`` SYNs through one NI in the replay harness under ``config``: seconds from inject to delivery."""
    from vhostni.policy import parse_policy
    from vhostni.replay import Replay
    doc = policy_doc(config, cfg)
    pol = parse_policy(doc, base=str(REPO), source=f"bench:{config}")
    targets = [f"{HS_NET.rsplit('.', 1)[0]}.{i}" for i in range(1, HS_HOSTS + 1)]
    delivered: list[float] = []

    def on_frame(_ts: int, frame: bytes, _direction: int) -> None:
        if len(frame) > 47 and frame[23] == 6 and frame[47] & 0x02:     # a TCP SYN came out
            delivered.append(time.perf_counter())

    ops, lost = [], 0
    t_start = time.monotonic()
    with Replay(_mac(MAC_A), pol, ni="a", on_frame=on_frame, sync_timeout=10.0) as r:
        r.start()
        for frame in dns_frames(HS_NAME, targets):
            r.feed(time.time_ns(), frame)
        for i in range(n):
            dst, sport = targets[i % len(targets)], 20000 + i % 40000
            frame = syn_frame(dst, sport)
            k = len(delivered)
            t0 = time.perf_counter()
            r.feed(time.time_ns(), frame)
            if len(delivered) > k:
                ops.append(delivered[k] - t0)
                # the target answers, as a live host does (a port-scan detector holds back first
                # contacts to hosts that never answer: that would be containment, not the hold's cost)
                r.feed(time.time_ns(), synack_frame(dst, sport))
            else:
                lost += 1
        r.finish()
        summary = r.summary()
    st = _loop_stats({"ops_s": ops, "failed": lost, "total_s": sum(ops)})
    # microseconds read better here
    out = {k: v for k, v in st.items() if not k.endswith("_ms")}
    for k in ("median", "min", "max", "p90", "mean"):
        if st.get(f"{k}_ms") is not None:
            out[f"{k}_us"] = st[f"{k}_ms"] * 1e3
    out["ops_us"] = [round(x * 1e6, 1) for x in sorted(ops)]
    out["wall_s"] = round(time.monotonic() - t_start, 2)
    out["replay"] = {k: summary.get(k) for k in ("from_guest", "delivered_from_guest", "alerts", "scanners")
                     if k in summary}
    return out


def _reraise_interrupt(exc: Exception) -> None:
    """The benchmark's signal handler raises ``Interrupted`` (an Exception): that ends the run, not a part."""
    if type(exc).__name__ == "Interrupted":
        raise exc


def run_hold(cfg: ScannerBenchConfig, progress: Callable[[str], None] = print) -> list[dict]:
    blocks = []
    k = len(cfg.configs)
    for r in range(cfg.hold_rounds):
        for config in list(cfg.configs[r % k:]) + list(cfg.configs[:r % k]):
            busy0, t0 = _cpu_busy_ticks(), time.monotonic()
            try:
                h = measure_hold(config, cfg, cfg.hold_count)
            except Exception as exc:  # noqa: BLE001 - reported, the guest part still runs
                _reraise_interrupt(exc)
                h = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
            busy = (_cpu_busy_ticks() - busy0) / _HZ / max(1e-3, time.monotonic() - t0)
            blocks.append({"phase": "hold", "round": r, "config": config, "metrics": {"hold": h},
                           "busy_cpus": round(busy, 3), "loadavg_1min": os.getloadavg()[0]})
            if "median_us" in h:
                progress(f"  hold round {r + 1}/{cfg.hold_rounds} {config:8s} SYN through the NI: median "
                         f"{h['median_us']:.0f} us, p90 {h['p90_us']:.0f} us (n={h['n']}, lost {h['failed']})")
            else:
                progress(f"  hold round {r + 1}/{cfg.hold_rounds} {config:8s} FAILED: "
                         f"{h.get('error', 'no SYN delivered').splitlines()[0]}")
    return blocks


# --- measurements inside guest a -----------------------------------------------------------------------

def parse_timed_loop(text: str) -> dict:
    """``ts %.s`` output of ``echo s; for ...; do CMD || echo FAIL; echo t; done`` -> per-op seconds."""
    marks = [(float(t), m) for t, m in _TS_LINE.findall(text)]
    if not marks or marks[0][1] != "s":
        raise ValueError(f"no start mark in the loop's output:\n{text[-1500:]}")
    ops, failed, prev, bad = [], 0, marks[0][0], False
    for t, m in marks[1:]:
        if m == "FAIL":
            bad = True
            continue
        if m == "t":
            if bad:
                failed += 1
            else:
                ops.append(t - prev)
            prev, bad = t, False
    return {"ops_s": ops, "failed": failed, "total_s": (prev - marks[0][0]) if len(marks) > 1 else 0.0}


def _loop_stats(parsed: dict) -> dict:
    ops = parsed["ops_s"]
    n_all = len(ops) + parsed["failed"]
    out = {"n": len(ops), "failed": parsed["failed"], "total_s": round(parsed["total_s"], 6),
           "mean_ms": parsed["total_s"] / n_all * 1e3 if n_all else None}
    if ops:
        ms = sorted(x * 1e3 for x in ops)
        out.update(median_ms=statistics.median(ms), min_ms=ms[0], max_ms=ms[-1],
                   p90_ms=ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))],
                   ops_ms=[round(x, 3) for x in ms])
    return out


def parse_handshakes(text: str) -> dict:
    """``ts %.s`` output of ``worm`` runs: seconds from each ``attempt I`` to its ``connected I``."""
    ops, failed, run, started = [], 0, 0, {}
    for t, what, index in _TS_WORM.findall(text):
        if what == "worm:":               # a new run: attempt numbers start again
            failed += len(started)
            run, started = run + 1, {}
        elif what == "attempt":
            started[(run, index)] = float(t)
        elif what in ("connected", "refused"):
            t0 = started.pop((run, index), None)
            if t0 is not None:
                ops.append(float(t) - t0)
        elif what == "failed":
            failed += started.pop((run, index), None) is not None
    failed += len(started)               # still pending at the end of the run
    return {"ops_s": ops, "failed": failed, "total_s": sum(ops)}


def measure_handshakes(guest, n: int) -> dict:
    runs = []
    while n > 0:
        runs.append(min(n, HS_HOSTS))
        n -= runs[-1]
    cmd = "; ".join(f"worm -n {k} -r 20 -p 80 -w 5 {HS_NET}" for k in runs)
    out, _ = guest.run(f"({cmd}) 2>&1 | ts %.s", timeout=len(runs) * 10 + sum(runs) * 0.05 + 30)
    p = parse_handshakes(out)
    if not p["ops_s"] and not p["failed"]:
        raise RuntimeError(f"no output from the worm program in guest a:\n{out[-1500:]}")
    return _loop_stats(p)


def timed_loop(guest, body: str, n: int, timeout: float) -> dict:
    cmd = f"(echo s; for i in $(seq {n}); do {body} || echo FAIL; echo t; done) 2>&1 | ts %.s"
    out, _ = guest.run(cmd, timeout=timeout)
    return _loop_stats(parse_timed_loop(out))


def measure_ping(guest, n: int, interval: float) -> dict:
    out, status = guest.run(f"ping -c {n} -i {interval:g} -W 2 {ADDR_B}", timeout=n * max(interval, 0.01) + 30)
    rtts = sorted(float(x) for x in _PING_TIME.findall(out))
    res = {"n": len(rtts), "failed": n - len(rtts)}
    if rtts:
        res.update(median_ms=statistics.median(rtts), min_ms=rtts[0], max_ms=rtts[-1],
                   mean_ms=statistics.fmean(rtts), p90_ms=rtts[min(len(rtts) - 1, int(round(0.9 * (len(rtts) - 1))))],
                   ops_ms=rtts)
    elif status != 0:
        res["error"] = out[-800:]
    return res


def measure_iperf(guest, seconds: int) -> dict:
    out, status = guest.run(f"iperf3 -c {ADDR_B} -t {seconds} -f m", timeout=seconds + 90)
    rates = parse_iperf3(out)
    if status != 0 or "receiver_gbit_s" not in rates:
        return {"ok": False, "error": f"iperf3 exited {status}:\n{out[-1500:]}"}
    return {"ok": True, "gbit_s": rates["receiver_gbit_s"], **rates}


# --- the daemon's view ---------------------------------------------------------------------------------

def read_stats(path: Path, after: float = 0.0, timeout: float = 10.0) -> dict:
    """The daemon's stats file, written after wall-clock time ``after`` (it is rewritten every 250 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = json.loads(path.read_text())
            if s.get("time", 0) > after:
                return s
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no fresh stats in {path} within {timeout:g} s")
        time.sleep(0.05)


def _ready(kernel: dict | None, expected: dict[str, int], rules: int = 0) -> bool:
    if kernel is None:
        return False
    if ((kernel.get("signatures") or {}).get("rules") or 0) != rules:
        return False                  # the signature stage of the new policy is not in yet
    scanners = kernel.get("scanners", {})
    if set(scanners) != set(expected):
        return False
    for name in expected:
        sc = scanners[name]
        if sc.get("state") != "running" or not sc.get("locked_down"):
            return False
    return kernel.get("subscriptions", 0) + kernel.get("stream_subscriptions", 0) >= sum(expected.values())


def switch_policy(daemon, policy_path: Path, stats_path: Path, doc: dict, timeout: float) -> dict:
    """Writes guest a's policy, SIGHUPs the daemon, waits until the stats show it in force."""
    tmp = policy_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, policy_path)
    expected, rules = _expected_scanners(doc), _expected_rules(doc)
    t_wall, t0 = time.time(), time.monotonic()
    os.kill(daemon.pid, signal.SIGHUP)
    while True:
        s = read_stats(stats_path, after=t_wall)
        kernel = s["nis"]["a"].get("kernel")
        if _ready(kernel, expected, rules):
            return {"switch_s": round(time.monotonic() - t0, 3),
                    "scanners": {n: {k: sc.get(k) for k in ("state", "locked_down", "pid", "restarts")}
                                 for n, sc in kernel["scanners"].items()},
                    "subscriptions": kernel["subscriptions"]}
        if not daemon.alive:
            raise RuntimeError(f"vhostni exited:\n{daemon.log_tail(15)}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"policy not in force {timeout:g} s after SIGHUP (expected scanners "
                               f"{expected}); NI a's kernel: {json.dumps(kernel)[:1500]}\n{daemon.log_tail(10)}")
        time.sleep(0.05)


_COUNTERS = ("held", "held_passed", "held_cut", "held_over_cap", "punted_copies", "punt_queue_full",
             "drop_spoofed", "in_frames", "out_frames", "tcp_held_segments", "tcp_released_segments",
             "sig_stream_bytes", "sig_dropped")


def _counters(s: dict) -> dict:
    ni = s["nis"]["a"]
    c = {k: ni.get(k, 0) for k in _COUNTERS}
    k = ni.get("kernel") or {}
    c["decided_by_timeout"] = k.get("decided_by_timeout", 0)
    c["alerts"] = s.get("alerts", 0)
    return c


def _scanner_pids(s: dict) -> list[int]:
    k = s["nis"]["a"].get("kernel") or {}
    return [sc["pid"] for sc in k.get("scanners", {}).values() if sc.get("pid")]


def _wait_quiet(max_wait: float, threshold: float, ours: list[int]) -> dict:
    """Wait up to ``max_wait`` s until processes other than ours use less than ``threshold`` CPUs (1 s)."""
    t_start = time.monotonic()
    while True:
        b0, o0, t0 = _cpu_busy_ticks(), _proc_ticks(ours), time.monotonic()
        time.sleep(1.0)
        foreign = max(0, (_cpu_busy_ticks() - b0) - (_proc_ticks(ours) - o0)) / _HZ / (time.monotonic() - t0)
        waited = time.monotonic() - t_start
        if foreign < threshold or waited >= max_wait:
            return {"foreign_cpus_before": round(foreign, 3), "waited_s": round(waited, 1),
                    "quiet": foreign < threshold}


# --- one block: one configuration, all measurements ----------------------------------------------------

def measure_block(a, cfg: ScannerBenchConfig, daemon, stats_path: Path, our_pids: list[int],
                  phase: str) -> dict:
    s0 = read_stats(stats_path, after=time.time())
    pids = our_pids + _scanner_pids(s0)
    busy0, ours0, t0 = _cpu_busy_ticks(), _proc_ticks(pids), time.monotonic()
    n = cfg.count
    m: dict = {}
    if phase == "latency":
        m["spawn"] = timed_loop(a, "busybox true", n, timeout=n * 2 + 30)
        m["ping"] = measure_ping(a, n, cfg.ping_interval)
        # DNS before connecting: the Code-Red scanner must have seen b's address resolved.
        m["dns"] = timed_loop(a, f"nslookup {NAME} {ADDR_B} >/dev/null", n, timeout=n * 5 + 30)
        a.run(f"nslookup {HS_NAME} {ADDR_B} >/dev/null", timeout=30)   # the Code-Red scanner learns them
        m["handshake"] = measure_handshakes(a, n)
        m["connect"] = timed_loop(a, f"timeout 5 wget -q -O /dev/null http://{ADDR_B}/", n, timeout=n * 6 + 30)
    else:
        a.run(f"nslookup {NAME} {ADDR_B} >/dev/null", timeout=30)     # as a program would (Code-Red)
        m["iperf3"] = measure_iperf(a, cfg.iperf_seconds)
    dt = time.monotonic() - t0
    busy1, ours1 = _cpu_busy_ticks(), _proc_ticks(pids)
    s1 = read_stats(stats_path, after=time.time())
    c0, c1 = _counters(s0), _counters(s1)
    if not daemon.alive:
        raise RuntimeError(f"vhostni exited during the measurements:\n{daemon.log_tail(15)}")
    kernel = s1["nis"]["a"].get("kernel") or {}
    return {
        "metrics": m,
        "counters": {k: c1[k] - c0[k] for k in c0},
        "scanner_restarts": {n_: sc.get("restarts", 0) for n_, sc in kernel.get("scanners", {}).items()},
        "interval_s": round(dt, 2),
        "foreign_cpus": round(max(0, (busy1 - busy0) - (ours1 - ours0)) / _HZ / dt, 3),
        "our_cpus": round((ours1 - ours0) / _HZ / dt, 3),
        "loadavg_1min": os.getloadavg()[0],
    }


def _block_line(config: str, b: dict) -> str:
    m = b["metrics"]

    def lat(key):
        e = m.get(key, {})
        fail = f" ({e['failed']} failed)" if e.get("failed") else ""
        return f"{e['median_ms']:.2f} ms{fail}" if e.get("median_ms") is not None else "FAILED"

    c = b["counters"]
    tail = f"; held {c['held']} cut {c['held_cut']}; others used {b['foreign_cpus']:.2f} CPU"
    if "iperf3" in m:
        ip = m["iperf3"]
        return f"{config:8s} iperf3 " + (f"{ip['gbit_s']:.3f} Gbit/s" if ip.get("ok") else "FAILED") + tail
    return (f"{config:8s} handshake {lat('handshake')}, connect {lat('connect')}, dns {lat('dns')}, "
            f"ping {lat('ping')}, "
            f"spawn {lat('spawn')}" + tail)


# --- the run -------------------------------------------------------------------------------------------

def _images(cfg: ScannerBenchConfig):
    from vhostni.testing import GuestImages, ImagesMissing
    try:
        return GuestImages.locate(cfg.images)
    except ImagesMissing as exc:
        raise Skip(str(exc)) from None


def run_blocks(cfg: ScannerBenchConfig, progress: Callable[[str], None] = print) -> dict:
    """Boots the guests once and measures every configuration ``cfg.rounds`` times, alternated."""
    from vhostni.testing import Guest, VhostniDaemon, VhostUserNic, boot_guests, vhostni_command
    images = _images(cfg)
    docs = {c: policy_doc(c, cfg) for c in cfg.configs}
    # the PID lets reap_stale() remove the directory after a SIGKILLed run
    work = Path(tempfile.mkdtemp(prefix=f"vni-bs-{os.getpid()}-", dir="/tmp"))
    sa, sb = work / "a.sock", work / "b.sock"
    policy_path, stats_path, alerts_path = work / "a.json", work / "stats.json", work / "alerts.jsonl"
    policy_path.write_text(json.dumps(docs.get("plain") or policy_doc("plain", cfg)))
    cmd = pdeathsig_prefix() + list(cfg.vhostni_command or vhostni_command())
    daemon = VhostniDaemon({"a": sa, "b": sb}, extra_args=[
        *cfg.vhostni_args, "--policy", f"a={policy_path}", "--stats-file", str(stats_path),
        "--alert-log", str(alerts_path)], log_path=cfg.logdir / "scanners.vhostni.log", command=cmd)
    guests = []
    info: dict = {"setup": "two TCG guests, virtio-net via vhost-user, joined by one vhostni run; guest a's "
                           "policy switched by SIGHUP", "blocks": []}
    try:
        daemon.start(timeout=60)
        a = Guest("scan-a", images, nics=[VhostUserNic(socket=sa, mac=MAC_A)], ip=f"{ADDR_A}/24",
                  log_dir=cfg.logdir, boot_timeout=cfg.boot_timeout)
        b = Guest("scan-b", images, nics=[VhostUserNic(socket=sb, mac=MAC_B)], ip=f"{ADDR_B}/24",
                  log_dir=cfg.logdir, boot_timeout=cfg.boot_timeout)
        guests = [a, b]
        t0 = time.monotonic()
        boot_guests(guests)
        info["boot_s"] = round(time.monotonic() - t0, 1)
        progress(f"  guests up in {info['boot_s']:.0f} s")
        hs_addrs = [f"{HS_NET.rsplit('.', 1)[0]}.{i}" for i in range(1, HS_HOSTS + 1)]
        records = " ".join([f"{NAME}={ADDR_B}"] + [f"{HS_NAME}={x}" for x in hs_addrs])
        b.check(f"mkdir -p /srv && echo hello-from-b > /srv/index.html && httpd -p 80 -h /srv && "
                f"(dnsd {records} > /tmp/dnsd.log 2>&1 &) && (iperf3 -s -D >/dev/null 2>&1)")
        b.check(f"for x in {' '.join(hs_addrs)}; do ip addr add $x/32 dev lo || exit 1; done")
        a.check(f"ip route add {HS_NET} via {ADDR_B}")
        b.check("for i in $(seq 50); do grep -q serving /tmp/dnsd.log && break; sleep 0.1; done; "
                "grep serving /tmp/dnsd.log")
        # ARP, a first lookup and fetch (TCG guests are slow the first time), under plain forwarding
        out, status = a.run(f"ping -c 3 -W 5 {ADDR_B}", timeout=60)
        if status != 0:
            raise RuntimeError(f"guest a cannot ping guest b:\n{out[-1500:]}")
        out = a.check(f"nslookup {NAME} {ADDR_B} && timeout 10 wget -q -O - http://{ADDR_B}/", timeout=60)
        if "hello-from-b" not in out:
            raise RuntimeError(f"guest a cannot fetch from guest b:\n{out[-1500:]}")
        out = a.check(f"nslookup {HS_NAME} {ADDR_B}", timeout=60)
        if len(re.findall(r"^Address: 10\.77\.1\.", out, re.M)) != HS_HOSTS:
            raise RuntimeError(f"{HS_NAME} does not resolve to {HS_HOSTS} addresses:\n{out[-1500:]}")
        our_pids = [p for p in (os.getpid(), daemon.pid, a.pid, b.pid) if p]
        k = len(cfg.configs)
        for phase, rounds in (("latency", cfg.rounds), ("throughput", cfg.iperf_rounds)):
            for r in range(rounds):
                order = list(cfg.configs[r % k:]) + list(cfg.configs[:r % k])
                quiet = _wait_quiet(cfg.wait_quiet, cfg.quiet_cpus, our_pids) if cfg.wait_quiet > 0 else None
                for config in order:
                    sw = switch_policy(daemon, policy_path, stats_path, docs[config], cfg.ready_timeout)
                    blk = {"phase": phase, "round": r, "config": config, **sw}
                    if quiet and config == order[0]:
                        blk["before"] = quiet
                    blk.update(measure_block(a, cfg, daemon, stats_path, our_pids, phase))
                    info["blocks"].append(blk)
                    progress(f"  {phase} round {r + 1}/{rounds} {_block_line(config, blk)}")
        try:
            info["alerts"] = [json.loads(x) for x in alerts_path.read_text().splitlines()][:20]
        except (OSError, ValueError):
            info["alerts"] = []
    finally:
        for g in guests:
            g.close()
        info["daemon_exit_status"] = daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    return info


LATENCIES = ("handshake", "connect", "dns", "ping", "spawn")


def summarize_blocks(blocks: list[dict], configs: Sequence[str]) -> dict:
    """Per configuration: per-round medians summarised over rounds, pooled per-op medians, failures."""
    out: dict = {}
    for c in configs:
        mine = [b for b in blocks if b["config"] == c]
        e: dict = {"blocks": len(mine)}
        for key in LATENCIES:
            per_round = [b["metrics"][key]["median_ms"] for b in mine
                         if b["metrics"].get(key, {}).get("median_ms") is not None]
            e[f"{key}_ms"] = summarize(per_round)
            pooled = [x for b in mine for x in b["metrics"].get(key, {}).get("ops_ms", [])]
            e[f"{key}_ms_pooled_median"] = statistics.median(pooled) if pooled else None
            e[f"{key}_failed"] = sum(b["metrics"].get(key, {}).get("failed", 0) for b in mine)
        holds = [b["metrics"]["hold"] for b in mine if "hold" in b["metrics"]]
        if holds:
            e["hold_us"] = summarize([h["median_us"] for h in holds if h.get("median_us") is not None])
            pooled = sorted(x for h in holds for x in h.get("ops_us", []))
            e["hold_us_pooled_median"] = statistics.median(pooled) if pooled else None
            e["hold_us_pooled_p90"] = pooled[int(round(0.9 * (len(pooled) - 1)))] if pooled else None
            e["hold_failed"] = sum(h.get("failed", 0) for h in holds) + sum(1 for h in holds if "error" in h)
        rates = [b["metrics"]["iperf3"]["gbit_s"] for b in mine if b["metrics"].get("iperf3", {}).get("ok")]
        e["iperf3_gbit_s"] = summarize(rates)
        e["iperf3_failed"] = sum(1 for b in mine if "iperf3" in b["metrics"] and not b["metrics"]["iperf3"].get("ok"))
        guest = [b for b in mine if "counters" in b]
        e["foreign_cpus"] = summarize([b["foreign_cpus"] for b in guest])
        e["counters"] = {k: sum(b["counters"][k] for b in guest) for k in (guest[0]["counters"] if guest else {})}
        out[c] = e
    return out


def _paired_ratios(blocks: list[dict], configs: Sequence[str], base: str = "plain") -> dict:
    """Median over rounds of (config / base) within the same round: drift between rounds cancels."""
    def value(b: dict, key: str):
        m = b["metrics"].get(key, {})
        return m.get("gbit_s") if key == "iperf3" else m.get("median_us") if key == "hold" else m.get("median_ms")

    out: dict = {}
    for c in configs:
        if c == base:
            continue
        r: dict = {}
        for key in ("hold", *LATENCIES, "iperf3"):
            ratios = []
            for blk in blocks:
                if blk["config"] != c:
                    continue
                mate = [x for x in blocks if x["config"] == base and x["phase"] == blk["phase"]
                        and x["round"] == blk["round"]]
                v, w = value(blk, key), (value(mate[0], key) if mate else None)
                if v is not None and w:
                    ratios.append(v / w)
            r[key] = statistics.median(ratios) if ratios else None
        out[c] = r
    return out


def _ratios(per: dict, base: str = "plain") -> tuple[dict, dict]:
    ratios: dict = {}
    deltas: dict = {}
    b = per.get(base)
    if not b:
        return ratios, deltas
    for c, e in per.items():
        if c == base:
            continue
        r, d = {}, {}
        for key in LATENCIES:
            x, y = e[f"{key}_ms"], b[f"{key}_ms"]
            if x.get("n") and y.get("n") and y["median"]:
                r[key] = x["median"] / y["median"]
                d[f"{key}_ms"] = x["median"] - y["median"]
            else:
                r[key] = None
        x, y = e["iperf3_gbit_s"], b["iperf3_gbit_s"]
        r["iperf3"] = x["median"] / y["median"] if x.get("n") and y.get("n") and y["median"] else None
        x, y = e.get("hold_us", {}), b.get("hold_us", {})
        if x.get("n") and y.get("n") and y["median"]:
            r["hold"] = x["median"] / y["median"]
            d["hold_us"] = x["median"] - y["median"]
        ratios[c], deltas[c] = r, d
    return ratios, deltas


def run_scanners(cfg: ScannerBenchConfig, vhostni_unavailable: str | None = None,
                 progress: Callable[[str], None] = print) -> dict:
    """The ``scanners`` JSON section."""
    section: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                     "method": __doc__.strip(), "paper": PAPER}
    if vhostni_unavailable:
        section["status"] = f"skipped: vhostni unavailable: {vhostni_unavailable}"
        return section
    bad = [c for c in cfg.configs if c not in CONFIGS]
    if bad or not cfg.configs:
        section["status"] = f"failed: unknown configuration(s) {bad} (known: {', '.join(CONFIGS)})"
        return section
    try:
        import vhostni.testing  # noqa: F401
        _images(cfg)
        for c in cfg.configs:
            for sc in policy_doc(c, cfg).get("scanner", []):
                if not Path(sc["program"]).exists():
                    raise Skip(f"scanner program {sc['program']} not found")
    except Skip as exc:
        section["status"] = f"skipped: {exc}"
        return section
    except (OSError, ValueError, KeyError) as exc:
        section["status"] = f"skipped: cannot make the policies: {type(exc).__name__}: {exc}"
        return section
    except ImportError as exc:
        section["status"] = f"skipped: cannot import vhostni.testing: {exc!r}"
        return section
    if shutil.which("qemu-system-x86_64") is None:
        section["status"] = "skipped: qemu-system-x86_64 not installed"
        return section
    section["policies"] = {c: policy_doc(c, cfg) for c in cfg.configs}
    hold = run_hold(cfg, progress) if cfg.hold_rounds > 0 else []
    try:
        info = run_blocks(cfg, progress)
    except Exception as exc:  # a failed setup is a result, not a crash of the whole benchmark
        _reraise_interrupt(exc)
        section["status"] = f"failed: {type(exc).__name__}: {exc}"[-3000:]
        progress(f"  scanners: FAILED: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        section["blocks"] = hold
        return section
    section.update(info)
    info["blocks"][:0] = hold
    per = summarize_blocks(info["blocks"], cfg.configs)
    section["configs"] = per
    section["ratios_to_plain"], section["deltas_to_plain"] = _ratios(per)
    section["paired_ratios_to_plain"] = _paired_ratios(info["blocks"], cfg.configs)
    failures = sum(e[f"{k}_failed"] for e in per.values() for k in LATENCIES) + \
        sum(e["iperf3_failed"] + e.get("hold_failed", 0) for e in per.values())
    section["status"] = "ran" if not failures else f"ran ({failures} failed operations, see blocks)"
    return section


# --- the summary table ---------------------------------------------------------------------------------

def _ms(e: dict) -> str:
    if not e or not e.get("n"):
        return "-"
    spread = f"±{e['spread_pct'] / 2:.0f}%" if e.get("spread_pct") is not None else ""
    return f"{e['median']:7.2f} ms {spread:>5s}"


def _us(e: dict) -> str:
    if not e or not e.get("n"):
        return "-"
    spread = f"±{e['spread_pct'] / 2:.0f}%" if e.get("spread_pct") is not None else ""
    return f"{e['median']:7.1f} us {spread:>5s}"


def _ratio(x) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) else "-"


def report_lines(sc: dict) -> list[str]:
    """The ``scanners`` section as lines of the benchmark's summary table."""
    if not sc.get("status", "").startswith("ran"):
        return [f"scanners: {sc.get('status')}"]
    per, ratios, deltas = sc.get("configs", {}), sc.get("ratios_to_plain", {}), sc.get("deltas_to_plain", {})
    names = list(per)
    others = [c for c in names if c != "plain"]
    cf = sc["config"]
    lines = [f"scanners ({sc.get('status')}): guest a's NI with no scanner (plain), the null scanner holding every "
             f"SYN, the Code-Red scanner",
             f"  median over alternated rounds ({cf['hold_rounds']} host-side, {cf['rounds']} latency, "
             f"{cf['iperf_rounds']} iperf3) of each round's per-op median; ± = half the spread between rounds"]
    head = "".join(f"  {c:16s}" for c in names) + "".join(f"  {c + '/plain':>16s}" for c in others)
    lines.append(f"  {'':22s}{head}")
    cells = "".join(f"  {_us(per[c].get('hold_us', {})):16s}" for c in names)
    rat = ""
    for c in others:
        r, d = ratios.get(c, {}).get("hold"), deltas.get(c, {}).get("hold_us")
        rat += f"  {(_ratio(r) + (f' ({d:+.0f} us)' if d is not None else '')):>16s}"
    if any(per[c].get("hold_us", {}).get("n") for c in names):
        lines.append(f"  {'SYN through the NI *':22s}{cells}{rat}")
    rows = (("handshake", "TCP handshake"), ("connect", "wget (connect+GET)"), ("dns", "DNS lookup (nslookup)"),
            ("ping", "ping RTT"), ("spawn", "process start"))
    for key, label in rows:
        cells = "".join(f"  {_ms(per[c].get(key + '_ms', {})):16s}" for c in names)
        rat = ""
        for c in others:
            r, d = ratios.get(c, {}).get(key), deltas.get(c, {}).get(key + "_ms")
            rat += f"  {(_ratio(r) + (f' ({d:+.2f})' if d is not None else '')):>16s}"
        lines.append(f"  {label:22s}{cells}{rat}")
    cells = ""
    for c in names:
        g = per[c].get("iperf3_gbit_s", {})
        rate = f"{g['median']:.3f} Gbit/s" if g.get("n") else "-"
        cells += f"  {rate:16s}"
    lines.append(f"  {'iperf3 a->b':22s}{cells}"
                 + "".join(f"  {_ratio(ratios.get(c, {}).get('iperf3')):>16s}" for c in others))
    fc = "  ".join(f"{c} {per[c]['foreign_cpus']['median']:.2f}" for c in names if per[c]["foreign_cpus"].get("n"))
    lines.append(f"  (others' CPU during the guest measurements, median: {fc}; in brackets: the difference "
                 f"in ms; * host-side, no guests: the replay harness's switch, NI kernel and scanner)")
    return lines
