"""Multi-queue virtio-net (VIRTIO_NET_F_MQ) against simulated drivers with several queue pairs:
per-queue counters (the NI's stats, the stats file, metrics), how the NI spreads flows over a
guest's receive queues, and that policy and containment are the NI's whatever queue a frame
used.  tests/test_mq_guests.py does the same with real Linux guests."""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from nibench import Bench, Request, vu
from nikit import A_MAC, B_MAC, policy, tcp_frame, udp_frame, write_policy
from vhostni.fastpath import ISOLATE_QUARANTINE
from vhostni.metrics import DaemonCollector


def mq_pair(bench: Bench, pairs: int = 2, rx: int = 64):
    a = bench.connect("a", queue_pairs=pairs)
    b = bench.connect("b", queue_pairs=pairs)
    for d in (a, b):
        for qp in range(pairs):
            d.post_rx_buffers(rx, 2048, queue=2 * qp)
    bench.step()
    return a, b


def rx_all(drv, pairs: int, count: int = 64) -> dict[int, list[bytes]]:
    """Frames waiting on each receive queue (by pair)."""
    return {qp: [f for _, f in drv.recv_frames(timeout=0, queue=2 * qp, count=count)]
            for qp in range(pairs)}


def test_device_offers_mq(make_bench):
    """QEMU clears VIRTIO_NET_F_MQ from what the guest sees unless the backend offers it:
    PROTOCOL_F_MQ and GET_QUEUE_NUM alone leave a guest with one queue pair."""
    bench = make_bench()
    a = bench.connect("a", queue_pairs=2)
    assert a.frontend.call(Request.GET_FEATURES).value & (1 << vu.VIRTIO_NET_F_MQ)
    assert a.frontend.protocol_features & vu.ProtocolFeature.MQ
    assert a.frontend.call(Request.GET_QUEUE_NUM).value == 8


def test_queue_counters_count_each_pair(make_bench):
    bench = make_bench()
    a, b = mq_pair(bench, pairs=3)
    sent = {0: [], 2: []}
    for i in range(10):
        frame = tcp_frame("a", "b", sport=41000 + i, payload=bytes([i]) * (50 + 37 * i))
        qp = 2 if i % 3 == 0 else 0
        a.send_frame(frame, queue=2 * qp + 1)
        sent[qp].append(frame)
    bench.step(5)
    got = rx_all(b, 3)
    assert sorted(sum(got.values(), [])) == sorted(sent[0] + sent[2])
    qa = {q["pair"]: q for q in bench.daemon.nis["a"].info()["queues"]}
    qb = {q["pair"]: q for q in bench.daemon.nis["b"].info()["queues"]}
    assert sorted(qa) == sorted(qb) == [0, 1, 2]           # every pair the frontend set up
    for qp in range(3):
        assert qa[qp]["in_frames"] == len(sent.get(qp, []))
        assert qa[qp]["in_bytes"] == sum(map(len, sent.get(qp, [])))
        assert qb[qp]["out_frames"] == len(got[qp])
        assert qb[qp]["out_bytes"] == sum(map(len, got[qp]))
        assert qa[qp]["ready"] and qb[qp]["ready"]
    st = bench.stats("b")
    assert sum(q["out_frames"] for q in qb.values()) == st["out_frames"] == 10
    assert sum(q["out_bytes"] for q in qb.values()) == st["out_bytes"]
    # the stats file carries them too
    assert bench.stats_json()["nis"]["b"]["queues"] == list(qb.values())


def test_queue_counters_count_frames_the_backlog_delivers(make_bench):
    """Frames that waited for receive buffers count on the queue that finally took them."""
    bench = make_bench()
    a = bench.connect("a", queue_pairs=2)
    b = bench.connect("b", queue_pairs=2)
    bench.step()
    frames = [udp_frame("a", "b", sport=5000 + i, payload=b"x" * (100 + i)) for i in range(5)]
    for f in frames:
        a.send_frame(f)
    bench.step(3)
    assert bench.stats("b")["out_frames"] == 0 and bench.stats("b")["backlog_max"] == 5
    b.post_rx_buffers(16, 2048, queue=2)
    bench.step(3)
    assert [f for _, f in b.recv_frames(timeout=0, queue=2, count=5)] == frames
    qb = bench.port("b").queue_stats()
    assert (qb[0]["out_frames"], qb[1]["out_frames"]) == (0, 5)
    assert qb[1]["out_bytes"] == sum(map(len, frames))


