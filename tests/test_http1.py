"""The sans-I/O HTTP/1.x codec of the scanner SDK (vhostni/scanner/http1.py): framing of requests
and responses (keep-alive, pipelining, 1.0/1.1, Content-Length, chunked, close-delimited,
bodiless responses, 1xx, tunnels), Content-Encoding with its bounds, every ambiguity reported,
the HTTP Evader corpus (tests/data/http-evader), and fuzzing: any bytes, fed in any pieces, give
events or ambiguities, never an exception, and the same events whatever the pieces.
"""
from __future__ import annotations

import base64
import gzip
import json
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from vhostni.scanner.http1 import (AMBIGUITIES, CLIENT, SERVER, Ambiguity, Body, Chunk, ChunkExtension,
                                   HttpConnection, Limits, MessageEnd, Request, Response, Trailers,
                                   Tunnel, content_codings, decode_content)

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
CASES = Path(__file__).resolve().parent / "data" / "http-evader" / "cases.jsonl.gz"
GET = b"GET /f HTTP/1.1\r\nHost: h\r\n\r\n"


def run(client: bytes, server: bytes, step: int = 0, limits: Limits = Limits(), eof: bool = True) -> list:
    """Feeds the client's bytes, then the server's (in ``step``-byte pieces), then EOF."""
    c = HttpConnection(limits)
    evs = []
    for side, data in ((CLIENT, client), (SERVER, server)):
        n = step or max(1, len(data))
        for i in range(0, len(data), n):
            evs += c.feed(side, data[i:i + n])
    if eof:
        evs += c.eof(SERVER)
    return evs


def responses(evs: list) -> list:
    """[(Response, body bytes, end offset or None)] of the server side."""
    out, cur = [], None
    for e in evs:
        if isinstance(e, Response):
            cur = [e, b"", None]
            out.append(cur)
        elif isinstance(e, Body) and e.side == SERVER:
            cur[1] += e.data
        elif isinstance(e, MessageEnd) and e.side == SERVER:
            cur[2] = e.end
    return [tuple(r) for r in out]


def kinds(evs: list) -> list:
    return [e.kind for e in evs if isinstance(e, Ambiguity)]


def chunked(data: bytes, size: int = 7) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
                    for i in range(0, len(data), size)) + b"0\r\n\r\n"


# ---------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("step", [0, 1, 5])
def test_keepalive_pipelining_lengths_chunked_and_close(step):
    reqs = GET + b"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n" + GET + b"GET /c HTTP/1.0\r\n\r\n"
    r1 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    r2 = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"               # HEAD: no body
    r3 = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"chunked body!")
    r4 = b"HTTP/1.0 200 OK\r\n\r\nuntil the end"                          # close-delimited
    evs = run(reqs, r1 + r2 + r3 + r4, step)
    assert not kinds(evs)
    got = responses(evs)
    assert [(r.status, r.framing, b, e) for r, b, e in got] == [
        (200, "length", b"hello", len(r1)), (200, "none", b"", len(r1 + r2)),
        (200, "chunked", b"chunked body!", len(r1 + r2 + r3)), (200, "close", b"until the end", len(r1 + r2 + r3 + r4))]
    assert [r.request.target for r, _, _ in got] == [b"/f", b"/h", b"/f", b"/c"]
    assert got[0][0].request.url == "http://h/f"


