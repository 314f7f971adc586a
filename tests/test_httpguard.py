"""The HTTP overflow stage (scanners/httpguard): URI normalisation, field-length signatures
(the shipped historic ones: Code-Red, Code-Red II, .printer, .htr, WebDAV, chunked sizes; the
policy's own), holding a request until it is checked, the evasions (1-byte segments, pipelining,
encodings, chunked bodies), the reply in the server's place, and the fake-clock hold bound.
The scanner in the NI kernel and in offline replay is tested in tests/test_httpguard_ni.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # scanners/ is not an installed package

from scanners.httpguard import BUILTIN_SIGNATURES, ConfigError, HttpGuard, load_config  # noqa: E402
from vhostni.scanner.http1 import CLIENT, HttpConnection, Request  # noqa: E402
from vhostni.scanner.httpuri import normalise  # noqa: E402

FROM_GUEST, TO_GUEST = 1, 2
# Code-Red's request as the worm sent it (CERT CA-2001-19, eEye's analysis): 224 N (Code-Red II:
# X), the %u-encoded jump into the worm's body, "=a", then the worm itself as the body
CR_SHELL = (b"%u9090%u6858%ucbd3%u7801%u9090%u6858%ucbd3%u7801%u9090%u6858%ucbd3%u7801"
            b"%u9090%u9090%u8190%u00c3%u0003%u8b00%u531b%u53ff%u0078%u0000%u00=a")
CR_BODY = bytes((i * 13 + 0x55) % 256 for i in range(3379))


def codered(fill: bytes = b"N") -> bytes:
    return (b"GET /default.ida?" + fill * 224 + CR_SHELL + b" HTTP/1.0\r\nContent-type: text/xml\r\n"
            b"Content-length: 3379\r\n\r\n" + CR_BODY)


CODERED, CODERED2 = codered(b"N"), codered(b"X")
GET = b"GET /index.html HTTP/1.1\r\nHost: www.example\r\nUser-Agent: Wget\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
REPLY = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 53\r\nConnection: close\r\n\r\n"
         b"This request was blocked by the network interface.\r\n")


def chunked(data: bytes, size: int = 100) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
                    for i in range(0, len(data), size)) + b"0\r\n\r\n"


def post(path: bytes, body: bytes, chunk: int = 0) -> bytes:
    if chunk:
        return (b"POST " + path + b" HTTP/1.1\r\nHost: www.example\r\nTransfer-Encoding: chunked\r\n\r\n"
                + chunked(body, chunk))
    return b"POST " + path + b" HTTP/1.1\r\nHost: www.example\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def run(core: HttpGuard, client: bytes, server: bytes = b"", step: int = 0, inbound: bool = True,
        now: float = 0.0, sid: int = 1) -> list:
    """The client's bytes in ``step``-byte pieces (0: at once), then the server's."""
    cdir, sdir = (TO_GUEST, FROM_GUEST) if inbound else (FROM_GUEST, TO_GUEST)
    acts = core.open(sid, 80, not inbound, ("tcp", "10.0.0.9", 40000, "10.0.0.1", 80), now)
    for d, data in ((cdir, client), (sdir, server)):
        n = step or max(1, len(data))
        for i in range(0, len(data), n):
            acts += core.data(sid, d, i, data[i:i + n], now)
    return acts


def passed(acts, direction=TO_GUEST) -> int:
    return max([a[2] for a in acts if a[0] == "pass" and a[1] == direction] or [0])


def killed(acts) -> bool:
    return any(a[0] == "kill" for a in acts)


def alerts(acts, what: str = "") -> list:
    return [a for a in acts if a[0] == "alert" and what in a[1]]


def overflow(acts) -> dict:
    (a,) = [a for a in acts if a[0] == "alert" and a[2].get("event") == "overflow"]
    return a[2]


def edited(wire: bytes, acts: list, direction: int, injections: dict) -> bytes:
    """``wire`` as the receiver gets it after the acts' injects and cuts."""
    out, at = b"", 0
    for a in acts:
        if a[0] == "inject" and a[1] == direction:
            out += wire[at:a[2]] + injections[a[3]]
            at = a[2]
        elif a[0] == "cut" and a[1] == direction:
            out += wire[at:a[2]]
            at = a[2] + a[3]
    return out + wire[at:]


