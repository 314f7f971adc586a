"""Stream reassembly throughput and the e-mail scanner's per-message latency, host-side.

``python3 -m vhostni.bench --only streams`` (part of ``make bench``; no guests, about a minute).  Everything runs
in the offline-replay harness (:mod:`vhostni.replay`: the C switch with sink ports, the NI kernel and its
sandboxed scanner processes, as in a running daemon), fed a synthetic capture built in memory:

* **throughput**: ``connections`` TCP connections of ``bytes_per_connection`` payload bytes each, in
  ``mss``-byte segments (handshake, data, an ACK every second segment, FIN both ways, last ACK), interleaved
  round-robin; even connections upload (the guest sends), odd ones download.  Replayed (a) with no policy:
  plain forwarding through the replay switch, and (b) with a policy whose null stream scanner
  (``scanners/null_stream.py``) holds every connection's bytes both ways and passes them as it reads them.
  The figure is payload bytes per second of wall time (first frame fed to ``finish()`` returned), in Gbit/s,
  with the replay process and its scanner pinned to one CPU (``cpu``; the scanner inherits the affinity), so
  it is a per-core figure.  Replay runs in lockstep (``window`` 1): after each segment the scanner has read
  and passed it before the next is fed, so the scanner case pays one round trip to the scanner per segment;
  a larger ``window`` lets the scanner fall behind (and needs a second core to help).  The scanner's policy
  raises ``messages_per_second`` so that replay's rate limiter (which keeps scanners under the kill
  threshold) does not cap the figure.
* **e-mail latency**: SMTP sessions from the guest (the client) to a server, one message each: a short
  text message, one with a base64 attachment (``attachment_bytes``, random, clean), and one whose attachment
  is in the policy's digest table ("infected": the scanner replaces it, the NI cuts and injects, and the
  message's last segment leaves rewritten).  The figure is the time
  from handing the segment that carries the message's last byte (the ``.`` line) to the switch to its
  delivery on the far port: under plain forwarding the C path alone, under ``examples/email.toml`` (digest table
  only, no clamd) the scanner's wait for the whole message, its MIME parse and hashing, and the release of the
  held bytes.  The paper's table 3 (a whole mail transfer, 2003 hardware): 22 ms without an NI, 107 ms with
  its MD5 scanner.

Each round runs every configuration once, in an order that alternates, so drift hits both alike; a figure is
the median over rounds.  Every run checks that all the payload came out (``delivered_payload``).
"""
from __future__ import annotations

import base64
import hashlib
import importlib
import os
import random
import statistics
import struct
import time
import tomllib
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from .scanners import REPO, _reraise_interrupt
from .frameloop import summarize

MAC_G, MAC_P = "52:54:00:5d:00:01", "52:54:00:5d:00:02"
IP_G, IP_P = "10.78.0.1", "10.78.0.2"
SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10
PAPER = {"email_ms": {"no_scanner": 22, "md5_scanner": 107},
         "note": "Siphon table 3: a whole mail transfer through a separate NI machine (2003); here the NI's own "
                 "per-message hold, host-side: compare the added time, not the totals"}


@dataclass
class StreamBenchConfig:
    rounds: int = 3
    connections: int = 16
    bytes_per_connection: int = 4 << 20
    mss: int = 1460
    window: int = 1
    cpu: Optional[int] = 0           # pin replay (and its scanner) to this CPU; None: no pinning
    email_rounds: int = 3
    email_messages: int = 50         # per kind and round
    attachment_bytes: int = 16384


# --- frames -----------------------------------------------------------------------------------------------

def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


class Frames:
    """Ethernet/IPv4/TCP frames between the guest and a peer, checksums correct; the payload's
    checksum sum is cached (the bulk data repeats a few chunks)."""

    def __init__(self):
        self.g, self.p = _mac(MAC_G), _mac(MAC_P)
        self.ip = {True: (bytes(map(int, IP_G.split("."))), bytes(map(int, IP_P.split("."))))}
        self.ip[False] = self.ip[True][::-1]
        self._sums: dict[bytes, int] = {}
        self.ident = 0

    def tcp(self, from_guest: bool, sport: int, dport: int, seq: int, ack: int, flags: int,
            payload: bytes = b"") -> bytes:
        src, dst = self.ip[from_guest]
        hdr = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags,
                          65535, 0, 0)
        psum = self._sums.get(payload)
        if psum is None:
            psum = _sum16(payload)
            if len(payload) > 256:
                self._sums[payload] = psum
        tlen = 20 + len(payload)
        total = _sum16(src + dst + bytes([0, 6]) + tlen.to_bytes(2, "big") + hdr) + psum
        hdr = hdr[:16] + struct.pack("!H", ~_fold(total) & 0xFFFF) + hdr[18:]
        self.ident = (self.ident + 1) & 0xFFFF
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tlen, self.ident, 0x4000, 64, 6, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", ~_fold(_sum16(ip)) & 0xFFFF) + ip[12:]
        macs = self.p + self.g if from_guest else self.g + self.p
        return macs + b"\x08\x00" + ip + hdr + payload


