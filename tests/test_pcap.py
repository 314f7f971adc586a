"""The pcap codec (vhostni/pcap.py): round trips, other writers' files, and garbage."""
from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostni import pcap
from vhostni.pcap import PcapDecoder, PcapError, UnsupportedLinkType

# PCAP_FUZZ=5000 for a longer fuzzing run
FUZZ = settings(max_examples=int(os.environ.get("PCAP_FUZZ", 300)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

records_st = st.lists(
    st.tuples(st.integers(0, (1 << 32) * 1_000_000_000 - 1), st.binary(min_size=0, max_size=300)),
    max_size=12)


def build(recs, nano=False, big=False, snaplen=65535, linktype=1) -> bytes:
    out = pcap.encode_header(snaplen, linktype, nano, big)
    for ts, data in recs:
        out += pcap.encode_record(ts, data, snaplen=snaplen, nanosecond=nano, big_endian=big)
    return out


def expected_ts(ts: int, nano: bool) -> int:
    return ts if nano else ts // 1000 * 1000


# ---------------------------------------------------------------------------
# pcapng, written by hand (the writer only writes classic pcap)
# ---------------------------------------------------------------------------

def ng_block(btype: int, body: bytes, end: str = "<") -> bytes:
    body += b"\0" * (-len(body) % 4)
    n = 12 + len(body)
    return struct.pack(end + "II", btype, n) + body + struct.pack(end + "I", n)


def ng_option(code: int, val: bytes, end: str = "<") -> bytes:
    return struct.pack(end + "HH", code, len(val)) + val + b"\0" * (-len(val) % 4)


def ng_shb(end: str = "<") -> bytes:
    return ng_block(0x0A0D0D0A, struct.pack(end + "IHHq", 0x1A2B3C4D, 1, 0, -1), end)


def ng_idb(linktype: int = 1, snaplen: int = 65535, tsresol=None, tsoffset=None, end: str = "<") -> bytes:
    opts = b""
    if tsresol is not None:
        opts += ng_option(9, bytes([tsresol]), end)
    if tsoffset is not None:
        opts += ng_option(14, struct.pack(end + "q", tsoffset), end)
    if opts:
        opts += ng_option(0, b"", end)
    return ng_block(1, struct.pack(end + "HHI", linktype, 0, snaplen) + opts, end)


def ng_epb(iface: int, ticks: int, data: bytes, orig=None, end: str = "<") -> bytes:
    return ng_block(6, struct.pack(end + "IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(data),
                                   len(data) if orig is None else orig) + data, end)


def ng_spb(data: bytes, end: str = "<") -> bytes:
    return ng_block(3, struct.pack(end + "I", len(data)) + data, end)


# ---------------------------------------------------------------------------
# Classic pcap
# ---------------------------------------------------------------------------

@FUZZ
@given(records_st, st.booleans(), st.booleans())
def test_round_trip(recs, nano, big):
    data = build(recs, nano, big)
    hdr, out = pcap.decode(data)
    assert (hdr.format, hdr.nanosecond, hdr.big_endian, hdr.linktype, hdr.snaplen) == \
        ("pcap", nano, big, 1, 65535)
    assert [(r.number, r.ts_ns, r.data, r.orig_len) for r in out] == \
        [(i + 1, expected_ts(ts, nano), d, len(d)) for i, (ts, d) in enumerate(recs)]


@FUZZ
@given(records_st, st.booleans(), st.data())
def test_feeding_in_pieces_gives_the_same_records(recs, nano, data):
    blob = build(recs, nano)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=8)))
    dec = PcapDecoder()
    got = []
    for a, b in zip([0] + cuts, cuts + [len(blob)]):
        got += dec.feed(blob[a:b])
    dec.close()
    assert got == pcap.decode(blob)[1]


def test_snaplen_is_respected_both_ways():
    frame = bytes(range(200))
    # the writer keeps at most snaplen bytes and records the original length
    blob = build([(5, frame)], snaplen=64)
    _, (rec,) = pcap.decode(blob)
    assert rec.data == frame[:64] and rec.orig_len == 200
    # a record whose caplen exceeds the snapshot length: the excess is skipped (as libpcap does)
    hdr = pcap.encode_header(snaplen=64)
    rec_raw = struct.pack("<IIII", 1, 0, 100, 100) + bytes(100)
    _, recs = pcap.decode(hdr + rec_raw + rec_raw)
    assert [len(r.data) for r in recs] == [64, 64]
    # a caplen no snapshot length allows is corruption
    huge = struct.pack("<IIII", 1, 0, pcap.MAX_SNAPLEN + 1, 10)
    with pytest.raises(PcapError, match="record 2: captured length"):
        pcap.decode(hdr + rec_raw + huge)


