"""Unit and property tests of the sans-I/O vhost-user codec (vhostni.vhost_user.proto)."""

import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from vhostni.vhost_user import proto as vu
from vhostni.vhost_user.proto import (
    HEADER_SIZE, MAX_PAYLOAD, NEED_REPLY, REPLY, VERSION, Empty, Header, Log, MemoryRegion,
    MemoryTable, ProtocolError, ProtocolFeature, Raw, Request, SingleMemoryRegion, U64, VringAddr,
    VringFile, VringState, decode_reply, decode_request, encode_ack, encode_reply, encode_request,
    parse_header,
)

GiB = 1 << 30
U64_MAX = (1 << 64) - 1


def region(gpa=0, size=GiB, uva=0x7F00_0000_0000, off=0):
    return MemoryRegion(gpa, size, uva, off)


def roundtrip(request, body=None, need_reply=False, fds=None):
    """Encode as a front-end would, decode as the back-end does."""
    data, fds = encode_request(request, body, need_reply, fds)
    header = parse_header(data[:HEADER_SIZE])
    return decode_request(header, data[HEADER_SIZE:], fds)


def decode_raw(request, payload=b"", fds=(), flags=VERSION):
    header = parse_header(Header(int(request), flags, len(payload)).pack())
    return decode_request(header, payload, list(fds))


# One valid example per request: (body, fds).
VALID = {
    Request.GET_FEATURES: (Empty(), []),
    Request.SET_FEATURES: (U64(vu.feature_mask(vu.VIRTIO_F_VERSION_1)), []),
    Request.SET_OWNER: (Empty(), []),
    Request.RESET_OWNER: (Empty(), []),
    Request.SET_MEM_TABLE: (MemoryTable([region(0, GiB, 0x1000_0000, 0),
                                         region(4 * GiB, GiB, 0x9000_0000, GiB)], (10, 11)), [10, 11]),
    Request.SET_LOG_BASE: (Log(4096, 0), [10]),
    Request.SET_LOG_FD: (Empty(), [10]),
    Request.SET_VRING_NUM: (VringState(1, 256), []),
    Request.SET_VRING_ADDR: (VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0), []),
    Request.SET_VRING_BASE: (VringState(0, 7), []),
    Request.GET_VRING_BASE: (VringState(0, 0), []),
    Request.SET_VRING_KICK: (VringFile(1, False, 10), [10]),
    Request.SET_VRING_CALL: (VringFile(0, True, None), []),
    Request.SET_VRING_ERR: (VringFile(255, False, 10), [10]),
    Request.GET_PROTOCOL_FEATURES: (Empty(), []),
    Request.SET_PROTOCOL_FEATURES: (U64(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK), []),
    Request.GET_QUEUE_NUM: (Empty(), []),
    Request.SET_VRING_ENABLE: (VringState(1, 1), []),
    Request.SEND_RARP: (U64(int.from_bytes(b"\x52\x54\x00\x12\x34\x56\0\0", "little")), []),
    Request.NET_SET_MTU: (U64(1500), []),
    Request.SET_BACKEND_REQ_FD: (Empty(), [10]),
    Request.IOTLB_MSG: (Raw(bytes(32)), []),
    Request.SET_VRING_ENDIAN: (VringState(0, 0), []),
    Request.GET_CONFIG: (Raw(bytes(12 + 6)), []),
    Request.SET_CONFIG: (Raw(bytes(12 + 6)), []),
    Request.CREATE_CRYPTO_SESSION: (Raw(b"x" * 40), []),
    Request.CLOSE_CRYPTO_SESSION: (U64(3), []),
    Request.POSTCOPY_ADVISE: (Empty(), []),
    Request.POSTCOPY_LISTEN: (Empty(), []),
    Request.POSTCOPY_END: (Empty(), []),
    Request.GET_INFLIGHT_FD: (Raw(bytes(24)), []),
    Request.SET_INFLIGHT_FD: (Raw(bytes(24)), [10]),
    Request.GPU_SET_SOCKET: (Empty(), [10]),
    Request.RESET_DEVICE: (Empty(), []),
    Request.VRING_KICK: (VringState(0, 0), []),
    Request.GET_MAX_MEM_SLOTS: (Empty(), []),
    Request.ADD_MEM_REG: (SingleMemoryRegion(region()), [10]),
    Request.REM_MEM_REG: (SingleMemoryRegion(region()), []),
    Request.SET_STATUS: (U64(0xF), []),
    Request.GET_STATUS: (Empty(), []),
    Request.GET_SHARED_OBJECT: (Raw(bytes(16)), []),
    Request.SET_DEVICE_STATE_FD: (Raw(bytes(8)), [10]),
    Request.CHECK_DEVICE_STATE: (Empty(), []),
}


