"""Flow events reach the scanners that subscribed to them (vhostni/kernel.py, the SDK's
``subscribe_flows``), one control message per event, only with a ``flows`` right."""
from __future__ import annotations

from nikit import A_MAC, IPS, TCP_ACK, TCP_RST, TCP_SYN, policy, scanner_spec, tcp_frame, udp_frame
from vhostni.scanner import wire


def flow_scanner(name="fl", allow=({"flows": True},), **config) -> dict:
    return scanner_spec(name, "flow_alerts.py", allow=list(allow), config=config)


def subscribed(k, name="fl") -> bool:
    return any(s.scanner == name for s in k.nk("a").flow_subs) and k.sp("a", name).ready


def events(k, name="fl") -> list[dict]:
    return [a["fields"] for a in k.alerts_matching("flow ", "a", name)]


def test_scanner_gets_flow_events_of_a_refused_and_an_unanswered_syn(kits):
    k = kits({"a": policy(A_MAC, [IPS["a"] + "/32"], scanners=[flow_scanner(proto="tcp")],
                          flow_tcp_syn_ms=200)})
    k.until(lambda: subscribed(k), what="the flows subscription")
    assert k.stats("a")["flows_opened"] == 0
    k.send("a", tcp_frame("a", "b", 40000, 23, TCP_SYN))
    k.send("b", tcp_frame("b", "a", 23, 40000, TCP_RST | TCP_ACK))
    k.send("a", tcp_frame("a", "b", 40001, 80, TCP_SYN))
    k.send("a", udp_frame("a", "b", 40002, 53))              # not tcp: not for this scanner
    k.until(lambda: len(events(k)) >= 6, timeout=10, what="six flow events")
    evs = events(k)
    by_flow: dict = {}
    for e in evs:
        by_flow.setdefault(tuple(e["remote"]), []).append((e["change"] or e["reason"]))
    assert by_flow[("10.0.0.2", 23)] == [None, "reset", "reset"]
    assert by_flow[("10.0.0.2", 80)] == [None, "unanswered", "unanswered"]
    first = evs[0]
    assert first["initiator"] == "guest" and first["guest"] == ["10.0.0.1", 40000]
    assert all(e["proto"] == 6 for e in evs)
    st = k.stats("a")
    assert st["flows_opened"] == 3 and st["flow_events_dropped"] == 0
    assert k.sp("a", "fl").counters.flow_events == len(evs)
    assert k.nk("a").info()["flow_subscriptions"] == 1


def test_scanner_without_the_right_is_refused_and_alerted(kits):
    k = kits({"a": policy(A_MAC, [IPS["a"] + "/32"], scanners=[
        flow_scanner("nf", allow=[{"proto": "tcp"}]),
        flow_scanner("narrow", allow=[{"flows": True, "proto": "udp"}], proto="tcp")])})
    for name in ("nf", "narrow"):
        assert "outside this scanner's rights" in k.wait_alert("refused", "a", name)["fields"]["error"]
        assert k.alerts_matching("flows subscription outside its rights", "a", name)
    assert k.nk("a").flow_subs == []
    k.send("a", tcp_frame("a", "b", 40000, 23, TCP_SYN))
    k.run_for(0.2)
    assert k.stats("a")["flows_opened"] == 0               # nobody subscribed: the stage is off


def test_malformed_flow_requests_are_refused():
    for body in ({"op": "subscribe", "id": 1, "flows": True, "contain": True},
                 {"op": "subscribe", "id": 1, "flows": 1}):
        try:
            wire.decode_request(body)
        except wire.RequestError as exc:
            assert exc.id == 1
        else:
            raise AssertionError(f"{body} accepted")
    req = wire.decode_request({"op": "subscribe", "id": 2, "flows": True, "events": ["open"]})
    assert isinstance(req, wire.FlowSubscribe) and req.fields["events"] == ["open"]


def test_bad_events_in_a_subscription_are_refused(kits):
    k = kits({"a": policy(A_MAC, [IPS["a"] + "/32"], scanners=[flow_scanner(events=["opened"])])})
    assert "events" in k.wait_alert("refused", "a", "fl")["fields"]["error"]