def test_truncated_records_name_the_record():
    blob = build([(1, b"a" * 60), (2, b"b" * 60), (3, b"c" * 60)])
    for cut in range(24 + 1, len(blob)):
        if (cut - 24) % 76 == 0:
            assert len(pcap.decode(blob[:cut])[1]) == (cut - 24) // 76   # a record boundary
            continue
        with pytest.raises(PcapError, match=r"record [123] truncated") as ei:
            pcap.decode(blob[:cut])
        # the record that was cut, counted from 1
        assert f"record {1 + (cut - 24) // 76}" in str(ei.value)
    for cut in range(1, 24):
        with pytest.raises(PcapError, match="not a capture file|truncated|not a pcap"):
            pcap.decode(blob[:cut])
    with pytest.raises(PcapError, match="empty"):
        pcap.decode(b"")


def test_link_types_other_than_ethernet_are_refused_clearly():
    with pytest.raises(UnsupportedLinkType, match=r"link type 113 \(LINUX_SLL"):
        pcap.decode(build([(1, b"x" * 20)], linktype=113))
    hdr, recs = pcap.decode(build([(1, b"x" * 20)], linktype=101), ethernet_only=False)
    assert hdr.linktype == 101 and len(recs) == 1


def test_header_oddities():
    with pytest.raises(PcapError, match="not a pcap or pcapng"):
        pcap.decode(b"GIF89a" + bytes(40))
    with pytest.raises(PcapError, match="modified"):
        pcap.decode(struct.pack("<I", 0xA1B2CD34) + bytes(20))
    bad_version = struct.pack("<IHHiIII", 0xA1B2C3D4, 1, 0, 0, 0, 65535, 1)
    with pytest.raises(PcapError, match="version 1.0"):
        pcap.decode(bad_version)
    fcs = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1 | 0x04000000 | (2 << 28))
    with pytest.raises(PcapError, match="FCS"):
        pcap.decode(fcs)
    # a snapshot length of 0 (some writers) reads as "no limit"
    zero = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 0, 1) + struct.pack("<IIII", 1, 0, 3, 3) + b"abc"
    hdr, (rec,) = pcap.decode(zero)
    assert hdr.snaplen == pcap.MAX_SNAPLEN and rec.data == b"abc"


def test_reader_and_writer_on_files(tmp_path):
    recs = [(1_700_000_000_123_456_789 + i, bytes([i % 256]) * (60 + i)) for i in range(300)]
    path = tmp_path / "x.pcap"
    with open(path, "wb") as f:
        w = pcap.PcapWriter(f, snaplen=65535, nanosecond=True)
        for ts, d in recs:
            w.write(ts, d)
    with open(path, "rb") as f:
        r = pcap.PcapReader(f, chunk=1000)
        assert r.header.nanosecond
        assert [(x.ts_ns, x.data) for x in r] == recs


