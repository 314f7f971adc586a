"""The Code-Red scanner's DNS parser (scanners/codered/dns.py): real-looking responses built with scapy's DNS
layer, hand-made compression, malformed and hostile messages, and fuzzing (nothing but ValueError escapes).
Also the guests' DNS server (guests/dnsd.c), built for the host: its replies must pass the strict parser."""

import ipaddress
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # scanners/ is not an installed package

from scanners.codered import dns  # noqa: E402
from scanners.codered.dns import DnsError, parse_message, parse_query, parse_response  # noqa: E402

from scapy.layers.dns import DNS, DNSQR, DNSRR, DNSRROPT, dns_compress  # noqa: E402

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def response(qname="www.example.com", qtype="A", an=(), ns=(), ar=(), compress=False, **kw):
    kw.setdefault("id", 0x1234)
    kw.setdefault("rd", 1)
    kw.setdefault("ra", 1)
    pkt = DNS(qr=1, qd=[DNSQR(qname=qname, qtype=qtype)], an=list(an), ns=list(ns), ar=list(ar), **kw)
    return bytes(dns_compress(pkt) if compress else pkt)


def header(ident=0x1234, flags=0x8180, qd=1, an=0, ns=0, ar=0):
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


def qname(*labels):
    return b"".join(bytes([len(lab)]) + lab for lab in labels) + b"\0"


def rr(name, rtype, ttl, rdata, rclass=1):
    return name + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


# ---- well-formed responses -----------------------------------------------------------------------------------


def test_simple_a_record():
    m = parse_response(response(an=[DNSRR(rrname="www.example.com", type="A", rdata="192.0.2.7", ttl=300)]))
    assert m.id == 0x1234 and m.qr and m.rcode == 0 and not m.truncated
    assert m.questions == (dns.Question("www.example.com", 1, 1),)
    (a,) = m.addresses()
    assert (a.address, a.ttl, a.name, a.aliases, a.section) == (V4("192.0.2.7"), 300, "www.example.com", (), "answer")


@pytest.mark.parametrize("compress", [False, True])
def test_cname_chain_with_a_and_aaaa(compress):
    wire = response(
        qname="www.example.com",
        an=[DNSRR(rrname="www.example.com", type="CNAME", rdata="web.example.net", ttl=3600),
            DNSRR(rrname="web.example.net", type="CNAME", rdata="edge.cdn.example.org", ttl=600),
            DNSRR(rrname="edge.cdn.example.org", type="A", rdata="198.51.100.1", ttl=20),
            DNSRR(rrname="edge.cdn.example.org", type="A", rdata="198.51.100.2", ttl=20),
            DNSRR(rrname="edge.cdn.example.org", type="AAAA", rdata="2001:db8::42", ttl=30)],
        compress=compress)
    if compress:
        assert b"\xc0\x0c" in wire     # the answer names point at the question
    m = parse_response(wire)
    assert [r.rtype for r in m.answers] == [5, 5, 1, 1, 28]
    assert m.answers[0].data == "web.example.net"
    addrs = list(m.addresses())
    assert [a.address for a in addrs] == [V4("198.51.100.1"), V4("198.51.100.2"), V6("2001:db8::42")]
    assert [a.ttl for a in addrs] == [20, 20, 30]      # the address records' own TTLs
    for a in addrs:
        assert a.name == "edge.cdn.example.org"
        assert set(a.aliases) == {"www.example.com", "web.example.net"}


def test_hand_compressed_cname_rdata():
    # www.example.com CNAME -> "cdn" + pointer to "example.com" inside the question; then A for cdn.example.com
    q = qname(b"www", b"example", b"com")            # at offset 12; "example" at 16
    body = q + struct.pack("!HH", 1, 1)
    cname_rdata = b"\x03cdn\xc0\x10"
    ans1 = rr(b"\xc0\x0c", 5, 60, cname_rdata)
    a_owner_off = 12 + len(body) + len(ans1) - len(cname_rdata)   # where "cdn.example.com" starts
    ans2 = rr(struct.pack("!H", 0xC000 | a_owner_off), 1, 60, bytes([203, 0, 113, 9]))
    m = parse_response(header(an=2) + body + ans1 + ans2)
    assert m.answers[0].data == "cdn.example.com"
    (a,) = m.addresses()
    assert (a.address, a.name, a.aliases) == (V4("203.0.113.9"), "cdn.example.com", ("www.example.com",))