class Conn:
    """One TCP connection's frames, the guest as client."""

    def __init__(self, fr: Frames, cport: int, sport: int, iss_c: int = 1000, iss_s: int = 900000):
        self.fr, self.cport, self.sport = fr, cport, sport
        self.nxt = {True: iss_c, False: iss_s}          # next sequence number, by from_guest

    def seg(self, from_guest: bool, flags: int, payload: bytes = b"") -> bytes:
        sp, dp = (self.cport, self.sport) if from_guest else (self.sport, self.cport)
        f = self.fr.tcp(from_guest, sp, dp, self.nxt[from_guest], self.nxt[not from_guest], flags, payload)
        self.nxt[from_guest] += len(payload) + (1 if flags & (SYN | FIN) else 0)
        return f

    def open(self) -> list[bytes]:
        syn = self.fr.tcp(True, self.cport, self.sport, self.nxt[True], 0, SYN)
        self.nxt[True] += 1
        synack = self.seg(False, SYN | ACK)
        return [syn, synack, self.seg(True, ACK)]

    def close(self) -> list[bytes]:
        return [self.seg(True, FIN | ACK), self.seg(False, FIN | ACK), self.seg(True, ACK)]


def bulk_capture(connections: int, nbytes: int, mss: int, seed: int = 1) -> tuple[list[bytes], int]:
    """Frames (in order) and the payload bytes they carry: see the module doc."""
    rng = random.Random(seed)
    chunk = bytes(rng.getrandbits(8) for _ in range(mss))
    fr = Frames()
    conns = [Conn(fr, 30000 + i, 5001) for i in range(connections)]
    frames: list[bytes] = []
    for c in conns:
        frames += c.open()
    left = [nbytes] * connections
    sent = [0] * connections
    while any(left):
        for i, c in enumerate(conns):
            if not left[i]:
                continue
            up = i % 2 == 0
            n = min(mss, left[i])
            frames.append(c.seg(up, ACK | PSH, chunk[:n]))
            left[i] -= n
            sent[i] += 1
            if sent[i] % 2 == 0 or not left[i]:
                frames.append(c.seg(not up, ACK))
    for c in conns:
        frames += c.close()
    return frames, connections * nbytes


def infected_attachment(size: int) -> bytes:
    """The attachment of the "infected" kind: fixed bytes whose SHA-256 the bench policy lists."""
    return bytes((i * 131 + 7) % 251 for i in range(size))


def email_message(attachment: int, rng: random.Random, infected: bool = False) -> bytes:
    body = b"Hello,\r\n\r\nthe figures are attached.\r\n\r\n-- \r\nbench\r\n"
    head = b"From: a@bench.test\r\nTo: b@bench.test\r\nSubject: figures\r\nMIME-Version: 1.0\r\n"
    if not attachment:
        return head + b"Content-Type: text/plain\r\n\r\n" + body
    raw = infected_attachment(attachment) if infected else bytes(rng.getrandbits(8) for _ in range(attachment))
    data = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return (head + b'Content-Type: multipart/mixed; boundary="BND"\r\n\r\n--BND\r\nContent-Type: text/plain\r\n\r\n'
            + body + b'--BND\r\nContent-Type: application/octet-stream; name="f.bin"\r\n'
            b'Content-Disposition: attachment; filename="f.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
            + data + b"--BND--\r\n")


