"""The web-download scanner, host-side: evasions that get through, clean downloads damaged, latency added.

``python3 -m vhostni.bench --only webdl`` (part of ``make bench``; no guests, about half a minute).  Everything
runs in the offline-replay harness (:mod:`vhostni.replay`: the C switch with sink ports, the NI kernel and the
scanner as a sandboxed process), with ``examples/webdl.toml`` as it ships (digest table with EICAR, no clamd), fed
synthetic captures built in memory, one TCP connection per download, the guest as client:

* **evasions**: the 502 HTTP Evader deliveries of EICAR (``tests/data/http-evader``, from OISF's suricata-verify;
  only in a checkout): the share whose response's last byte reaches the guest (goal: 0), and how each was stopped.
* **clean downloads**: responses with Content-Length (1 KiB, 60 KiB, 1 MiB), chunked, gzip-compressed and chunked,
  close-delimited (HTTP/1.0), and three pipelined on one keep-alive connection: the share not delivered byte for
  byte (goal: 0).  The guest acknowledges a response after its last byte came in (a receiver whose NI holds the
  response), segment by segment, so the NI can deliver a response larger than the window.
* **latency**: the time from handing the segment with a response's last byte to the switch to that byte's
  delivery to the guest, with no policy (the C path alone) and with the scanner (its wait for the whole
  response, decoding, SHA-256, the release of the held segments), for responses that fit the guest's window
  (larger ones are released as the guest acknowledges, which a capture cannot pace), and for an infected one the
  time to the policy's "blocked" response that replaces it (or the RST that kills it).

Each round runs both configurations in alternating order; a figure is the median over rounds.
"""
from __future__ import annotations

import base64
import gzip
import json
import time
import tomllib
import zlib
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from ._replaykit import latency_lines, latency_rounds, replay, summarize_latency
from ._replaykit import stream as _stream
from .scanners import REPO
from .streams import ACK, FIN, MAC_G, PSH, RST, Conn, Frames, _mac, _parse, _payload

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
CASES = REPO / "tests" / "data" / "http-evader" / "cases.jsonl.gz"
MSS = 1460


@dataclass
class WebBenchConfig:
    rounds: int = 3
    downloads: int = 30             # per kind and round, latency
    cpu: Optional[int] = 0


def policy_doc(config: str) -> Optional[dict]:
    if config == "plain":
        return None
    path = REPO / "examples" / "webdl.toml"
    doc = tomllib.loads(path.read_text())
    doc.setdefault("ni", {})["mac"] = MAC_G
    for sc in doc.get("scanner", []):
        sc["program"] = str((path.parent / sc["program"]).resolve())
        sc["messages_per_second"] = 1_000_000
        sc["alerts_per_second"] = 10000
        sc.setdefault("config", {})["clamd_socket"] = ""
    return doc


def _replacement() -> bytes:
    """The stream injection examples/webdl.toml replaces infected responses with (b"" if none)."""
    doc = tomllib.loads((REPO / "examples" / "webdl.toml").read_text())
    name = doc["scanner"][0].get("config", {}).get("replacement_injection", "")
    for inj in doc["scanner"][0].get("inject", []):
        if inj.get("name") == name and "stream" in inj:
            return inj["stream"].encode()
    return b""


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: dl.bench.test\r\nUser-Agent: Wget\r\n\r\n".encode()


def _resp(body: bytes, *headers: bytes, length: bool = True, version: bytes = b"HTTP/1.1") -> bytes:
    h = version + b" 200 OK\r\nContent-Type: application/octet-stream\r\n" + b"".join(x + b"\r\n" for x in headers)
    return h + (b"Content-Length: %d\r\n" % len(body) if length else b"") + b"\r\n" + body


def _chunked(data: bytes, size: int = 4096) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
                    for i in range(0, len(data), size)) + b"0\r\n\r\n"


