"""The web-download scanner (scanners/webdl): its decisions over HTTP conversations (clean
downloads pass byte for byte, infected ones are killed before their last byte passes, every HTTP
Evader delivery of EICAR is stopped, ambiguity handling, bombs, tunnels, engine errors), and the
scanner end to end in the NI kernel over simulated TCP conversations.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import json
import sys
import time
import zlib
from pathlib import Path

import brotli
import pytest
from backports import zstd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # scanners/ is not an installed package

from scanners.webdl import ConfigError, EngineError, WebDownloadScanner, load_config  # noqa: E402

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SHA = hashlib.sha256(EICAR).hexdigest()
CASES = REPO / "tests" / "data" / "http-evader" / "cases.jsonl.gz"
CLEAN = bytes((i * 7 + 3) % 256 for i in range(20000))
GET = b"GET /files/x.bin HTTP/1.1\r\nHost: dl.example\r\nUser-Agent: Wget\r\n\r\n"
FROM_GUEST, TO_GUEST = 1, 2


def chunked(data: bytes, size: int = 1000) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
                    for i in range(0, len(data), size)) + b"0\r\n\r\n"


def resp(body: bytes, *headers: bytes, status: bytes = b"200 OK", length: bool = True) -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\nContent-Type: application/octet-stream\r\n" + b"".join(h + b"\r\n" for h in headers)
    if length:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


def run_core(core: WebDownloadScanner, client: bytes, server: bytes, step: int = 0, fin: bool = True,
             client_is_guest: bool = True) -> list:
    """The guest's requests, then the server's responses (in ``step``-byte pieces), then the
    server's FIN.  Directions: the client is the guest unless ``client_is_guest`` is False."""
    cdir, sdir = (FROM_GUEST, TO_GUEST) if client_is_guest else (TO_GUEST, FROM_GUEST)
    acts = core.open(1, 80, client_is_guest, ("tcp", "10.0.0.1", 40000, "10.0.0.2", 80))
    off = {cdir: 0, sdir: 0}
    for d, data in ((cdir, client), (sdir, server)):
        n = step or max(1, len(data))
        for i in range(0, len(data), n):
            acts += core.data(1, d, off[d], data[i:i + n])
            off[d] += len(data[i:i + n])
    if fin:
        acts += core.end(1, sdir, off[sdir])
    return acts


def passed(acts, direction) -> int:
    return max([a[2] for a in acts if a[0] == "pass" and a[1] == direction] or [0])


def killed(acts) -> bool:
    return any(a[0] == "kill" for a in acts)


def alerts(acts) -> list:
    return [a for a in acts if a[0] == "alert"]


def scanner(**cfg) -> WebDownloadScanner:
    return WebDownloadScanner(dict({"bad_sha256": [f"{EICAR_SHA} EICAR-Test-File"]}, **cfg))


# ---------------------------------------------------------------------------
# Clean downloads pass byte for byte, in any framing
# ---------------------------------------------------------------------------