def test_every_request_has_a_spec_and_an_example():
    assert set(vu.REQUESTS) == set(Request)
    assert set(VALID) == set(Request)


def test_request_numbers_match_the_spec():
    assert Request.GET_FEATURES == 1 and Request.SET_MEM_TABLE == 5
    assert Request.SET_VRING_KICK == 12 and Request.GET_QUEUE_NUM == 17
    assert Request.SET_VRING_ENABLE == 18 and Request.GET_STATUS == 40
    assert Request.CHECK_DEVICE_STATE == 43
    assert ProtocolFeature.MQ == 1 << 0 and ProtocolFeature.REPLY_ACK == 1 << 3
    assert ProtocolFeature.NET_MTU == 1 << 4 and ProtocolFeature.CONFIGURE_MEM_SLOTS == 1 << 15
    assert vu.VIRTIO_F_VERSION_1 == 32 and vu.VHOST_USER_F_PROTOCOL_FEATURES == 30
    assert vu.VIRTIO_NET_F_MRG_RXBUF == 15 and vu.VIRTIO_RING_F_EVENT_IDX == 29


@pytest.mark.parametrize("request_", list(Request), ids=lambda r: r.name)
def test_valid_request_round_trips(request_):
    body, fds = VALID[request_]
    msg = roundtrip(request_, body, fds=fds)
    assert msg.request is request_
    assert msg.body == body
    assert msg.fds == fds
    assert not msg.need_reply


@pytest.mark.parametrize("body,size", [
    (Empty(), 0), (U64(U64_MAX), 8), (VringState(255, 0xFFFFFFFF), 8),
    (VringAddr(3, 1, 1, 2, 3, 4), 40), (VringFile(7, True), 8), (Log(1, 2), 16),
    (SingleMemoryRegion(region()), 40), (MemoryTable([region()]), 40), (MemoryTable([]), 8),
    (Raw(b"abc"), 3),
])
def test_body_pack_unpack(body, size):
    data = body.pack()
    assert len(data) == size
    again = type(body).unpack(data)
    if isinstance(body, MemoryTable):
        assert again.regions == body.regions
    else:
        assert again == body


def test_wire_layout_is_little_endian_and_matches_the_c_structs():
    assert Header(Request.SET_VRING_NUM, VERSION, 8).pack() == bytes.fromhex("08000000 01000000 08000000")
    assert VringState(1, 256).pack() == bytes.fromhex("01000000 00010000")
    assert VringFile(2, True).pack() == bytes.fromhex("0201000000000000")
    assert VringAddr(1, 0, 0x10, 0x20, 0x30, 0x40).pack() == struct.pack("<IIQQQQ", 1, 0, 0x10, 0x20, 0x30, 0x40)
    table = MemoryTable([region(0x1000, 0x2000, 0x3000, 0x4000)])
    assert table.pack() == struct.pack("<IIQQQQ", 1, 0, 0x1000, 0x2000, 0x3000, 0x4000)


def test_need_reply_flag():
    msg = roundtrip(Request.SET_MEM_TABLE, MemoryTable([]), need_reply=True)
    assert msg.need_reply and msg.flags == VERSION | NEED_REPLY


# --- header ---------------------------------------------------------------