# ---------------------------------------------------------------------------
# URIs as the server reads them
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("target,path,kinds", [
    (b"/index.html", "/index.html", []),
    (b"/a//b/./c/../d", "/a/b/d", ["double_slash", "dot_segment"]),
    (b"/%64efault.%69da", "/default.ida", []),
    (b"/scripts/..%c0%af../winnt/system32/cmd.exe", "/winnt/system32/cmd.exe",
     ["overlong_utf8", "dot_segment", "traversal"]),                                      # Nimda, CVE-2000-0884
    (b"/scripts/..%255c../winnt/system32/cmd.exe", "/winnt/system32/cmd.exe",
     ["double_encoding", "backslash", "dot_segment", "traversal"]),                       # Nimda, CVE-2001-0333
    (b"\\default.ida", "/default.ida", ["backslash"]),
    (b"/x%u002fdefault.ida", "/x/default.ida", ["percent_u"]),
    (b"/default.ida%00.html", "/default.ida\0.html", ["nul_in_uri"]),
    (b"http://h.example/a/../b?x", "/b", ["dot_segment"]),
    (b"/a%zz", "/a%zz", ["bad_percent"]),
    (b"/a#frag", "/a", ["fragment"]),
])
def test_targets_are_decoded_and_normalised_as_servers_read_them(target, path, kinds):
    u = normalise(target)
    assert u.path == path and u.kinds() == kinds


def test_every_reading_of_a_path_is_matched():
    assert "/default.ida" in normalise(b"/default.ida%00.html").paths          # NUL-truncated
    assert "/default.ida" in normalise(b"/default.ida.").paths                 # Windows drops trailing dots
    assert "/default.ida" in normalise(b"/default.ida%20").paths
    u = normalise(b"/scripts/..%255c..%255cdefault.ida")
    assert len(u.paths) >= 2                                                    # decoded once and twice


def test_path_info_prefixes_are_matched_without_building_them():
    """A script mapped by its extension runs with the rest of the path as PATH_INFO: every prefix
    at a segment boundary is a reading (trailing dots dropped, as Windows does).  They used to be
    built as strings, one per segment: a 16 KiB target of 8,000 segments made 8,000 strings of
    8 KB on average (~80 MB) and a second of the scanner's CPU per request."""
    u = normalise(b"/scripts/default.ida./x/y")
    assert u.matches("*.ida") and u.matches("/scripts/default.ida") and not u.matches("*.idq")
    assert normalise(b"/a/b.htr/c").matches("*.htr") and not normalise(b"/a/b.htrx/c").matches("*.htr")
    u = normalise(b"/a" * 8000)
    assert len(u.paths) <= 4 and sum(map(len, u.paths)) <= 4 * 16001    # the readings, not one per segment
    assert u.matches("/a/a/a") and not u.matches("*.ida")
    deep = normalise(b"/a" * 4000 + b"/default.ida/x")
    assert deep.matches("*.ida")


def test_a_target_of_many_segments_costs_linear_time():
    import time
    g = HttpGuard()
    req = b"GET " + b"/a." * 5300 + b" HTTP/1.1\r\nHost: x\r\n\r\n"       # 16 KiB, 5,300 segments
    t0 = time.process_time()
    acts = run(g, req)
    assert time.process_time() - t0 < 0.2         # was ~1.1 s (and ~80 MB)
    assert passed(acts) == len(req) and not killed(acts)
    acts = run(HttpGuard(), b"GET " + b"/a" * 4000 + b"/default.ida/x?" + b"N" * 300 + b" HTTP/1.0\r\n\r\n")
    assert killed(acts) and overflow(acts)["signature"] == "iis-ida-codered"