CLEAN_CONVERSATIONS = {
    "content-length": (GET, resp(CLEAN)),
    "chunked": (GET, resp(chunked(CLEAN), b"Transfer-Encoding: chunked", length=False)),
    "gzip": (GET, resp(gzip.compress(CLEAN), b"Content-Encoding: gzip")),
    "br": (GET, resp(brotli.compress(CLEAN), b"Content-Encoding: br")),
    "zstd chunked": (GET, resp(chunked(zstd.compress(CLEAN)), b"Content-Encoding: zstd",
                               b"Transfer-Encoding: chunked", length=False)),
    "gzip, br": (GET, resp(brotli.compress(gzip.compress(CLEAN)), b"Content-Encoding: gzip, br")),
    "deflate chunked": (GET, resp(chunked(zlib.compress(CLEAN)), b"Content-Encoding: deflate",
                                  b"Transfer-Encoding: chunked", length=False)),
    "close-delimited 1.0": (b"GET / HTTP/1.0\r\n\r\n", b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n" + CLEAN),
    "keep-alive pipelined": (GET * 3 + b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
                             resp(CLEAN) + resp(b"", status=b"304 Not Modified", length=False)
                             + resp(chunked(CLEAN[:999]), b"Transfer-Encoding: chunked", length=False)
                             + b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n"),
    "100-continue": (b"POST /u HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\ndata",
                     b"HTTP/1.1 100 Continue\r\n\r\n" + resp(b"stored")),
}


@pytest.mark.parametrize("name", list(CLEAN_CONVERSATIONS))
@pytest.mark.parametrize("step", [0, 1000, 1])
def test_clean_downloads_pass_byte_for_byte(name, step):
    if step == 1 and name != "keep-alive pipelined":
        step = 7
    client, server = CLEAN_CONVERSATIONS[name]
    core = scanner()
    acts = run_core(core, client, server, step)
    assert not killed(acts) and not alerts(acts), alerts(acts)
    assert passed(acts, FROM_GUEST) == len(client) and passed(acts, TO_GUEST) == len(server)
    assert core.stats["infected"] == 0 and core.stats["clean"] >= 1


def test_a_response_is_held_until_its_last_byte_and_more_is_asked_once():
    core = scanner()
    first = resp(b"ok")
    server = first + resp(CLEAN)
    acts = core.open(1, 80, True)
    acts += core.data(1, FROM_GUEST, 0, GET + GET)
    acts += core.data(1, TO_GUEST, 0, server[:-1])
    assert passed(acts, TO_GUEST) == len(first)          # the second response waits for its last byte
    assert [a for a in acts if a[0] == "more"] == [("more", TO_GUEST)] * 2
    acts += core.data(1, TO_GUEST, len(server) - 1, server[-1:])
    assert passed(acts, TO_GUEST) == len(server)


# ---------------------------------------------------------------------------
# Infected downloads are killed before their last byte passes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("server", [
    resp(EICAR),
    resp(chunked(EICAR, 5), b"Transfer-Encoding: chunked", length=False),
    resp(gzip.compress(gzip.compress(EICAR)), b"Content-Encoding: gzip, gzip"),
    resp(gzip.compress(EICAR), b"Content-Encoding: gzip", b"Content-Disposition: attachment; filename=\"e.com\""),
    resp(brotli.compress(EICAR), b"Content-Encoding: br"),
    resp(chunked(zstd.compress(EICAR), 7), b"Content-Encoding: zstd", b"Transfer-Encoding: chunked", length=False),
    resp(zstd.compress(brotli.compress(EICAR)), b"Content-Encoding: br", b"Content-Encoding: zstd"),
    b"HTTP/1.0 200 OK\r\n\r\n" + EICAR,
])
@pytest.mark.parametrize("step", [0, 3])
def test_infected_downloads_are_killed_with_an_alert(server, step):
    clean = resp(b"first, clean")
    core = scanner()
    acts = run_core(core, GET + GET, clean + server, step)
    assert killed(acts)
    assert passed(acts, TO_GUEST) == len(clean)        # nothing of the infected response
    (alert,) = alerts(acts)
    f = alert[2]
    assert f["event"] == "virus" and f["action"] == "kill" and f["verdict"] == "EICAR-Test-File"
    assert f["url"] == "http://dl.example/files/x.bin" and f["sha256"] == EICAR_SHA
    assert f["filename"] in ("x.bin", "e.com") and ["Host", "dl.example"] not in f["request_headers"]
    assert ["host", "dl.example"] in f["request_headers"] and isinstance(f["response_headers"], list)
    assert base64.b64decode(f["object_b64"]) in (EICAR, server[-len(base64.b64decode(f["object_b64"])):])


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


@pytest.mark.parametrize("step", [0, 5])
def test_an_infected_response_is_replaced_and_the_connection_goes_on(step):
    rep = example_replacement()
    core = scanner(replacement_injection="blocked")
    assert core.replacement is None                   # not registered: kill
    core = WebDownloadScanner({"bad_sha256": [f"{EICAR_SHA} EICAR-Test-File"], "replacement_injection": "blocked"},
                              stream_injections=["blocked"])
    first, bad, after = resp(b"first"), resp(gzip.compress(EICAR), b"Content-Encoding: gzip"), resp(CLEAN)
    server = first + bad + after
    acts = run_core(core, GET * 3, server, step)
    assert not killed(acts)
    assert [a for a in acts if a[0] in ("inject", "cut")] == [
        ("inject", TO_GUEST, len(first), "blocked"), ("cut", TO_GUEST, len(first), len(bad))]
    assert passed(acts, TO_GUEST) == len(server)
    assert edited(server, acts, TO_GUEST, {"blocked": rep}) == first + rep + after
    (alert,) = alerts(acts)
    assert alert[2]["action"] == "replace" and alert[2]["replaced"] == [len(first), len(bad)]
    assert "response replaced" in alert[1] and alert[2]["verdict"] == "EICAR-Test-File"
    # the kernel refusing the edit kills instead
    acts = core.edit_refused(1, ("cut", TO_GUEST, len(first), len(bad)), "too many edits")
    assert killed(acts) and "refused" in alerts(acts)[0][1] and alerts(acts)[0][2]["action"] == "kill"