def test_authority_and_additional_addresses_count():
    wire = response(
        qname="example.com",
        an=[DNSRR(rrname="example.com", type="A", rdata="192.0.2.1", ttl=60)],
        ns=[DNSRR(rrname="example.com", type="NS", rdata="ns1.example.com", ttl=86400)],
        ar=[DNSRR(rrname="ns1.example.com", type="A", rdata="192.0.2.53", ttl=86400),
            DNSRR(rrname="ns1.example.com", type="AAAA", rdata="2001:db8::53", ttl=86400),
            DNSRROPT(rclass=1232)],
        compress=True)
    m = parse_response(wire)
    assert m.authority[0].rtype == 2 and isinstance(m.authority[0].data, bytes)
    assert m.additional[-1].rtype == 41
    got = [(a.address, a.section) for a in m.addresses()]
    assert got == [(V4("192.0.2.1"), "answer"), (V4("192.0.2.53"), "additional"),
                   (V6("2001:db8::53"), "additional")]


def test_names_are_lower_cased_and_escaped():
    owner = qname(b"WwW", b"Ex.mple", b"c\x00m")
    wire = header(an=1) + owner + struct.pack("!HH", 1, 1) + rr(b"\xc0\x0c", 1, 5, bytes(4))
    m = parse_response(wire)
    assert m.questions[0].name == "www.ex\\046mple.c\\000m"
    assert m.answers[0].name == m.questions[0].name


def test_root_name_and_no_question():
    wire = header(qd=0, an=1) + rr(b"\0", 1, 1, bytes([10, 0, 0, 1]))
    m = parse_response(wire)
    assert m.questions == () and m.answers[0].name == "."


def test_ttl_with_top_bit_is_zero():
    wire = header(an=1) + qname(b"a") + struct.pack("!HH", 1, 1) + rr(b"\xc0\x0c", 1, 0x80000001, bytes(4))
    assert parse_response(wire).answers[0].ttl == 0


def test_non_in_class_addresses_are_raw_and_ignored():
    wire = header(an=1) + qname(b"a") + struct.pack("!HH", 1, 3) + rr(b"\xc0\x0c", 1, 5, b"\x01\x02", rclass=3)
    m = parse_response(wire)
    assert m.answers[0].data == b"\x01\x02" and list(m.addresses()) == []


def test_query_parsing():
    q = bytes(DNS(id=99, rd=1, qd=[DNSQR(qname="Host.Example", qtype="AAAA")]))
    m = parse_query(q)
    assert m.id == 99 and m.questions == (dns.Question("host.example", 28, 1),)
    with pytest.raises(DnsError, match="QR=0"):
        parse_response(q)
    with pytest.raises(DnsError, match="QR=1"):
        parse_query(response(an=[]))


@pytest.mark.parametrize("flags,why", [(0x8183, "RCODE 3"), (0x8182, "RCODE 2"), (0x9180, "opcode 2"),
                                       (0x0100, "QR=0")])
def test_only_noerror_query_responses(flags, why):
    wire = header(flags=flags, an=1) + qname(b"a") + struct.pack("!HH", 1, 1) + rr(b"\xc0\x0c", 1, 5, bytes(4))
    parse_message(wire)     # well-formed...
    with pytest.raises(DnsError, match=why):
        parse_response(wire)  # ...but not an answer to use


def test_truncated_flag_is_reported():
    wire = header(flags=0x8380, an=0) + qname(b"a") + struct.pack("!HH", 1, 1)
    assert parse_response(wire).truncated


# ---- malformed and hostile --------------------------------------------------------------------------------------

GOOD = response(qname="www.example.com",
                an=[DNSRR(rrname="www.example.com", type="CNAME", rdata="x.example.net", ttl=60),
                    DNSRR(rrname="x.example.net", type="A", rdata="192.0.2.1", ttl=60),
                    DNSRR(rrname="x.example.net", type="AAAA", rdata="2001:db8::1", ttl=60)],
                compress=True)


def test_every_truncation_is_an_error():
    parse_response(GOOD)
    for n in range(len(GOOD)):
        with pytest.raises(DnsError):
            parse_message(GOOD[:n])


def test_trailing_bytes_are_an_error():
    with pytest.raises(DnsError, match="after the last record"):
        parse_message(GOOD + b"\0")


Q_A = struct.pack("!HH", 1, 1)