def test_disabled_pair_is_not_ready(make_bench):
    bench = make_bench()
    a, b = mq_pair(bench, pairs=2)
    for q in (2, 3):
        b.set_vring_enable(q, False)
    bench.step()
    qb = bench.port("b").queue_stats()
    assert [q["ready"] for q in qb] == [True, False]


def test_connections_between_two_hosts_spread_over_rx_queues(make_bench):
    """Two guests talk over one address pair: the receive queue must follow the connection
    (ports), not only the addresses, or one queue carries everything."""
    bench = make_bench()
    a, b = mq_pair(bench, pairs=2)
    where: dict[int, set[int]] = {}
    for rnd in range(3):
        for i in range(16):
            a.send_frame(tcp_frame("a", "b", sport=42000 + i, payload=bytes([rnd, i])))
        bench.step(5)
        for qp, frames in rx_all(b, 2).items():
            for f in frames:
                where.setdefault(int.from_bytes(f[34:36], "big"), set()).add(qp)
    assert len(where) == 16
    assert all(len(qs) == 1 for qs in where.values()), where      # one connection, one queue
    assert Counter(next(iter(qs)) for qs in where.values()).keys() == {0, 1}


def test_fragments_of_a_datagram_take_one_rx_queue(make_bench):
    """A fragment has no ports: a datagram's fragments hash without them (and stay together)."""
    bench = make_bench()
    a, b = mq_pair(bench, pairs=2)
    import socket
    import struct
    for i in range(8):
        for off, mf in ((0, 0x2000), (8, 0)):
            udp_hdr = struct.pack("!HHHH", 6000 + i, 53, 24, 0) if off == 0 else b""
            payload = udp_hdr + bytes(8 if off == 0 else 16)
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 100 + i, mf | (off // 8),
                             64, 17, 0, socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"))
            a.send_frame(B_MAC + A_MAC + b"\x08\x00" + ip + payload)
    bench.step(5)
    got = rx_all(b, 2)
    assert sum(len(v) for v in got.values()) == 16
    for qp, frames in got.items():
        ids = Counter(int.from_bytes(f[18:20], "big") for f in frames)
        assert all(n == 2 for n in ids.values()), (qp, ids)


def test_prevent_rule_and_quarantine_hold_on_every_queue(make_bench, tmp_path):
    pol = write_policy(str(tmp_path / "a.json"), policy(prevent=[
        {"direction": "from_guest", "proto": "tcp", "dport": 25}]))
    bench = make_bench(policies={"a": pol})
    a, b = mq_pair(bench, pairs=4)
    for qp in range(4):
        a.send_frame(tcp_frame("a", "b", dport=25, sport=43000 + qp), queue=2 * qp + 1)
        a.send_frame(tcp_frame("a", "b", dport=80, sport=43000 + qp), queue=2 * qp + 1)
    bench.step(5)
    got = sum(rx_all(b, 4).values(), [])
    assert sorted(int.from_bytes(f[36:38], "big") for f in got) == [80] * 4
    assert bench.stats("a")["drop_prevented"] == 4
    assert [q["in_frames"] for q in bench.port("a").queue_stats()] == [2, 2, 2, 2]
    # quarantine: nothing either way, on any queue
    bench.port("a").set_isolation(ISOLATE_QUARANTINE)
    for qp in range(4):
        a.send_frame(tcp_frame("a", "b", sport=44000 + qp), queue=2 * qp + 1)
        b.send_frame(tcp_frame("b", "a", sport=44000 + qp), queue=2 * qp + 1)
    bench.step(5)
    assert sum(rx_all(b, 4).values(), []) == [] and sum(rx_all(a, 4).values(), []) == []
    assert bench.stats("a")["drop_quarantine"] == 8


def test_queue_metrics():
    snap = {"nis": {"vm1": {"in_frames": 5, "queues": [
        {"pair": 0, "in_frames": 3, "in_bytes": 300, "out_frames": 1, "out_bytes": 60, "ready": True},
        {"pair": 1, "in_frames": 2, "in_bytes": 200, "out_frames": 4, "out_bytes": 90, "ready": False}]}}}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in DaemonCollector(lambda: (snap, False)).collect() for s in f.samples}
    q = lambda n, d: (("direction", d), ("ni", "vm1"), ("queue", n))   # noqa: E731
    assert samples[("vhostni_ni_queue_frames_total", q("0", "in"))] == 3
    assert samples[("vhostni_ni_queue_frames_total", q("1", "out"))] == 4
    assert samples[("vhostni_ni_queue_bytes_total", q("1", "in"))] == 200
    assert samples[("vhostni_ni_queue_ready", (("ni", "vm1"), ("queue", "1")))] == 0
    assert samples[("vhostni_ni_frames_total", (("direction", "in"), ("ni", "vm1")))] == 5
    assert not any(n.startswith("vhostni_ni_queues") for n, _ in samples)