def test_query_lengths_count_decoded_code_units():
    u = normalise(b"/default.ida?" + b"N" * 224 + CR_SHELL)
    # 224 N, 22 whole %u escapes (one unit each), and "%u00=a" kept as it is (a malformed escape)
    assert len(u.query) == 224 + 22 + 6 and len(u.raw_query) == 224 + len(CR_SHELL)
    assert set(u.kinds()) >= {"percent_u", "bad_percent"}
    u = normalise(b"/s?q=a+b%20c&q=%41%41&empty&=v&p=1%2B1")
    assert u.params == [("q", "a b c"), ("q", "AA"), ("empty", ""), ("", "v"), ("p", "1+1")]


# ---------------------------------------------------------------------------
# Code-Red, Code-Red II and normal requests to the same server
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("worm", [CODERED, CODERED2], ids=["codered", "codered2"])
@pytest.mark.parametrize("step", [0, 1, 7, 1460])
def test_codered_never_reaches_the_server(worm, step):
    g = HttpGuard()
    acts = run(g, worm, step=step)
    assert killed(acts) and passed(acts) == 0
    f = overflow(acts)
    assert (f["signature"], f["field"], f["length"], f["limit"], f["cve"]) == (
        "iis-ida-codered", "query", 252, 200, "CVE-2001-0500")
    assert f["action"] == "kill" and f["method"] == "GET" and f["uri"].startswith("/default.ida?NNN"[:13])
    (a,) = alerts(acts, "http overflow")
    assert "query of 252 > 200 (iis-ida-codered, CVE-2001-0500)" in a[1]
    assert g.stats["overflows"] == 1 and g.stats["blocked"] == 1


@pytest.mark.parametrize("step", [0, 1, 9])
def test_normal_requests_pass_byte_for_byte(step):
    g = HttpGuard()
    client = (GET + b"GET /default.ida?q=short HTTP/1.1\r\nHost: www.example\r\n\r\n" + post(b"/form", b"a=1&b=2")
              + post(b"/upload", bytes(range(256)) * 20, chunk=333) + GET)
    server = OK * 5
    acts = run(g, client, server, step)
    assert not killed(acts) and not alerts(acts)
    assert passed(acts, TO_GUEST) == len(client) and passed(acts, FROM_GUEST) == len(server)
    assert g.stats["requests"] == 5


@pytest.mark.parametrize("req", [
    b"GET /search?q=" + b"x" * 6000 + b" HTTP/1.1\r\nHost: www.example\r\n\r\n",      # long query, no signature
    b"GET /default.ida?" + b"N" * 200 + b" HTTP/1.1\r\nHost: www.example\r\n\r\n",   # .ida at its limit
    b"GET /default.ida?" + b"%4e" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n",          # long on the wire, 200 decoded
    b"GET /index.html HTTP/1.1\r\nHost: " + b"h" * 1000 + b"\r\n\r\n",                # long Host, not .printer
    b"GET /" + b"d" * 3000 + b".html HTTP/1.1\r\nHost: a\r\n\r\n",                   # long path, not .htr
    b"PROPFIND /" + b"p" * 3000 + b" HTTP/1.1\r\nHost: a\r\nDepth: 1\r\n\r\n",        # WebDAV below its limit
    b"PROPFIND / HTTP/1.1\r\nHost: a\r\nIf: (<opaquelocktoken:e71d4fae-5dec-22d6-fea5-00a0c91e6be4>)\r\n\r\n",
    b"GET /cookie HTTP/1.1\r\nHost: a\r\nCookie: " + b"c" * 4000 + b"\r\n\r\n",
], ids=["long-query", "ida-at-limit", "ida-encoded", "long-host", "long-path", "webdav-3000", "if-lock", "cookie"])
def test_benign_long_but_allowed_requests_pass(req):
    acts = run(HttpGuard(), req + GET, step=500)
    assert not killed(acts) and not alerts(acts, "overflow") and passed(acts) == len(req + GET)


# ---------------------------------------------------------------------------
# The shipped signatures, each against the overflow it stops
# ---------------------------------------------------------------------------