def clean_downloads() -> dict:
    """kind -> (requests, responses as the server sends them)."""
    rnd = bytes((i * 131 + (i >> 7)) % 251 for i in range(1 << 20))
    text = b"".join(b"line %d of a text file that compresses well\n" % i for i in range(60000))
    return {
        "1 KiB": (_get("/a"), _resp(rnd[:1024])),
        "60 KiB": (_get("/b"), _resp(rnd[:61440])),
        "1 MiB": (_get("/c"), _resp(rnd)),
        "chunked 256 KiB": (_get("/d"), _resp(_chunked(rnd[:262144]), b"Transfer-Encoding: chunked", length=False)),
        "gzip+chunked 2.6 MB text": (_get("/e"), _resp(_chunked(gzip.compress(text)), b"Content-Encoding: gzip",
                                                       b"Transfer-Encoding: chunked", length=False)),
        "close-delimited 1.0": (b"GET /f HTTP/1.0\r\n\r\n", _resp(rnd[:30000], length=False, version=b"HTTP/1.0")),
        "keep-alive x3": (_get("/g") * 3, _resp(rnd[:5000]) + _resp(zlib.compress(rnd[:9000]), b"Content-Encoding: deflate")
                          + _resp(_chunked(rnd[:7000]), b"Transfer-Encoding: chunked", length=False)),
    }


def latency_downloads() -> dict:
    rnd = bytes((i * 131 + (i >> 7)) % 251 for i in range(61440))
    return {"1 KiB": _resp(rnd[:1024]), "60 KiB": _resp(rnd),
            "gzip 60 KiB": _resp(gzip.compress(rnd), b"Content-Encoding: gzip"),
            "infected (replaced)": _resp(EICAR)}


def download(fr: Frames, cport: int, req: bytes, res: bytes) -> tuple[list, int, int]:
    """Frames of one download; returns them, the index of the one with the response's last byte, and the
    server's initial sequence number + 1."""
    c = Conn(fr, cport, 80)
    out = c.open()
    base = c.nxt[False]
    out.append(c.seg(True, ACK | PSH, req))
    for i in range(0, len(res), MSS):
        out.append(c.fr.tcp(False, 80, cport, base + i, c.nxt[True], ACK | PSH, res[i:i + MSS]))
    last = len(out) - 1
    c.nxt[False] = base + len(res)
    out.append(c.seg(False, FIN | ACK))
    for i in range(MSS * 8, len(res), MSS * 8):      # the guest acknowledges, 8 segments at a time
        out.append(c.fr.tcp(True, cport, 80, c.nxt[True], base + i, ACK))
    out += [c.seg(True, FIN | ACK)]
    return out, last, base


def _replay(config: str, captures: list, cpu: Optional[int], timed: bool = False) -> tuple[dict, list, list]:
    """Replays the downloads (frames, last, base) one after another; returns the delivered server bytes by
    client port, the latencies (s) of the last bytes (or kills), and the alerts."""
    pol = _parse(policy_doc(config), config)
    got: dict = {}

    def collect(f):
        if len(f) >= 54 and f[12:14] == b"\x08\x00" and f[23] == 6:
            ihl = (f[14] & 15) * 4
            sport, dport, seq = int.from_bytes(f[14 + ihl:16 + ihl], "big"), \
                int.from_bytes(f[16 + ihl:18 + ihl], "big"), int.from_bytes(f[18 + ihl:22 + ihl], "big")
            if sport == 80:
                got.setdefault(dport, {})[seq] = _payload(f)

    rep = _replacement()

    def ends(x: bytes, tail: bytes) -> bool:       # the last byte, the RST of a kill, or the replacement
        return _payload(x) == tail or _rst_to_guest(x) or bool(rep) and _payload(x).endswith(rep)
    lat, alerts = replay(pol, "w", captures, cpu, timed, collect, ends)
    return got, lat, alerts


def _rst_to_guest(f: bytes) -> bool:
    return len(f) >= 54 and f[12:14] == b"\x08\x00" and f[23] == 6 and f[:6] == _mac(MAC_G) \
        and bool(f[14 + (f[14] & 15) * 4 + 13] & RST)