@pytest.mark.parametrize("wire,why", [
    (header(qd=1) + b"\xc0\x0c" + Q_A, "backwards"),                    # points at itself
    (header(qd=1) + b"\xc0\x0e\x00" + Q_A, "backwards"),                # points forwards
    (header(qd=1) + b"\xc0\x02" + Q_A, "backwards"),                    # into the header
    (header(qd=2) + qname(b"a") + Q_A + b"\x01b\xc0\x13" + Q_A, "backwards"),   # loop via a label: b -> itself
    (header(qd=1) + b"\x41abc\x00" + Q_A, "label type"),                # 0x40: extended label type
    (header(qd=1) + b"\x81abc\x00" + Q_A, "label type"),                # 0x80: reserved
    (header(qd=1) + b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x3f" + b"c" * 63 + b"\x3f" + b"d" * 63
     + b"\0" + Q_A, "255"),                                            # 257 octets
    (header(qd=1) + b"\x3fabcd", "label runs past"),                  # label past the end
    (header(qd=1) + qname(b"abc") + b"\x00", "truncated question"),
    (header(an=1, qd=0) + rr(b"\0", 1, 5, bytes(5)), "A record with 5"),
    (header(an=1, qd=0) + rr(b"\0", 28, 5, bytes(4)), "AAAA record with 4"),
    (header(an=1, qd=0) + b"\0" + struct.pack("!HHIH", 1, 1, 5, 10) + bytes(4), "past the end"),
    (header(an=1, qd=0) + rr(b"\0", 5, 5, b"\x01a\x00\x00"), "CNAME data longer"),
    (header(an=1, qd=0) + rr(b"\0", 5, 5, b"\x01a"), "past its end"),   # CNAME name runs out of its RDATA
    (header(qd=0xFFFF), "section counts"),
    (header(qd=0, an=0, ns=0, ar=5000) + bytes(100), "section counts"),
    (b"\x12\x34\x81", "shorter than the header"),
])
def test_malformed(wire, why):
    with pytest.raises(DnsError, match=why):
        parse_message(wire)


def test_pointer_chain_is_bounded():
    # 70 names in the RDATA of an unknown record type, each a label and a pointer to the one before: every
    # jump is backwards and the name stays under 255 octets, but 69 jumps are more than the 64 a name may take.
    base = 12 + 1 + 10        # the RDATA of a record owned by the root, right after the header
    body = b"\x01a\x00"
    offs = [base]
    for _ in range(69):
        offs.append(base + len(body))
        body += b"\x01a" + struct.pack("!H", 0xC000 | offs[-2])
    for hops, ok in ((63, True), (64, False)):     # the owner's own pointer is one more
        owner = struct.pack("!H", 0xC000 | offs[hops])
        wire = header(qd=0, an=2) + rr(b"\0", 65280, 0, body) + rr(owner, 1, 0, bytes(4))
        if ok:
            assert list(parse_message(wire).addresses())[0].name == ".".join(["a"] * (hops + 1))
        else:
            with pytest.raises(DnsError, match="too many compression pointers"):
                parse_message(wire)


def test_pointer_may_not_reach_into_already_read_labels():
    # name at 12: "a" then pointer to 12 (itself, after one label): must not loop
    wire = header(qd=1) + b"\x01a\xc0\x0c" + Q_A
    with pytest.raises(DnsError, match="backwards"):
        parse_message(wire)


def _long_name_and_pointers(records):
    """A question for a 255-octet name (4 labels of 63, 61 ... octets), then ``records`` A records
    whose owner is a pointer to it: 12 bytes of message a record, 255 octets of name each."""
    name = b"".join(b"\x3f" + b"A" * 63 for _ in range(3)) + b"\x3d" + b"a" * 61 + b"\x00"
    return header(qd=1, ar=records) + name + Q_A + rr(b"\xc0\x0c", 1, 60, bytes(4)) * records


def test_a_name_pointed_at_again_is_not_read_again(monkeypatch):
    """Each name a pointer leads to was read label by label again: 4,000 records pointing at a
    255-octet name (a 64 KB query a guest sends over TCP) cost 0.2 s, ~2 us of the scanner's CPU
    per byte.  What was read from an offset is kept for the rest of the message."""
    calls = []
    real = dns._label_text
    monkeypatch.setattr(dns, "_label_text", lambda raw: calls.append(raw) or real(raw))
    wire = _long_name_and_pointers(4000)
    m = parse_message(wire)
    assert len(m.additional) == 4000
    assert m.additional[-1].name == m.questions[0].name == ".".join(["a" * 63] * 3 + ["a" * 61])
    assert len(calls) == 4                     # each label once (was 4 + 4 * 4,000)
    monkeypatch.undo()
    t0 = time.process_time()
    for _ in range(5):
        parse_message(wire)
    assert (time.process_time() - t0) / 5 < 0.15         # was ~0.2 s (the count above is the real check)


