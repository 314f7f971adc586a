"""The scanner wire codec (vhostni/scanner/wire.py): round trips, and malformed messages
raise WireError and nothing else."""
from __future__ import annotations

import datetime
import json
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vhostni.scanner import wire
from vhostni.scanner.wire import Control, Decision, Frame, WireError

u64 = st.integers(0, 2**64 - 1)
json_scalars = st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.text(max_size=20) | \
    st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@given(number=u64, direction=st.sampled_from([wire.FROM_GUEST, wire.TO_GUEST]), held=st.booleans(),
       time_ns=u64, data=st.binary(max_size=2000))
def test_frame_round_trip(number, direction, held, time_ns, data):
    msg = wire.decode(wire.encode_frame(number, direction, held, time_ns, data))
    assert msg == Frame(number, direction, held, time_ns / 1e9, data)
    assert msg.from_guest == (direction == wire.FROM_GUEST)


def test_largest_frame_round_trips():
    data = bytes(range(256)) * (wire.MAX_FRAME // 256) + b"x" * (wire.MAX_FRAME % 256)
    raw = wire.encode_frame(1, wire.TO_GUEST, True, 0, data)
    assert len(raw) == wire.MAX_MESSAGE
    assert wire.decode(raw).data == data


@given(number=u64, verdict=st.sampled_from([wire.PASS, wire.CUT]))
def test_decision_round_trip(number, verdict):
    raw = wire.encode_decision(number, verdict)
    assert len(raw) == 16
    assert wire.decode(raw) == Decision(number, verdict)


@given(op=st.text(max_size=10), body=st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_control_round_trip(op, body):
    body = dict(body, op=op)
    assert wire.decode(wire.encode_control(body)) == Control(json.loads(json.dumps(body)))


@given(kind=st.sampled_from([wire.CHECKPOINT_BYTES, wire.CHECKPOINT_JSON]), data=st.binary(max_size=300))
def test_checkpoint_round_trip(kind, data):
    assert wire.decode(wire.encode_checkpoint(kind, data)) == wire.Checkpoint(kind, data)


def test_largest_checkpoint_round_trips_and_larger_is_refused():
    big = bytes(range(256)) * (wire.MAX_CHECKPOINT // 256)
    raw = wire.encode_checkpoint(wire.CHECKPOINT_BYTES, big)
    assert len(raw) <= wire.MAX_MESSAGE and wire.decode(raw).data == big
    with pytest.raises(wire.WireError):
        wire.encode_checkpoint(wire.CHECKPOINT_BYTES, big + b"x")


def test_control_too_large_is_refused_on_both_sides():
    with pytest.raises(WireError):
        wire.encode_control({"op": "alert", "message": "x" * wire.MAX_JSON})
    with pytest.raises(WireError):
        wire.decode(b"J" + json.dumps({"op": "x", "m": "y" * wire.MAX_JSON}).encode())


@pytest.mark.parametrize("raw, why", [
    (b"", "empty"),
    (b"X", "unknown message type"),
    (b"F", "truncated"),
    (b"F" + b"\0" * 10, "truncated"),
    (struct.pack("<cBBxQQI", b"F", 3, 0, 1, 0, 0), "bad direction 3"),
    (struct.pack("<cBBxQQI", b"F", 0, 0, 1, 0, 0), "bad direction 0"),
    (struct.pack("<cBBxQQI", b"F", 1, 0, 1, 0, 5) + b"abcd", "frame length"),
    (struct.pack("<cBBxQQI", b"F", 1, 0, 1, 0, 3) + b"abcd", "frame length"),
    (struct.pack("<cBBxQQI", b"F", 1, 0, 1, 0, wire.MAX_FRAME + 1) + b"a" * (wire.MAX_FRAME + 1),
     "frame length"),
    (b"D" + b"\0" * 14, "decision of 15 bytes"),
    (b"D" + b"\0" * 16, "decision of 17 bytes"),
    (struct.pack("<cB6xQ", b"D", 2, 1), "bad verdict 2"),
    (b"J", "bad JSON"),
    (b"J{", "bad JSON"),
    (b"J\xff\xfe", "bad JSON"),
    (b"J[]", "JSON object"),
    (b'J"op"', "JSON object"),
    (b'J{"op": 1}', "JSON object"),
    (b'J{"id": 1}', "JSON object"),
    (b"J" + b"[" * 32000 + b"]" * 32000, "bad JSON"),                     # deeper than the stack
    (b'J{"op": "x", "f": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper"),
    (b'J{"op": "x", "n": 1' + b"0" * 5000 + b"}", "bad JSON"),            # int too long to convert
    (b'J{"op": "x", "n": NaN}', "NaN is not JSON"),                         # Python's json takes it
    (b'J{"op": "x", "n": [-Infinity]}', "-Infinity is not JSON"),
])
def test_malformed_messages(raw, why):
    with pytest.raises(WireError, match=why):
        wire.decode(raw)


@pytest.mark.parametrize("value, why", [
    (float("nan"), "not strict JSON"), ([float("inf")], "not strict JSON"),
    (datetime.date(2026, 1, 1), "not strict JSON"),          # what a TOML config can hold
    (json.loads("[" * wire.MAX_DEPTH + "]" * wire.MAX_DEPTH), "nested deeper"),
])
def test_the_encoder_refuses_what_the_decoder_would(value, why):
    """Strict JSON within the limits both ways: a scanner's alert with a NaN fails at the call,
    and the kernel never sends a hello the SDK cannot read."""
    with pytest.raises(WireError, match=why):
        wire.encode_control({"op": "alert", "message": "m", "fields": {"v": value}})
    with pytest.raises(WireError, match=why):
        wire.encode_hello("s", "ni", {"v": value}, [], [])
    ok = wire.encode_hello("s", "ni", {"v": 1.5}, ["f"], ["g"])
    assert wire.decode(ok).body == {"op": "hello", "version": wire.VERSION, "scanner": "s", "ni": "ni",
                                    "config": {"v": 1.5}, "injections": ["f"],
                                    "stream_injections": ["g"], "checkpoint_max": 0,
                                    "checkpoint": None, "clock": "system"}


def test_nesting_up_to_the_limit_is_fine():
    body = {"op": "x", "f": json.loads("[" * (wire.MAX_DEPTH - 1) + "]" * (wire.MAX_DEPTH - 1))}
    assert wire.decode(wire.encode_control(body)).body == body
    body["f"] = [body["f"]]
    with pytest.raises(WireError):
        wire.decode(wire.encode_control(body))


def _decode_only_wire_errors(raw: bytes) -> None:
    try:
        msg = wire.decode(raw)
    except WireError:
        return
    assert isinstance(msg, (Frame, Decision, Control, wire.Checkpoint, wire.StreamData, wire.StreamPass))


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
@example(b"J" + b"{" * 1000)
@example(b"J" + b'{"op":"a","x":' * 1000)
def test_fuzz_random_bytes(raw):
    _decode_only_wire_errors(raw)


@settings(max_examples=500)
@given(kind=st.sampled_from([b"F", b"D", b"J", b"K"]), rest=st.binary(max_size=120))
def test_fuzz_typed_garbage(kind, rest):
    _decode_only_wire_errors(kind + rest)


valid_messages = st.one_of(
    st.builds(wire.encode_frame, u64, st.sampled_from([1, 2]), st.booleans(), u64, st.binary(max_size=64)),
    st.builds(wire.encode_decision, u64, st.sampled_from([0, 1])),
    st.builds(wire.encode_checkpoint, st.sampled_from([0, 1]), st.binary(max_size=64)),
    st.builds(lambda b: wire.encode_control(dict(b, op="subscribe")),
              st.dictionaries(st.text(max_size=5), json_values, max_size=4)),
)


@settings(max_examples=500)
@given(msg=valid_messages, data=st.data())
def test_fuzz_mutated_valid_messages(msg, data):
    """Flip, cut, extend: the result is a valid message or a WireError."""
    raw = bytearray(msg)
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["flip", "cut", "extend", "insert"]))
        if how == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif how == "cut":
            del raw[data.draw(st.integers(0, len(raw))):]
        elif how == "extend":
            raw += data.draw(st.binary(min_size=1, max_size=8))
        elif how == "insert":
            i = data.draw(st.integers(0, len(raw)))
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    _decode_only_wire_errors(bytes(raw))


# ---- typed scanner requests (decode_request)
@pytest.mark.parametrize("req", [
    wire.Subscribe({"proto": "udp", "dport": 53}, True, 1),
    wire.StreamSubscribe({"stream": True, "port": 25, "direction": "both"}, False, 2),
    wire.Inject(0, wire.TO_GUEST, 3),
    wire.StreamCut(7, wire.FROM_GUEST, 10, 5, 4),
    wire.StreamInject(7, wire.TO_GUEST, 0, "note", 5),
    wire.StreamInject(7, wire.TO_GUEST, 0, 1, 6),
    wire.StreamKill(7),
    wire.StreamMore(7, wire.TO_GUEST),
    wire.StreamMore(7),
    wire.Alert("hi", {"x": 1}),
    wire.Synced(-1),
])
def test_requests_round_trip_through_their_body(req):
    """What the SDK sends is exactly what the kernel decodes."""
    body = wire.decode(wire.encode_control(req.body())).body
    assert wire.decode_request(body) == req


@pytest.mark.parametrize("body, reason, reply, counted, alert", [
    ({"op": "nonsense", "id": 4}, "unknown op 'nonsense'", True, True, False),
    ({"op": "subscribe", "match": None, "contain": "yes"}, "contain must be", True, True, False),
    ({"op": "subscribe", "stream": True, "contain": 1}, "contain must be", True, True, False),
    ({"op": "inject", "index": [0], "direction": "to_guest"}, "no pre-registered injection [0]",
     True, True, True),
    ({"op": "inject", "index": True, "direction": "to_guest"}, "no pre-registered injection True",
     True, True, True),
    ({"op": "inject", "index": 0, "direction": ["to_guest"]}, "direction must be", True, True, False),
    ({"op": "cut", "stream": "x", "direction": "to_guest", "offset": 0, "length": 1}, "stream id",
     True, True, False),
    ({"op": "cut", "stream": 1, "direction": "up", "offset": 0, "length": 1}, "direction", True, True, False),
    ({"op": "cut", "stream": 1, "direction": "to_guest", "offset": -1, "length": 1}, "offset",
     True, True, False),
    ({"op": "cut", "stream": 1, "direction": "to_guest", "offset": 0, "length": 2**64}, "length",
     True, True, False),
    ({"op": "inject", "stream": 1, "direction": "to_guest", "offset": 0, "name": 3},
     "no pre-registered stream injection 3", True, True, True),
    ({"op": "inject", "stream": 1, "direction": "to_guest", "offset": 0, "name": "a", "index": 0},
     "no pre-registered stream injection 0", True, True, True),
    ({"op": "inject", "stream": 1, "direction": "to_guest", "offset": 0},
     "no pre-registered stream injection None", True, True, True),
    ({"op": "kill", "stream": "x"}, "stream id", False, True, False),
    ({"op": "more", "stream": None}, "stream id", False, True, False),
    ({"op": "alert", "message": ["x"]}, "alert needs", False, True, False),
    ({"op": "alert", "message": "x", "fields": [1]}, "alert needs", False, True, False),
    ({"op": "synced", "id": "x"}, "synced", False, False, False),
])
def test_malformed_requests_say_why_and_how_to_refuse_them(body, reason, reply, counted, alert):
    with pytest.raises(wire.RequestError) as ei:
        wire.decode_request(dict(body, id=body.get("id", 9)) if reply else body)
    exc = ei.value
    assert reason in exc.reason
    assert (exc.reply, exc.counted, exc.alert is not None) == (reply, counted, alert)
    assert exc.id == (body.get("id", 9) if reply else None)


def test_a_more_with_no_valid_direction_asks_for_each_held_one():
    assert wire.decode_request({"op": "more", "stream": 3, "direction": "up"}) == wire.StreamMore(3, None)
