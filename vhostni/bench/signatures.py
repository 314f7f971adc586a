"""Signature matcher (the payload stage, csrc/sig.c): throughput and rule compile time, host-side.

In one process and run: Hyperscan's own stream-mode scan of the same bytes with the same database
(its physical limit here) against the engine (Hyperscan plus exact confirmation, history and
pending bookkeeping), both over ``streams`` streams fed round-robin in ``chunk``-byte pieces by a
C loop (``vn_sig_bench_streams``: no Python per chunk).  The rules never match the data, as in the
issue's goal (1,000+ rules, mostly content, some pcre); then the time to parse and compile
``compile_rules`` rules.

In-line (``inline``): the same rules as a policy's signature stage on an NI of the C switch, host-side,
one core: ``streams`` TCP connections (even ones upload, odd ones download; an ACK every second segment;
handshakes and FINs) carrying make_data()'s text in ``chunk``-byte segments, injected by a C loop
(``vn_sig_bench_switch``) into two sink ports and drained as they come out.  Three figures in one run,
as payload Gbit/s: plain forwarding (the NI has a policy, no rules), forwarding with the stage (the TCP
engine tracks, holds and reassembles every connection, the stage scans each byte before release), and
Hyperscan's own stream scan of the same payload in the same chunks (``vn_sig_bench_streams`` raw).
"""
from __future__ import annotations

import os
import random
import statistics
import struct
import time
from dataclasses import dataclass

from .._fastpath import ffi, lib
from ..signatures.engine import SignatureDB
from ..signatures.rules import Vars, parse_rules


@dataclass
class SigBenchConfig:
    rules: int = 1500
    pcre_share: float = 0.1
    near_share: float = 0.02
    mbytes: int = 64
    chunk: int = 1460
    streams: int = 16
    rounds: int = 5
    compile_rules: int = 10000
    inline: bool = True
    inline_mbytes: int = 32
    inline_http: bool = True        # the same rules as HTTP rules over coherent HTTP request streams


def vocabulary(seed: int = 2) -> list[bytes]:
    rng = random.Random(seed)
    return [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789/._-=") for _ in range(rng.randint(2, 12)))
            for _ in range(4096)]


