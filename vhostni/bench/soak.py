"""``python3 -m vhostni.bench.soak [--seconds N] [--out bench/out/soak.json]`` (``make soak``): a long run of
the daemon under continuous, checked traffic, sampling its memory and file descriptors (and its scanners').

What runs: ``vhostni run`` (a subprocess, with an admin socket, a stats file, an alert log and a state
directory) with two NIs, a and b; two simulated virtio drivers (tests/vdriver.py, so this needs a checkout)
play the guests.  NI a's policy runs the Code-Red scanner (DNS read, SYNs held) and the null stream scanner
(port 25 held; TCP connections idle for 60 s are forgotten).  Each round (``--batch`` of each at once, 8 by
default) a resolves a fresh name through b (a DNS query and its answer), connects to the address it got (a held
SYN, which must reach b), and runs one TCP connection to b's port 25 (handshake,
three data segments held by the stream scanner (20000 bytes each by default, sent as TSO frames as a
guest with offloads sends them), FIN; every tenth one is left open to go idle); now and then
a connects to an unknown address (Code-Red attack mode and its alerts come and go), an admin client asks
``query-nis`` and ``query-scanners``, and the Code-Red scanner is killed (restart, checkpoint restored).
The traffic is checked: the known SYNs and the stream bytes must arrive (``lost_syns``, ``lost_bytes``; SYNs
sent while the Code-Red scanner restarts are cut, the policy's default, so each kill costs about one batch).

Every ``--interval`` seconds it records the daemon's RSS (VmRSS) and open fds, each scanner's, and the
kernel's table sizes (TCP flows, streams, held frames).  The report (JSON, plus a CSV of the samples beside
it) ends with a summary: first and last values, and the slope of the daemon's RSS and fds over the last half
of the run (a leak keeps a positive slope; warm-up growth flattens out).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]

A_MAC, B_MAC = bytes.fromhex("020000000a0a"), bytes.fromhex("020000000b0b")
A_IP, B_IP = "10.0.0.1", "10.0.0.2"
SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01
RX_BUFFERS = 512        # 2 KiB each, merged for large frames (a round of TSO frames needs hundreds)


# ---- frames -------------------------------------------------------------------------------------------------

def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ipv4(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    h = h[:10] + struct.pack("!H", _csum(h)) + h[12:]
    return h + l4


def _l4_csum(src: str, dst: str, proto: int, l4: bytes, at: int) -> bytes:
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, len(l4))
    return l4[:at] + struct.pack("!H", _csum(pseudo + l4)) + l4[at + 2:]


def tcp_frame(src_mac: bytes, dst_mac: bytes, src: str, dst: str, sport: int, dport: int, seq: int, ack: int,
              flags: int, payload: bytes = b"") -> bytes:
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, 65535, 0, 0)
    seg = _l4_csum(src, dst, 6, seg + payload, 16)
    return dst_mac + src_mac + b"\x08\x00" + _ipv4(src, dst, 6, seg)


def udp_frame(src_mac: bytes, dst_mac: bytes, src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    dgram = _l4_csum(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload, 6)
    return dst_mac + src_mac + b"\x08\x00" + _ipv4(src, dst, 17, dgram)


def _qname(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"


def dns_pair(i: int, addr: str) -> tuple[bytes, bytes]:
    """A's query for h<i>.soak.test and b's answer (``addr``, TTL 300)."""
    txid, sport, q = i & 0xFFFF, 30000 + i % 20000, _qname(f"h{i}.soak.test") + struct.pack("!HH", 1, 1)
    query = struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + q
    answer = (struct.pack("!HHHHHH", txid, 0x8180, 1, 1, 0, 0) + q
              + struct.pack("!HHHIH", 0xC00C, 1, 1, 300, 4) + socket.inet_aton(addr))
    return (udp_frame(A_MAC, B_MAC, A_IP, B_IP, sport, 53, query),
            udp_frame(B_MAC, A_MAC, B_IP, A_IP, 53, sport, answer))


# ---- the daemon ---------------------------------------------------------------------------------------------

def policy_doc() -> dict:
    return {
        "ni": {"hold_timeout_ms": 2000, "default_decision": "cut",
               "tcp_idle_timeout_ms": 60000},     # the connections left open go within the run
        "scanner": [
            {"name": "codered", "program": str(REPO / "scanners" / "codered"),
             "config": {"known_networks": ["10.0.0.0/24"]},
             "allow": [{"direction": "from_guest", "proto": "udp", "dport": 53},
                       {"direction": "to_guest", "proto": "udp", "sport": 53},
                       {"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn", "contain": True}]},
            {"name": "stream", "program": str(REPO / "scanners" / "null_stream.py"), "config": {"port": 25},
             "allow": [{"stream": True, "port": 25, "direction": "both", "contain": True}]},
        ],
    }


def proc_sample(pid: int) -> Optional[dict]:
    """RSS (kB) and open fds of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    return {"rss_kb": rss, "fds": fds}