@pytest.mark.parametrize("data,match", [
    (b"", "header is 0 bytes"),
    (bytes(11), "header is 11 bytes"),
    (bytes(13), "header is 13 bytes"),
    (struct.pack("<III", 1, 0, 0), "unsupported version 0"),
    (struct.pack("<III", 1, 2, 0), "unsupported version 2"),
    (struct.pack("<III", 1, 3, 0), "unsupported version 3"),
    (struct.pack("<III", 1, 0x11, 0), "reserved flag bits"),
    (struct.pack("<III", 1, 0x80000001, 0), "reserved flag bits"),
    (struct.pack("<III", 5, 1, MAX_PAYLOAD + 1), "exceeds"),
    (struct.pack("<III", 5, 1, 0xFFFFFFFF), "exceeds"),
])
def test_parse_header_rejects(data, match):
    with pytest.raises(ProtocolError, match=match):
        parse_header(data)


def test_parse_header_accepts_unknown_request_numbers_for_framing():
    header = parse_header(struct.pack("<III", 999, VERSION | NEED_REPLY, 16))
    assert header.request == 999 and header.size == 16 and header.need_reply
    assert parse_header(struct.pack("<III", 8, 1, MAX_PAYLOAD)).request is Request.SET_VRING_NUM


# --- request validation ---------------------------------------------------

def test_unknown_request():
    with pytest.raises(ProtocolError, match="unknown request") as exc:
        decode_raw(999)
    assert exc.value.request == 999
    with pytest.raises(ProtocolError, match="unknown request"):
        decode_raw(0)


def test_reply_flag_on_request():
    with pytest.raises(ProtocolError, match="reply flag set"):
        decode_raw(Request.GET_FEATURES, flags=VERSION | REPLY)


def test_payload_shorter_than_header_says():
    header = Header(Request.SET_FEATURES, VERSION, 8)
    with pytest.raises(ProtocolError, match="header says 8"):
        decode_request(header, bytes(4), [])


@pytest.mark.parametrize("request_,size", [
    (Request.GET_FEATURES, 8), (Request.SET_FEATURES, 0), (Request.SET_FEATURES, 4),
    (Request.SET_FEATURES, 16), (Request.SET_VRING_NUM, 4), (Request.SET_VRING_NUM, 12),
    (Request.SET_VRING_ADDR, 32), (Request.SET_VRING_ADDR, 48), (Request.SET_VRING_KICK, 4),
    (Request.SET_OWNER, 1), (Request.GET_VRING_BASE, 16), (Request.SET_LOG_BASE, 8),
    (Request.ADD_MEM_REG, 32), (Request.IOTLB_MSG, 31), (Request.GET_CONFIG, 11),
    (Request.SET_INFLIGHT_FD, 20), (Request.GET_SHARED_OBJECT, 17),
])
def test_wrong_payload_size(request_, size):
    fds = [10] * len(VALID[request_][1])
    with pytest.raises(ProtocolError, match=r"payload (is|of) \d+ bytes"):
        decode_raw(request_, bytes(size), fds)


@pytest.mark.parametrize("request_", [r for r in Request if VALID[r][1] == []
                                      and r not in (Request.SET_VRING_CALL,)], ids=lambda r: r.name)
def test_stray_fd_rejected(request_):
    body, _ = VALID[request_]
    nfds = 2 if request_ == Request.REM_MEM_REG else 1  # REM_MEM_REG tolerates one
    with pytest.raises(ProtocolError, match="fds attached"):
        decode_raw(request_, body.pack(), [10] * nfds)


@pytest.mark.parametrize("request_", [r for r in Request if len(VALID[r][1]) == 1], ids=lambda r: r.name)
def test_missing_or_extra_fd(request_):
    body, _ = VALID[request_]
    for nfds in (0, 2):
        with pytest.raises(ProtocolError, match="fds attached"):
            decode_raw(request_, body.pack(), [10] * nfds)


def test_rem_mem_reg_tolerates_one_stray_fd():
    msg = decode_raw(Request.REM_MEM_REG, SingleMemoryRegion(region()).pack(), [10])
    assert msg.fds == [10]


