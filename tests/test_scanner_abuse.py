"""A hostile scanner's author against the NI kernel, within the rights its policy gives: it must not
take the subscription room other scanners need, send a registered frame in another host's name, make
the kernel recompile the NI's policy at will, or fill the alert log with one alert's fields."""
from __future__ import annotations

import json

import pytest

from nikit import policy, scanner_spec, tcp_frame, time_limit
from vhostni import scannerproc as scannerproc_mod

HTTP_CONTAIN = {"match": {"direction": "from_guest", "proto": "tcp", "dport": 80}, "contain": True}


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(scannerproc_mod, "RESTART_MIN", 0.05)
    with time_limit(90, "the test"):
        yield


def _decider(name, subscribe):
    return scanner_spec(name, "decider.py",
                        allow=[dict(s["match"], contain=s.get("contain", False)) for s in subscribe],
                        config={"subscribe": list(subscribe)})


# ---------------------------------------------------------------------------
# 1. One scanner can fill the NI-wide subscription table (64 rows, shared by every
#    scanner of the NI, never freed while the scanner lives or restarts): a scanner
#    the policy adds later cannot subscribe at all, so what it was put there to
#    contain is never inspected (cut forever, or the default once it gives up).
# ---------------------------------------------------------------------------

def test_one_scanner_cannot_starve_the_others_of_subscriptions(kits):
    greedy = scanner_spec("greedy", "greedy_subscriber.py", allow=[{"proto": "udp"}])
    k = kits({"a": policy(scanners=[greedy], default_decision="pass")})
    rep = k.report("a", "greedy")
    assert rep["subscriptions"] == 63                   # alone: the whole table but the covers' row
    # the administrator adds a containment scanner for the guest's web traffic
    k.reload("a", policy(scanners=[greedy, _decider("web", [HTTP_CONTAIN])], default_decision="pass"))
    try:
        k.wait_subscribed("a", "web", timeout=8.0)
    except AssertionError:
        refusals = [a for a in k.alerts() if a["scanner"] == "web"]
        pytest.fail("the new containment scanner never got its subscription: greedy holds "
                    f"{sum(s.scanner == 'greedy' for s in k.nk('a').subs)} of "
                    f"{len(k.nk('a').subs)} rows; web's restarts: "
                    f"{k.sp('a', 'web').counters.restarts}; alerts: "
                    f"{[a['message'][:80] for a in refusals][:3]}")
    f = tcp_frame(payload=b"CUT")
    k.send("a", f)
    assert k.recv("b", 0.5) == []
    # the greedy one was cut to what the other's share leaves and restarted to subscribe anew
    assert sum(s.scanner == "greedy" for s in k.nk("a").subs) <= 63 - k.nk("a").share("frame")
    assert k.alerts_matching("share this NI's subscription tables anew", "a", "greedy")


# ---------------------------------------------------------------------------
# 2. A pre-registered frame injection goes the way the *scanner* says: sent
#    "from_guest", it enters the switch after the NI's policy (vn_port_inject ->
#    vn_forward_switch), so no anti-spoofing, no prevent rules; the switch learns its
#    source MAC on this guest's port.  A frame the administrator registered for the
#    guest (from its peer b: the test suite's own "RST stand-in") becomes a frame in
#    b's name from guest a, and b's MAC moves to a's port (a's traffic to b is lost,
#    a third guest's would be delivered to a).
# ---------------------------------------------------------------------------

def test_injection_from_the_guest_obeys_anti_spoofing(kits):
    from nikit import A_IP, A_MAC, B_MAC, eth
    canned = eth(A_MAC, B_MAC, 0x88B5, b"pre-registered RST stand-in")   # b -> a, for the guest
    spec = scanner_spec("inj", "decider.py", allow=[dict(HTTP_CONTAIN["match"], contain=True)],
                        config={"subscribe": [HTTP_CONTAIN], "inject": [0, "from_guest"]},
                        inject=[{"name": "rst", "frame": canned.hex()}])
    k = kits({"a": policy(mac=A_MAC, addresses=[f"{A_IP}/32"], scanners=[spec])})
    k.until(lambda: k.stats("a")["injected"] == 1, what="the injection")
    got_b = k.recv("b", 1.0)
    ok = tcp_frame("a", "b", dport=22, payload=b"to b after the injection")
    k.send("a", ok)
    after = k.recv("b", 1.0)
    assert got_b == [] and after == [ok], (
        f"frame in b's name left NI a: {got_b == [canned]}; a's next frame to b "
        f"delivered: {after == [ok]} (drop_same_port={k.stats('a').get('drop_same_port')}, "
        f"drop_spoofed={k.stats('a')['drop_spoofed']})")


def test_injections_are_bounded_like_resets(kits):
    from nikit import A_MAC, B_MAC, eth
    from vhostni.scanner import wire
    canned = eth(A_MAC, B_MAC, 0x88B5, b"registered")
    spec = scanner_spec("inj", "decider.py", allow=[dict(HTTP_CONTAIN["match"], contain=True)],
                        config={"subscribe": [HTTP_CONTAIN]}, resets_per_second=5,
                        inject=[{"name": "x", "frame": canned.hex()}])
    k = kits({"a": policy(scanners=[spec])})
    k.wait_subscribed("a", "inj")
    sp = k.sp("a", "inj")
    for i in range(20):
        sp._handle(wire.Control(wire.Inject(0, wire.TO_GUEST, id=i).body()))
    assert 5 <= k.stats("a")["injected"] <= 6 and sp.counters.injects_refused >= 14
    assert k.alerts_matching("injections faster than its policy allows", "a", "inj")