def make_rules(n: int, pcre_share: float, near_share: float = 0.02, seed: int = 1) -> str:
    """``n`` realistic-looking rules that never match make_data()'s bytes: random literals of
    6-14 characters from the data's own alphabet (so Hyperscan cannot skip the data by looking
    for a byte it never has), chains with distance/within, nocase, a share of pcre rules, and a
    share of *near* rules whose fast pattern is a word the data has all the time while the rule
    as a whole never matches (so confirmations run, as they do on real traffic)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    common = [w.decode() for w in vocabulary() if len(w) >= 8]

    def word(lo=6, hi=14):
        return "".join(rng.choice(letters) for _ in range(rng.randint(lo, hi)))

    out = []
    for i in range(n):
        sid = 2_000_000 + i
        x = rng.random()
        if x < near_share:
            body = (f'content:"{rng.choice(common)}"; fast_pattern; content:"{word(8, 12)}"; '
                    f'distance:0; within:{rng.randint(40, 400)};')
        elif x < near_share + pcre_share:
            body = (f'content:"{word()}"; pcre:"/{word(3, 5)}[0-9]{{2,4}}\\s*{word(3, 6)}/i"; '
                    if rng.random() < 0.5 else f'pcre:"/{word(5, 7)}(\\d+|[a-f]{{3}})\\w*Q/";')
        else:
            parts = [f'content:"{word(8, 14)}";']
            if rng.random() < 0.3:
                parts.append("nocase;")
            for _ in range(rng.randint(0, 2)):
                parts.append(f'content:"{word(3, 8)}"; distance:{rng.randint(0, 20)};')
                if rng.random() < 0.5:
                    parts.append(f"within:{rng.randint(20, 200)};")
            body = " ".join(parts)
        out.append(f'alert tcp any any -> $HOME_NET any (msg:"bench {i}"; flow:to_server,established; '
                   f"{body} sid:{sid}; rev:1;)")
    return "\n".join(out)


def make_data(nbytes: int, seed: int = 3) -> bytes:
    """HTTP-like request text made of vocabulary() words."""
    rng = random.Random(seed)
    words = vocabulary()
    parts, size = [], 0
    while size < nbytes:
        line = b"GET /" + b"/".join(rng.choice(words) for _ in range(6)) + b" HTTP/1.1\r\nHost: " + \
            rng.choice(words) + b"\r\nUser-Agent: " + b" ".join(rng.choice(words) for _ in range(8)) + b"\r\n\r\n"
        parts.append(line)
        size += len(line)
    return b"".join(parts)[:nbytes]


def _gbit(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e9


def run_signatures(cfg: SigBenchConfig, progress=print) -> dict:
    vars = Vars(home=["10.0.0.2"])
    rs = parse_rules(make_rules(cfg.rules, cfg.pcre_share, cfg.near_share), vars, "bench.rules")
    if rs.problems:
        return {"status": f"bench rules rejected: {rs.problems[0]}"}
    db = SignatureDB(rs.rules, "stream")
    if db.problems:
        return {"status": f"bench rules rejected by the engine: {db.problems[0]}"}
    data = make_data(cfg.mbytes << 20)
    progress(f"signatures: {len(rs.rules)} rules ({cfg.pcre_share:.0%} with pcre), {cfg.mbytes} MiB in "
             f"{cfg.chunk}-byte chunks over {cfg.streams} streams, {cfg.rounds} rounds")
    raw_s, eng_s = [], []
    for r in range(cfg.rounds):
        for raw, acc in ((1, raw_s), (0, eng_s)):
            t = time.perf_counter()
            n = lib.vn_sig_bench_streams(db._db, data, len(data), cfg.chunk, cfg.streams, raw)
            acc.append(time.perf_counter() - t)
            if n < 0:
                return {"status": f"scan failed: {n}"}
            if not raw and n:
                return {"status": f"{n} matches: the bench rules should never match"}
    stats = db.stats()
    raw_best, eng_best = min(raw_s), min(eng_s)
    res = {
        "status": "ran", "rules": len(rs.rules), "pcre_share": cfg.pcre_share, "near_share": cfg.near_share, "bytes": len(data),
        "chunk": cfg.chunk, "streams": cfg.streams, "rounds": cfg.rounds,
        "hyperscan_gbit_median": _gbit(len(data), statistics.median(raw_s)),
        "engine_gbit_median": _gbit(len(data), statistics.median(eng_s)),
        "hyperscan_gbit_best": _gbit(len(data), raw_best),
        "engine_gbit_best": _gbit(len(data), eng_best),
        "ratio_engine_to_hyperscan_median": statistics.median(raw_s) / statistics.median(eng_s),
        "ratio_engine_to_hyperscan_best": raw_best / eng_best,
        "anchor_hits": stats["hits"], "confirmations": stats["evals"],
        "hs_stream_state_bytes": stats["hs_stream_size"], "lookback": stats["lookback"],
        "loadavg": os.getloadavg(),
    }
    db.close()
    if cfg.inline:
        res.update(run_inline(cfg, make_rules(cfg.rules, cfg.pcre_share, cfg.near_share), progress))
    if cfg.inline_http:
        res.update(run_inline_http(cfg, make_rules(cfg.rules, cfg.pcre_share, cfg.near_share), progress))
    if cfg.compile_rules <= 0:
        return res
    progress(f"signatures: compiling {cfg.compile_rules} rules")
    text = make_rules(cfg.compile_rules, cfg.pcre_share, cfg.near_share, seed=4)
    t = time.perf_counter()
    rs = parse_rules(text, vars, "compile.rules")
    t_parse = time.perf_counter() - t
    t = time.perf_counter()
    groups = rs.groups()
    for (mode, _, _), group in groups.items():
        SignatureDB(group, mode).close()
    t_build = time.perf_counter() - t
    res.update({"compile_rules": rs.accepted, "compile_parse_s": t_parse, "compile_build_s": t_build,
                "compile_total_s": t_parse + t_build})
    return res


def inline_capture(streams: int, nbytes: int, mss: int) -> tuple[bytes, bytes, int]:
    """(the pack vn_sig_bench_switch reads, the payload in the order it is sent, payload bytes)."""
    from .streams import ACK, PSH, Conn, Frames
    fr = Frames()
    data = make_data(nbytes * streams)
    conns = [Conn(fr, 30000 + i, 80) for i in range(streams)]
    out, payload = [], []

    def put(from_guest: bool, frame: bytes) -> None:
        out.append(struct.pack("<BH", 0 if from_guest else 1, len(frame)) + frame)

    for c in conns:
        for k, f in enumerate(c.open()):
            put(k != 1, f)
    left, pos, sent = [nbytes] * streams, 0, [0] * streams
    while any(left):
        for i, c in enumerate(conns):
            if not left[i]:
                continue
            up = i % 2 == 0
            n = min(mss, left[i])
            piece = data[pos:pos + n]
            pos += n
            payload.append(piece)
            put(up, c.seg(up, ACK | PSH, piece))
            left[i] -= n
            sent[i] += 1
            if sent[i] % 2 == 0 or not left[i]:
                put(not up, c.seg(not up, ACK))
    for c in conns:
        for k, f in enumerate(c.close()):
            put(k != 1, f)
    return b"".join(out), b"".join(payload), nbytes * streams


def _switch_run(stage, pack: bytes) -> tuple[float, int, dict]:
    """One pass of the pack through a fresh switch, the NI with ``stage`` (None: plain
    forwarding): (seconds, bytes delivered, the NI's port stats)."""
    from ..fastpath import Switch
    from ..policy import parse_policy
    with Switch() as sw:
        g, n = sw.add_sink_port(), sw.add_sink_port()
        g.set_policy(parse_policy({"ni": {}}).compile([], []))
        if stage is not None:
            g.set_sigstage(stage)
        t = time.perf_counter()
        got = lib.vn_sig_bench_switch(sw._sw, g.index, n.index, pack, len(pack))
        secs = time.perf_counter() - t
        st = g.stats()
        g.set_sigstage(None)
    return secs, got, st


def run_inline(cfg: SigBenchConfig, text: str, progress=print) -> dict:
    """Forwarding with and without the stage, and Hyperscan alone, in one run (see the module doc)."""
    from ..signatures.stage import Stage
    vars = Vars(home=["10.78.0.1"])
    rs = parse_rules(text.replace("flow:to_server,established;", "flow:established;")
                     .replace("-> $HOME_NET any", "-> any any"), vars, "bench.rules")   # both ways
    stage = Stage(rs.rules)
    if stage.problems:
        return {"inline_status": f"bench rules rejected: {stage.problems[0]}"}
    per = (cfg.inline_mbytes << 20) // cfg.streams
    pack, payload, nbytes = inline_capture(cfg.streams, per, cfg.chunk)
    progress(f"signatures in-line: {len(rs.rules)} rules, {nbytes >> 20} MiB over {cfg.streams} TCP "
             f"connections through the switch, {cfg.rounds} rounds")
    db = SignatureDB(rs.rules, "stream")
    fwd_s, sig_s, raw_s = [], [], []
    delivered = {}
    try:
        for r in range(cfg.rounds):
            order = (("plain", fwd_s), ("stage", sig_s)) if r % 2 == 0 else (("stage", sig_s), ("plain", fwd_s))
            for what, acc in order:
                secs, delivered[what], st = _switch_run(stage if what == "stage" else None, pack)
                acc.append(secs)
                if what == "stage" and (st["sig_matches"] or st["sig_stream_bytes"] != nbytes):
                    return {"inline_status": f"stage scanned {st['sig_stream_bytes']} of {nbytes} bytes, "
                                             f"{st['sig_matches']} matches"}
            t = time.perf_counter()
            lib.vn_sig_bench_streams(db._db, payload, len(payload), cfg.chunk, cfg.streams, 1)
            raw_s.append(time.perf_counter() - t)
    finally:
        db.close()
    if delivered.get("plain") != delivered.get("stage") or (delivered.get("plain") or 0) < nbytes:
        return {"inline_status": f"delivered bytes differ: {delivered}"}
    f, s_, h = (statistics.median(x) for x in (fwd_s, sig_s, raw_s))
    return {"inline_status": "ran", "inline_bytes": nbytes, "inline_rules": len(rs.rules),
            "inline_forward_gbit": _gbit(nbytes, f), "inline_stage_gbit": _gbit(nbytes, s_),
            "inline_hyperscan_gbit": _gbit(nbytes, h),
            "inline_ratio_stage_to_forward": f / s_, "inline_ratio_stage_to_hyperscan": h / s_}


HTTP_BUFFERS_ROTATION = ("http.uri", "http.header", "http.user_agent", "http.host")


def http_rules(text: str) -> str:
    """The bench's rules as HTTP rules: each rule's contents in one HTTP buffer (rotating over
    http.uri, http.header, http.user_agent, http.host), as rule sets write most web rules."""
    out = []
    for i, line in enumerate(text.splitlines()):
        buf = HTTP_BUFFERS_ROTATION[i % len(HTTP_BUFFERS_ROTATION)]
        out.append(line.replace("flow:to_server,established;", f"flow:to_server,established; {buf};", 1)
                   .replace("-> $HOME_NET any", "-> any any", 1))
    return "\n".join(out)


def http_capture(streams: int, nbytes: int, mss: int) -> tuple[bytes, int, int]:
    """Like inline_capture, but every connection carries its own whole requests from the client
    (an HTTP reader needs coherent streams): (the pack, payload bytes, requests)."""
    from .streams import ACK, PSH, Conn, Frames
    fr = Frames()
    conns = [Conn(fr, 31000 + i, 80) for i in range(streams)]
    datas = []
    for i in range(streams):
        d = make_data(nbytes + 4096, seed=10 + i)
        datas.append(d[:d.rfind(b"\r\n\r\n", 0, nbytes) + 4])
    out = []

    def put(from_guest: bool, frame: bytes) -> None:
        out.append(struct.pack("<BH", 0 if from_guest else 1, len(frame)) + frame)

    for c in conns:
        for k, f in enumerate(c.open()):
            put(k != 1, f)
    at, sent = [0] * streams, [0] * streams
    while any(at[i] < len(datas[i]) for i in range(streams)):
        for i, c in enumerate(conns):
            if at[i] >= len(datas[i]):
                continue
            piece = datas[i][at[i]:at[i] + mss]
            at[i] += len(piece)
            put(True, c.seg(True, ACK | PSH, piece))
            sent[i] += 1
            if sent[i] % 2 == 0 or at[i] >= len(datas[i]):
                put(False, c.seg(False, ACK))
    for c in conns:
        for k, f in enumerate(c.close()):
            put(k != 1, f)
    return b"".join(out), sum(map(len, datas)), sum(d.count(b"\r\n\r\n") for d in datas)


def run_inline_http(cfg: SigBenchConfig, text: str, progress=print) -> dict:
    """The in-line stage with the rules as HTTP rules (csrc/http.c reads every request, the
    rules match its buffers) against plain forwarding of the same requests, alternated."""
    from ..signatures.stage import Stage
    rs = parse_rules(http_rules(text), Vars(home=["10.78.0.1"]), "bench-http.rules")
    if rs.problems:
        return {"http_status": f"bench rules rejected: {rs.problems[0]}"}
    stage = Stage(rs.rules)
    if stage.problems:
        return {"http_status": f"bench rules rejected: {stage.problems[0]}"}
    pack, nbytes, nreq = http_capture(cfg.streams, (cfg.inline_mbytes << 20) // cfg.streams, cfg.chunk)
    progress(f"signatures in-line, HTTP rules: {len(rs.rules)} rules, {nbytes >> 20} MiB of {nreq} requests over "
             f"{cfg.streams} connections, {cfg.rounds} rounds")
    fwd_s, sig_s, delivered = [], [], {}
    for r in range(cfg.rounds):
        order = (("plain", fwd_s), ("stage", sig_s)) if r % 2 == 0 else (("stage", sig_s), ("plain", fwd_s))
        for what, acc in order:
            secs, delivered[what], st = _switch_run(stage if what == "stage" else None, pack)
            acc.append(secs)
            if what == "stage" and (st["sig_matches"] or st["sig_http_errors"] or st["sig_http_requests"] != nreq):
                return {"http_status": f"stage read {st['sig_http_requests']} of {nreq} requests, "
                                       f"{st['sig_matches']} matches, {st['sig_http_errors']} errors"}
    if delivered.get("plain") != delivered.get("stage") or (delivered.get("plain") or 0) < nbytes:
        return {"http_status": f"delivered bytes differ: {delivered}"}
    f, s_ = statistics.median(fwd_s), statistics.median(sig_s)
    return {"http_status": "ran", "http_bytes": nbytes, "http_requests": nreq, "http_rules": len(rs.rules),
            "http_forward_gbit": _gbit(nbytes, f), "http_stage_gbit": _gbit(nbytes, s_),
            "http_requests_per_s": nreq / s_, "http_ratio_stage_to_forward": f / s_}


def report_lines(r: dict) -> list[str]:
    if r.get("status") != "ran":
        return [f"signatures: {r.get('status')}"]
    lines = [
        f"signatures: {r['rules']} never-matching rules ({r['pcre_share']:.0%} pcre, "
        f"{r['near_share']:.0%} with a fast pattern the data has), "
        f"{r['bytes'] >> 20} MiB in {r['chunk']}-byte chunks over {r['streams']} streams, one core",
        f"  Hyperscan stream mode alone  {r['hyperscan_gbit_median']:6.2f} Gbit/s (best {r['hyperscan_gbit_best']:.2f})",
        f"  engine (HS + confirmation)   {r['engine_gbit_median']:6.2f} Gbit/s (best {r['engine_gbit_best']:.2f})"
        f"   engine/Hyperscan {r['ratio_engine_to_hyperscan_median']:.2f} (goal >= 0.6; >= 3 Gbit/s)",
        f"  anchor hits {r['anchor_hits']}, exact confirmations {r['confirmations']}; load average "
        f"{r['loadavg'][0]:.1f} at the end (others' load makes both figures swing)",
    ]
    if r.get("inline_status") == "ran":
        lines += [
            f"  in-line, {r['streams']} TCP connections through the switch ({r['inline_bytes'] >> 20} MiB payload):",
            f"    plain forwarding             {r['inline_forward_gbit']:6.2f} Gbit/s",
            f"    with the signature stage     {r['inline_stage_gbit']:6.2f} Gbit/s   "
            f"stage/plain {r['inline_ratio_stage_to_forward']:.2f}",
            f"    Hyperscan alone, same bytes  {r['inline_hyperscan_gbit']:6.2f} Gbit/s   "
            f"stage/Hyperscan {r['inline_ratio_stage_to_hyperscan']:.2f} (goal >= 0.6; >= 3 Gbit/s)"]
    elif "inline_status" in r:
        lines.append(f"  in-line: {r['inline_status']}")
    if r.get("http_status") == "ran":
        lines += [
            f"  in-line, the rules as HTTP rules, {r['http_requests']} requests ({r['http_bytes'] >> 20} MiB) "
            f"over {r['streams']} connections:",
            f"    plain forwarding             {r['http_forward_gbit']:6.2f} Gbit/s",
            f"    with the HTTP rules          {r['http_stage_gbit']:6.2f} Gbit/s   "
            f"stage/plain {r['http_ratio_stage_to_forward']:.2f}  ({r['http_requests_per_s'] / 1e3:.0f} k requests/s)"]
    elif "http_status" in r:
        lines.append(f"  in-line, HTTP rules: {r['http_status']}")
    if "compile_total_s" in r:
        lines.append(f"  compile {r['compile_rules']} rules: {r['compile_total_s']:.2f} s (parse "
                     f"{r['compile_parse_s']:.2f} s, Hyperscan+PCRE2 {r['compile_build_s']:.2f} s; goal <= 10 s)")
    return lines