@pytest.mark.parametrize("request_", [Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR])
def test_vring_file_fd_rules(request_):
    assert decode_raw(request_, VringFile(3).pack(), [10]).body == VringFile(3, False, 10)
    assert decode_raw(request_, VringFile(3, True).pack(), []).body == VringFile(3, True, None)
    with pytest.raises(ProtocolError, match="expected 1"):
        decode_raw(request_, VringFile(3).pack(), [])
    with pytest.raises(ProtocolError, match="expected 0"):
        decode_raw(request_, VringFile(3, True).pack(), [10])
    with pytest.raises(ProtocolError, match="fds attached"):
        decode_raw(request_, VringFile(3).pack(), [10, 11])
    for value in (1 << 9, 1 << 63, 0x1FF | 0x200):
        with pytest.raises(ProtocolError, match="reserved bits"):
            decode_raw(request_, U64(value).pack(), [10])


def test_mem_table_fd_count_must_match_regions():
    table = MemoryTable([region(0, GiB, 0x1000_0000), region(GiB, GiB, 0x5000_0000)])
    for nfds in (0, 1, 3):
        with pytest.raises(ProtocolError, match="fds attached"):
            decode_raw(Request.SET_MEM_TABLE, table.pack(), list(range(10, 10 + nfds)))
    msg = decode_raw(Request.SET_MEM_TABLE, table.pack(), [10, 11])
    assert msg.body.fds == (10, 11) and msg.body.regions == table.regions


def test_mem_table_empty_is_allowed():
    assert decode_raw(Request.SET_MEM_TABLE, MemoryTable([]).pack()).body.regions == ()


def test_mem_table_too_many_regions():
    regions = [region(i * GiB, GiB, 0x1_0000_0000 + i * GiB) for i in range(9)]
    with pytest.raises(ProtocolError, match="9 regions, at most 8"):
        decode_raw(Request.SET_MEM_TABLE, MemoryTable(regions).pack(), list(range(9)))
    assert len(decode_raw(Request.SET_MEM_TABLE, MemoryTable(regions[:8]).pack(), list(range(8)))
               .body.regions) == 8


def test_mem_table_nregions_disagrees_with_size():
    data = MemoryTable([region()]).pack()
    with pytest.raises(ProtocolError, match="expected 40"):
        decode_raw(Request.SET_MEM_TABLE, data + bytes(32), [10])   # padded to two regions
    with pytest.raises(ProtocolError, match="expected 40"):
        decode_raw(Request.SET_MEM_TABLE, data[:-1], [10])
    huge = struct.pack("<II", 0xFFFFFFFF, 0)
    with pytest.raises(ProtocolError, match="regions, at most"):
        decode_raw(Request.SET_MEM_TABLE, huge, [])
    with pytest.raises(ProtocolError, match="too short"):
        decode_raw(Request.SET_MEM_TABLE, bytes(4), [])


@pytest.mark.parametrize("bad,match", [
    (region(size=0), "size 0"),
    (region(gpa=U64_MAX - 10, size=12), "guest range"),
    (region(uva=U64_MAX, size=2), "user range"),
    (region(off=1 << 63, size=1 << 63 | 1), "mmap offset range"),
])
def test_mem_table_bad_region(bad, match):
    with pytest.raises(ProtocolError, match=match):
        decode_raw(Request.SET_MEM_TABLE, MemoryTable([bad]).pack(), [10])
    with pytest.raises(ProtocolError, match=match):
        decode_raw(Request.ADD_MEM_REG, SingleMemoryRegion(bad).pack(), [10])


def test_region_reaching_the_top_of_the_address_space_is_fine():
    top = region(gpa=U64_MAX - 0xFFF, size=0x1000, uva=U64_MAX - 0xFFF)
    assert decode_raw(Request.SET_MEM_TABLE, MemoryTable([top]).pack(), [10]).body.regions == (top,)