def test_guest_servers_are_scanned_only_when_the_policy_says():
    acts = run_core(scanner(), GET, resp(EICAR), client_is_guest=False)
    assert ("pass_all", FROM_GUEST) in acts and not killed(acts)
    acts = run_core(scanner(guest_servers=True), GET, resp(EICAR), client_is_guest=False)
    assert killed(acts) and passed(acts, FROM_GUEST) == 0 and passed(acts, TO_GUEST) == len(GET)


def test_engine_verdicts_and_errors():
    seen = []

    def engine(data):
        seen.append(data)
        if b"BAD" in data:
            return "Test.Sig"
        if b"ERR" in data:
            raise EngineError("clamd: boom")
        return None

    core = WebDownloadScanner({}, engine=engine)
    acts = run_core(core, GET, resp(gzip.compress(b"xxBADxx"), b"Content-Encoding: gzip"))
    assert killed(acts) and alerts(acts)[0][2]["engine"] == "clamd" and alerts(acts)[0][2]["object"] == "decoded"
    assert seen == [b"xxBADxx"]
    acts = run_core(WebDownloadScanner({}, engine=engine), GET, resp(b"ERR"))
    assert killed(acts) and alerts(acts)[0][2]["event"] == "unchecked"
    acts = run_core(WebDownloadScanner({"engine_error": "pass"}, engine=engine), GET, resp(b"ERR"))
    assert not killed(acts) and passed(acts, TO_GUEST) == len(resp(b"ERR"))


# ---------------------------------------------------------------------------
# Ambiguity is an attack
# ---------------------------------------------------------------------------

def evader_cases() -> list:
    with gzip.open(CASES, "rt") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("step", [0, 11])
def test_no_http_evader_delivery_of_eicar_gets_through(step):
    """All 502 HTTP Evader cases: the connection is killed and the server's last byte never
    passes, nor anything of the body (EICAR by digest only: no clamd needed)."""
    through = []
    reasons: dict = {}
    for case in evader_cases():
        req, res = base64.b64decode(case["request"]), base64.b64decode(case["response"])
        acts = run_core(scanner(), req, res, step)
        p = passed(acts, TO_GUEST)
        if not killed(acts) or p >= len(res) or EICAR[:20] in res[:p]:
            through.append(case["case"])
        for a in alerts(acts):
            key = a[2]["event"] if a[2]["event"] != "ambiguity" else a[2]["kind"]
            reasons[key] = reasons.get(key, 0) + 1
    assert not through, through
    assert reasons.get("virus", 0) >= 100, reasons      # many are decoded and found, not just refused


def test_alert_mode_goes_on_with_the_codecs_reading():
    server = resp(chunked(EICAR), b"Transfer-Encoding: chunked", b"Content-Length: 68", length=False)
    acts = run_core(scanner(uninspectable="alert"), GET, server)
    assert [a[2]["event"] for a in alerts(acts)] == ["ambiguity", "virus"] and killed(acts)
    server = resp(chunked(CLEAN), b"Transfer-Encoding: chunked", b"Content-Length: 68", length=False)
    acts = run_core(scanner(uninspectable="alert"), GET, server)
    assert not killed(acts) and passed(acts, TO_GUEST) == len(server)
    (a,) = alerts(acts)
    assert a[2]["kind"] == "te_and_cl" and a[2]["action"] == "alert"
    acts = run_core(scanner(tolerate=["te_and_cl"]), GET, server)
    assert not killed(acts) and not alerts(acts)
    acts = run_core(scanner(), GET, server)
    assert killed(acts) and passed(acts, TO_GUEST) == 0 and alerts(acts)[0][2]["kind"] == "te_and_cl"
    assert alerts(acts)[0][2]["url"] == "http://dl.example/files/x.bin"     # the request it answered