def test_scapy_reads_ours_and_we_read_scapys(tmp_path):
    import scapy.all as scapy
    pkts = [scapy.Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / scapy.IP(dst="10.0.0.2")
            / scapy.UDP(dport=53) / (b"q" * i) for i in range(5)]
    for i, p in enumerate(pkts):
        p.time = 1_700_000_000 + i / 8
    for nano in (False, True):
        path = str(tmp_path / f"scapy{nano}.pcap")
        scapy.wrpcap(path, pkts, nano=nano)
        with open(path, "rb") as f:
            hdr, recs = pcap.decode(f.read())
        assert hdr.nanosecond == nano
        assert [r.data for r in recs] == [bytes(p) for p in pkts]
        assert [r.ts_ns for r in recs] == [1_700_000_000_000_000_000 + i * 125_000_000 for i in range(5)]
    ours = tmp_path / "ours.pcap"
    ours.write_bytes(build([(1_700_000_000_000_000_000 + i, bytes(p)) for i, p in enumerate(pkts)]))
    back = scapy.rdpcap(str(ours))
    assert [bytes(p) for p in back] == [bytes(p) for p in pkts]
    # pcapng as scapy writes it
    ng = str(tmp_path / "scapy.pcapng")
    w = scapy.PcapNgWriter(ng)
    for p in pkts:
        w.write(p)
    w.close()
    with open(ng, "rb") as f:
        hdr, recs = pcap.decode(f.read())
    assert hdr.format == "pcapng"
    assert [r.data for r in recs] == [bytes(p) for p in pkts]
    assert [r.ts_ns // 1000 for r in recs] == [int(p.time * 1_000_000) for p in pkts]


# ---------------------------------------------------------------------------
# pcapng
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("end", ["<", ">"])
def test_pcapng_sections_interfaces_and_resolutions(end):
    blob = (ng_shb(end) + ng_idb(end=end) + ng_idb(tsresol=9, end=end)
            + ng_idb(tsresol=0x80 | 10, tsoffset=100, end=end)
            + ng_epb(0, 1_500_000, b"A" * 20, end=end)               # us: 1.5 s
            + ng_block(5, b"\0" * 16, end)                             # statistics: skipped
            + ng_epb(1, 2_000_000_001, b"B" * 21, orig=99, end=end)    # ns
            + ng_epb(2, 3 * 1024 + 512, b"C" * 22, end=end)            # 2^-10 s, +100 s
            + ng_spb(b"D" * 23, end=end)                               # no time: the last one's
            # a new section in the other byte order starts over with its own interfaces
            + ng_shb(">" if end == "<" else "<") + ng_idb(end=">" if end == "<" else "<")
            + ng_epb(0, 7, b"E" * 24, end=">" if end == "<" else "<"))
    hdr, recs = pcap.decode(blob)
    assert hdr.format == "pcapng" and hdr.big_endian == (end == ">") and hdr.linktype == 1
    assert [(r.number, r.interface, r.data[:1], len(r.data), r.orig_len) for r in recs] == [
        (1, 0, b"A", 20, 20), (2, 1, b"B", 21, 99), (3, 2, b"C", 22, 22), (4, 0, b"D", 23, 23),
        (5, 0, b"E", 24, 24)]
    assert [r.ts_ns for r in recs] == [1_500_000_000, 2_000_000_001, 103_500_000_000,
                                       103_500_000_000, 7000]


def test_pcapng_errors_name_the_record():
    good = ng_shb() + ng_idb() + ng_epb(0, 1, b"x" * 30)
    with pytest.raises(PcapError, match=r"record 2 \(pcapng block 4\) truncated"):
        pcap.decode(good + ng_epb(0, 2, b"y" * 30)[:-5])
    with pytest.raises(PcapError, match="interface 3 was never described"):
        pcap.decode(good + ng_epb(3, 2, b"y" * 30))
    with pytest.raises(UnsupportedLinkType, match=r"record 2: interface 1 has link type 113"):
        pcap.decode(good + ng_idb(linktype=113) + ng_epb(1, 2, b"y" * 30))
    # an unused non-Ethernet interface does not matter
    assert len(pcap.decode(good + ng_idb(linktype=113))[1]) == 1
    bad_trailer = bytearray(good)
    bad_trailer[-1] ^= 1
    with pytest.raises(PcapError, match="trailing block length"):
        pcap.decode(bytes(bad_trailer))
    with pytest.raises(PcapError, match="bad block length"):
        pcap.decode(ng_shb() + struct.pack("<II", 1, 13) + bytes(8))
    with pytest.raises(PcapError, match="exceeds"):
        pcap.decode(ng_shb() + struct.pack("<III", 6, pcap.MAX_BLOCK + 4, 0))
    with pytest.raises(PcapError, match="runs past its block"):
        pcap.decode(ng_shb() + ng_idb() + ng_block(6, struct.pack("<IIIII", 0, 0, 0, 500, 500) + bytes(8)))
    with pytest.raises(PcapError, match="version 2.0"):
        pcap.decode(ng_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 2, 0, -1)))


def test_pcapng_snaplen_of_the_interface():
    _, (rec,) = pcap.decode(ng_shb() + ng_idb(snaplen=16) + ng_epb(0, 1, b"z" * 40))
    assert rec.data == b"z" * 16 and rec.orig_len == 40


# ---------------------------------------------------------------------------
# Garbage: only ever a PcapError
# ---------------------------------------------------------------------------

def _decode_garbage(blob: bytes, pieces: int = 1) -> None:
    dec = PcapDecoder(ethernet_only=False)
    step = max(1, len(blob) // pieces)
    try:
        for i in range(0, len(blob), step):
            for rec in dec.feed(blob[i:i + step]):
                assert len(rec.data) <= pcap.MAX_SNAPLEN
                assert rec.orig_len >= len(rec.data)
        dec.close()
    except PcapError:
        pass


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes(blob):
    _decode_garbage(blob)


@FUZZ
@given(st.sampled_from([struct.pack("<I", 0xA1B2C3D4), struct.pack(">I", 0xA1B23C4D),
                        struct.pack("<I", 0x0A0D0D0A)]), st.binary(max_size=400))
def test_random_bytes_after_a_magic(magic, blob):
    _decode_garbage(magic + blob, pieces=3)


GOOD_FILES = [
    build([(1, b"a" * 40), (2, b"b" * 41)], nano=True, big=True, snaplen=64),
    ng_shb() + ng_idb(tsresol=6) + ng_epb(0, 5, b"a" * 40) + ng_spb(b"b" * 9),
    ng_shb(">") + ng_idb(end=">", tsoffset=-5) + ng_epb(0, 5, b"a" * 40, end=">"),
]


@FUZZ
@given(st.sampled_from(GOOD_FILES), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                            min_size=1, max_size=6),
       st.integers(0, 10**6), st.integers(1, 7))
def test_mutated_files(blob, flips, cut, pieces):
    b = bytearray(blob)
    for pos, val in flips:
        b[pos % len(b)] = val
    _decode_garbage(bytes(b[:cut % (len(b) + 1)]), pieces)