def test_a_name_read_before_keeps_its_first_pointer_below_the_floor():
    """A name pointed into (so read from an offset inside another name's labels) still obeys the rule
    of the name being read: its first pointer must point below that name's floor, not just below
    the offset where the earlier name started.  Here the third owner points at the second record's
    RDLENGTH octet (2), read as a label that runs into the second owner "b" + pointer to 23: fine
    for the second owner (its floor is 25), not for the third (its floor is 22)."""
    wire = (header(qd=0, an=3) + rr(b"\0", 99, 0, b"\0\0") + rr(b"\x01b\xc0\x17", 99, 0, b"")
            + rr(b"\xc0\x16", 1, 0, bytes(4)))
    assert wire[22] == 2 and wire[25:29] == b"\x01b\xc0\x17"
    with pytest.raises(DnsError, match="backwards"):
        parse_message(wire)
    assert parse_message(wire[:39].replace(b"\x00\x03\x00\x00\x00\x00", b"\x00\x02\x00\x00\x00\x00", 1)).answers[1].name == "b"


def test_not_bytes():
    with pytest.raises(DnsError):
        parse_message("a string")   # type: ignore[arg-type]


# ---- property tests --------------------------------------------------------------------------------------------

labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
names = st.lists(labels, min_size=1, max_size=4).map(".".join)


@settings(max_examples=200, deadline=None)
@given(qn=names,
       records=st.lists(st.tuples(names, st.sampled_from(["A", "AAAA", "CNAME"]), st.integers(0, 2**31 - 1),
                                  st.ip_addresses(v=4), st.ip_addresses(v=6), names), max_size=8),
       compress=st.booleans())
def test_agrees_with_scapy(qn, records, compress):
    rrs = []
    for owner, rtype, ttl, v4, v6, target in records:
        rdata = {"A": str(v4), "AAAA": str(v6), "CNAME": target}[rtype]
        rrs.append(DNSRR(rrname=owner, type=rtype, rdata=rdata, ttl=ttl))
    wire = response(qname=qn, an=rrs, compress=compress)
    m = parse_response(wire)
    theirs = DNS(wire)
    assert len(m.answers) == len(records) == theirs.ancount
    for mine, (owner, rtype, ttl, v4, v6, target) in zip(m.answers, records):
        assert mine.name == owner and mine.ttl == ttl
        assert mine.data == {"A": v4, "AAAA": v6, "CNAME": target}[rtype]
    assert [a.address for a in m.addresses()] == [r.data for r in m.answers if r.rtype in (1, 28)]


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_value_error(data):
    for parse in (parse_message, parse_response, parse_query):
        try:
            m = parse(data)
        except DnsError:
            continue
        list(m.addresses())


@settings(max_examples=2000, deadline=None)
@given(counts=st.tuples(*[st.integers(0, 6)] * 4), flags=st.integers(0, 0xFFFF), body=st.binary(max_size=300))
def test_random_bodies_behind_plausible_headers(counts, flags, body):
    # Plausible counts get the parser past its cheap count check into names, pointers and records.
    wire = header(flags=flags, qd=counts[0], an=counts[1], ns=counts[2], ar=counts[3]) + body
    try:
        m = parse_message(wire)
    except DnsError:
        return
    list(m.addresses())


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.integers(0, len(GOOD)))
def test_mutated_responses_only_raise_value_error(edits, cut):
    data = bytearray(GOOD)
    for pos, val in edits:
        data[pos] = val
    data = bytes(data[:cut]) if cut else bytes(data)
    assume(data != GOOD)
    try:
        m = parse_response(data)
    except ValueError as exc:
        assert isinstance(exc, DnsError)
        return
    for a in m.addresses():
        assert isinstance(a.address, (V4, V6))


# ---- guests/dnsd.c, built for the host and queried over loopback; its answers must satisfy the strict parser -----