def test_bombs_oversize_and_tunnels():
    bomb = zlib.compress(b"\0" * (4 << 20))
    acts = run_core(scanner(max_decoded_bytes=1 << 20), GET, resp(bomb, b"Content-Encoding: deflate"))
    assert killed(acts) and alerts(acts)[0][2]["kind"] == "decompression_bomb" and passed(acts, TO_GUEST) == 0
    acts = run_core(scanner(max_body_bytes=10000), GET, resp(CLEAN))
    assert killed(acts) and alerts(acts)[0][2]["event"] == "oversize" and passed(acts, TO_GUEST) == 0
    acts = run_core(scanner(max_body_bytes=10000, oversize="pass"), GET, resp(CLEAN))
    assert not killed(acts) and ("pass_all", TO_GUEST) in acts
    ws = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
          b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello")
    acts = run_core(scanner(), *ws)
    assert killed(acts) and alerts(acts)[0][2]["event"] == "tunnel"
    acts = run_core(scanner(tunnels="pass"), *ws)
    assert not killed(acts) and ("pass_all", TO_GUEST) in acts


def test_br_and_zstd_bombs_and_big_windows_are_ambiguities():
    for coding, bomb in ((b"br", brotli.compress(b"\0" * (4 << 20))), (b"zstd", zstd.compress(b"\0" * (4 << 20)))):
        acts = run_core(scanner(max_decoded_bytes=1 << 20), GET, resp(bomb, b"Content-Encoding: " + coding))
        assert killed(acts) and alerts(acts)[0][2]["kind"] == "decompression_bomb" and passed(acts, TO_GUEST) == 0
    # a frame that asks for a 16 MiB window: refused (browsers stop at 8 MiB) unless the config allows it
    frame = b"\x28\xb5\x2f\xfd\x00\x70" + (1 | len(EICAR) << 3).to_bytes(3, "little") + EICAR
    acts = run_core(scanner(), GET, resp(frame, b"Content-Encoding: zstd"))
    assert killed(acts) and "window" in alerts(acts)[0][2]["detail"]
    acts = run_core(scanner(max_window_size=16 << 20), GET, resp(frame, b"Content-Encoding: zstd"))
    assert killed(acts) and alerts(acts)[0][2]["verdict"] == "EICAR-Test-File"
    # alert mode: a truncated br response goes on, with what it decoded to checked
    acts = run_core(scanner(uninspectable="alert"), GET, resp(brotli.compress(b"clean " * 100)[:-2],
                                                              b"Content-Encoding: br"))
    assert not killed(acts) and alerts(acts)[0][2]["kind"] == "compressed_truncated"


def test_config_is_checked():
    for bad in ({"ports": []}, {"uninspectable": "maybe"}, {"tolerate": ["nonsense"]}, {"bad_sha256": ["xyz"]},
                {"alert_object_bytes": 50000}, {"frobnicate": 1}, {"max_body_bytes": 0},
                {"max_window_size": 512}, {"max_window_size": 1 << 32}):
        with pytest.raises(ConfigError):
            load_config(bad)


def example_replacement() -> bytes:
    from vhostni.policy import load_policy
    (spec,) = load_policy(str(REPO / "examples" / "webdl.toml")).scanners
    return dict(spec.stream_injections)[load_config(spec.config)["replacement_injection"]]


def test_example_policy_loads_and_its_config_is_valid():
    from vhostni.policy import load_policy
    from vhostni.scanner.http1 import CLIENT, SERVER, Ambiguity, HttpConnection, MessageEnd, Response
    pol = load_policy(str(REPO / "examples" / "webdl.toml"))
    (spec,) = pol.scanners
    assert spec.argv[-1] == str(REPO / "scanners" / "webdl")
    cfg = load_config(spec.config)
    assert cfg["_table"][EICAR_SHA] == "EICAR-Test-File" and cfg["uninspectable"] == "kill"
    # the replacement it registers is one whole, unambiguous HTTP/1.1 response that closes
    rep = example_replacement()
    c = HttpConnection()
    c.feed(CLIENT, GET)
    evs = c.feed(SERVER, rep)
    assert not [e for e in evs if isinstance(e, Ambiguity)], evs
    (r,) = [e for e in evs if isinstance(e, Response)]
    assert r.framing == "length" and (b"connection", b"close") in r.headers
    assert [e.end for e in evs if isinstance(e, MessageEnd)] == [len(rep)]