def run_webdl(cfg: WebBenchConfig, progress: Callable[[str], None] = print) -> dict:
    section: dict = {"config": asdict(cfg)}
    try:
        import vhostni._fastpath  # noqa: F401
    except ImportError as exc:
        section["status"] = f"skipped: the C fast path is not built ({exc})"
        return section
    failures = 0
    # evasions
    if CASES.exists():
        with gzip.open(CASES, "rt") as f:
            cases = [json.loads(line) for line in f]
        fr = Frames()
        caps = [download(fr, 20000 + i, base64.b64decode(c["request"]), base64.b64decode(c["response"]))
                for i, c in enumerate(cases)]
        t0 = time.perf_counter()
        got, _, alerts = _replay("webdl", caps, cfg.cpu)
        wall = time.perf_counter() - t0
        rep = _replacement()
        through, how = [], {}
        for i, (c, (_, _, base)) in enumerate(zip(cases, caps)):
            res = base64.b64decode(c["response"])
            d = _stream(got.get(20000 + i, {}), base)
            if rep and d.endswith(rep):       # replaced by the policy's "blocked" response
                d = d[:-len(rep)]
            if len(d) >= len(res) or not res.startswith(d):
                through.append(c["case"])
        first: dict = {}
        for a in alerts:
            f = a.get("fields", {})
            if f.get("action") in ("kill", "replace") and a.get("flow"):
                first.setdefault(a["flow"].get("dport"), f)
        for f in first.values():
            key = f.get("kind") if f.get("event") == "ambiguity" else f"{f.get('event')} ({f.get('action')})"
            how[key] = how.get(key, 0) + 1
        section["evasions"] = {"cases": len(cases), "reached_guest": len(through), "share": len(through) / len(cases),
                               "through": through[:50], "stopped_as": dict(sorted(how.items(), key=lambda x: -x[1])),
                               "wall_s": round(wall, 2)}
        failures += bool(through)
        progress(f"  webdl evasions: {len(through)}/{len(cases)} reached the guest ({wall:.1f} s)")
    else:
        section["evasions"] = {"status": f"skipped: {CASES} is not here (not a checkout)"}
    # clean downloads, byte for byte
    fr = Frames()
    kinds = clean_downloads()
    caps = [download(fr, 30000 + i, req, res) for i, (req, res) in enumerate(kinds.values())]
    got, _, alerts = _replay("webdl", caps, cfg.cpu)
    damaged = [k for i, (k, (_, res)) in enumerate(kinds.items())
               if _stream(got.get(30000 + i, {}), caps[i][2]) != res]
    section["clean"] = {"downloads": len(kinds), "damaged": damaged, "share": len(damaged) / len(kinds),
                        "alerts": [a.get("message") for a in alerts if "ready" not in a.get("message", "")][:10]}
    failures += bool(damaged)
    progress(f"  webdl clean downloads: {len(damaged)}/{len(kinds)} damaged or killed")
    # latency
    lat_kinds = latency_downloads()

    def caps_of(res):
        fr = Frames()
        return [download(fr, 40000 + i, _get("/x"), res) for i in range(cfg.downloads)]
    blocks, failed = latency_rounds("webdl", 6, cfg.rounds, lat_kinds, cfg.downloads, caps_of,
                                    lambda c, caps: _replay(c, caps, cfg.cpu, timed=True)[1], progress,
                                    skip=lambda c, kind: c == "plain" and kind.startswith("infected"))
    failures += failed
    summarize_latency(section, "webdl", lat_kinds, blocks)
    section["status"] = "ran" if not failures else f"ran ({failures} failures, see the section)"
    return section


def report_lines(sec: dict) -> list[str]:
    if not sec.get("status", "").startswith("ran"):
        return [f"webdl: {sec.get('status')}"]
    ev, cl = sec.get("evasions", {}), sec["clean"]
    lines = [f"webdl ({sec['status']}): examples/webdl.toml in the replay harness, one core"]
    if "cases" in ev:
        lines.append(f"  HTTP Evader deliveries of EICAR reaching the guest: {ev['reached_guest']}/{ev['cases']}")
    else:
        lines.append(f"  HTTP Evader: {ev.get('status')}")
    lines.append(f"  clean downloads damaged or killed: {len(cl['damaged'])}/{cl['downloads']} {cl['damaged'] or ''}")
    lines.append("  last byte of the response in -> delivered (median over rounds of per-round medians)")
    return lines + latency_lines(sec, "webdl")