HISTORIC = {
    "iis-printer-host": b"GET /NULL.printer HTTP/1.0\r\nHost: " + b"A" * 420 + b"\r\n\r\n",             # jill.c
    "iis-htr-path": b"GET /" + b"A" * 2900 + b".htr HTTP/1.0\r\n\r\n",                                  # iishack
    "iis-webdav-long-uri": b"SEARCH /" + b"A" * 20000 + b" HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    "iis-translate-long-uri": b"GET /" + b"A" * 9000 + b" HTTP/1.1\r\nTranslate: f\r\nHost: a\r\n\r\n",
    "iis6-webdav-if-header": (b"PROPFIND / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nIf: <http://localhost/aaaaaaa"
                              + "\u6f68\u7863\u7865\u4e6e\u6e69".encode() * 40 + b"> (Not <locktoken:write1>) "
                              b"<http://localhost/bbbbbbb" + "\u7365\u7468".encode() * 60 + b">\r\n\r\n"),  # CVE-2017-7269
    "chunk-size-overflow": (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"FFFFFF6E\r\n" + b"A" * 64 + b"\r\n0\r\n\r\n"),                            # apache-scalp
}


@pytest.mark.parametrize("name", sorted(HISTORIC))
def test_each_shipped_signature_stops_its_overflow(name):
    req = HISTORIC[name]
    g = HttpGuard({"max_line": 32768})
    acts = run(g, GET + req + GET, step=1000)
    assert killed(acts) and passed(acts) == len(GET)
    f = overflow(acts)
    sig = next(s for s in BUILTIN_SIGNATURES if s["name"] == name)
    assert f["signature"] == name and f["field"] == sig["field"] and f["length"] > f["limit"] == sig["max"]


def test_the_host_of_an_absolute_form_target_counts_as_the_host_header():
    req = b"GET http://" + b"A" * 420 + b"/NULL.printer HTTP/1.1\r\nHost: short\r\n\r\n"
    acts = run(HttpGuard(), req)
    assert killed(acts) and overflow(acts)["signature"] == "iis-printer-host" and overflow(acts)["length"] == 420


def test_disabling_a_shipped_signature_lets_its_request_through():
    acts = run(HttpGuard({"disable": ["iis-printer-host"]}), HISTORIC["iis-printer-host"])
    assert not killed(acts)


def test_a_request_line_beyond_the_parser_s_limit_is_blocked_and_named():
    acts = run(HttpGuard(), b"SEARCH /" + b"A" * 70000 + b" HTTP/1.1\r\n\r\n", step=1460)
    assert killed(acts) and passed(acts) == 0
    (a,) = alerts(acts, "head_too_long")
    assert a[2]["kind"] == "head_too_long" and a[2]["action"] == "kill"


# ---------------------------------------------------------------------------
# Evasions
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("target", [
    b"/%64efault.%69da", b"/DEFAULT.IDA", b"/scripts/../default.ida", b"\\default.ida", b"//default.ida",
    b"/default.ida.", b"/default.ida%00.html", b"http://victim/default.ida", b"/default%2eida",
    b"/x%u002f..%u002fdefault.ida", b"/default.idq", b"/default.ida;x", b"/default.ida/extra/path",
    b"/default.ida%3bx",
])
def test_the_path_pattern_sees_through_encodings(target):
    req = b"GET " + target + b"?" + b"%4e" * 230 + b" HTTP/1.0\r\n\r\n"
    acts = run(HttpGuard(), req)
    assert killed(acts) and passed(acts) == 0 and overflow(acts)["signature"] == "iis-ida-codered"


@pytest.mark.parametrize("step", [0, 1, 13])
def test_codered_pipelined_behind_benign_requests(step):
    """The benign requests before it reach the server; nothing of the worm's does, nor anything after."""
    g = HttpGuard()
    client = GET + post(b"/f", b"x=1") + GET + CODERED + GET
    acts = run(g, client, OK * 3, step)
    assert killed(acts) and passed(acts) == len(GET + post(b"/f", b"x=1") + GET)
    assert overflow(acts)["signature"] == "iis-ida-codered"