# ---------------------------------------------------------------------------
# End to end: the scanner process in the NI kernel, simulated guests a (client) and b (server)
# ---------------------------------------------------------------------------

@pytest.fixture
def kits_made():
    made: list = []
    yield made
    for k in made:
        k.close()


def _e2e_kit(kits_made, config: dict, hold_timeout_ms: int = 10000, inject: tuple = ()):
    sys.path.insert(0, str(REPO / "tests"))
    from nikit import Kit, policy, scanner_spec
    spec = scanner_spec("webdl", str(REPO / "scanners" / "webdl"),
                        allow=[{"stream": True, "port": 80, "direction": "both", "contain": True}],
                        alerts_per_second=1000, inject=list(inject),
                        config=dict({"ports": [80], "bad_sha256": [f"{EICAR_SHA} EICAR-Test-File"]}, **config))
    k = Kit({"a": policy(scanners=[spec], hold_timeout_ms=hold_timeout_ms)})
    kits_made.append(k)
    k.wait_alert("web-download scanner ready", "a", "webdl", timeout=20)
    return k


def _got(k, name: str, want: int, wait: float = 5.0) -> bytes:
    from tcpkit import segments
    out = b""
    end = time.monotonic() + wait
    while len(out) < want and time.monotonic() < end:
        out += b"".join(s.payload for s in segments(k.recv(name, 0.1)))
    return out