def test_request_bodies_1xx_204_304_and_tunnels():
    post = b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc"
    post2 = b"POST /v HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"data") + GET + GET
    server = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"
              b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
              b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"
              b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    evs = run(post + post2, server)
    assert not kinds(evs)
    reqs = [e for e in evs if isinstance(e, Request)]
    assert [r.target for r in reqs] == [b"/u", b"/v", b"/f", b"/f"]
    assert b"".join(e.data for e in evs if isinstance(e, Body) and e.side == CLIENT) == b"abcdata"
    got = responses(evs)
    assert [(r.status, r.interim, r.request.target) for r, _, _ in got] == [
        (100, True, b"/u"), (103, True, b"/u"), (201, False, b"/u"), (204, False, b"/v"),
        (304, False, b"/f"), (200, False, b"/f")]
    assert got[-1][1] == b"ok"
    evs = run(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n\x16\x03\x01",
              b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x03 tls")
    assert [e.side for e in evs if isinstance(e, Tunnel)] == [CLIENT, SERVER] and not kinds(evs)
    evs = run(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
              b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello")
    assert [e.side for e in evs if isinstance(e, Tunnel)] == [SERVER] and not kinds(evs)


def test_a_connect_is_a_tunnel_only_once_the_server_agrees():
    """The client's bytes after a CONNECT were taken for the tunnel's at once; a server that refuses
    CONNECT (405) and keeps the connection reads them as requests, so they now wait for the
    server's answer: a 2xx makes them the tunnel's, any other final answer leaves them HTTP."""
    connect = b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n"
    refused = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 405 Method Not Allowed\r\nContent-Length: 3\r\n\r\nno!"
    for step in (0, 1, 7):
        evs = run(connect + GET, refused + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", step)
        assert not kinds(evs) and not [e for e in evs if isinstance(e, Tunnel)]
        assert [e.target for e in evs if isinstance(e, Request)] == [b"h:443", b"/f"]
        assert [(r.status, r.request.target, b) for r, b, _ in responses(evs)] == [
            (100, b"h:443", b""), (405, b"h:443", b"no!"), (200, b"/f", b"ok")]
    c = HttpConnection()
    assert not [e for e in c.feed(CLIENT, connect + GET) if isinstance(e, Request) and e.target == b"/f"]
    evs = c.feed(SERVER, b"HTTP/1.1 200 Connection established\r\n\r\n")
    assert [(e.side, e.offset) for e in evs if isinstance(e, Tunnel)] == [(CLIENT, len(connect)), (SERVER, 39)]
    assert not [e for e in evs if isinstance(e, Request)] and c.feed(CLIENT, GET) == []
    c = HttpConnection()                        # the client leaves before the answer, bytes unread
    c.feed(CLIENT, connect + GET)
    (amb,) = c.eof(CLIENT)
    assert amb.kind == "truncated" and amb.fatal
    c = HttpConnection(Limits(max_head=1000))   # what waits for the answer is bounded
    (amb,) = [e for e in c.feed(CLIENT, connect + bytes(1001)) if isinstance(e, Ambiguity)]
    assert amb.kind == "head_too_long" and amb.fatal
    # a CONNECT has no content: one that says it has is read differently by a server that refuses it
    for field in (b"Content-Length: 40", b"Transfer-Encoding: chunked"):
        evs = run(connect.replace(b"\r\n\r\n", b"\r\n" + field + b"\r\n\r\n") + GET, b"")
        assert [(e.kind, e.fatal) for e in evs if isinstance(e, Ambiguity)][:1] == [("connect_with_content", True)]
    assert not kinds(run(connect.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"),
                         b"HTTP/1.1 200 OK\r\n\r\n"))


def test_chunk_extensions_and_trailers():
    body = b"5;name=value;q=\"quo\\\"ted\"\r\nhello\r\n6 ; x\r\n world\r\n0;last\r\nX-Sum: 1\r\n\r\n"
    evs = run(GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert not kinds(evs)
    assert [e.ext for e in evs if isinstance(e, ChunkExtension)] == [
        b";name=value;q=\"quo\\\"ted\"", b"; x", b";last"]
    (tr,) = [e for e in evs if isinstance(e, Trailers)]
    assert tr.headers == [(b"x-sum", b"1")]
    assert responses(evs)[0][1] == b"hello world"
    # each chunk-size line is reported with its size and where the chunk's data starts
    head = len(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunks = [(e.size, e.offset - head, e.end - head) for e in evs if isinstance(e, Chunk)]
    starts = [0, body.index(b"6 ; x"), body.index(b"0;last")]
    ends = [body.index(b"hello"), body.index(b" world"), body.index(b"X-Sum")]
    assert chunks == list(zip([5, 6, 0], starts, ends))
    evs = run(GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 5\r\n\r\n")
    assert kinds(evs) == ["framing_in_trailer"]


def test_a_lone_cr_waits_for_what_follows_it():
    """A CRLF before a status line sent a byte at a time is the same empty line as sent at once
    (the CR alone was read as an HTTP/0.9 response's first byte)."""
    c = HttpConnection()
    c.feed(CLIENT, GET)
    evs = c.feed(SERVER, b"\r") + c.feed(SERVER, b"\n") + c.feed(SERVER, b"HTTP/1.1 204 No Content\r\n\r\n")
    assert kinds(evs) == ["leading_blank_line"]
    assert [(e.status, e.version) for e in evs if isinstance(e, Response)] == [(204, b"HTTP/1.1")]


def test_unsolicited_and_truncated():
    evs = run(GET, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
    assert kinds(evs) == ["unsolicited_response"] and evs[-1].fatal
    evs = run(GET, b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nshort")
    assert kinds(evs) == ["truncated"]
    evs = run(GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
    assert kinds(evs) == ["truncated"]
    # a server may answer a request whose head has not all arrived yet (431, say): no ambiguity
    c = HttpConnection()
    c.feed(CLIENT, b"GET / HTTP/1.1\r\nX: " + b"a" * 100)
    assert not kinds(c.feed(SERVER, b"HTTP/1.1 431 Too large\r\nContent-Length: 0\r\n\r\n"))


# ---------------------------------------------------------------------------
# Ambiguities: each one is reported, with the reading the codec went on with
# ---------------------------------------------------------------------------

OK = b"HTTP/1.1 200 OK\r\n"
AMBIGUOUS = [
    (OK + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n" + chunked(b"abc"), "te_and_cl"),
    (OK + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", "duplicate_content_length"),
    (OK + b"Content-Length: 3, 3\r\n\r\nabc", "duplicate_content_length"),
    (OK + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "conflicting_content_length"),
    (OK + b"Content-Length: +3\r\n\r\nabc", "bad_content_length"),
    (OK + b"Content-Length: 3 3\r\n\r\nabc", "bad_content_length"),
    (OK + b"Transfer-Encoding: gzip\r\n\r\nabc", "te_not_chunked"),
    (OK + b"Transfer-Encoding: chunked, gzip\r\n\r\nabc", "te_not_chunked"),
    (OK + b"Transfer-Encoding: xchunked\r\n\r\nabc", "te_not_chunked"),
    (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"abc"), "te_in_http10"),
    (OK + b"Content-Type: a\r\n b\r\nContent-Length: 3\r\n\r\nabc", "obs_fold"),
    (OK + b"Content-Length: 3\n\r\nabc", "bare_lf"),
    (b"HTTP/1.1 200 OK\nContent-Length: 3\n\nabc", "bare_lf"),
    (OK + b"X: a\rContent-Length: 3\r\n\r\nabc", "bare_cr"),
    (b"HTTP/1.1 200 OK\rTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc", "bare_cr"),
    (OK + b"X: a\0b\r\nContent-Length: 3\r\n\r\nabc", "nul_in_head"),
    (OK + b"X: a\x0bb\r\nContent-Length: 3\r\n\r\nabc", "ctl_in_head"),
    (OK + b"Content-Length : 3\r\n\r\nabc", "space_before_colon"),
    (OK + b"X\xe4: 1\r\nContent-Length: 3\r\n\r\nabc", "bad_field_name"),
    (OK + b"junk line\r\nContent-Length: 3\r\n\r\nabc", "no_colon"),
    (b"abcdefgh", "no_status_line"),
    (b"HTTP/1.2 200 OK\r\nContent-Length: 3\r\n\r\nabc", "bad_version"),
    (b"http/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", "bad_status_line"),
    (b"HTTP/1.1 2000 OK\r\nContent-Length: 3\r\n\r\nabc", "bad_status_line"),
    (b"HTTP/1.1 700 OK\r\nContent-Length: 3\r\n\r\nabc", "odd_status"),
    (OK + b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", "chunk_size_syntax"),
    (OK + b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n", "chunk_size_syntax"),
    (OK + b"Transfer-Encoding: chunked\r\n\r\n 3\r\nabc\r\n0\r\n\r\n", "chunk_size_syntax"),
    (OK + b"Transfer-Encoding: chunked\r\n\r\n3;\r\nabc\r\n0\r\n\r\n", "chunk_size_syntax"),
    (OK + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", "bare_lf"),
    (OK + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n", "chunk_data_terminator"),
    (OK + b"Transfer-Encoding: chunked\r\n\r\n11111111111111111\r\n", "chunk_size_overflow"),
    (OK + b"Content-Length: 3\r\n" + b"X: y\r\n" * 300 + b"\r\nabc", "too_many_headers"),
    (OK + b"X: " + b"y" * 9000 + b"\r\n\r\n", "head_too_long"),
]


@pytest.mark.parametrize("server,kind", AMBIGUOUS, ids=[k for _, k in AMBIGUOUS])
@pytest.mark.parametrize("step", [0, 1])
def test_every_ambiguity_is_reported(server, kind, step):
    evs = run(GET, server, step)
    assert kind in kinds(evs), evs
    assert set(kinds(evs)) <= set(AMBIGUITIES)


def test_lenient_reading_goes_on_where_it_can():
    """A tolerated ambiguity still gives the reading RFC 9112 takes: chunked over
    Content-Length, a folded value joined, duplicate lengths as one."""
    evs = run(GET, OK + b"Transfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n" + chunked(EICAR))
    assert responses(evs)[0][1] == EICAR
    evs = run(GET, OK + b"Content-Type: text/\r\n plain\r\nContent-Length: 2\r\n\r\nok")
    r, body, _ = responses(evs)[0]
    assert (r.headers[0], body) == ((b"content-type", b"text/ plain"), b"ok")


# ---------------------------------------------------------------------------
# Content-Encoding
# ---------------------------------------------------------------------------

def test_content_encodings_as_browsers_decode_them():
    raw_deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    rd = raw_deflate.compress(EICAR) + raw_deflate.flush()
    assert decode_content(gzip.compress(EICAR), [b"gzip"]).data == EICAR
    assert decode_content(gzip.compress(EICAR), [b"x-gzip"]).data == EICAR
    assert decode_content(zlib.compress(EICAR), [b"deflate"]).data == EICAR
    d = decode_content(rd, [b"deflate"])
    assert d.data == EICAR and not d.ambiguities          # raw deflate: what browsers accept
    stacked = gzip.compress(zlib.compress(EICAR))
    d = decode_content(stacked, [b"deflate", b"gzip"])
    assert (d.data, d.layers, d.ambiguities) == (EICAR, ["gzip", "deflate"], [])
    headers = [(b"content-encoding", b"deflate"), (b"content-encoding", b"gzip")]
    assert content_codings(headers) == [b"deflate", b"gzip"]
    assert decode_content(EICAR, [b"identity"]).data == EICAR


@pytest.mark.parametrize("body,codings,kind", [
    (gzip.compress(EICAR), [b"gzip", b"gzip", b"gzip", b"gzip"], "too_many_encodings"),
    (EICAR, [b"foo"], "unknown_content_encoding"),
    (EICAR, [b"compress"], "unsupported_content_encoding"),
    (gzip.compress(EICAR), [b"", b"gzip"], "odd_content_encoding"),
    (EICAR, [b"gzip"], "compressed_corrupt"),
    (gzip.compress(EICAR)[:-12], [b"gzip"], "compressed_truncated"),
    (gzip.compress(EICAR)[:-8], [b"gzip"], "gzip_trailer"),
    (gzip.compress(EICAR)[:-8] + b"\0\0\0\0" + gzip.compress(EICAR)[-4:], [b"gzip"], "gzip_trailer"),
    (gzip.compress(EICAR) + gzip.compress(b"second"), [b"gzip"], "compressed_trailing_data"),
    (gzip.compress(EICAR)[:3] + b"\xe0" + gzip.compress(EICAR)[4:], [b"gzip"], "gzip_header"),
    (zlib.compress(EICAR)[:-4] + b"\0\0\0\0", [b"deflate"], "zlib_checksum"),
    (zlib.compress(b"\0" * (1 << 20)), [b"deflate"], "decompression_bomb"),
])
def test_content_encoding_ambiguities(body, codings, kind):
    d = decode_content(body, codings, max_layers=3, max_bytes=1 << 16)
    assert kind in [k for k, _ in d.ambiguities], d.ambiguities
    assert len(d.data) <= 1 << 16


def test_a_bomb_is_never_followed():
    bomb = zlib.compress(zlib.compress(b"\0" * (50 << 20)))     # 50 MiB in about 1 KiB... twice
    d = decode_content(bomb, [b"deflate", b"deflate"], max_bytes=1 << 20)
    assert d.bomb and len(d.data) <= 1 << 20


# ---------------------------------------------------------------------------
# br and zstd: decoded as browsers do, bounded, every oddity reported
# ---------------------------------------------------------------------------

import brotli  # noqa: E402
from backports import zstd  # noqa: E402

from vhostni.scanner import http1  # noqa: E402


def zstd_frame(window_byte: int, payload: bytes = b"hello") -> bytes:
    """One zstd frame by hand: no content size, so its window descriptor (``window_byte``:
    exponent << 3 | mantissa, window 2**(10 + exponent)) is what a decoder must allocate."""
    return b"\x28\xb5\x2f\xfd\x00" + bytes([window_byte]) + (1 | len(payload) << 3).to_bytes(3, "little") + payload


SKIPPABLE = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"


def test_br_and_zstd_are_decoded_stacked_with_the_others():
    assert http1.MISSING_DECODERS == {}
    d = decode_content(brotli.compress(EICAR), [b"br"])
    assert (d.data, d.layers, d.ambiguities) == (EICAR, ["br"], [])
    d = decode_content(zstd.compress(EICAR), [b"zstd"])
    assert (d.data, d.layers, d.ambiguities) == (EICAR, ["zstd"], [])
    d = decode_content(zstd.compress(brotli.compress(gzip.compress(EICAR))), [b"gzip", b"br", b"zstd"])
    assert (d.data, d.layers, d.ambiguities) == (EICAR, ["zstd", "br", "gzip"], [])
    # concatenated frames and skippable frames, as libzstd's streaming decoder (browsers') reads them
    d = decode_content(zstd.compress(EICAR[:30]) + SKIPPABLE + zstd.compress(EICAR[30:]), [b"zstd"])
    assert (d.data, d.ambiguities) == (EICAR, [])
    assert decode_content(b"", [b"br"]).data == b"" and not decode_content(b"", [b"zstd"]).ambiguities
    # a large clean object, stream-compressed as a server does
    big = bytes((i * 7 + 3) % 251 for i in range(3 << 20))
    assert decode_content(brotli.compress(big, quality=1), [b"br"]).data == big
    assert decode_content(zstd.compress(big), [b"zstd"]).data == big


def test_br_and_zstd_across_the_decoders_input_pieces():
    """Streams longer than the pieces the decoders are fed (4 KiB for br, 64 KiB for zstd):
    frames and the end of a stream fall anywhere, trailing data is still told from corruption."""
    import random
    noise = random.Random(7).randbytes(300_000)
    br = brotli.compress(noise, quality=1)
    for tail in (b"", b"x", b"\0" * 5000):
        d = decode_content(br + tail, [b"br"])
        assert d.data == noise and [k for k, _ in d.ambiguities] == (["compressed_trailing_data"] if tail else [])
    zs = zstd.compress(noise[:150_000]) + SKIPPABLE + zstd.compress(noise[150_000:])
    for tail in (b"", b"garbage", b"\0" * 70_000):
        d = decode_content(zs + tail, [b"zstd"])
        assert d.data == noise and [k for k, _ in d.ambiguities] == (["compressed_trailing_data"] if tail else [])
    d = decode_content(zs[:200_000], [b"zstd"])
    assert d.data == noise[:len(d.data)] and [k for k, _ in d.ambiguities] == ["compressed_truncated"]
    d = decode_content(br[:200_000], [b"br"])
    assert d.data == noise[:len(d.data)] and [k for k, _ in d.ambiguities] == ["compressed_truncated"]


BR, ZS = brotli.compress(EICAR), zstd.compress(EICAR)


@pytest.mark.parametrize("body,codings,kind", [
    (BR[:-3], [b"br"], "compressed_truncated"),
    (BR + b"garbage", [b"br"], "compressed_trailing_data"),
    (BR + BR, [b"br"], "compressed_trailing_data"),
    (b"\xff" * 40, [b"br"], "compressed_corrupt"),
    (BR[:5] + bytes([BR[5] ^ 0x55]) + BR[6:], [b"br"], "compressed_corrupt"),
    (brotli.compress(b"\0" * (4 << 20)), [b"br"], "decompression_bomb"),
    (ZS[:-3], [b"zstd"], "compressed_truncated"),
    (ZS + b"garbage!", [b"zstd"], "compressed_trailing_data"),
    (b"\x28\xb5\x2f\xfdgarbage", [b"zstd"], "compressed_corrupt"),
    (zstd_frame(0xA0), [b"zstd"], "compressed_corrupt"),              # a 1 GiB window
    (zstd.compress(b"\0" * (4 << 20)), [b"zstd"], "decompression_bomb"),
    (zstd.compress(b"") * 2000, [b"zstd"], "decompression_bomb"),    # a bomb of decoding time
    (brotli.compress(zstd.compress(b"\0" * (4 << 20))), [b"zstd", b"br"], "decompression_bomb"),
])
def test_br_and_zstd_ambiguities(body, codings, kind):
    d = decode_content(body, codings, max_layers=3, max_bytes=1 << 16)
    assert kind in [k for k, _ in d.ambiguities], d.ambiguities
    assert len(d.data) <= 1 << 16 and len([k for k, _ in d.ambiguities if k == kind]) == 1


def test_the_zstd_window_bound_is_the_callers():
    assert decode_content(zstd_frame(0x68), [b"zstd"]).data == b"hello"            # 8 MiB: what browsers take
    assert decode_content(zstd_frame(0x70), [b"zstd"]).ambiguities[0][0] == "compressed_corrupt"   # 16 MiB
    assert decode_content(zstd_frame(0x70), [b"zstd"], max_window=16 << 20).data == b"hello"
    d = decode_content(zstd_frame(0x68), [b"zstd"], max_window=1 << 20)
    assert "window" in d.ambiguities[0][1]


@pytest.mark.parametrize("coding", [b"br", b"zstd"])
def test_a_br_or_zstd_bomb_is_never_materialised(coding):
    """A gigabyte from a few kilobytes: decoding stops at the bound, never holding more than it
    and one output block (the libraries' one-shot calls would allocate the whole gigabyte)."""
    import tracemalloc
    if coding == b"br":
        c = brotli.Compressor(quality=1)
        bomb = b"".join(c.process(b"\0" * (64 << 20)) for _ in range(16)) + c.finish()
    else:
        c = zstd.ZstdCompressor()
        bomb = b"".join(c.compress(b"\0" * (64 << 20)) for _ in range(16)) + c.flush()
    assert len(bomb) < 1 << 20
    tracemalloc.start()
    try:
        d = decode_content(bomb, [coding], max_bytes=4 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert d.bomb and len(d.data) == 4 << 20
    assert peak < 2 * (4 << 20) + (1 << 20), peak        # the output, its bytes copy, a block


def test_without_their_libraries_br_and_zstd_are_unsupported_as_before():
    import subprocess
    import sys
    code = ("import sys; sys.modules['brotli'] = None; sys.modules['backports.zstd'] = None\n"
            "sys.modules['compression.zstd'] = None\n"
            "from vhostni.scanner.http1 import MISSING_DECODERS, decode_content\n"
            "print(sorted(MISSING_DECODERS))\n"
            "for c in (b'br', b'zstd'): print(decode_content(b'x', [c]).ambiguities[0][0])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == ["['br', 'zstd']", "unsupported_content_encoding", "unsupported_content_encoding"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from([b"br", b"zstd"]), st.data())
def test_fuzz_br_and_zstd_round_trip_and_mutants_stay_bounded(payload, coding, data):
    """Whatever is compressed decodes back without ambiguity; any cut, flipped byte or tail
    gives output within the bound and known ambiguity kinds, never an exception."""
    comp = brotli.compress(payload, quality=data.draw(st.integers(0, 11))) if coding == b"br" \
        else zstd.compress(payload, level=data.draw(st.integers(1, 19)))
    d = decode_content(comp, [coding], max_bytes=4096)
    if len(payload) <= 4096:
        assert (d.data, d.ambiguities) == (payload, [])
    else:
        assert d.bomb and d.data == payload[:4096]
    mutant = bytearray(comp)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["cut", "flip", "tail"]))
        if op == "cut" and mutant:
            del mutant[data.draw(st.integers(0, len(mutant) - 1)):]
        elif op == "flip" and mutant:
            mutant[data.draw(st.integers(0, len(mutant) - 1))] ^= data.draw(st.integers(1, 255))
        else:
            mutant += data.draw(st.binary(min_size=1, max_size=20))
    d = decode_content(bytes(mutant), [coding], max_bytes=4096)
    assert len(d.data) <= 4096 and all(k in AMBIGUITIES for k, _ in d.ambiguities)


# ---------------------------------------------------------------------------
# The HTTP Evader corpus: every case either decodes to EICAR or is reported ambiguous
# ---------------------------------------------------------------------------

def evader_cases() -> list:
    with gzip.open(CASES, "rt") as f:
        return [json.loads(line) for line in f]


def test_http_evader_corpus_never_hides_the_file():
    """502 deliveries of EICAR (OISF suricata-verify's http-evader pcaps): the codec either
    finds the file in a response body as decoded (Content-Encoding undone), or reports an
    ambiguity or a tunnel for the response, so a scanner that blocks those lets none through."""
    cases = evader_cases()
    assert len(cases) == 502
    hidden, found = [], 0
    for case in cases:
        evs = run(base64.b64decode(case["request"]), base64.b64decode(case["response"]))
        flagged = bool(kinds(evs)) or any(isinstance(e, Tunnel) for e in evs)
        for r, body, end in responses(evs):
            d = decode_content(body, content_codings(r.headers))
            flagged |= bool(d.ambiguities)
            found += EICAR in body or EICAR in d.data
        if not flagged and not found:
            hidden.append(case["case"])
    assert not hidden
    assert found >= 290       # the file is decoded in most of them, ambiguous or not


def test_http_evader_corpus_in_one_byte_pieces_gives_the_same_events():
    for case in evader_cases()[::7]:
        req, resp = base64.b64decode(case["request"]), base64.b64decode(case["response"])
        whole = run(req, resp)
        bytewise = run(req, resp, step=1)
        assert responses(whole) == responses(bytewise), case["case"]
        assert [(k, ) for k in sorted(set(kinds(whole)))] == [(k, ) for k in sorted(set(kinds(bytewise)))]


# ---------------------------------------------------------------------------
# Fuzzing
# ---------------------------------------------------------------------------

PIECES = [b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 ", b"204", b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
          b"\r\n", b"\n", b"\r", b"5\r\n", b"0\r\n\r\n", b"hello", b" ", b"\0", b"Content-Length: 99999999999999999999\r\n",
          b"ffffffffffffffffff\r\n", b"X: y\r\n", b"\t folded\r\n", b"GET / HTTP/1.1\r\n", b"HEAD / HTTP/1.1\r\n\r\n"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES) | st.binary(max_size=12), max_size=30),
       st.lists(st.sampled_from(PIECES) | st.binary(max_size=12), max_size=30), st.integers(1, 9))
def test_fuzz_never_raises_and_pieces_do_not_matter(client, server, step):
    c, s = b"".join(client), b"".join(server)
    lim = Limits(max_line=64, max_head=256, max_headers=8)
    whole = run(c, s, limits=lim)
    pieces = run(c, s, step=step, limits=lim)
    for e in whole:
        if isinstance(e, Ambiguity):
            assert e.kind in AMBIGUITIES
    assert responses(whole) == responses(pieces)
    for r, body, _ in responses(whole):
        decode_content(body, content_codings(r.headers), max_bytes=4096)


def test_a_head_sent_a_byte_at_a_time_costs_linear_time():
    """A server (or client) trickling a large head one byte per segment must not make the
    codec rescan it on every byte (it did: quadratic, ~20 s for this head)."""
    import time
    head = OK + b"".join(b"X-Field-%04d: some value here\r\n" % i for i in range(1000)) + b"Content-Length: 2\r\n\r\nok"
    c = HttpConnection(Limits(max_headers=2000))
    c.feed(CLIENT, GET)
    t0 = time.perf_counter()
    evs = []
    for i in range(len(head)):
        evs += c.feed(SERVER, head[i:i + 1])
    took = time.perf_counter() - t0
    assert responses(evs)[0][1] == b"ok" and not kinds(evs)
    assert took < 3.0, f"{len(head)} bytes one at a time took {took:.1f} s"


def test_many_small_heads_in_one_feed_cost_linear_time():
    """A client pipelining thousands of requests, or a server sending thousands of 1xx heads,
    in one segment: finding each head's end searched the whole rest of the buffer (for a
    "\\n\\n" a CRLF head never has), quadratic: ~36 s for 80000 requests (2 MB)."""
    import time
    n = 60000
    t0 = time.perf_counter()
    c = HttpConnection(Limits(max_pipelined=n + 1))
    evs = c.feed(CLIENT, GET * n)
    took = time.perf_counter() - t0
    assert sum(isinstance(e, Request) for e in evs) == n and not kinds(evs)
    assert took < 6.0, f"{n} pipelined requests in one feed took {took:.1f} s"
    c = HttpConnection()
    c.feed(CLIENT, GET)
    t0 = time.perf_counter()
    evs = c.feed(SERVER, b"HTTP/1.1 100 Continue\r\n\r\n" * n + OK + b"Content-Length: 2\r\n\r\nok")
    took = time.perf_counter() - t0
    assert responses(evs)[-1][1] == b"ok"
    assert took < 6.0, f"{n} 1xx heads in one feed took {took:.1f} s"
    # heads ending in bare LFs (tolerated by a caller) are found line by line too, not by a
    # search through max_head bytes for a CRLF end they do not have
    t0 = time.perf_counter()
    c = HttpConnection(Limits(max_pipelined=n + 1))
    evs = c.feed(CLIENT, GET.replace(b"\r\n", b"\n") * n)
    took = time.perf_counter() - t0
    assert sum(isinstance(e, Request) for e in evs) == n and set(kinds(evs)) == {"bare_lf"}
    assert took < 6.0, f"{n} bare-LF pipelined requests in one feed took {took:.1f} s"


def test_chunked_answering_an_http10_request_is_ambiguous():
    evs = run(b"GET / HTTP/1.0\r\n\r\n", OK + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b"abc"))
    assert kinds(evs) == ["te_in_http10"]


def test_server_bytes_waiting_for_a_request_are_bounded():
    """While a request's head is still coming, the server's bytes wait for it, but not without end."""
    c = HttpConnection(Limits(max_head=1000))
    c.feed(CLIENT, b"GET / HTTP/1.1\r\nX: ")
    assert not c.feed(SERVER, b"x" * 900)
    evs = c.feed(SERVER, b"x" * 200)
    assert kinds(evs) == ["head_too_long"] and evs[-1].fatal


def test_pipelined_requests_are_bounded():
    c = HttpConnection(Limits(max_pipelined=5))
    assert not kinds(c.feed(CLIENT, GET * 5))
    evs = c.feed(CLIENT, GET)
    assert kinds(evs) == ["too_many_pipelined"] and evs[-1].fatal
    assert not c.feed(CLIENT, GET)            # the side stopped


def test_body_offsets_are_where_the_bytes_are_on_the_wire():
    head = b"HTTP/1.0 200 OK\r\n\r\n"
    c = HttpConnection()
    c.feed(CLIENT, GET)
    evs = c.feed(SERVER, head + b"abc")
    c.server.buf += b"def"              # arrived with the FIN, say, not parsed yet
    evs += c.eof(SERVER)
    assert [(e.data, e.offset) for e in evs if isinstance(e, Body)] == [(b"abc", len(head)), (b"def", len(head) + 3)]