def test_replay_on_the_capture_clock_expires_flows_on_capture_time(tmp_path):
    """``vhostni replay --clock capture``: the flow stage's timers run on the capture's
    timestamps, so an unanswered SYN is reported when *capture* time passes its timeout,
    with capture times in the events, and two runs say the same."""
    from scapy.all import TCP, UDP
    from test_replay import Capture, from_guest, run_replay, to_guest

    cap = Capture()
    cap.add(from_guest(TCP(sport=40000, dport=80, flags="S")))                 # T0 + 1 ms
    cap.add(from_guest(TCP(sport=40001, dport=23, flags="S")), gap_ns=10**6)
    cap.add(to_guest(TCP(sport=23, dport=40001, flags="RA")), gap_ns=10**6)
    cap.add(from_guest(UDP(sport=5000, dport=53)), gap_ns=10 * 10**9)          # 10 s later
    cap.add(from_guest(UDP(sport=5000, dport=53)), gap_ns=10 * 10**9)
    ts = [t / 1e9 for t, _ in cap.frames]
    doc = policy(scanners=[flow_scanner(events=["open", "state", "close"])], flow_tcp_syn_ms=3000)
    runs = []
    for _ in range(2):
        rc, out, alerts = run_replay(tmp_path, cap, doc, clock="capture")
        assert rc == 0 and len(out) == 5
        runs.append([(a["message"], a["fields"]) for a in alerts if a["message"].startswith("flow ")])
    assert runs[0] == runs[1]
    got = [(m, f["remote"][1], f["change"] or f["reason"], f["time"]) for m, f in runs[0]]
    assert got == [
        ("flow open", 80, None, ts[0]),
        ("flow open", 23, None, ts[1]),
        ("flow state", 23, "reset", ts[2]),
        # the next frame moves capture time on 10 s: the SYN's 3 s ran out, the reset
        # connection's lingering too (one tick: the SYN then lingers from there)
        ("flow state", 80, "unanswered", ts[3]),
        ("flow close", 23, "reset", ts[3]),
        ("flow open", 53, None, ts[3]),
        ("flow close", 80, "unanswered", ts[4]),
    ]
    assert all(f["clock"] >= f["time"] - 1e-6 for _, f in runs[0])   # the SDK's clock followed


def test_a_real_connection_beside_a_stream_scanner(kits):
    """A whole connection (tcpkit's Conn: real sequence numbers) through an NI whose TCP
    engine holds it for a stream scanner: the flow stage sees the same frames first and
    tells its scanner the handshake, then the close with the final counters."""
    from tcpkit import ACK, FIN, Conn
    streams = scanner_spec("sp", "stream_pass.py", allow=[{"stream": True, "port": 25, "contain": True}],
                           config={"port": 25})
    k = kits({"a": policy(A_MAC, [IPS["a"] + "/32"], scanners=[flow_scanner(), streams],
                          flow_tcp_syn_ms=200)})
    k.wait_alert("ready", "a", "sp")
    k.until(lambda: subscribed(k), what="the flows subscription")
    c = Conn(k, "a", "b", cport=40000, sport=25)
    c.open()
    c.send("a", c.data("a", b"HELO x\r\n"))
    assert b"HELO" in b"".join(s.payload for s in c.recv("b", 2.0, 1))
    c.send("b", c.data("b", b"250 ok\r\n"))
    assert c.recv("a", 2.0, 1)
    c.send("a", c.data("a", b"", flags=FIN | ACK))
    c.send("b", c.data("b", b"", flags=FIN | ACK))
    c.send("a", c.segment("a", ACK))
    k.until(lambda: any(e["reason"] for e in events(k)), timeout=10, what="the close")
    evs = events(k)
    assert [e["change"] or e["reason"] for e in evs] == [None, "synack", "established", "fin"]
    close = evs[-1]
    assert close["packets"] == [5, 3]
    assert close["bytes"][0] == 5 * 40 + 8 and close["bytes"][1] == 3 * 40 + 8
    assert k.stats("a")["tcp_flows_opened"] == 1          # the stream engine saw it too


HOSTILE_FLOW_REQUESTS = [
    {"proto": {"x": 1}}, {"proto": []}, {"proto": [1] * 17}, {"proto": True}, {"proto": -1},
    {"proto": 256}, {"proto": 1.5}, {"proto": [[1]]}, {"proto": ["nosuch"]}, {"direction": 5},
    {"direction": "sideways"}, {"events": "open"}, {"events": [1]}, {"events": []},
    {"events": [[]]}, {"port": 80}, {"contain": 1}]


def test_hostile_flow_subscriptions_are_policy_errors_never_crashes():
    from vhostni.policy import PolicyError, parse_flow_match
    for extra in HOSTILE_FLOW_REQUESTS:
        try:
            parse_flow_match("subscription", {"flows": True, **extra}, subscription=True)
        except PolicyError:
            continue
        raise AssertionError(f"{extra} accepted")