@pytest.mark.parametrize("pieces", [1, 7])
def test_e2e_clean_download_arrives_byte_for_byte(kits_made, pieces):
    from tcpkit import Conn
    k = _e2e_kit(kits_made, {})
    c = Conn(k, sport=80)
    c.open()
    c.send("a", c.data("a", GET))
    assert _got(k, "b", len(GET)) == GET
    wire = resp(gzip.compress(CLEAN[:3000]), b"Content-Encoding: gzip")
    size = -(-len(wire) // pieces)
    for i in range(0, len(wire), size):
        c.send("b", c.data("b", wire[i:i + size]))
    assert _got(k, "a", len(wire)) == wire
    assert not k.alerts_matching("web download", "a", "webdl") and k.nk("a").streams_killed == 0


@pytest.mark.parametrize("evasion", ["plain", "te_and_cl"])
def test_e2e_infected_download_is_killed_and_alerted(kits_made, evasion):
    from tcpkit import RST, Conn, segments
    k = _e2e_kit(kits_made, {})
    c = Conn(k, sport=80)
    c.open()
    c.send("a", c.data("a", GET))
    assert _got(k, "b", len(GET)) == GET
    if evasion == "plain":
        wire = resp(EICAR)
    else:
        wire = resp(chunked(EICAR, 9), b"Transfer-Encoding: chunked", b"Content-Length: 68", length=False)
    c.send("b", c.data("b", wire[:40]))
    time.sleep(0.3)
    c.send("b", c.data("b", wire[40:]))
    alert = k.wait_alert("web download", "a", "webdl")
    f = alert["fields"]
    assert f["url"] == "http://dl.example/files/x.bin" and f["action"] == "kill"
    assert (f["event"], f.get("verdict"), f.get("kind")) == (
        ("virus", "EICAR-Test-File", None) if evasion == "plain" else ("ambiguity", None, "te_and_cl"))
    to_a = segments(k.recv("a", 1.0, 4))
    assert to_a and all(s.has(RST) and not s.payload for s in to_a)       # nothing of the response
    k.until(lambda: k.nk("a").streams_killed == 1, what="the kill")


def _stream_at(k, c, name: str, want: int, wait: float = 5.0) -> bytes:
    """The contiguous bytes guest ``name`` received, placed by sequence number (the NI
    retransmits injected bytes until they are acknowledged)."""
    import itertools
    from tcpkit import segments
    base = c.seq(c.other(name).name, 0)
    got: dict[int, int] = {}
    end = time.monotonic() + wait
    out = b""
    while len(out) < want and time.monotonic() < end:
        for seg in segments(k.recv(name, 0.1)):
            for i, b in enumerate(seg.payload):
                got.setdefault(((seg.seq - base) & 0xFFFFFFFF) + i, b)
        out = bytes(itertools.takewhile(lambda b: b is not None, (got.get(i) for i in range(len(got)))))
    return out


def test_e2e_infected_response_is_replaced_and_alerted(kits_made):
    from tcpkit import Conn
    rep = example_replacement()
    k = _e2e_kit(kits_made, {"replacement_injection": "blocked"},
                 inject=[{"name": "blocked", "stream": rep.decode()}])
    ready = k.wait_alert("web-download scanner ready", "a", "webdl")
    assert ready["fields"]["replacement"] == "blocked"
    c = Conn(k, sport=80)
    c.open()
    c.send("a", c.data("a", GET + GET))
    assert _got(k, "b", 2 * len(GET)) == GET + GET
    first, bad = resp(b"first, clean"), resp(chunked(EICAR, 10), b"Transfer-Encoding: chunked", length=False)
    c.send("b", c.data("b", first + bad))
    alert = k.wait_alert("response replaced", "a", "webdl")
    assert alert["fields"]["action"] == "replace" and alert["fields"]["verdict"] == "EICAR-Test-File"
    assert _stream_at(k, c, "a", len(first + rep)) == first + rep
    sp = k.sp("a", "webdl")
    assert (sp.counters.stream_cuts, sp.counters.stream_cut_bytes) == (1, len(bad))
    assert (sp.counters.stream_injects, sp.counters.stream_inject_bytes) == (1, len(rep))
    assert k.nk("a").streams_killed == 0 and sp.counters.refused == 0


def test_e2e_br_and_zstd_in_the_sandboxed_scanner(kits_made):
    """The scanner process, confined as always, imports the br and zstd decoders staged beside
    the SDK: a clean br download arrives byte for byte, a zstd-compressed EICAR is replaced."""
    from tcpkit import Conn
    rep = example_replacement()
    k = _e2e_kit(kits_made, {"replacement_injection": "blocked"},
                 inject=[{"name": "blocked", "stream": rep.decode()}])
    ready = k.wait_alert("web-download scanner ready", "a", "webdl")
    assert ready["fields"]["undecodable"] == []
    assert k.sp("a", "webdl")._check_confinement() is None        # the real sandbox
    c = Conn(k, sport=80)
    c.open()
    c.send("a", c.data("a", GET + GET))
    assert _got(k, "b", 2 * len(GET)) == GET + GET
    good = resp(brotli.compress(CLEAN[:3000]), b"Content-Encoding: br")
    bad = resp(chunked(zstd.compress(EICAR), 10), b"Content-Encoding: zstd", b"Transfer-Encoding: chunked",
               length=False)
    c.send("b", c.data("b", good + bad))
    alert = k.wait_alert("response replaced", "a", "webdl")
    f = alert["fields"]
    assert (f["verdict"], f["content_encoding"], f["decoded_layers"]) == ("EICAR-Test-File", ["zstd"], ["zstd"])
    assert _stream_at(k, c, "a", len(good + rep)) == good + rep
    assert k.nk("a").streams_killed == 0


def test_e2e_without_the_decoder_libraries_br_is_uninspectable_and_said_so(kits_made, monkeypatch):
    """Where the libraries cannot be staged, the scanner says so once at start and a br response
    is what it was before the decoders: uninspectable (killed by default)."""
    from tcpkit import Conn
    from vhostni import sandbox
    monkeypatch.setattr(sandbox, "SDK_LIBRARIES", ())
    k = _e2e_kit(kits_made, {})
    missing = k.wait_alert("cannot decode Content-Encoding br", "a", "webdl")
    assert missing["fields"]["event"] == "decoder_missing" and missing["fields"]["coding"] == "br"
    assert k.wait_alert("cannot decode Content-Encoding zstd", "a", "webdl")["fields"]["coding"] == "zstd"
    c = Conn(k, sport=80)
    c.open()
    c.send("a", c.data("a", GET))
    assert _got(k, "b", len(GET)) == GET
    c.send("b", c.data("b", resp(brotli.compress(CLEAN[:3000]), b"Content-Encoding: br")))
    alert = k.wait_alert("ambiguous HTTP", "a", "webdl")
    assert alert["fields"]["kind"] == "unsupported_content_encoding" and alert["fields"]["action"] == "kill"
    assert len(k.alerts_matching("cannot decode Content-Encoding br", "a", "webdl")) == 1


# ---------------------------------------------------------------------------
# Offline replay: the HTTP Evader deliveries and clean downloads as one capture, through the
# NI kernel and the scanner process as examples/webdl.toml ships them
# ---------------------------------------------------------------------------

def _capture(conversations: list) -> tuple:
    """One TCP connection per (request, response): the guest (client) asks, the server answers
    in 1400-byte segments and closes.  Returns (Capture, {client port: (request, response)})."""
    from scapy.all import IP, TCP, Ether, Raw
    from test_replay import GUEST, ROUTER, Capture
    cap, flows = Capture(), {}
    gip, sip = "10.0.0.5", "10.0.0.80"
    for i, (req, res) in enumerate(conversations):
        port = 20000 + i
        flows[port] = (req, res)
        cs, ss = 1000, 500000

        def g(flags, seq, ack, data=b""):
            cap.add(Ether(src=GUEST, dst=ROUTER) / IP(src=gip, dst=sip) / TCP(sport=port, dport=80, flags=flags,
                                                                              seq=seq, ack=ack) / Raw(data))

        def s(flags, seq, ack, data=b""):
            cap.add(Ether(src=ROUTER, dst=GUEST) / IP(src=sip, dst=gip) / TCP(sport=80, dport=port, flags=flags,
                                                                              seq=seq, ack=ack) / Raw(data))
        cap.add(Ether(src=GUEST, dst=ROUTER) / IP(src=gip, dst=sip) / TCP(sport=port, dport=80, flags="S", seq=cs - 1))
        s("SA", ss - 1, cs)
        g("A", cs, ss)
        g("PA", cs, ss, req)
        for o in range(0, len(res), 1400):
            s("PA", ss + o, cs + len(req), res[o:o + 1400])
        s("FA", ss + len(res), cs + len(req))
        # the guest acknowledges as a receiver does, segment by segment: here after the whole
        # response, since a scanner holds it until its end (the NI sends only what the
        # guest's window allows, and more as it is acknowledged)
        for o in range(1400, len(res), 1400):
            g("A", cs + len(req), ss + o)
        g("A", cs + len(req), ss + len(res) + 1)
    return cap, flows


def _delivered(out: list, flows: dict) -> dict:
    """Bytes of each flow's server stream that reached the guest, by client port (in order
    from offset 0, as far as contiguous)."""
    from scapy.all import TCP, Ether, Raw
    got: dict = {p: {} for p in flows}
    for _, d in out:
        p = Ether(d)
        if TCP in p and p[TCP].sport == 80 and p[TCP].dport in got and Raw in p:
            off = (p[TCP].seq - 500000) & 0xFFFFFFFF
            for i, b in enumerate(bytes(p[Raw].load)):
                got[p[TCP].dport].setdefault(off + i, b)
    out_bytes = {}
    for port, m in got.items():
        n = 0
        while n in m:
            n += 1
        out_bytes[port] = bytes(m[i] for i in range(n))
    return out_bytes


def test_replay_of_http_evader_and_clean_downloads(tmp_path):
    from nikit import write_policy
    from vhostni import cli
    from test_replay import GUEST, out_frames, alerts_of
    evasive = [(base64.b64decode(c["request"]), base64.b64decode(c["response"])) for c in evader_cases()]
    clean = [(c, s) for c, s in CLEAN_CONVERSATIONS.values() if c.count(b"\r\n\r\n") == 1 and b"POST" not in c]
    clean += [(GET, resp(bytes(range(256)) * 400))]          # 100 KiB: beyond a window
    cap, flows = _capture(evasive + clean)
    doc = (REPO / "examples" / "webdl.toml").read_text().replace(
        'program = "../scanners/webdl"', f'program = "{REPO / "scanners" / "webdl"}"\nalerts_per_second = 10000')
    inp = cap.write(tmp_path / "in.pcap")
    pol = write_policy(str(tmp_path / "webdl.toml"), doc)
    rc = cli.main(["replay", "--policy", pol, "--guest-mac", GUEST, inp, "--out", str(tmp_path / "out.pcap"),
                   "--alerts", str(tmp_path / "alerts.jsonl")])
    assert rc == 0
    got = _delivered(out_frames(tmp_path / "out.pcap"), flows)
    rep = example_replacement()
    ports = sorted(flows)
    leaked = []
    for port in ports[:len(evasive)]:
        req, res = flows[port]
        d = got[port]
        if rep in d:                  # replaced: what came before it is the original's, and nothing after
            assert d.endswith(rep), d
            d = d[:-len(rep)]
        if len(d) >= len(res) or not res.startswith(d) or EICAR[:12] in d:
            leaked.append(port)
    assert not leaked, [flows[p][0].split(b"\r\n")[0] for p in leaked]
    for port in ports[len(evasive):]:
        assert got[port] == flows[port][1], f"clean download {port - 20000} damaged"
    stopped = [a for a in alerts_of(tmp_path / "alerts.jsonl") if a["fields"].get("action") in ("kill", "replace")]
    # every delivery stopped (one replaced may then be killed for what the server sent after it)
    assert sorted({a["flow"]["dport"] for a in stopped}) == ports[:len(evasive)]
    assert sum(a["fields"]["action"] == "replace" for a in stopped) >= 100


# ---------------------------------------------------------------------------
# Fuzzing the decisions
# ---------------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_PIECES = [GET, b"HEAD / HTTP/1.1\r\n\r\n", resp(b"ok"), resp(EICAR), resp(gzip.compress(EICAR), b"Content-Encoding: gzip"),
           resp(brotli.compress(EICAR), b"Content-Encoding: br"), resp(zstd.compress(EICAR), b"Content-Encoding: zstd"),
           brotli.compress(EICAR)[:9], zstd.compress(EICAR)[9:], b"Content-Encoding: br, zstd\r\n",
           b"HTTP/1.1 200 OK\r\n", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 3\r\n", b"\r\n", b"5\r\nhello\r\n",
           b"0\r\n\r\n", b"\n", b"\r", b"\0", b" ", EICAR[:20], EICAR[20:]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_PIECES) | st.binary(max_size=10), max_size=12),
       st.lists(st.sampled_from(_PIECES) | st.binary(max_size=10), max_size=16), st.integers(1, 13), st.booleans())