def test_an_overflow_in_a_chunked_body_is_held_and_stopped():
    """A policy's body signature: the request is held whole (chunks of any size) and never passes."""
    g = HttpGuard({"signatures": [{"name": "login-body", "methods": ["POST"], "path": "/cgi-bin/login*",
                                   "field": "body", "max": 1000}]})
    big = post(b"/cgi-bin/login", b"u=" + b"A" * 2000, chunk=7)
    for step in (1, 50, 0):
        acts = run(g, GET + big, step=step, sid=step + 10)
        assert killed(acts) and passed(acts) == len(GET), step
        f = overflow(acts)
        assert (f["signature"], f["field"], f["length"], f["limit"]) == ("login-body", "body", 1001, 1000)
    small = post(b"/cgi-bin/login", b"u=alice&p=secret", chunk=5)
    acts = run(g, small + GET, step=3, sid=99)
    assert not killed(acts) and passed(acts) == len(small + GET)
    # the body is held: nothing of the request passes before its last byte
    acts = run(g, small[:-1], sid=100)
    assert passed(acts) == 0 and ("more", TO_GUEST) in acts


def test_a_huge_chunk_size_is_stopped_before_the_server_reads_it():
    req = HISTORIC["chunk-size-overflow"]
    acts = run(HttpGuard(), req, step=1)
    assert killed(acts) and passed(acts) == 0     # held until the first chunk-size line was read
    f = overflow(acts)
    assert f["length"] == 0xFFFFFF6E and "chunk size 0xffffff6e > 2147483647" in alerts(acts, "overflow")[0][1]
    # a later chunk: the head passed, the bad chunk-size line does not
    req2 = post(b"/x", b"A" * 10, chunk=5)[:-5] + b"FFFFFFFF0\r\n"
    acts = run(HttpGuard(), req2, step=4)
    assert killed(acts) and req2.index(b"FFFFFFFF0") - 2 <= passed(acts) <= req2.index(b"FFFFFFFF0")


def test_params_headers_and_raw_measures():
    g = HttpGuard({"builtin_signatures": False, "signatures": [
        {"name": "q", "path": "/search", "field": "param", "param": "q", "max": 10},
        {"name": "any-header", "field": "header", "header": "*", "max": 100},
        {"name": "raw-uri", "path": "/raw*", "field": "uri", "max": 20, "measure": "raw"},
        {"name": "line", "methods": ["OPTIONS"], "field": "request_line", "max": 30},
        {"name": "watch", "path": "/watch", "field": "query", "max": 1, "action": "alert"}]})
    cases = {b"GET /search?a=1&q=0123456789&Q=%41%41 HTTP/1.1\r\n\r\n": None,
             b"GET /search?a=1&q=0123456789&Q=" + b"%41" * 11 + b" HTTP/1.1\r\n\r\n": "q",     # HPP: every value
             b"GET / HTTP/1.1\r\nX-A: " + b"a" * 101 + b"\r\n\r\n": "any-header",
             b"GET /raw/%41%41%41%41%41%41 HTTP/1.1\r\n\r\n": "raw-uri",
             b"OPTIONS /" + b"o" * 30 + b" HTTP/1.1\r\n\r\n": "line"}
    for i, (req, sig) in enumerate(cases.items()):
        acts = run(g, req, sid=i)
        assert killed(acts) == (sig is not None), req
        if sig:
            assert overflow(acts)["signature"] == sig
    acts = run(g, b"GET /watch?xyz HTTP/1.1\r\n\r\n")
    assert not killed(acts) and overflow(acts)["action"] == "alert" and passed(acts) > 0


