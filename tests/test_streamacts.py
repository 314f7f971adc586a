"""The SDK's one copy of the stream scanners' action dispatch (vhostni/scanner/streamacts.py)."""
from __future__ import annotations

import pytest

from vhostni.scanner import Refused
from vhostni.scanner.streamacts import apply_actions, send_alert


class Stream:
    def __init__(self, refuse=False, closed=False):
        self.id, self.holds, self.closed, self.reason = 7, {0, 1}, closed, "fin"
        self.refuse, self.did = refuse, []

    def cut(self, *a):
        if self.refuse:
            raise Refused("no")
        self.did.append(("cut",) + a)

    def inject(self, *a):
        self.did.append(("inject",) + a)

    def pass_(self, h, upto):
        self.did.append(("pass", h, upto))

    def pass_all(self, h):
        self.did.append(("pass_all", h))

    def more(self, h):
        self.did.append(("more", h))

    def kill(self):
        self.did.append(("kill",))


class Sc:
    def __init__(self, limit=None):
        self.sent, self.limit = [], limit

    def alert(self, message, /, **fields):
        if self.limit is not None and len(repr(fields)) > self.limit:
            raise ValueError("too large")
        self.sent.append((message, fields))


class Core:
    def edit_refused(self, sid, act, why):
        return [("kill",), ("alert", f"refused: {why}", {"sid": sid})]


def test_dispatches_pass_more_kill_and_alerts():
    sc, s = Sc(), Stream()
    apply_actions(sc, Core(), s, [("pass", 0, 10), ("more", 1), ("pass", 5, 1), ("pass_all", 1),
                                  ("alert", "m", {"x": 1}), ("kill",), ("bogus",)], print)
    assert s.did == [("pass", 0, 10), ("more", 1), ("pass_all", 1), ("kill",)]
    assert sc.sent == [("m", {"x": 1})]


def test_a_closed_stream_gets_alerts_only():
    sc, s = Sc(), Stream(closed=True)
    apply_actions(sc, Core(), s, [("pass", 0, 1), ("kill",), ("alert", "m", {})], print)
    assert s.did == [] and sc.sent == [("m", {})]


def test_a_refused_edit_applies_the_cores_answer_and_drops_the_rest():
    sc, s, logged = Sc(), Stream(refuse=True), []
    apply_actions(sc, Core(), s, [("cut", 0, 1, 2), ("pass", 0, 9), ("alert", "infected", {})],
                  logged.append)
    assert s.did == [("kill",)]
    assert sc.sent == [("refused: no", {"sid": 7})]
    assert logged and "cut refused" in logged[0]


def test_an_alert_too_large_goes_slim_only_when_asked():
    big = {"a": 1, "blob": "x" * 100}
    sc = Sc(limit=50)
    send_alert(sc, "m", big, slim=("blob",))
    assert sc.sent == [("m", {"a": 1, "alert_truncated": True})]
    with pytest.raises(ValueError):
        send_alert(Sc(limit=50), "m", big)