def test_fuzz_decisions_are_well_formed_and_eicar_never_passes(client, server, step, fin):
    c, s = b"".join(client), b"".join(server)
    acts = run_core(scanner(max_line=64, max_head=512), c, s, step, fin=fin)
    fed = {FROM_GUEST: len(c), TO_GUEST: len(s)}
    last = {FROM_GUEST: 0, TO_GUEST: 0}
    for a in acts:
        assert a[0] in ("pass", "pass_all", "more", "kill", "alert"), a
        if a[0] == "pass":
            assert last[a[1]] < a[2] <= fed[a[1]], (a, last)
            last[a[1]] = a[2]
        if a[0] == "alert":
            json.dumps(a[2])                  # an alert is JSON
    if ("pass_all", TO_GUEST) not in acts:
        assert EICAR not in s[:last[TO_GUEST]]


def test_an_alert_too_large_for_the_wire_still_goes_without_its_largest_fields():
    """Hostile heads (8-bit bytes become \\u00XX in JSON) and a large object can make an alert
    larger than the wire allows; it is then sent without them rather than crashing the scanner."""
    from scanners.webdl.__main__ import alert
    from vhostni.scanner import wire

    class Sc:
        sent: list = []

        def alert(self, message, /, **fields):
            wire.encode_control(wire.Alert(str(message), fields).body())     # raises as the SDK does
            self.sent.append((message, fields))

    big = bytes(range(128, 256)) * 30
    server = resp(EICAR + b"\0" * 40000, *[b"X-%d: %s" % (i, big) for i in range(1)])
    core = WebDownloadScanner({"bad_sha256": [hashlib.sha256(EICAR + b"\0" * 40000).hexdigest()],
                               "alert_object_bytes": 40000, "alert_header_bytes": 8192})
    (a,) = alerts(run_core(core, GET, server))
    sc = Sc()
    alert(sc, a[1], a[2])
    ((msg, fields),) = sc.sent
    assert fields["alert_truncated"] and fields["sha256"] == a[2]["sha256"] and "object_b64" not in fields