def smtp_session(fr: Frames, cport: int, msg: bytes, mss: int) -> tuple[list[bytes], int]:
    """One SMTP session from the guest carrying ``msg``; returns the frames and the indexes of the ones with the
    message's first and last byte (the ``.`` line).  The server acknowledges the message's segments only after that
    one (a message fits its window), as a server does whose NI holds the message."""
    c = Conn(fr, cport, 25)
    out = c.open()
    out.append(c.seg(False, ACK | PSH, b"220 mx.bench.test ESMTP\r\n"))
    for cmd, reply in ((b"EHLO me\r\n", b"250 mx.bench.test\r\n"), (b"MAIL FROM:<a@bench.test>\r\n", b"250 OK\r\n"),
                       (b"RCPT TO:<b@bench.test>\r\n", b"250 OK\r\n"), (b"DATA\r\n", b"354 go ahead\r\n")):
        out += [c.seg(True, ACK | PSH, cmd), c.seg(False, ACK | PSH, reply)]
    data = msg + b".\r\n"
    first = len(out)
    for i in range(0, len(data), mss):
        out.append(c.seg(True, ACK | PSH, data[i:i + mss]))
    last = len(out) - 1
    out += [c.seg(False, ACK | PSH, b"250 OK queued\r\n"), c.seg(True, ACK | PSH, b"QUIT\r\n"),
            c.seg(False, ACK | PSH, b"221 bye\r\n")]
    return out + c.close(), first, last


def _payload(frame: bytes) -> bytes:
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return b""
    ihl = (frame[14] & 15) * 4
    tot = int.from_bytes(frame[16:18], "big")
    doff = (frame[14 + ihl + 12] >> 4) * 4
    return frame[14 + ihl + doff:14 + tot]


def _payload_len(frame: bytes) -> int:
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return 0
    ihl = (frame[14] & 15) * 4
    tot = int.from_bytes(frame[16:18], "big")
    doff = (frame[14 + ihl + 12] >> 4) * 4
    return max(0, tot - ihl - doff)


# --- policies ---------------------------------------------------------------------------------------------

def policy_doc(config: str, attachment: int = 16384) -> Optional[dict]:
    if config == "plain":
        return None
    if config == "null_stream":
        return {"comment": "bench: the null stream scanner holds every TCP stream",
                "ni": {"mac": MAC_G, "hold_timeout_ms": 10000, "default_decision": "cut",
                       "tcp_bytes_max": 256 << 20},
                "scanner": [{"name": "null_stream", "program": str(REPO / "scanners" / "null_stream.py"),
                             "messages_per_second": 1_000_000,
                             "allow": [{"stream": True, "port": "1-65535", "direction": "both", "contain": True}],
                             "config": {"port": "1-65535"}}]}
    if config == "email":
        path = REPO / "examples" / "email.toml"
        doc = tomllib.loads(path.read_text())
        doc.setdefault("ni", {})["mac"] = MAC_G
        for sc in doc.get("scanner", []):
            sc["program"] = str((path.parent / sc["program"]).resolve())
            sc["messages_per_second"] = 1_000_000
            sc.setdefault("config", {})["clamd_socket"] = ""
            digest = hashlib.sha256(infected_attachment(attachment)).hexdigest()
            sc["config"]["bad_sha256"] = list(sc["config"].get("bad_sha256", [])) + [f"{digest} Bench.Infected"]
        return doc
    raise ValueError(f"unknown configuration {config!r}")


def _parse(doc: Optional[dict], name: str):
    if doc is None:
        return None
    from vhostni.policy import parse_policy
    return parse_policy(doc, base=str(REPO), source=f"bench:{name}")


class _Pinned:
    def __init__(self, cpu: Optional[int]):
        self.cpu, self.old = cpu, None

    def __enter__(self):
        if self.cpu is not None and hasattr(os, "sched_setaffinity"):
            self.old = os.sched_getaffinity(0)
            if self.cpu in self.old:
                os.sched_setaffinity(0, {self.cpu})
            else:
                self.old = None
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            os.sched_setaffinity(0, self.old)


# --- measurements -----------------------------------------------------------------------------------------