def build_guest_program(name, out_dir):
    """guests/NAME.c compiled as images/build.py does (static, -O2), warnings as errors; plus, when the
    toolchain has them, AddressSanitizer and UBSan (dynamic) for the robustness tests.  Returns the path."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    src = REPO / "guests" / f"{name}.c"
    static = out_dir / name
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(static), str(src)],
                   check=True, capture_output=True)
    asan = out_dir / f"{name}-asan"
    r = subprocess.run(["gcc", "-O1", "-g", "-Wall", "-Wextra", "-fsanitize=address,undefined",
                        "-fno-sanitize-recover=all", "-o", str(asan), str(src)], capture_output=True)
    return asan if r.returncode == 0 else static


@pytest.fixture(scope="module")
def dnsd(tmp_path_factory):
    exe = build_guest_program("dnsd", tmp_path_factory.mktemp("dnsd"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = tmp_path_factory.mktemp("dnsd-log") / "dnsd.log"    # a file: a full pipe would stall dnsd
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe), "-b", "127.0.0.1", "-p", str(port), "www.example.com=10.1.2.3",
                                 "WWW.Example.COM.=10.1.2.4", "mail.test=10.9.9.9"],
                                stdout=out, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while b"\n" not in log.read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, "dnsd did not start"
        time.sleep(0.02)
    assert log.read_bytes().startswith(b"dnsd: serving 3 records on 127.0.0.1:")
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    client.connect(("127.0.0.1", port))
    yield proc, client, log
    client.close()
    proc.terminate()
    out, err = proc.communicate(timeout=10)
    assert b"Sanitizer" not in err and b"runtime error" not in err, err.decode()


PROBE = bytes(DNS(id=0xBEEF, rd=1, qd=[DNSQR(qname="mail.test")]))


def exchange(client, query):
    """Sends query, then a probe; returns the reply to query or None (replies come back in order)."""
    client.send(query)
    client.send(PROBE)
    first = client.recv(65535)
    if first[:2] == b"\xbe\xef" and query[:2] != b"\xbe\xef":
        return None
    assert client.recv(65535)[:2] == b"\xbe\xef"
    return first


def test_dnsd_answers(dnsd):
    _, client, _ = dnsd
    m = parse_response(exchange(client, bytes(DNS(id=5, rd=1, qd=[DNSQR(qname="Www.EXAMPLE.com.")]))))
    assert m.id == 5 and m.flags & 0x0400 and m.flags & 0x0100       # AA, RD echoed
    assert [(a.address, a.ttl, a.name) for a in m.addresses()] == [
        (V4("10.1.2.3"), 300, "www.example.com"), (V4("10.1.2.4"), 300, "www.example.com")]
    m = parse_response(exchange(client, bytes(DNS(id=6, qd=[DNSQR(qname="www.example.com", qtype="AAAA")]))))
    assert m.answers == () and m.questions[0].qtype == 28                # NODATA
    m = parse_message(exchange(client, bytes(DNS(id=7, qd=[DNSQR(qname="nope.example.com")]))))
    assert m.rcode == 3 and m.qr and m.questions[0].name == "nope.example.com"
    with_opt = bytes(DNS(id=8, qd=[DNSQR(qname="mail.test")], ar=[DNSRROPT(rclass=1232)]))
    assert [a.address for a in parse_response(exchange(client, with_opt)).addresses()] == [V4("10.9.9.9")]


@pytest.mark.parametrize("query,rcode", [
    (b"abc", None),                                                               # shorter than a header
    (bytes(DNS(id=9, qr=1, qd=[DNSQR(qname="mail.test")])), None),                # a response: never answered
    (header(flags=0, qd=1) + b"\xc0\x0c" + Q_A, 1),                               # pointer in a query
    (header(flags=0, qd=2) + qname(b"a") + Q_A + qname(b"b") + Q_A, 1),           # two questions
    (header(flags=0, qd=1) + b"\x3fabc", 1),                                      # label past the end
    (header(flags=0, qd=1) + qname(b"a"), 1),                                     # no type/class
    (header(flags=0x2800, qd=1) + qname(b"a") + Q_A, 4),                          # opcode 5 (UPDATE)
    (header(flags=0, qd=1) + qname(b"mail\x00", b"test") + Q_A, 3),               # odd bytes: no such name
])
def test_dnsd_malformed_queries(dnsd, query, rcode):
    _, client, _ = dnsd
    reply = exchange(client, query)
    if rcode is None:
        assert reply is None
    else:
        m = parse_message(reply)
        assert m.qr and m.rcode == rcode and m.id == struct.unpack("!H", query[:2])[0]


def test_dnsd_survives_fuzzing(dnsd):
    proc, client, log = dnsd
    rng = random.Random(1234)
    base = bytes(DNS(id=0x4242, rd=1, qd=[DNSQR(qname="www.example.com")]))
    for i in range(3000):
        if i % 3 == 0:
            q = rng.randbytes(rng.randint(0, 600))
        else:
            b = bytearray(base)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            q = bytes(b[:rng.randint(0, len(b) + 3)])
        if q[:2] == b"\xbe\xef":
            continue
        reply = exchange(client, q)
        if reply is not None:
            m = parse_message(reply)                 # every reply is a well-formed DNS message
            assert m.qr and m.id == struct.unpack("!H", q[:2])[0] and len(reply) <= 512
    assert proc.poll() is None
    assert log.read_bytes().count(b"\nquery ") >= 6000 - 10     # it saw them all (and the probes)