@pytest.mark.parametrize("second,match", [
    (region(gpa=GiB - 1, size=GiB, uva=0x9000_0000_0000), "guest-physical"),
    (region(gpa=0, size=1, uva=0x9000_0000_0000), "guest-physical"),       # same start
    (region(gpa=GiB // 2, size=1, uva=0x9000_0000_0000), "guest-physical"),  # inside
    (region(gpa=4 * GiB, size=GiB, uva=0x7F00_0000_0000 + 4096), "user"),
])
def test_mem_table_overlapping_regions(second, match):
    first = region(gpa=0, size=GiB, uva=0x7F00_0000_0000)
    for order in ([first, second], [second, first]):
        with pytest.raises(ProtocolError, match=f"overlap in {match}"):
            decode_raw(Request.SET_MEM_TABLE, MemoryTable(order).pack(), [10, 11])


def test_mem_table_adjacent_regions_do_not_overlap():
    regions = [region(0, GiB, 0x1000_0000), region(GiB, GiB, 0x1000_0000 + GiB)]
    assert len(decode_raw(Request.SET_MEM_TABLE, MemoryTable(regions).pack(), [10, 11]).body.regions) == 2


@pytest.mark.parametrize("request_", [Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
                                      Request.SET_VRING_ENABLE, Request.SET_VRING_ENDIAN, Request.VRING_KICK])
def test_vring_state_index_out_of_range(request_):
    with pytest.raises(ProtocolError, match="ring index 256"):
        decode_raw(request_, VringState(256, 1).pack())
    with pytest.raises(ProtocolError, match="ring index"):
        decode_raw(request_, VringState(0xFFFFFFFF, 1).pack())


def test_vring_addr_checks():
    with pytest.raises(ProtocolError, match="ring index 256"):
        decode_raw(Request.SET_VRING_ADDR, VringAddr(256, 0, 0, 0, 0, 0).pack())
    with pytest.raises(ProtocolError, match="unknown vring flags"):
        decode_raw(Request.SET_VRING_ADDR, VringAddr(0, 2, 0, 0, 0, 0).pack())
    assert decode_raw(Request.SET_VRING_ADDR, VringAddr(0, vu.VRING_F_LOG, 1, 2, 3, 4).pack()).body.flags == 1


@pytest.mark.parametrize("num,ok", [(0, False), (1, True), (256, True), (32768, True), (32769, False),
                                    (0xFFFFFFFF, False)])
def test_vring_num_range(num, ok):
    if ok:
        assert decode_raw(Request.SET_VRING_NUM, VringState(0, num).pack()).body.num == num
    else:
        with pytest.raises(ProtocolError, match="queue size"):
            decode_raw(Request.SET_VRING_NUM, VringState(0, num).pack())


def test_vring_enable_is_boolean():
    assert decode_raw(Request.SET_VRING_ENABLE, VringState(0, 0).pack()).body.num == 0
    with pytest.raises(ProtocolError, match="neither 0 nor 1"):
        decode_raw(Request.SET_VRING_ENABLE, VringState(0, 2).pack())


def test_protocol_error_names_the_request():
    with pytest.raises(ProtocolError) as exc:
        decode_raw(Request.SET_VRING_NUM, bytes(3))
    assert exc.value.request is Request.SET_VRING_NUM
    assert str(exc.value).startswith("SET_VRING_NUM: ")


# --- fd ownership -----------------------------------------------------------

def _is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_message_owns_fds_until_taken():
    r, w = os.pipe()
    msg = roundtrip(Request.SET_VRING_KICK, VringFile(0, False, r))
    assert msg.body.fd == r
    with msg:
        assert msg.take_fd() == r
    assert _is_open(r)          # taken: the message did not close it
    msg = roundtrip(Request.SET_VRING_CALL, VringFile(0, False, w))
    with msg:
        pass
    assert not _is_open(w)      # not taken: closed with the message
    os.close(r)


def test_error_leaves_fds_with_the_caller():
    r, w = os.pipe()
    try:
        with pytest.raises(ProtocolError):
            decode_raw(Request.SET_FEATURES, U64(0).pack(), [r, w])
        assert _is_open(r) and _is_open(w)
    finally:
        vu.close_fds([r, w])
    assert not _is_open(r)
    vu.close_fds([r])           # already closed: ignored


# --- replies ----------------------------------------------------------------

def _reply(data):
    header = parse_header(data[:HEADER_SIZE])
    return header, decode_reply(header, data[HEADER_SIZE:])


def test_encode_reply_and_decode_reply():
    header, body = _reply(encode_reply(Request.GET_FEATURES, U64(0x1234)))
    assert header.is_reply and header.version == 1 and not header.need_reply
    assert header.request is Request.GET_FEATURES and body == U64(0x1234)
    _, body = _reply(encode_reply(Request.GET_VRING_BASE, VringState(1, 42)))
    assert body == VringState(1, 42)
    _, body = _reply(encode_reply(Request.GET_CONFIG, Raw(b"config")))
    assert body == Raw(b"config")


def test_ack():
    data = encode_ack(Request.SET_MEM_TABLE, True)
    assert data == struct.pack("<IIIQ", 5, VERSION | REPLY, 8, 0)
    assert _reply(data)[1] == U64(0)
    assert _reply(encode_ack(Request.SET_VRING_ADDR, False))[1] == U64(1)


def test_set_log_base_empty_reply():
    assert _reply(encode_reply(Request.SET_LOG_BASE, Empty()))[1] == Empty()


@pytest.mark.parametrize("data,match", [
    (encode_request(Request.GET_FEATURES, U64(1))[0], "reply flag missing"),
    (Header(Request.GET_FEATURES, VERSION | REPLY, 4).pack() + bytes(4), "expected 8"),
    (Header(Request.GET_VRING_BASE, VERSION | REPLY, 8).pack() + VringState(300, 0).pack(), "ring index"),
    (Header(77, VERSION | REPLY, 0).pack(), "unknown request"),
    (Header(Request.SET_MEM_TABLE, VERSION | REPLY, 0).pack(), "expected 8"),
])
def test_decode_reply_rejects(data, match):
    with pytest.raises(ProtocolError, match=match):
        _reply(data)


def test_decode_reply_payload_mismatch():
    with pytest.raises(ProtocolError, match="header says"):
        decode_reply(Header(Request.GET_FEATURES, VERSION | REPLY, 8), bytes(7))


def test_reply_expected():
    none, ack = 0, ProtocolFeature.REPLY_ACK
    for request in (Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
                    Request.GET_QUEUE_NUM):
        assert vu.reply_expected(request, False, none)
    assert not vu.reply_expected(Request.SET_MEM_TABLE, True, none)
    assert not vu.reply_expected(Request.SET_MEM_TABLE, False, ack)
    assert vu.reply_expected(Request.SET_MEM_TABLE, True, ack)
    assert vu.reply_expected(Request.SET_LOG_BASE, False, ProtocolFeature.LOG_SHMFD)
    assert not vu.reply_expected(Request.SET_LOG_BASE, False, none)
    assert vu.reply_expected(999, True, ack) and not vu.reply_expected(999, True, none)


def test_encode_request_attaches_body_fds_unless_told_otherwise():
    table = MemoryTable([region()], (10,))
    assert encode_request(Request.SET_MEM_TABLE, table)[1] == [10]
    assert encode_request(Request.SET_MEM_TABLE, table, fds=[])[1] == []
    assert encode_request(Request.SET_VRING_CALL, VringFile(0, True))[1] == []
    assert encode_request(Request.SET_LOG_FD, fds=[5])[1] == [5]
    data, fds = encode_request(Request.GET_FEATURES)
    assert data == struct.pack("<III", 1, 1, 0) and fds == []


def test_feature_mask():
    assert vu.feature_mask() == 0
    assert vu.feature_mask(vu.VIRTIO_F_VERSION_1, vu.VIRTIO_NET_F_MRG_RXBUF) == (1 << 32) | (1 << 15)
    with pytest.raises(ValueError):
        vu.feature_mask(64)


# --- properties -------------------------------------------------------------

@given(st.binary(max_size=20))
def test_parse_header_raises_only_protocol_error(data):
    try:
        header = parse_header(data)
    except ProtocolError:
        return
    assert len(data) == HEADER_SIZE and header.size <= MAX_PAYLOAD and header.version == 1


request_numbers = st.one_of(st.sampled_from(list(Request)), st.integers(0, 2**32 - 1))
flag_values = st.one_of(st.sampled_from([VERSION, VERSION | NEED_REPLY, VERSION | REPLY]),
                        st.integers(0, 2**32 - 1))


@settings(max_examples=500)
@given(request_numbers, flag_values, st.binary(max_size=300), st.integers(0, 9))
def test_decode_request_raises_only_protocol_error(request, flags, payload, nfds):
    data = struct.pack("<III", request, flags, len(payload))
    try:
        header = parse_header(data)
        msg = decode_request(header, payload, list(range(100, 100 + nfds)))
    except ProtocolError:
        return
    assert msg.request in vu.REQUESTS and len(msg.fds) == nfds
    # Whatever was accepted re-encodes to the same payload.
    assert msg.body.pack() == payload


@settings(max_examples=300)
@given(request_numbers, flag_values, st.binary(max_size=300))
def test_decode_reply_raises_only_protocol_error(request, flags, payload):
    data = struct.pack("<III", request, flags, len(payload))
    try:
        header = parse_header(data)
        body = decode_reply(header, payload)
    except ProtocolError:
        return
    assert body.pack() == payload


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, U64_MAX)
ring = st.integers(0, 255)


@st.composite
def memory_tables(draw):
    """Disjoint regions (in both guest and user space), with fds."""
    n = draw(st.integers(0, 8))
    sizes = draw(st.lists(st.integers(1, 1 << 40), min_size=n, max_size=n))
    gaps = draw(st.lists(st.integers(0, 1 << 40), min_size=n, max_size=n))
    regions, gpa, uva = [], draw(st.integers(0, 1 << 50)), draw(st.integers(0, 1 << 50))
    for size, gap in zip(sizes, gaps):
        regions.append(MemoryRegion(gpa, size, uva, draw(st.integers(0, 1 << 40))))
        gpa += size + gap
        uva += size + gap * 3
    regions = draw(st.permutations(regions))
    return MemoryTable(regions, tuple(range(100, 100 + n)))


valid_requests = st.one_of(
    st.tuples(st.sampled_from([Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES, Request.NET_SET_MTU,
                               Request.SEND_RARP, Request.SET_STATUS]), st.builds(U64, u64)),
    st.tuples(st.sampled_from([Request.SET_VRING_BASE, Request.GET_VRING_BASE, Request.SET_VRING_ENDIAN]),
              st.builds(VringState, ring, u32)),
    st.tuples(st.just(Request.SET_VRING_NUM), st.builds(VringState, ring, st.integers(1, 32768))),
    st.tuples(st.just(Request.SET_VRING_ENABLE), st.builds(VringState, ring, st.integers(0, 1))),
    st.tuples(st.just(Request.SET_VRING_ADDR), st.builds(VringAddr, ring, st.integers(0, 1), u64, u64, u64, u64)),
    st.tuples(st.sampled_from([Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR]),
              st.one_of(st.builds(VringFile, ring, st.just(True), st.none()),
                        st.builds(VringFile, ring, st.just(False), st.integers(0, 1000)))),
    st.tuples(st.just(Request.SET_MEM_TABLE), memory_tables()),
    st.tuples(st.sampled_from([Request.GET_FEATURES, Request.SET_OWNER, Request.GET_QUEUE_NUM,
                               Request.GET_PROTOCOL_FEATURES, Request.RESET_DEVICE]), st.just(Empty())),
)


@given(valid_requests, st.booleans())
def test_encode_decode_round_trip(request_body, need_reply):
    request, body = request_body
    msg = roundtrip(request, body, need_reply)
    assert msg.request is request and msg.need_reply == need_reply
    assert msg.body == body
    assert msg.fds == (body.attached_fds() if hasattr(body, "attached_fds") else [])


@given(st.sampled_from([Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
                        Request.SET_MEM_TABLE, Request.SET_VRING_ADDR]), u64)
def test_reply_round_trip_u64(request, value):
    header, body = _reply(encode_reply(request, U64(value)))
    assert body == U64(value) and header.request is request


@given(ring, st.integers(0, 0xFFFF))
def test_reply_round_trip_vring_base(index, num):
    assert _reply(encode_reply(Request.GET_VRING_BASE, VringState(index, num)))[1] == VringState(index, num)