def measure_throughput(config: str, cfg: StreamBenchConfig, frames: list[bytes], payload: int) -> dict:
    from vhostni.replay import Replay
    pol = _parse(policy_doc(config), config)
    got = [0, 0]

    def on_frame(_ts, frame, _d):
        got[0] += 1
        got[1] += _payload_len(frame)

    with _Pinned(cfg.cpu):
        with Replay(_mac(MAC_G), pol, ni="s", on_frame=on_frame, window=cfg.window) as r:
            r.start()
            t0 = time.perf_counter()
            for i, f in enumerate(frames):
                r.feed(i, f)
            r.finish()
            wall = time.perf_counter() - t0
            s = r.summary()
    return {"wall_s": round(wall, 4), "gbit_s": payload * 8 / wall / 1e9, "frames": len(frames),
            "frames_per_s": len(frames) / wall, "payload_bytes": payload, "delivered_frames": got[0],
            "delivered_payload": got[1], "complete": got[1] == payload,
            "ni": {k: s["ni"].get(k) for k in ("decided_by_timeout", "held_cut", "drop_spoofed")},
            "scanners": {n: {k: v.get(k) for k in ("state", "restarts", "timeouts")}
                         for n, v in s.get("scanners", {}).items()}}


def measure_email(config: str, cfg: StreamBenchConfig, attachment: int, n: int, seed: int,
                  infected: bool = False) -> dict:
    from vhostni.replay import Replay
    pol = _parse(policy_doc(config, attachment), config)
    rng = random.Random(seed)
    fr = Frames()
    sessions = [smtp_session(fr, 40000 + i, email_message(attachment, rng, infected), 1460) for i in range(n)]
    seen: list[tuple[float, bytes]] = []

    def on_frame(_ts, frame, _d):
        seen.append((time.perf_counter(), frame))

    ops, lost, alerts, held_whole = [], 0, [], 0
    with _Pinned(cfg.cpu):
        with Replay(_mac(MAC_G), pol, ni="m", on_frame=on_frame, on_alert=alerts.append) as r:
            r.start()
            k = 0
            for frames, first, last in sessions:
                for j, f in enumerate(frames):
                    if j != last:
                        r.feed(k, f)
                        k += 1
                        continue
                    mark = len(seen)
                    # the message's end leaves as the segment ending with it (rewritten and
                    # split where the NI replaced an attachment)
                    tail = _payload(f)[-5:]
                    t0 = time.perf_counter()
                    r.feed(k, f)
                    k += 1
                    deadline = t0 + 10.0
                    while not any(_payload(x).endswith(tail) for _, x in seen[mark:]) \
                            and time.perf_counter() < deadline:
                        r._pump(0.002)
                    hit = [t for t, x in seen[mark:] if _payload(x).endswith(tail)]
                    if hit:
                        ops.append(hit[0] - t0)
                        # the message's first segment left only once its last one was in: held whole
                        head = _payload(frames[first])[:64]     # (the rest may be cut)
                        held_whole += first == last or any(_payload(x).startswith(head) for _, x in seen[mark:])
                    else:
                        lost += 1
            # the NI's resends of injected bytes: a replaced message's end that waited for the
            # resend timer shows here (it should leave at once)
            inject_resends = r.guest.stats()["tcp_inject_retransmits"]
            r.finish()
    us = sorted(x * 1e6 for x in ops)
    _, first, last = sessions[0]
    out = {"n": len(us), "lost": lost, "held_whole": held_whole, "alerts": [a.get("message") for a in alerts][:5],
           "message_bytes": sum(_payload_len(f) for f in sessions[0][0][first:last + 1]),
           "message_segments": last - first + 1, "inject_resends": inject_resends}
    if us:
        out.update(median_us=statistics.median(us), min_us=us[0], max_us=us[-1],
                   p90_us=us[min(len(us) - 1, int(round(0.9 * (len(us) - 1))))])
    return out