# ---------------------------------------------------------------------------
# 3. The "ring" request recompiles and reinstalls the NI's whole policy (on_punts +
#    apply) each time it flips "streams", with no limit but the generic 20,000 messages
#    a second: a scanner alternating it keeps the daemon's one Python loop (every NI's
#    punts, socket scanners, streams, housekeeping) busy far beyond real time.
# ---------------------------------------------------------------------------

def test_ring_requests_cannot_make_the_ni_recompile_its_policy_at_will(kits):
    from vhostni.scanner import wire
    spec = _decider("d", [{"match": {"proto": "udp", "dport": 53}, "contain": True}])
    k = kits({"a": policy(scanners=[spec])})
    k.wait_subscribed("a", "d")
    sp, nk = k.sp("a", "d"), k.nk("a")
    assert sp.ring_on                                   # the SDK asked for its ring
    applies = []
    real = nk.apply
    nk.apply = lambda: (applies.append(1), real())[1]
    answers = []
    real_reply = sp._reply
    sp._reply = lambda rid, err=None: (answers.append(err), real_reply(rid, err))[1]
    try:
        for i in range(400):                            # what the scanner may send in 20 ms
            sp._handle(wire.Control({"op": "ring", "version": 1, "streams": bool(i & 1), "id": i}))
    finally:
        del nk.apply, sp._reply
    # the ring's mode is set once a run: a repeat is answered, a change refused, and neither
    # recompiles the NI's policy
    assert sp.running and applies == []
    assert answers[0] is None and answers[1] is not None and "once per run" in answers[1]


def test_a_share_is_a_guarantee_not_a_cap():
    """Two scanners on one NI, one with 2 stream subscriptions: the other may take 61 rows, not only
    its share of 31, while the first keeps room for its own 31; a third row past that is refused."""
    from types import SimpleNamespace as NS
    from vhostni.kernel import NIKernel
    nk = NS(scanners={"httpguard": object(), "email": object()}, TABLES=NIKernel.TABLES)
    nk.share = lambda table: NIKernel.share(nk, table)
    nk._claimed = lambda table, used: NIKernel._claimed(nk, table, used)
    rows = [NS(scanner="email")] * 2 + [NS(scanner="httpguard")] * 31
    assert NIKernel._room(nk, "stream", rows, NS(scanner="httpguard")) is None
    rows += [NS(scanner="httpguard")]
    assert NIKernel._room(nk, "stream", rows, NS(scanner="email")) is None      # within its share
    rows = [NS(scanner="email")] * 2 + [NS(scanner="httpguard")] * 32
    why = NIKernel._room(nk, "stream", rows, NS(scanner="httpguard"))
    assert why is not None and "kept for the others' shares" in why


def test_alert_bytes_a_second_are_bounded(kits):
    from vhostni.scanner import wire
    spec = _decider("d", [{"match": {"proto": "udp", "dport": 53}}])
    k = kits({"a": policy(scanners=[spec])})
    k.wait_subscribed("a", "d")
    sp = k.sp("a", "d")
    sp._alerts.rate = sp._alerts.burst = sp._alerts.tokens = 1e6     # only the byte budget binds
    before = sp.counters.alerts_suppressed
    for i in range(100):
        sp._handle(wire.decode(b"J" + json.dumps({"op": "alert", "message": f"big{i}",
                                                   "fields": {"blob": "x" * 60000}}).encode()))
    written = len(k.alerts_matching("big", "a", "d"))
    # at 10 alerts a second allowed: four of the largest at once, then 40 KB a second
    assert 4 <= written <= 6 and sp.counters.alerts_suppressed - before == 100 - written


# ---------------------------------------------------------------------------
# 4. An alert's message is cut at 4096 characters, its fields not at all: each alert
#    the rate limit lets through (10/s, burst 20) can carry ~64 KiB of scanner-chosen
#    fields into the alert log (unrotated by default) and into the kernel's last 1000
#    alerts in memory: ~0.6 MB/s, 55 GB a day, from a scanner within its limits.
# ---------------------------------------------------------------------------

def test_alert_size_is_bounded_like_its_message(kits):
    from vhostni.scanner import wire
    spec = _decider("d", [{"match": {"proto": "udp", "dport": 53}}])
    k = kits({"a": policy(scanners=[spec])})
    k.wait_subscribed("a", "d")
    sp = k.sp("a", "d")
    body = {"op": "alert", "message": "m" * 400, "fields": {"blob": "x" * 64000, "event": "virus"}}
    msg = b"J" + json.dumps(body).encode()
    assert len(msg) - 1 <= wire.MAX_JSON                # a message the wire accepts
    sp._handle(wire.decode(msg))
    (rec,) = k.alerts_matching("mmmm", "a", "d")
    # the largest field is cut; the small ones after it, which say what happened, stay
    f = rec["fields"]
    assert f["fields_truncated"] is True and f["event"] == "virus"
    assert len(json.dumps(f, separators=(",", ":"))) <= scannerproc_mod.ALERT_FIELDS_MAX + 64
