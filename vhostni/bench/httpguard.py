"""The HTTP overflow stage, host-side: overflow requests that reach the server, normal ones damaged, latency added.

``python3 -m vhostni.bench --only httpguard`` (part of ``make bench``; no guests, about half a minute).  Everything
runs in the offline-replay harness (:mod:`vhostni.replay`: the C switch with sink ports, the NI kernel and the
scanner as a sandboxed process), with ``examples/httpguard.toml`` as it ships, fed synthetic captures built in
memory, one TCP connection per request, a client on the network and the web server in the guest:

* **overflows**: Code-Red, Code-Red II and the other shipped signatures' historic requests, each also delivered
  evasively (1-byte segments, pipelined behind a normal request, percent-encoded, ``%u``-encoded path, ``..``,
  backslash, NUL and trailing-dot paths, a body signature over 7-byte chunks): the share of them whose
  overflowing field reaches the guest's server (goal: 0).
* **normal requests**: GETs, a long but allowed query, a POST, a chunked upload, WebDAV below its limit,
  pipelined keep-alive requests: the share not delivered byte for byte (goal: 0).
* **latency**: the time from handing the switch the segment that completes a request's head to that request's
  last byte reaching the guest, with no policy (the C path alone) and with the stage (the held head, parsing,
  normalising, the signatures, the release).

Each round runs both configurations in alternating order; a figure is the median over rounds.
"""
from __future__ import annotations

import time
import tomllib
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from ._replaykit import latency_lines, latency_rounds, replay, summarize_latency
from ._replaykit import stream as _stream
from .scanners import REPO
from .streams import ACK, FIN, MAC_G, PSH, SYN, Frames, _mac, _parse, _payload

MSS = 1460
HOST = b"Host: www.bench.test\r\n"


@dataclass
class HttpBenchConfig:
    rounds: int = 3
    requests: int = 30              # per kind, configuration and round, latency
    cpu: Optional[int] = 0


def policy_doc(config: str) -> Optional[dict]:
    if config == "plain":
        return None
    path = REPO / "examples" / "httpguard.toml"
    doc = tomllib.loads(path.read_text())
    doc.setdefault("ni", {})["mac"] = MAC_G
    for sc in doc.get("scanner", []):
        sc["program"] = str((path.parent / sc["program"]).resolve())
        sc["messages_per_second"] = 1_000_000
        sc["alerts_per_second"] = 10000
    return doc


def _codered(fill: bytes) -> bytes:
    from vhostni.demo_http import codered_request
    return codered_request(fill)


def _get(target: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\n" + HOST + extra + b"\r\n"


def _chunked(data: bytes, size: int) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
                    for i in range(0, len(data), size)) + b"0\r\n\r\n"