def run_streams(cfg: StreamBenchConfig, progress: Callable[[str], None] = print) -> dict:
    section: dict = {"config": asdict(cfg), "paper": PAPER}
    try:
        importlib.import_module("vhostni._fastpath")
    except ImportError as exc:
        section["status"] = f"skipped: the C fast path is not built ({exc})"
        return section
    frames, payload = bulk_capture(cfg.connections, cfg.bytes_per_connection, cfg.mss)
    section["capture"] = {"frames": len(frames), "payload_bytes": payload,
                          "bytes": sum(len(f) for f in frames)}
    configs = ("plain", "null_stream")
    blocks, failures = [], 0
    for r in range(cfg.rounds):
        for c in (configs if r % 2 == 0 else configs[::-1]):
            try:
                m = measure_throughput(c, cfg, frames, payload)
            except Exception as exc:  # noqa: BLE001 - a failed run is a result
                _reraise_interrupt(exc)
                m = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
            if not m.get("complete"):
                failures += 1
            blocks.append({"phase": "throughput", "round": r, "config": c, "metrics": m})
            progress(f"  streams round {r + 1}/{cfg.rounds} {c:11s} "
                     + (f"{m['gbit_s']:.3f} Gbit/s ({m['frames_per_s'] / 1e3:.0f} kframes/s)"
                        + ("" if m["complete"] else " INCOMPLETE") if "gbit_s" in m else f"FAILED: {m['error']}"))
    kinds = {"text": 0, "attachment": cfg.attachment_bytes, "infected": cfg.attachment_bytes}
    for r in range(cfg.email_rounds):
        for c in (("plain", "email") if r % 2 == 0 else ("email", "plain")):
            for kind, att in kinds.items():
                try:
                    m = measure_email(c, cfg, att, cfg.email_messages, seed=r, infected=kind == "infected")
                except Exception as exc:  # noqa: BLE001
                    _reraise_interrupt(exc)
                    m = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
                if m.get("lost") or "median_us" not in m:
                    failures += 1
                blocks.append({"phase": "email", "round": r, "config": c, "kind": kind, "metrics": m})
                progress(f"  e-mail round {r + 1}/{cfg.email_rounds} {c:6s} {kind:10s} "
                         + (f"median {m['median_us']:.0f} us (n={m['n']}, lost {m['lost']})"
                            if "median_us" in m else f"FAILED: {m.get('error', 'nothing released')}"))
    section["blocks"] = blocks
    thr = {c: summarize([b["metrics"]["gbit_s"] for b in blocks
                         if b["phase"] == "throughput" and b["config"] == c and b["metrics"].get("complete")])
           for c in configs}
    section["throughput_gbit_s"] = thr
    paired = [n["metrics"]["gbit_s"] / p["metrics"]["gbit_s"]
              for p in blocks for n in blocks
              if p["phase"] == n["phase"] == "throughput" and p["round"] == n["round"] and p["config"] == "plain"
              and n["config"] == "null_stream" and p["metrics"].get("complete") and n["metrics"].get("complete")]
    section["ratio_null_stream_to_plain"] = statistics.median(paired) if paired else None
    lat: dict = {}
    for c in ("plain", "email"):
        for kind in kinds:
            lat.setdefault(c, {})[kind] = summarize(
                [b["metrics"]["median_us"] for b in blocks if b["phase"] == "email" and b["config"] == c
                 and b["kind"] == kind and "median_us" in b["metrics"]])
    section["email_latency_us"] = lat
    section["email_added_us"] = {k: (lat["email"][k]["median"] - lat["plain"][k]["median"])
                                 if lat["email"][k].get("n") and lat["plain"][k].get("n") else None for k in kinds}
    section["status"] = "ran" if not failures else f"ran ({failures} failed runs, see blocks)"
    return section


def report_lines(sec: dict) -> list[str]:
    if not sec.get("status", "").startswith("ran"):
        return [f"streams: {sec.get('status')}"]
    cf, thr, lat = sec["config"], sec["throughput_gbit_s"], sec["email_latency_us"]

    def g(e):
        return f"{e['median']:.3f} Gbit/s (n={e['n']})" if e.get("n") else "-"

    def u(e):
        return f"{e['median']:9.0f} us (n={e['n']})" if e.get("n") else "-"
    ratio = sec.get("ratio_null_stream_to_plain")
    lines = [f"streams ({sec['status']}): replay harness, {cf['connections']} connections x "
             f"{cf['bytes_per_connection']} B, one core (cpu {cf['cpu']}), window {cf['window']}",
             f"  payload throughput: plain {g(thr['plain'])}   null stream scanner {g(thr['null_stream'])}   "
             f"ratio {ratio:.3f}" if ratio is not None else "  payload throughput: -",
             "  e-mail: last byte of the message in -> released (median over rounds of per-round medians)",
             f"  {'':14s}{'plain':>22s}  {'e-mail scanner':>22s}  added"]
    for kind in ("text", "attachment", "infected"):
        if kind not in lat["plain"]:
            continue
        add = sec["email_added_us"].get(kind)
        lines.append(f"  {kind:14s}{u(lat['plain'][kind]):>22s}  {u(lat['email'][kind]):>22s}  "
                     + (f"{add / 1e3:+.2f} ms" if add is not None else "-"))
    return lines
