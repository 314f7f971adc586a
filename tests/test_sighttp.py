"""HTTP buffers in the in-line signature stage (csrc/http.c read by csrc/sigstage.c): Suricata's
http.* sticky buffers, their legacy modifiers, urilen and bsize, matched per message.

Through simulated guests (guest a the client, guest b the web server behind the rules), every
test checks what the receiver got: a drop rule on an HTTP buffer keeps the whole offending
message from the server, whatever the client does to its segments or its encoding, and
benign messages around it arrive whole.  The reader itself (sans-I/O) is tested directly too:
the same bytes cut anywhere give the same messages.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from nikit import IPS, time_limit
from tcpkit import Conn
from test_sigstage import conn as sig_conn, got, sig_alerts as alerts
from vhostni._fastpath import ffi, lib

RULES = r'''
drop http any any -> $HOME_NET any (msg:"Code Red .ida overflow"; flow:to_server,established; http.method; content:"GET"; http.uri; content:".ida?"; nocase; classtype:web-application-attack; sid:201; rev:2;)
drop tcp any any -> $HOME_NET $HTTP_PORTS (msg:"cmd.exe"; flow:to_server,established; content:"cmd.exe"; http_uri; nocase; sid:202;)
alert http any any -> $HOME_NET any (msg:"curl"; flow:to_server,established; http.user_agent; content:"curl/"; startswith; sid:203;)
drop http any any -> $HOME_NET any (msg:"long uri"; flow:to_server,established; urilen:>200; sid:204;)
drop http any any -> $HOME_NET any (msg:"body cmd"; flow:to_server,established; http.request_body; content:"cmd=rm"; sid:205;)
drop http $HOME_NET any -> any any (msg:"leaky 500"; flow:to_client,established; http.stat_code; content:"500"; http.header; content:"X-Debug|3a|"; nocase; sid:206;)
alert http any any -> $HOME_NET any (msg:"evil host"; flow:to_server; http.host; content:"evil.example"; bsize:12; sid:207;)
drop http any any -> $HOME_NET any (msg:"shellshock"; flow:to_server; http.header; content:"() {"; sid:208;)
'''


@pytest.fixture(autouse=True)
def _limit():
    with time_limit(90, "the test"):
        yield


@pytest.fixture
def hk(kits, tmp_path):
    p = tmp_path / "h.rules"
    p.write_text(RULES)
    pol = (f'[ni]\naddresses = ["{IPS["b"]}/32"]\n[signatures]\nrules = ["{p}"]\nhttp_body_limit = 1024\n'
           '[signatures.vars]\nHTTP_PORTS = "[80,8080]"\n')
    return kits({"b": pol})


def conn(k, cport: int = 41000, sport: int = 80) -> Conn:
    return sig_conn(k, cport=cport, sport=sport)


BENIGN = b"GET /index.html HTTP/1.1\r\nHost: www.example\r\nUser-Agent: Mozilla/5.0\r\n\r\n"
CODERED = (b"GET /default.ida?" + b"N" * 224 + b"%u9090%u6858 HTTP/1.0\r\nContent-type: text/xml\r\n"
           b"Content-length: 3379 \r\n\r\n")


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

def test_a_uri_rule_drops_the_whole_request_and_what_follows(hk):
    c = conn(hk)
    c.send("a", c.data("a", BENIGN))
    assert got(c) == BENIGN                               # a benign request goes on
    c.send("a", c.data("a", CODERED[:30]))
    assert got(c) == b""                                  # a head is held until it is complete...
    c.send("a", c.data("a", CODERED[30:]))
    assert got(c, wait=0.6) == b""                        # ...and none of the offending one goes
    st = hk.stats("b")
    assert st["sig_dropped"] == 1 and st["sig_http_requests"] == 2
    a = hk.wait_alert("signature 201", "b")["fields"]
    assert a["alert"]["signature_id"] == 201 and a["alert"]["action"] == "blocked"
    assert a["http"]["http_method"] == "GET" and a["http"]["url"].startswith("/default.ida?NNNN")
    assert a["stream_offset"] == len(BENIGN) + len(CODERED)


def test_a_benign_head_is_held_only_until_its_empty_line(hk):
    c = conn(hk)
    c.send("a", c.data("a", b"GET /a HTTP/1.1\r\nHost: x\r\n"))
    assert got(c) == b""
    c.send("a", c.data("a", b"\r\n"))
    assert got(c) == b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    assert not hk.alerts()


@pytest.mark.parametrize("target", [
    b"/default.%69da?x", b"/default.%u0069da?x", b"/default.%uFF49da?x",   # %XX, %u, IIS best fit
    b"/scripts/../default.IDA?x", b"/a/./b/..//default.ida?x", b"\\default.ida?x",
    b"http://www.example/default.ida?x",                                 # absolute form
])
def test_encoded_and_reshaped_uris_are_normalised_before_matching(hk, target):
    c = conn(hk)
    c.send("a", c.data("a", b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n"))
    assert got(c, wait=0.5) == b""
    assert alerts(hk, 201)


def test_near_misses_pass(hk):
    c = conn(hk)
    reqs = [b"POST /default.ida?x HTTP/1.1\r\nContent-Length: 0\r\n\r\n",   # not GET
            b"GET /default.idb?x HTTP/1.1\r\n\r\n", b"GET /default.ida HTTP/1.1\r\n\r\n",
            b"GET /x HTTP/1.1\r\nReferer: /default.ida?x\r\n\r\n",     # in a header, not the URI
            b"GET /x?" + b"a" * 190 + b" HTTP/1.1\r\n\r\n"]            # urilen 193: not > 200
    for r in reqs:
        c.send("a", c.data("a", r))
    assert got(c, wait=0.6) == b"".join(reqs)
    assert not [a for a in hk.alerts() if "signature" in a.get("message", "")]


def test_urilen_counts_the_normalised_uri(hk):
    c = conn(hk)
    long = b"GET /" + b"a" * 210 + b" HTTP/1.1\r\n\r\n"
    c.send("a", c.data("a", long))
    assert got(c, wait=0.5) == b"" and alerts(hk, 204)
    ok = conn(hk, cport=41004)
    short = b"GET /" + b"%61" * 100 + b" HTTP/1.1\r\n\r\n"    # 301 bytes raw, 101 normalised
    ok.send("a", ok.data("a", short))
    assert got(ok, wait=0.5) == short and len(alerts(hk, 204)) == 1


def test_a_request_in_one_byte_segments_is_read_whole(hk):
    c = conn(hk)
    req = b"GET /x/cmd.exe?/c+dir HTTP/1.0\r\n\r\n"
    for i in range(len(req)):
        c.send("a", c.data("a", req[i:i + 1]))
    assert got(c, wait=0.6) == b""
    assert alerts(hk, 202)


def test_pipelined_requests_the_evil_one_and_after_are_stopped(hk):
    c = conn(hk)
    c.send("a", c.data("a", BENIGN + BENIGN))
    assert got(c) == BENIGN * 2
    c.send("a", c.data("a", b"GET /a HTTP/1.1\r\n\r\nGET /b.ida?x HTTP/1.1\r\n\r\n"), c.data("a", BENIGN))
    rx = got(c, wait=0.6)
    assert b".ida" not in rx and BENIGN not in rx and alerts(hk, 201)


def test_alert_rule_and_header_fields(hk):
    c = conn(hk)
    req = b"GET / HTTP/1.1\r\nHost: EVIL.example:8080\r\nUser-Agent: curl/8.0\r\n\r\n"
    c.send("a", c.data("a", req))
    assert got(c) == req                                   # alert rules only alert
    assert alerts(hk, 203) and alerts(hk, 207)             # http.host: lower case, no port
    assert alerts(hk, 207)[0]["fields"]["http"]["hostname"] == "evil.example"
    c2 = conn(hk, cport=41001)
    c2.send("a", c2.data("a", b"GET / HTTP/1.1\r\nUser-Agent: x curl/8.0\r\nHost: evil.example.org\r\n\r\n"))
    got(c2)
    assert len(alerts(hk, 203)) == 1 and len(alerts(hk, 207)) == 1   # not at the start; bsize 16


def test_a_folded_header_is_read_as_the_server_joins_it(hk):
    c = conn(hk)
    c.send("a", c.data("a", b"GET / HTTP/1.1\r\nX-A: ()\r\n {  :; }; /bin/id\r\n\r\n"))
    assert got(c, wait=0.5) == b"" and alerts(hk, 208)


def test_a_chunked_body_is_dechunked_before_matching(hk):
    c = conn(hk)
    head = b"POST /f HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    c.send("a", c.data("a", head + b"4\r\nx&cm\r\n"))
    assert got(c) == b""                                   # held until the body is read
    c.send("a", c.data("a", b"6\r\nd=rm -\r\n0\r\n\r\n"))
    assert got(c, wait=0.5) == b"" and alerts(hk, 205)
    ok = conn(hk, cport=41002)
    body = b"cmd=ls"
    req = b"POST /f HTTP/1.1\r\nContent-Length: 6\r\n\r\n" + body
    ok.send("a", ok.data("a", req))
    assert got(ok) == req


def test_a_body_past_the_inspection_limit_is_released_after_the_limit(hk):
    c = conn(hk)
    req = b"POST /u HTTP/1.1\r\nContent-Length: 3000\r\n\r\n" + b"A" * 3000
    c.send("a", c.data("a", req[:1200]), c.data("a", req[1200:]))
    assert got(c, wait=0.5) == req


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",   # CL.TE
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",            # CL.CL
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",               # TE not last
    b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",                                            # space before :
    b"GET / HTTP/1.1\rX-A: b\r\n\r\n",                                                # bare CR
])
def test_smuggling_and_ambiguous_framing_fail_closed(hk, head):
    c = conn(hk)
    c.send("a", c.data("a", BENIGN))
    assert got(c) == BENIGN
    c.send("a", c.data("a", head + b"GET /default.ida?x HTTP/1.1\r\n\r\n"))
    assert got(c, wait=0.5) == b""
    assert hk.stats("b")["sig_http_errors"] == 1


def test_a_refused_connect_does_not_hide_the_requests_behind_it(hk):
    c = conn(hk)
    c.send("a", c.data("a", b"CONNECT x:443 HTTP/1.1\r\n\r\n"), c.data("a", b"GET /default.ida?x HTTP/1.1\r\n\r\n"))
    assert got(c) == b"CONNECT x:443 HTTP/1.1\r\n\r\n"     # the rest waits for the answer
    # refused: what waited is read as HTTP again, and the request it hid is stopped (the
    # connection with it, the answer that released it included)
    c.send("b", c.data("b", b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n"))
    assert got(c, wait=0.5) == b"" and alerts(hk, 201)
    ok = conn(hk, cport=41003)
    ok.send("a", ok.data("a", b"CONNECT x:443 HTTP/1.1\r\n\r\n"), ok.data("a", b"\x16\x03\x01GET /y.ida?z"))
    assert got(ok) == b"CONNECT x:443 HTTP/1.1\r\n\r\n"
    ok.send("b", ok.data("b", b"HTTP/1.1 200 Connection established\r\n\r\n"))
    assert got(ok, "a") == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert got(ok) == b"\x16\x03\x01GET /y.ida?z"            # accepted: a tunnel, not HTTP
    assert len(alerts(hk, 201)) == 1


def test_an_upgraded_connection_is_a_tunnel(hk):
    c = conn(hk)
    c.send("a", c.data("a", b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"))
    got(c)
    c.send("b", c.data("b", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"))
    got(c, "a")
    frame = b"\x81\x05GET /x.ida?y"                       # not HTTP any more
    c.send("a", c.data("a", frame))
    assert got(c) == frame and not alerts(hk, 201)


def test_a_response_rule_stops_the_response(hk):
    c = conn(hk)
    c.send("a", c.data("a", BENIGN))
    assert got(c) == BENIGN
    resp = b"HTTP/1.1 500 Oops\r\nX-Debug: /srv/app.py line 3\r\nContent-Length: 4\r\n\r\nboom"
    c.send("b", c.data("b", resp[:20]), c.data("b", resp[20:]))
    assert got(c, "a", wait=0.5) == b"" and alerts(hk, 206)
    a = alerts(hk, 206)[0]["fields"]
    assert a["direction"] == "to_client" and a["http"]["status"] == 500


def test_a_response_alert_names_the_request_it_answers_not_the_latest(hk):
    c = conn(hk)
    first = b"GET /debug/trace?id=7 HTTP/1.1\r\nHost: App.Example:8080\r\n\r\n"
    later = b"POST /upload HTTP/1.1\r\nHost: other.example\r\nContent-Length: 2\r\n\r\nok"
    c.send("a", c.data("a", first + later))             # pipelined: both read before any answer
    assert got(c) == first + later
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    bad = b"HTTP/1.1 500 Oops\r\nX-Debug: /srv/app.py line 3\r\nContent-Length: 4\r\n\r\nboom"
    c.send("b", c.data("b", bad))
    assert got(c, "a", wait=0.5) == b"" and alerts(hk, 206)
    h = alerts(hk, 206)[0]["fields"]["http"]
    assert (h["http_method"], h["hostname"], h["url"], h["status"]) == ("GET", "app.example", "/debug/trace?id=7", 500)
    # and the second response of a pipeline names the second request
    c = conn(hk, cport=41001)
    c.send("a", c.data("a", first + later))
    assert got(c) == first + later
    c.send("b", c.data("b", ok), c.data("b", bad))     # a drop stops the segment holding the message's start
    assert got(c, "a", wait=0.5) == ok
    h = alerts(hk, 206)[-1]["fields"]["http"]
    assert (h["http_method"], h["hostname"], h["url"], h["status"]) == ("POST", "other.example", "/upload", 500)


def test_a_benign_response_with_a_body_flows_and_the_next_request_is_read(hk):
    c = conn(hk)
    c.send("a", c.data("a", b"HEAD / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n"))
    got(c)
    resp = (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"            # HEAD: no body follows
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n500\r\n0\r\n\r\n")
    c.send("b", c.data("b", resp))
    assert got(c, "a") == resp
    c.send("a", c.data("a", b"GET /z.ida?q HTTP/1.1\r\n\r\n"))
    assert got(c, wait=0.5) == b"" and alerts(hk, 201)
    assert hk.stats("b")["sig_http_responses"] == 2


def test_a_connection_that_is_not_http_is_left_alone(hk):
    c = conn(hk, sport=8080)
    banner = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"
    c.send("a", c.data("a", banner), c.data("a", b"\x00\x00\x01\x0c\x0a\x14GET /x.ida?y HTTP/1.1\r\n\r\n"))
    assert got(c).startswith(banner) and not alerts(hk, 201)


def test_a_head_cut_short_by_fin_is_still_matched(hk):
    from tcpkit import ACK, FIN
    c = conn(hk)
    c.send("a", c.data("a", b"GET /default.ida?x HTTP/1.0\r\nHost: x", flags=ACK | FIN))
    assert got(c, wait=0.5) == b"" and alerts(hk, 201)


def test_http_rules_in_query_nis_and_rules_check(hk, tmp_path, capsys):
    from vhostni.cli import main
    f = tmp_path / "r.rules"
    f.write_text(RULES)
    assert main(["rules", "check", str(f), "--var", "HTTP_PORTS=80"]) == 0
    assert "8 rules accepted (8 http)" in capsys.readouterr().out
    c = conn(hk)
    c.send("a", c.data("a", b"GET /cmd.exe HTTP/1.1\r\n\r\n"))
    got(c, wait=0.5)
    info = hk.nk("b").info()["signatures"]
    assert info["per_rule"]["202"]["drops"] == 1


# ---------------------------------------------------------------------------
# The reader alone (sans-I/O)
# ---------------------------------------------------------------------------

NAMES = {getattr(lib, n): n[10:].lower() for n in dir(lib) if n.startswith("VN_HTTP_B_")}


def read(parts, body_limit=4096):
    """Feeds (side, bytes) parts; returns the events with their buffers, and the errors."""
    h = lib.vn_http_new(body_limit, 1, 1)
    ev = ffi.new("int *")
    p = ffi.new("const uint8_t **")
    n = ffi.new("uint32_t *")
    out = []
    try:
        for side, data in parts:
            off = 0
            while off < len(data):
                r = lib.vn_http_feed(h, side, data[off:], len(data) - off, ev)
                if r < 0:
                    out.append(("error", side, r))
                    break
                off += r
                if ev[0]:
                    bufs = {NAMES[b]: bytes(ffi.buffer(p[0], n[0])) for b in NAMES
                            if lib.vn_http_buf(h, side, b, p, n)}
                    out.append((ev[0], side, tuple(sorted(bufs.items()))))
                elif r == 0:
                    break
        return out
    finally:
        lib.vn_http_free(h)


STREAM = (b"\r\nGET /a%20b/../c?x=%41 HTTP/1.1\r\nHost: A.example\r\nCookie: k=v\r\nX: 1\r\n 2\r\n\r\n"
          b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n3\r\n!!!\r\n0\r\nT: 1\r\n\r\n"
          b"PUT /q HTTP/1.0\r\nContent-Length: 4\r\n\r\nbody"
          b"GET /last HTTP/1.1\r\n\r\n")


def test_reader_buffers():
    evs = read([(0, STREAM)])
    heads = [dict(b) for e, s, b in evs if e == lib.VN_HTTP_EV_HEAD]
    assert [h["uri"] for h in heads] == [b"/c?x=A", b"/p", b"/q", b"/last"]
    h = heads[0]
    assert h["uri_raw"] == b"/a%20b/../c?x=%41" and h["host"] == b"a.example" and h["cookie"] == b"k=v"
    assert h["header"] == b"Host: A.example\r\nX: 1 2\r\n\r\n"           # no Cookie; folded
    assert h["header_names"] == b"\r\nHost\r\nCookie\r\nX\r\n\r\n"
    bodies = [dict(b)["request_body"] for e, s, b in evs if e == lib.VN_HTTP_EV_BODY]
    assert bodies == [b"hello!!!", b"body"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=12))
def test_reader_gives_the_same_messages_however_the_bytes_are_cut(cuts):
    cuts = sorted(set(cuts))
    parts, at = [], 0
    for c in cuts + [len(STREAM)]:
        parts.append((0, STREAM[at:c]))
        at = c
    assert read(parts) == read([(0, STREAM)])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.binary(max_size=64)), max_size=20),
       st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"]))
def test_reader_survives_hostile_bytes(parts, prefix):
    read([(0, prefix)] + parts, body_limit=64)            # no crash, no hang (ASan checks memory)


def _gz(data: bytes, layers: int) -> bytes:
    import gzip
    for _ in range(layers):
        data = gzip.compress(data)
    return data


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 9), st.binary(max_size=300), st.integers(0, 400),
       st.lists(st.sampled_from(["gzip", "x-gzip", "deflate", "identity", "br", " gzip ", ""]), min_size=1,
                max_size=10), st.booleans())
def test_reader_decodes_hostile_encoded_bodies_within_its_limit(layers, plain, cut, codings, corrupt):
    """Request bodies with Content-Encoding are decoded (csrc/http.c): any list of codings, any
    depth, cut or corrupted gzip: the body buffer stays within body_limit, nothing crashes (ASan
    runs this), and a body that decodes cleanly is seen decoded."""
    body = _gz(plain, layers)
    if corrupt and body:
        body = body[:cut % (len(body) + 1)] + bytes(reversed(body[cut % (len(body) + 1):]))
    head = (b"POST /u HTTP/1.1\r\nContent-Encoding: " + ", ".join(codings).encode() +
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    evs = read([(0, head + body)], body_limit=256)
    bodies = [dict(b).get("request_body") for e, _, b in evs if e == lib.VN_HTTP_EV_BODY]
    assert all(b is None or len(b) <= 256 for b in bodies)
    known = [c.strip() for c in codings if c.strip() not in ("", "identity")]
    if (not corrupt and layers and len(body) <= 256 and len(plain) <= 256 and known
            and all(c in ("gzip", "x-gzip") for c in known) and len(known) == layers):
        assert bodies == [plain]


def test_a_gzip_bomb_body_is_cut_at_the_limit():
    body = _gz(bytes(1 << 24), 2)                          # 16 MiB of zeros in a few hundred bytes
    head = b"POST /u HTTP/1.1\r\nContent-Encoding: gzip, gzip\r\nContent-Length: %d\r\n\r\n" % len(body)
    [b] = [dict(b)["request_body"] for e, _, b in read([(0, head + body)], body_limit=4096)
           if e == lib.VN_HTTP_EV_BODY]
    assert b == bytes(4096)


def test_reader_frames_responses_as_a_client_does_and_requests_strictly():
    # a response with both lengths: Transfer-Encoding wins, and the next response is found
    evs = read([(0, b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"),
                (1, b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 404 No\r\nContent-Length: 0\r\n\r\n")])
    codes = [dict(b).get("stat_code") for e, s, b in evs if s == 1]
    assert codes == [b"200", b"404"]
    # the same in a request is smuggling
    assert read([(0, b"POST / HTTP/1.1\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n")])[-1][0] == "error"
    # a server that does not speak HTTP: requests are still read, with no limit on how many wait
    many = b"GET / HTTP/1.1\r\n\r\n" * 100
    evs = read([(1, b"SSH-2.0-x\r\n"), (0, many)])
    assert len(evs) == 100 and all(e == lib.VN_HTTP_EV_HEAD for e, s, b in evs)


# ---------------------------------------------------------------------------
# What a review of the reader found: request lines servers act on, and holds and memory
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("req", [
    b"GET /default.ida?x HTTP/1.1 \r\n\r\n",                   # a separator after the version
    b"GET /default.ida?x HTTP/01.10\r\n\r\n",                  # digits servers accept
    b"GET\x0b/default.ida?x\x0cHTTP/1.1\r\n\r\n",              # VT and FF (Python's split())
    b"GET /default.ida?x\r\nHost: h\r\n\r\n",                  # no version: busybox reads on
    b"X" * 40 + b" /x HTTP/1.1\r\nUser-Agent: () { :;}; id\r\n\r\n",   # a long method (Apache)
    b"POST /x\r\nUser-Agent: () { :;}; id\r\n\r\n",           # no version, fields after it
])
def test_request_lines_servers_act_on_are_read_not_waved_through(hk, req):
    c = conn(hk)
    c.send("a", c.data("a", req))
    assert got(c, wait=0.5) == b""
    assert alerts(hk, 201) or alerts(hk, 208)


def test_a_control_byte_in_the_target_fails_closed(hk):
    c = conn(hk)
    c.send("a", c.data("a", b"GET /default.i\x01da?x HTTP/1.1\r\n\r\n"))
    assert got(c, wait=0.5) == b"" and hk.stats("b")["sig_http_errors"] == 1


def test_an_accepted_connect_followed_by_a_request_is_still_http(hk):
    c = conn(hk)
    c.send("a", c.data("a", b"CONNECT / HTTP/1.1\r\n\r\n"), c.data("a", b"GET /x.ida?y HTTP/1.1\r\n\r\n"))
    got(c)
    c.send("b", c.data("b", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))   # an ordinary handler
    assert got(c, wait=0.5) == b"" and alerts(hk, 201)


def test_reader_memory_goes_back_after_each_message():
    h = lib.vn_http_new(1024, 1, 1)
    ev = ffi.new("int *")
    big = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 30000 + b"\r\n\r\n"
    resp = b"HTTP/1.1 204 No Content\r\n\r\n"
    names = ffi.sizeof("struct vn_http_reqinfo")
    try:
        base = lib.vn_http_mem(h)
        for _ in range(2):
            assert lib.vn_http_feed(h, 0, big, len(big), ev) == len(big) and ev[0] == lib.VN_HTTP_EV_HEAD
            assert lib.vn_http_mem(h) > base + 30000
            lib.vn_http_settle(h, 0)
            # the big buffers are gone; what names the request for its response's alerts waits with it
            assert lib.vn_http_mem(h) == base + names
            assert lib.vn_http_feed(h, 1, resp, len(resp), ev) == len(resp) and ev[0] == lib.VN_HTTP_EV_HEAD
            assert ffi.string(lib.vn_http_answered(h).method) == b"GET"
            lib.vn_http_settle(h, 1)
            # the names went with the answer; only the response side's small working buffers stay,
            # the same after every exchange: an idle keep-alive connection keeps nothing more
            assert lib.vn_http_mem(h) <= base + 16384 + 2048 + 4096
            base = lib.vn_http_mem(h)
    finally:
        lib.vn_http_free(h)


def test_reader_chunk_framing_cannot_hold_a_body_without_bound():
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"1;" + b"e" * 1000 + b"\r\nA\r\n"
    evs = read([(0, head + chunk * 200)], body_limit=64)
    assert [e for e, s, b in evs][:2] == [lib.VN_HTTP_EV_HEAD, lib.VN_HTTP_EV_BODY]


def _reader_feed(h, side, data):
    """Feeds all of data, event by event (the reader stops after each)."""
    ev = ffi.new("int *")
    while data:
        n = lib.vn_http_feed(h, side, data, len(data), ev)
        assert n > 0, (n, data)
        lib.vn_http_settle(h, side)
        data = data[n:]


def test_reader_names_the_request_an_interim_or_switching_response_answers():
    h = lib.vn_http_new(1024, 0, 1)
    try:
        _reader_feed(h, 0, b"GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n"
                           b"GET /chat HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        _reader_feed(h, 1, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert ffi.string(lib.vn_http_answered(h).url) == b"/a"
        _reader_feed(h, 1, b"HTTP/1.1 100 Continue\r\n\r\n")        # interim: answers /b, which still waits
        assert ffi.string(lib.vn_http_answered(h).url) == b"/b"
        _reader_feed(h, 1, b"HTTP/1.1 204 No Content\r\n\r\n")
        assert ffi.string(lib.vn_http_answered(h).url) == b"/b"
        _reader_feed(h, 1, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        assert ffi.string(lib.vn_http_answered(h).url) == b"/chat"
    finally:
        lib.vn_http_free(h)


def test_reader_forgets_pending_requests_names_when_responses_stop_being_read():
    h = lib.vn_http_new(1024, 0, 1)
    try:
        base = lib.vn_http_mem(h)
        _reader_feed(h, 0, b"GET /x HTTP/1.1\r\n\r\n" * 20)
        assert lib.vn_http_mem(h) >= base + 20 * ffi.sizeof("struct vn_http_reqinfo")
        before = lib.vn_http_mem(h)
        ev = ffi.new("int *")
        junk = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"       # the server speaks TLS: no more responses
        lib.vn_http_feed(h, 1, junk, len(junk), ev)
        assert not lib.vn_http_active(h, 1)
        # the twenty names went (the response side's small head buffer, 1 or 2 KiB, came)
        assert lib.vn_http_mem(h) <= before - 20 * ffi.sizeof("struct vn_http_reqinfo") + 2048
    finally:
        lib.vn_http_free(h)