def overflows() -> dict:
    """name -> (segments as the client sends them, a marker of the overflowing field that must not arrive)."""
    cr, cr2 = _codered(b"N"), _codered(b"X")
    enc = cr.replace(b"/default.ida?", b"/%64efault%2eida?").replace(b"N" * 224, b"%4e" * 224)
    out = {
        "Code-Red": ([cr[:MSS], cr[MSS:2 * MSS], cr[2 * MSS:]], b"N" * 100),
        "Code-Red II": ([cr2[:MSS], cr2[MSS:2 * MSS], cr2[2 * MSS:]], b"X" * 100),
        "Code-Red, 1-byte segments": ([cr[i:i + 1] for i in range(400)] + [cr[400:]], b"N" * 100),
        "Code-Red, pipelined": ([_get(b"/") + _get(b"/a") + cr[:900], cr[900:]], b"N" * 100),
        "Code-Red, percent-encoded": ([enc], b"%4e" * 30),
    }
    for target in (b"/scripts/..%2fdefault.ida", b"\\default.ida", b"/default.ida%00.htm", b"/DEFAULT.IDA.",
                   b"/x%u002f..%u002fdefault.ida"):
        out[f"Code-Red at {target.decode()}"] = ([cr.replace(b"/default.ida", target, 1)], b"N" * 100)
    out[".printer Host"] = ([b"GET /NULL.printer HTTP/1.0\r\nHost: " + b"\x90" * 420 + b"\r\n\r\n"], b"\x90" * 100)
    out[".htr file name"] = ([b"GET /" + b"A" * 2900 + b".htr HTTP/1.0\r\n\r\n"], b"A" * 100)
    out["WebDAV SEARCH 10 KB"] = ([b"SEARCH /" + b"B" * 10000 + b" HTTP/1.1\r\n" + HOST + b"\r\n"], b"B" * 100)
    out["IIS 6 If header"] = ([b"PROPFIND / HTTP/1.1\r\n" + HOST + b"If: <http://localhost/" + b"C" * 700
                               + b">\r\n\r\n"], b"C" * 100)
    out["chunk size 0xFFFFFF6E"] = ([b"POST /x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
                                     b"FFFFFF6E\r\n" + b"D" * 200], b"FFFFFF6E")
    body = _chunked(b"u=" + b"E" * 3000, 7)
    out["body signature, 7-byte chunks"] = (
        [b"POST /cgi-bin/login HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + body], b"u=EEEE")
    return out


def normal() -> dict:
    """name -> the request bytes (each arrives byte for byte)."""
    up = bytes(range(256)) * 40
    return {
        "GET": _get(b"/index.html", b"User-Agent: Wget\r\n"),
        "long allowed query": _get(b"/search?q=" + b"x" * 400 + b"&page=" + b"y" * 3000),
        "short .ida query": _get(b"/default.ida?q=short"),
        "POST form": b"POST /form HTTP/1.1\r\n" + HOST + b"Content-Length: 14\r\n\r\nname=alice&x=1",
        "chunked upload": b"POST /upload HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(up, 1000),
        "WebDAV below its limit": b"PROPFIND /" + b"p" * 3000 + b" HTTP/1.1\r\n" + HOST + b"Depth: 1\r\n\r\n",
        "keep-alive x3": _get(b"/a") + _get(b"/b?c=d") + _get(b"/e", b"Cookie: " + b"c" * 3000 + b"\r\n"),
    }


class _Conn:
    """One connection, the client on the network, the server in the guest on port 80."""

    def __init__(self, fr: Frames, cport: int, iss_c: int = 7000, iss_s: int = 800000):
        self.fr, self.cport = fr, cport
        self.c, self.s = iss_c, iss_s

    def open(self) -> list:
        f = [self.fr.tcp(False, self.cport, 80, self.c, 0, SYN)]
        self.c += 1
        f.append(self.fr.tcp(True, 80, self.cport, self.s, self.c, SYN | ACK))
        self.s += 1
        f.append(self.fr.tcp(False, self.cport, 80, self.c, self.s, ACK))
        return f

    def send(self, data: bytes) -> bytes:
        f = self.fr.tcp(False, self.cport, 80, self.c, self.s, ACK | PSH, data)
        self.c += len(data)
        return f

    def ack(self) -> bytes:
        return self.fr.tcp(True, 80, self.cport, self.s, self.c, ACK)

    def close(self) -> list:
        f = [self.fr.tcp(False, self.cport, 80, self.c, self.s, FIN | ACK)]
        self.c += 1
        f.append(self.fr.tcp(True, 80, self.cport, self.s, self.c, FIN | ACK))
        self.s += 1
        f.append(self.fr.tcp(False, self.cport, 80, self.c, self.s, ACK))
        return f


def connection(fr: Frames, cport: int, segments: list) -> tuple:
    """Frames of one connection: (frames, index of the last request segment, the client's first data sequence)."""
    c = _Conn(fr, cport)
    out = c.open()
    base = c.c
    for s in segments:
        for i in range(0, len(s), MSS):
            out.append(c.send(s[i:i + MSS]))
    last = len(out) - 1
    out.append(c.ack())
    out += c.close()
    return out, last, base


def _replay(config: str, captures: list, cpu: Optional[int], timed: bool = False) -> tuple:
    """Replays the connections; returns {client port: {seq: payload}} of what reached the guest, the latencies
    (s) of the last request bytes, and the alerts."""
    pol = _parse(policy_doc(config), config)
    got: dict = {}

    def collect(f):
        if len(f) >= 54 and f[12:14] == b"\x08\x00" and f[23] == 6 and f[:6] == _mac(MAC_G):
            ihl = (f[14] & 15) * 4
            sport, dport = int.from_bytes(f[14 + ihl:16 + ihl], "big"), int.from_bytes(f[16 + ihl:18 + ihl], "big")
            seq = int.from_bytes(f[18 + ihl:22 + ihl], "big")
            if dport == 80 and _payload(f):
                got.setdefault(sport, {})[seq] = _payload(f)

    lat, alerts = replay(pol, "h", captures, cpu, timed, collect)
    return got, lat, alerts


def run_httpguard(cfg: HttpBenchConfig, progress: Callable[[str], None] = print) -> dict:
    section: dict = {"config": asdict(cfg)}
    try:
        import vhostni._fastpath  # noqa: F401
    except ImportError as exc:
        section["status"] = f"skipped: the C fast path is not built ({exc})"
        return section
    failures = 0
    # overflows, and normal requests in the same capture
    attacks, benign = overflows(), normal()
    fr = Frames()
    caps = [connection(fr, 20000 + i, segs) for i, (segs, _) in enumerate(attacks.values())]
    caps += [connection(fr, 30000 + i, [req]) for i, req in enumerate(benign.values())]
    t0 = time.perf_counter()
    got, _, alerts = _replay("httpguard", caps, cfg.cpu)
    wall = time.perf_counter() - t0
    through = [name for i, (name, (_, marker)) in enumerate(attacks.items())
               if marker in _stream(got.get(20000 + i, {}), caps[i][2])]
    damaged = [name for i, (name, req) in enumerate(benign.items())
               if _stream(got.get(30000 + i, {}), caps[len(attacks) + i][2]) != req]
    sigs: dict = {}
    for a in alerts:
        f = a.get("fields", {})
        if f.get("event") == "overflow":
            sigs[f["signature"]] = sigs.get(f["signature"], 0) + 1
    section["overflows"] = {"requests": len(attacks), "reached_server": len(through), "share": len(through) / len(attacks),
                            "through": through, "stopped_by": sigs, "wall_s": round(wall, 2)}
    section["normal"] = {"requests": len(benign), "damaged": damaged, "share": len(damaged) / len(benign)}
    failures += bool(through) + bool(damaged)
    progress(f"  httpguard overflows: {len(through)}/{len(attacks)} reached the server; normal requests: "
             f"{len(damaged)}/{len(benign)} damaged ({wall:.1f} s)")
    # latency
    kinds = {"GET": benign["GET"], "long allowed query": benign["long allowed query"],
             "POST form": benign["POST form"]}

    def caps_of(req):
        fr = Frames()
        return [connection(fr, 40000 + i, [req]) for i in range(cfg.requests)]
    blocks, failed = latency_rounds("httpguard", 9, cfg.rounds, kinds, cfg.requests, caps_of,
                                    lambda c, caps: _replay(c, caps, cfg.cpu, timed=True)[1], progress)
    failures += failed
    summarize_latency(section, "httpguard", kinds, blocks)
    section["status"] = "ran" if not failures else f"ran ({failures} failures, see the section)"
    return section


def report_lines(sec: dict) -> list[str]:
    if not sec.get("status", "").startswith("ran"):
        return [f"httpguard: {sec.get('status')}"]
    ov, nm = sec["overflows"], sec["normal"]
    lines = [f"httpguard ({sec['status']}): examples/httpguard.toml in the replay harness, one core",
             f"  overflow requests reaching the server: {ov['reached_server']}/{ov['requests']} {ov['through'] or ''}",
             f"  normal requests damaged or stopped: {len(nm['damaged'])}/{nm['requests']} {nm['damaged'] or ''}",
             "  last byte of the request in -> delivered to the server (median over rounds of per-round medians)"]
    return lines + latency_lines(sec, "httpguard")