# ---------------------------------------------------------------------------
# Anomalies
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("req,kind,blocked", [
    (b"GET /scripts/..%c0%af../winnt/system32/cmd.exe?/c+dir HTTP/1.0\r\n\r\n", "overlong_utf8", True),
    (b"GET /scripts/..%255c../winnt/system32/cmd.exe?/c+dir HTTP/1.0\r\n\r\n", "double_encoding", True),
    (b"GET /../../etc/passwd HTTP/1.0\r\n\r\n", "traversal", True),
    (b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "te_and_cl", True),
    (b"GET /x%u0041 HTTP/1.1\r\n\r\n", "percent_u", False),
    (b"GET /a%zz HTTP/1.1\r\n\r\n", "bad_percent", False),
    (b"GET /a/./b//c HTTP/1.1\r\n\r\n", None, False),          # ignored by default
])
def test_anomalies_are_alerted_and_the_dangerous_ones_block(req, kind, blocked):
    acts = run(HttpGuard(), req + GET)
    assert killed(acts) == blocked
    assert [a[2]["kind"] for a in alerts(acts, "anomaly")][:1] == ([kind] if kind else [])
    assert passed(acts) == (0 if blocked else len(req + GET))


# ---------------------------------------------------------------------------
# The reply in the server's place
# ---------------------------------------------------------------------------

def reply_guard(**cfg) -> HttpGuard:
    return HttpGuard(dict({"block": "reply", "reply_injection": "bad_request"}, **cfg),
                     stream_injections=["bad_request"])


@pytest.mark.parametrize("step", [0, 1, 50])
def test_a_blocked_request_is_answered_in_the_server_s_place(step):
    g = reply_guard()
    assert g.reply == "bad_request"
    first = GET
    client = first + CODERED + GET          # what follows the worm's request is cut too
    acts = run(g, first, step=step)
    acts += g.data(1, FROM_GUEST, 0, OK, 0.0)              # the first request is answered
    for i in range(len(first), len(client), step or len(client)):
        acts += g.data(1, TO_GUEST, i, client[i:i + (step or len(client))], 0.0)
    acts += g.data(1, FROM_GUEST, len(OK), b"HTTP/1.1 408 Timeout\r\n\r\n", 0.0)   # the server's later bytes
    assert not killed(acts)
    assert edited(client, acts, TO_GUEST, {}) == first                    # the server never gets the worm
    assert edited(OK + b"HTTP/1.1 408 Timeout\r\n\r\n", acts, FROM_GUEST, {"bad_request": REPLY}) == OK + REPLY
    f = overflow(acts)
    assert f["action"] == "reply" and f["reply"] == "bad_request" and g.stats["replied"] == 1
    # the kernel refusing the edit kills instead
    cut = next(a for a in acts if a[0] == "cut")
    acts = g.edit_refused(1, cut, "too many edits")
    assert killed(acts) and alerts(acts)[0][2]["action"] == "kill"


@pytest.mark.parametrize("step", [0, 3, 100])
def test_a_reply_behind_pipelined_requests_waits_for_their_answers(step):
    """The requests before the worm's pass and are answered; the worm's is cut at once, and the
    reply goes in where the last answer before it ends."""
    g = reply_guard()
    client = GET + post(b"/p", b"abc") + CODERED + GET
    head100 = b"HTTP/1.1 100 Continue\r\n\r\n"
    server = head100 + OK + OK + b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"
    acts = run(g, client, server, step)
    assert not killed(acts)
    assert edited(client, acts, TO_GUEST, {}) == GET + post(b"/p", b"abc")
    assert edited(server, acts, FROM_GUEST, {"bad_request": REPLY}) == head100 + OK + OK + REPLY
    assert [a for a in acts if a[0] == "inject"] == [("inject", FROM_GUEST, len(head100 + OK + OK), "bad_request")]
    assert "after the 2 response(s) before it" in alerts(acts, "overflow")[0][1]
    # a replied connection is not "held too long" later: the client was answered
    assert g.tick(1000.0) == []