def test_queue_stats_refuse_bad_calls():
    """The C accessor takes no count past its queues and no port without rings."""
    from vhostni.fastpath import MAX_QUEUES, Switch, ffi, lib
    with Switch() as sw:
        p = sw.add_vhost_port()
        sink = sw.add_sink_port()
        out = ffi.new("struct vn_queue_stats[]", MAX_QUEUES + 1)
        assert lib.vn_port_queue_stats(sw._sw, p.index, out, MAX_QUEUES + 1) == lib.VN_EINVAL
        assert lib.vn_port_queue_stats(sw._sw, sink.index, out, 2) == lib.VN_ENOPORT
        assert lib.vn_port_queue_stats(sw._sw, 99, out, 2) == lib.VN_ENOPORT
        assert lib.vn_port_queue_stats(sw._sw, -1, out, 2) == lib.VN_ENOPORT
        assert lib.vn_port_queue_stats(sw._sw, p.index, out, MAX_QUEUES) == MAX_QUEUES
        assert p.queue_stats() == []          # no ring configured, nothing carried


def test_a_connection_spread_over_every_queue_is_one_held_stream(kits):
    """Each end puts its segments round-robin on its 4 transmit queues (and the NI picks the
    receive queues): the scanner still sees one in-order stream each way and holds it, the
    receivers get exactly the bytes sent, and the prevent rule drops on every queue."""
    from test_streams import FROM, TO, decider, got_payload, reports, seen
    from tcpkit import ACK, FIN, Conn
    scanners = [decider(mode="pass", report=True)]
    k = kits({"a": policy(scanners=scanners, hold_timeout_ms=5000, prevent=[
        {"direction": "from_guest", "proto": "tcp", "dport": 26}])}, queue_pairs=4)
    k.wait_alert("ready", "a", "sd")
    c = Conn(k)
    c.open()
    client = [bytes([i]) * (100 + 50 * i) for i in range(12)]
    server = [b"%d ok\r\n" % i for i in range(8)]
    k.send("a", *[c.data("a", m) for m in client])
    k.send("b", *[c.data("b", m) for m in server])
    want_a, want_b = b"".join(server), b"".join(client)
    assert got_payload(k, "b", len(want_b)) == want_b
    assert got_payload(k, "a", len(want_a)) == want_a
    k.until(lambda: len(seen(k, FROM)) == len(want_b) and len(seen(k, TO)) == len(want_a),
            what="the scanner's reports")
    assert seen(k, FROM) == want_b and seen(k, TO) == want_a
    assert len(reports(k, "open")) == 1
    c.send("a", c.data("a", b"", flags=ACK | FIN))
    c.send("b", c.data("b", b"", flags=ACK | FIN))
    c.send("a", c.segment("a", ACK))
    k.until(lambda: reports(k, "close"), what="the close")
    assert reports(k, "close")[0]["reason"] == "fin"
    st = k.stats("a")
    assert st["tcp_held_segments"] >= len(client) and st["tcp_conflict"] == 0
    qa = k.daemon.nis["a"].port.queue_stats()
    assert all(q["in_frames"] >= 3 for q in qa), qa              # every TX queue carried the stream
    assert sum(q["out_frames"] > 0 for q in qa) >= 1
    # the prevent rule, on every queue
    k.send("a", *[tcp_frame("a", "b", sport=45000 + i, dport=26) for i in range(4)])
    assert [q["in_frames"] for q in k.daemon.nis["a"].port.queue_stats()] == \
        [q["in_frames"] + 1 for q in qa]
    assert k.stats("a")["drop_prevented"] == 4