def read_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def qmp(path: Path, *commands: str) -> list[dict]:
    """One admin session: the greeting, qmp_capabilities, then each command; their replies."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(str(path))
        f = s.makefile("rwb")
        out = []
        json.loads(f.readline())
        for cmd in ("qmp_capabilities", *commands):
            f.write(json.dumps({"execute": cmd}).encode() + b"\r\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "event" not in msg:
                    break
            out.append(msg)
        return out
    finally:
        s.close()


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 60.0 * sum((t - mt) * (v - mv) for t, v in points) / var if var else 0.0


def summarize(samples: list[dict]) -> dict:
    if not samples:
        return {}
    half = [s for s in samples if s["t"] >= samples[-1]["t"] / 2]
    out = {"samples": len(samples), "seconds": round(samples[-1]["t"], 1)}
    for key in ("daemon_rss_kb", "daemon_fds"):
        vals = [s[key] for s in samples if s.get(key) is not None]
        if vals:
            out[key] = {"first": vals[0], "last": vals[-1], "max": max(vals),
                        "slope_last_half_per_min": round(slope_per_min(
                            [(s["t"], s[key]) for s in half if s.get(key) is not None]), 2)}
    scanners = {}
    for s in samples:
        for name, v in s.get("scanners", {}).items():
            scanners.setdefault(name, []).append(v)
    out["scanners"] = {n: {"rss_kb_first": v[0]["rss_kb"], "rss_kb_last": v[-1]["rss_kb"],
                           "rss_kb_max": max(x["rss_kb"] for x in v), "fds_max": max(x["fds"] for x in v)}
                       for n, v in scanners.items()}
    last = samples[-1]
    out["traffic"] = {k: last.get(k) for k in ("rounds", "syns_sent", "lost_syns", "stream_bytes_sent",
                                                "lost_bytes", "admin_sessions", "scanner_kills", "alerts")}
    return out


class Soak:
    def __init__(self, seconds: float, interval: float, kill_every: float, admin_every: float,
                 workdir: Path, log=print, batch: int = 8, segment: int = 20000):
        self.batch = batch
        self.segment = segment
        self.seconds, self.interval, self.kill_every, self.admin_every = seconds, interval, kill_every, admin_every
        self.dir = workdir
        self.log = log
        self.proc: Optional[subprocess.Popen] = None
        self.drivers: dict = {}
        self.samples: list[dict] = []
        self.counts = {"rounds": 0, "syns_sent": 0, "lost_syns": 0, "stream_bytes_sent": 0, "lost_bytes": 0,
                       "admin_sessions": 0, "scanner_kills": 0}
        self.rx_b: list[bytes] = []

    # ---- set-up
    def start(self) -> None:
        sys.path.insert(0, str(REPO / "tests"))
        from vdriver import VirtioNetDriver
        d = self.dir
        os.chmod(d, 0o755)
        (d / "a.json").write_text(json.dumps(policy_doc(), indent=1))
        from vhostni.testing.daemon import vhostni_command     # $VHOSTNI_CMD, or this python -m vhostni
        cmd = [*vhostni_command(), "run", "--ni", f"a={d}/a.sock", "--ni", f"b={d}/b.sock",
               "--policy", f"a={d}/a.json", "--alert-log", str(d / "alerts.jsonl"),
               "--stats-file", str(d / "stats.json"), "--admin", f"unix:{d}/admin.sock",
               "--state-dir", str(d / "state")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(d / "daemon.log", "wb"),
                                     cwd=str(REPO))
        self._wait(lambda: self._scanners_ready(), 60, "the daemon and its scanners")
        for name in ("a", "b"):
            drv = VirtioNetDriver.connect(str(d / f"{name}.sock"), ack_all=True, queue_size=1024)
            drv.post_rx_buffers(RX_BUFFERS, 2048)
            self.drivers[name] = drv

    def _scanners_ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({self.proc.returncode}); see {self.dir}/daemon.log")
        k = (read_stats(self.dir / "stats.json").get("nis", {}).get("a") or {}).get("kernel") or {}
        sc = k.get("scanners", {})
        return (set(sc) == {"codered", "stream"} and all(v.get("locked_down") for v in sc.values())
                and k.get("subscriptions") == 3 and k.get("stream_subscriptions") == 1)

    @staticmethod
    def _wait(cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def close(self) -> None:
        for drv in self.drivers.values():
            try:
                drv.close(graceful=False)
            except Exception:     # noqa: BLE001 - best effort at teardown
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # ---- traffic
    def _send(self, name: str, *frames: bytes, tso: bool = False) -> None:
        """Sends frames; ``tso``: TCP/IPv4 frames larger than one MSS, for the NI to segment (or pass on
        whole to a peer that takes TSO), as a guest with TSO sends them."""
        from vdriver import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VirtioNetHdr
        drv = self.drivers[name]
        for f in frames:
            drv.reclaim_tx()
            hdr = None
            if tso and len(f) > 1514:
                hdr = VirtioNetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_TCPV4,
                                   hdr_len=54, gso_size=1448, csum_start=34, csum_offset=16)
            drv.send_frame(f, hdr)

    def _recv(self, name: str, want, timeout: float) -> list[bytes]:
        """Frames ``name`` receives until ``want(frames)`` or ``timeout``."""
        drv = self.drivers[name]
        got: list[bytes] = []
        end = time.monotonic() + timeout
        while True:
            got += [f for _, f in drv.recv_frames(timeout=0.02, count=64)]
            if len(drv.queues[0].outstanding) < RX_BUFFERS // 2:
                drv.post_rx_buffers(RX_BUFFERS // 2, 2048)
            if want(got) or time.monotonic() > end:
                return got

    def round(self, i: int, batch: int) -> None:
        """``batch`` lookups, SYNs and connections, each step for the whole batch at once."""
        idx = range(i, i + batch)
        addrs = {j: f"198.51.{100 + j // 250 % 50}.{j % 250 + 1}" for j in idx}
        pairs = {j: dns_pair(j, addrs[j]) for j in idx}
        self._send("a", *[pairs[j][0] for j in idx])
        self._recv("b", lambda g: len(g) >= batch, 1.0)
        self._send("b", *[pairs[j][1] for j in idx])
        self._recv("a", lambda g: len(g) >= batch, 1.0)
        time.sleep(0.005)   # the scanner reads the answers before the SYNs (both go to it, in order)
        self._send("a", *[tcp_frame(A_MAC, B_MAC, A_IP, addrs[j], 10000 + j % 50000, 80, 1000, 0, SYN)
                          for j in idx])
        self.counts["syns_sent"] += batch
        want = {socket.inet_aton(a) for a in addrs.values()}
        got = self._recv("b", lambda g: len({f[30:34] for f in g} & want) >= batch, 2.0)
        self.counts["lost_syns"] += batch - len({f[30:34] for f in got} & want)
        for j in idx:
            if j % 40 == 0:    # an unknown destination: about 12 a minute, so attack mode comes and goes
                self._send("a", tcp_frame(A_MAC, B_MAC, A_IP, f"192.0.2.{j // 40 % 250 + 1}", 10000 + j % 50000,
                                          445, 1, 0, SYN))
        self._connections(list(idx))
        self.counts["rounds"] += 1

    def _connections(self, idx: list[int]) -> None:
        """TCP connections a -> b:25 through the stream scanner, one per index; every tenth is left open (it
        goes idle)."""
        n = len(idx)

        def c(j, seq, ack, fl, p=b""):
            return tcp_frame(A_MAC, B_MAC, A_IP, B_IP, 20000 + j % 40000, 25, seq, ack, fl, p)

        def s(j, seq, ack, fl, p=b""):
            return tcp_frame(B_MAC, A_MAC, B_IP, A_IP, 25, 20000 + j % 40000, seq, ack, fl, p)

        cseq = {j: 100000 * (j % 1000) for j in idx}
        sseq = 500000
        self._send("a", *[c(j, cseq[j], 0, SYN) for j in idx])
        self._recv("b", lambda g: len(g) >= n, 1.0)
        self._send("b", *[s(j, sseq, cseq[j] + 1, SYN | ACK) for j in idx])
        self._recv("a", lambda g: len(g) >= n, 1.0)
        data = [bytes([65 + k]) * self.segment for k in range(3)]
        sent = sum(map(len, data))
        frames = []
        for j in idx:
            off = cseq[j] + 1
            frames.append(c(j, off, sseq + 1, ACK))
            for p in data:
                frames.append(c(j, off, sseq + 1, ACK | PSH, p))
                off += len(p)
        self._send("a", *frames, tso=True)
        self.counts["stream_bytes_sent"] += sent * n
        got = self._recv("b", lambda g: sum(max(0, len(f) - 54) for f in g) >= sent * n, 3.0)
        self.counts["lost_bytes"] += max(0, sent * n - sum(max(0, len(f) - 54) for f in got))
        end = {j: cseq[j] + 1 + sent for j in idx}
        self._send("b", *[s(j, sseq + 1, end[j], ACK) for j in idx])
        closing = [j for j in idx if j % 10 != 9]
        self._send("a", *[c(j, end[j], sseq + 1, FIN | ACK) for j in closing])
        self._recv("b", lambda g: len(g) >= len(closing), 0.5)
        self._send("b", *[s(j, sseq + 1, end[j] + 1, FIN | ACK) for j in closing])
        self._recv("a", lambda g: len(g) >= len(closing), 0.5)
        self._send("a", *[c(j, end[j] + 1, sseq + 2, ACK) for j in closing])

    # ---- sampling
    def sample(self, t: float) -> dict:
        stats = read_stats(self.dir / "stats.json")
        k = (stats.get("nis", {}).get("a") or {}).get("kernel") or {}
        d = proc_sample(self.proc.pid) or {}
        s = {"t": round(t, 2), "daemon_rss_kb": d.get("rss_kb"), "daemon_fds": d.get("fds"), "scanners": {},
             "tcp_flows": k.get("tcp_flows"), "streams": k.get("streams"), "held": k.get("held"),
             "alerts": stats.get("alerts"), **self.counts}
        for name, sc in (k.get("scanners") or {}).items():
            p = proc_sample(sc["pid"]) if sc.get("pid") else None
            if p:
                s["scanners"][name] = p
        self.samples.append(s)
        return s

    def kill_scanner(self) -> None:
        k = (read_stats(self.dir / "stats.json").get("nis", {}).get("a") or {}).get("kernel") or {}
        pid = (k.get("scanners", {}).get("codered") or {}).get("pid")
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
                self.counts["scanner_kills"] += 1
            except ProcessLookupError:
                pass

    def run(self) -> list[dict]:
        start = time.monotonic()
        next_sample = next_kill = next_admin = 0.0
        i = 0
        while True:
            t = time.monotonic() - start
            if t >= next_sample:
                s = self.sample(t)
                self.log(f"soak {t:6.0f} s: daemon RSS {s['daemon_rss_kb']} kB, {s['daemon_fds']} fds, "
                         f"flows {s['tcp_flows']}, rounds {s['rounds']}, lost syns {s['lost_syns']} "
                         f"bytes {s['lost_bytes']}")
                next_sample += self.interval
            if t >= self.seconds:
                return self.samples
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited ({self.proc.returncode}); see {self.dir}/daemon.log")
            if self.kill_every and t >= next_kill:
                if next_kill:
                    self.kill_scanner()
                next_kill = t + self.kill_every
            if self.admin_every and t >= next_admin:
                qmp(self.dir / "admin.sock", "query-nis", "query-scanners")
                self.counts["admin_sessions"] += 1
                next_admin = t + self.admin_every
            self.round(i, self.batch)
            i += self.batch


def write_report(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        names = sorted({n for s in report["samples"] for n in s.get("scanners", {})})
        w.writerow(["t", "daemon_rss_kb", "daemon_fds", "tcp_flows", "streams", "held", "rounds", "lost_syns",
                    "lost_bytes"] + [f"{n}_{k}" for n in names for k in ("rss_kb", "fds")])
        for s in report["samples"]:
            w.writerow([s["t"], s["daemon_rss_kb"], s["daemon_fds"], s["tcp_flows"], s["streams"], s["held"],
                        s["rounds"], s["lost_syns"], s["lost_bytes"]]
                       + [s["scanners"].get(n, {}).get(k) for n in names for k in ("rss_kb", "fds")])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m vhostni.bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 600)))
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--kill-every", type=float, default=60.0, help="kill the Code-Red scanner this often (0: never)")
    p.add_argument("--admin-every", type=float, default=5.0, help="an admin session this often (0: never)")
    p.add_argument("--batch", type=int, default=8, help="lookups, SYNs and connections per round, in parallel")
    p.add_argument("--segment", type=int, default=20000,
                   help="bytes of each of a connection's three data segments, at most 21000 (all three fit in the "
                        "receiver's window); above 1448 they are sent as TSO frames")
    p.add_argument("--out", default="bench/out/soak.json", help="JSON report (a .csv of the samples beside it)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (daemon log, alerts, state)")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="vnsoak-", dir="/tmp"))
    soak = Soak(args.seconds, args.interval, args.kill_every, args.admin_every, workdir,
                log=lambda m: print(m, flush=True), batch=max(1, args.batch),
                segment=min(max(1, args.segment), 21000))   # 3 of them within the 64 KiB window
    error = None
    try:
        soak.start()
        soak.run()
    except (RuntimeError, OSError) as exc:
        error = str(exc)
        print(f"soak: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        error = "interrupted"
    finally:
        soak.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {"seconds": args.seconds, "interval": args.interval, "error": error,
              "summary": summarize(soak.samples), "samples": soak.samples}
    write_report(Path(args.out), report)
    print(json.dumps(report["summary"], indent=1))
    return 1 if error or not soak.samples else 0


if __name__ == "__main__":
    sys.exit(main())