def test_reply_falls_back_to_a_kill():
    assert HttpGuard({"block": "reply", "reply_injection": "bad_request"}).reply is None   # not registered
    # the answers before the blocked request cannot be followed: killed then
    g = reply_guard()
    acts = run(g, GET + CODERED, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert killed(acts) and not [a for a in acts if a[0] == "inject"]
    assert "cannot be followed" in alerts(acts, "killed")[0][1]
    # a request not held from its first byte (a bad chunk after its head passed)
    req = post(b"/x", b"A" * 10, chunk=5)[:-5] + b"FFFFFFFF0\r\n"
    assert killed(run(reply_guard(), req, step=4))


# ---------------------------------------------------------------------------
# Holding: more, and the bound on how long (fake clock)
# ---------------------------------------------------------------------------

def test_a_head_is_held_with_more_and_a_trickled_one_is_killed_after_max_hold_seconds():
    g = HttpGuard({"max_hold_seconds": 30})
    acts = run(g, b"GET /index.html HTTP/1.1\r\nHost: a\r\n", now=100.0)
    assert passed(acts) == 0 and acts.count(("more", TO_GUEST)) == 1
    acts = g.data(1, TO_GUEST, 35, b"X-Slow: 1\r\n", 120.0)
    assert passed(acts) == 0 and ("more", TO_GUEST) not in acts        # still the same `more`
    assert g.tick(129.0) == []
    out = g.tick(130.5)
    assert [a for sid, a in out if a[0] == "kill"] == [("kill", "held_too_long")] and {s for s, _ in out} == {1}
    assert g.stats["held_too_long"] == 1 and g.tick(200.0) == []
    # a connection idle between requests holds nothing and is never timed out
    acts = run(g, GET, now=0.0, sid=2)
    assert g.tick(1000.0) == []


def test_outbound_only_when_the_policy_says():
    acts = run(HttpGuard(), CODERED, inbound=False)
    assert acts == [("pass_all", FROM_GUEST), ("pass_all", TO_GUEST)]
    g = HttpGuard({"outbound": True, "inbound": False})
    acts = run(g, CODERED, inbound=False)        # an infected guest spreading the worm
    assert killed(acts) and passed(acts, FROM_GUEST) == 0 and overflow(acts)["direction"] == "outbound"
    assert run(g, CODERED, sid=2) == [("pass_all", FROM_GUEST), ("pass_all", TO_GUEST)]
    assert HttpGuard().open(3, 443, False) == [("pass_all", FROM_GUEST), ("pass_all", TO_GUEST)]


def test_tunnels():
    req = b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n"
    est = b"HTTP/1.1 200 Connection established\r\n\r\n"
    acts = run(HttpGuard(), req + b"\x16\x03\x01", est)
    assert ("pass_all", TO_GUEST) in acts and not killed(acts) and alerts(acts, "tunnel")
    assert killed(run(HttpGuard({"tunnels": "kill"}), req, est))


@pytest.mark.parametrize("step", [0, 1, 9])
def test_a_refused_connect_leaves_the_connection_http(step):
    """A CONNECT is a tunnel only once the server agrees (2xx).  The stage took it for one as soon
    as it read the request (tunnels = "pass": the rest passed uninspected), so a worm request sent
    right behind a CONNECT reached every server that refuses CONNECT and keeps the connection (a
    405 with keep-alive): the bytes after a CONNECT now wait for its answer, and after a refusal
    they are read as requests, as the server reads them."""
    req = b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n"
    refused = b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n"
    acts = run(HttpGuard(), req + CODERED, refused, step)
    assert killed(acts) and passed(acts) == len(req) and overflow(acts)["signature"] == "iis-ida-codered"
    assert not any(a[0] == "pass_all" for a in acts)
    acts = run(HttpGuard(), req + GET, refused + OK, step)           # a benign request after it goes on
    assert passed(acts) == len(req + GET) and not killed(acts) and not any(a[0] == "pass_all" for a in acts)
    acts = run(HttpGuard(), req + CODERED)                            # no answer yet: held
    assert passed(acts) == len(req) and ("more", TO_GUEST) in acts and not killed(acts)
    # a CONNECT has no content, but a server that refuses it may read the one it announces: the
    # codec, reading on right after its head, would take the worm's request for a header's value
    smuggle = b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\nGET /a HTTP/1.1\r\nX: "
    acts = run(HttpGuard(), smuggle + CODERED, refused, step)
    assert killed(acts) and passed(acts) <= smuggle.index(b"GET") and alerts(acts, "connect_with_content")


@pytest.mark.parametrize("cfg", [
    {"nope": 1}, {"ports": []}, {"block": "drop"}, {"block_anomalies": ["no_such_kind"]},
    {"signatures": [{"name": "x", "field": "nose", "max": 1}]},
    {"signatures": [{"name": "x", "field": "header", "max": 1}]},
    {"signatures": [{"name": "x", "field": "query", "max": -1}]},
    {"signatures": [{"name": "x", "field": "query", "max": 1, "header": "host"}]},
    {"signatures": [{"name": "x y", "field": "query", "max": 1}]},
    {"signatures": [{"name": "x", "field": "query", "max": 1, "methods": ["G T"]}]},
    {"signatures": [{"name": "x", "field": "query", "max": 1}, {"name": "x", "field": "uri", "max": 1}]},
    {"signatures": {"name": "x"}}, {"max_hold_seconds": 0}, {"inbound": "yes"},
])
def test_config_is_checked(cfg):
    with pytest.raises(ConfigError):
        load_config(cfg)


def test_a_policy_signature_replaces_a_shipped_one_of_the_same_name():
    g = HttpGuard({"signatures": [{"name": "iis-ida-codered", "path": "*.ida", "field": "query", "max": 300}]})
    req = b"GET /default.ida?" + b"N" * 250 + b" HTTP/1.0\r\n\r\n"
    assert killed(run(HttpGuard(), req)) and not killed(run(g, req))
    assert [s.name for s in g.sigs].count("iis-ida-codered") == 1


# ---------------------------------------------------------------------------
# Fuzzing: decisions are well formed, and the worm's request never reaches the server
# ---------------------------------------------------------------------------

_PIECES = [GET, CODERED, CODERED2, post(b"/p", b"abc"), post(b"/c", b"hello world", chunk=4),
           b"GET /default.ida?", b"N" * 150, b"%u9090", b" HTTP/1.1\r\n", b"Host: a\r\n", b"\r\n", b"\n", b"\r",
           b"\0", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 3\r\n", b"5\r\nhello\r\n", b"0\r\n\r\n"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PIECES) | st.binary(max_size=10), max_size=10), st.integers(1, 600),
       st.booleans())
def test_fuzz_decisions_are_well_formed_and_codered_never_passes(pieces, step, reply):
    client = b"".join(pieces)
    g = reply_guard() if reply else HttpGuard()
    acts = run(g, client, OK, step)
    acts += g.end(1, TO_GUEST, len(client))
    last = {FROM_GUEST: 0, TO_GUEST: 0}
    fed = {TO_GUEST: len(client), FROM_GUEST: len(OK)}
    for a in acts:
        assert a[0] in ("pass", "pass_all", "more", "kill", "alert", "inject", "cut"), a
        if a[0] == "pass":
            assert last[a[1]] < a[2] <= fed[a[1]], (a, last)
            last[a[1]] = a[2]
        if a[0] == "alert":
            json.dumps(a[2])
    cuts = [a for a in acts if a[0] == "cut" and a[1] == TO_GUEST]
    if cuts:                               # a reply: from the blocked request on, everything is cut
        assert last[TO_GUEST] <= cuts[0][2]
        assert all(x[2] + x[3] == y[2] for x, y in zip(cuts, cuts[1:])) and cuts[-1][2] + cuts[-1][3] == len(client)
        delivered = client[:cuts[0][2]]
    else:
        delivered = client[:last[TO_GUEST]]
    # no request the server reads from what it got overflows the .ida query
    conn = HttpConnection()
    for ev in conn.feed(CLIENT, delivered):
        if isinstance(ev, Request):
            u = normalise(ev.target)
            assert not ((u.matches("*.ida") or u.matches("*.idq")) and len(u.query) > 200), ev
