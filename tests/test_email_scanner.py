"""The e-mail virus scanner (scanners/email): SMTP/POP3 state machines, MIME, the
replacement of infected parts, the decisions, the clamd INSTREAM client against a fake clamd and (when
Debian's clamav-daemon is installed) a real clamd with a database the test builds, and the
scanner end to end in the NI kernel over simulated TCP conversations.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # scanners/ is not an installed package

from scanners.email import EmailScanner, EngineError, replacement_plan  # noqa: E402
from scanners.email.clamd import Clamd, ClamdError, parse_reply  # noqa: E402
from scanners.email.core import ConfigError, load_config  # noqa: E402
from scanners.email.mime import MailError, parse_message  # noqa: E402
from scanners.email.proto import CLIENT, SERVER, Message, Pop3Tracker, SmtpTracker, Violation  # noqa: E402

EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
VIRUS = b"this attachment is a known-bad test payload\x00\x01\x02" * 3
VIRUS_SHA = hashlib.sha256(VIRUS).hexdigest()


def mail(attachment: bytes = b"hello", name: str = "a.bin", body: str = "Hi.\r\n.dotted line\r\n",
         boundary: str = "XYZ") -> bytes:
    b64 = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (f"From: a@x\r\nTo: b@y\r\nSubject: t\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\npreamble\r\n"
            f"--{boundary}\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
            f"{body}--{boundary}\r\nContent-Type: application/octet-stream; name=\"{name}\"\r\n"
            f"Content-Disposition: attachment; filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            ).encode() + b64 + f"--{boundary}--\r\nepilogue\r\n".encode()


def stuff(msg: bytes) -> bytes:
    out = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in msg.split(b"\r\n"))
    return out


def smtp_session(*msgs: bytes) -> bytes:
    out = b"EHLO me\r\n"
    for m in msgs:
        out += b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n" + stuff(m) + b".\r\n"
    return out + b"QUIT\r\n"


def feed_all(t, side, data: bytes, step: int = 0) -> list:
    out = []
    if step <= 0:
        return t.feed(side, data)
    for i in range(0, len(data), step):
        out += t.feed(side, data[i:i + step])
    return out


# ---------------------------------------------------------------------------
# SMTP
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("step", [0, 1, 7, 1000])
def test_smtp_messages_pipelined_and_dot_unstuffed(step):
    m1, m2 = mail(b"one"), b"Subject: two\r\n\r\n..starts with dots\r\n.\r\n"[:-3] + b"x\r\n"
    data = smtp_session(m1, m2)
    t = SmtpTracker()
    evs = feed_all(t, CLIENT, data, step)
    msgs = [e for e in evs if isinstance(e, Message)]
    assert [m.data for m in msgs] == [m1, m2]
    assert all(m.how == "data" and m.envelope["mail_from"] == "FROM:<a@x>" for m in msgs)
    # the stream offsets: the body starts after DATA's line, ends after ".\r\n"
    assert data[msgs[0].start - 6:msgs[0].start] == b"DATA\r\n"
    assert data[msgs[0].end - 5:msgs[0].end] == b"\r\n.\r\n"
    assert t.passable(CLIENT) == len(data) and not t.in_message()


def test_smtp_holds_the_body_until_its_end():
    t = SmtpTracker()
    head = b"EHLO me\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"
    assert t.feed(CLIENT, head + b"Subject: x\r\n\r\nbody\r\n") == []
    assert t.passable(CLIENT) == len(head) and t.in_message()
    assert t.feed(CLIENT, b".") == [] and t.passable(CLIENT) == len(head)
    (m,) = t.feed(CLIENT, b"\r\nRSET\r\n")
    assert m.data == b"Subject: x\r\n\r\nbody\r\n" and t.passable(CLIENT) == len(head) + 20 + 3 + 6
    assert t.feed(SERVER, b"250 ok\r\n") == [] and t.passable(SERVER) == 8


def test_smtp_empty_message_and_rset_and_data_with_bare_lf():
    t = SmtpTracker()
    evs = t.feed(CLIENT, b"MAIL FROM:<a>\r\nRSET\r\nMAIL FROM:<c>\r\nDATA\n.\r\nDATA\r\nx\r\n.\r\n")
    assert [e.data for e in evs] == [b"", b"x\r\n"]
    assert evs[0].envelope["mail_from"] == "FROM:<c>"


@pytest.mark.parametrize("evil", [b"a\n.\nb\r\n.\r\n", b"a\r\n.\nMAIL FROM:<x>\r\n", b"a\r.\r\nb\r\n.\r\n",
                                  b"a\n.\r\nb\r\n.\r\n"])
def test_smtp_smuggling_is_a_violation(evil):
    t = SmtpTracker()
    evs = t.feed(CLIENT, b"DATA\r\n" + evil)
    assert [type(e) for e in evs] == [Violation] and evs[0].reason == "smuggling"
    assert t.passable(CLIENT) == 6


def test_smtp_bdat_chunks_and_lines_in_them():
    chunk1, chunk2 = b"Subject: x\r\n\r\nDATA\r\n.\r\n", b"QUIT\r\nend\r\n"
    data = (b"EHLO me\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nBDAT %d\r\n" % len(chunk1) + chunk1
            + b"BDAT %d LAST\r\n" % len(chunk2) + chunk2 + b"QUIT\r\n")
    for step in (0, 1, 5):
        t = SmtpTracker()
        evs = feed_all(t, CLIENT, data, step)
        (m,) = [e for e in evs if isinstance(e, Message)]
        assert m.data == chunk1 + chunk2 and m.how == "bdat" and m.end == len(data) - 6
        assert not [e for e in evs if isinstance(e, Violation)]
    t = SmtpTracker()
    assert t.feed(CLIENT, b"BDAT x\r\n")[0].reason == "bad_bdat"
    t = SmtpTracker(max_message=10)
    assert t.feed(CLIENT, b"BDAT 11 LAST\r\n")[0].reason == "oversize"
    # a chunked transaction cut short by RSET: what was sent is still scanned
    t = SmtpTracker()
    evs = t.feed(CLIENT, b"BDAT 3\r\nabcRSET\r\n")
    assert [e.data for e in evs] == [b"abc"] and evs[0].envelope.get("incomplete")


def test_smtp_starttls_and_oversize():
    t = SmtpTracker()
    evs = t.feed(CLIENT, b"EHLO x\r\nSTARTTLS\r\n\x16\x03\x01")
    assert evs[0].reason == "starttls"
    t = SmtpTracker(max_message=100)
    evs = t.feed(CLIENT, b"DATA\r\n" + b"x" * 200)
    assert evs[0].reason == "oversize"


# ---------------------------------------------------------------------------
# POP3
# ---------------------------------------------------------------------------

def pop3(t, client: bytes, server: bytes) -> list:
    return t.feed(CLIENT, client) + t.feed(SERVER, server)


def test_pop3_retr_top_and_multiline_replies():
    m = mail(b"payload")
    t = Pop3Tracker()
    assert t.feed(SERVER, b"+OK ready\r\n") == [] and t.passable(SERVER) == 11
    evs = pop3(t, b"USER u\r\nPASS p\r\nLIST\r\nRETR 1\r\nTOP 1 0\r\nRETR 2\r\nQUIT\r\n",
               b"+OK\r\n+OK\r\n+OK 1 msg\r\n1 100\r\n.\r\n+OK 100 octets\r\n" + stuff(m) + b".\r\n"
               + b"+OK\r\nSubject: t\r\n\r\n.\r\n-ERR no such message\r\n+OK bye\r\n")
    assert [(e.how, e.data) for e in evs] == [("retr", m), ("top", b"Subject: t\r\n\r\n")]
    assert t.passable(SERVER) == t.fed[SERVER] and t.passable(CLIENT) == t.fed[CLIENT]


def test_pop3_server_bytes_before_their_command_wait():
    t = Pop3Tracker()
    t.feed(SERVER, b"+OK ready\r\n")
    evil = b"+OK\r\nSubject: v\r\n\r\nvirus\r\n.\r\n"
    assert t.feed(SERVER, evil) == [] and t.passable(SERVER) == 11     # nobody asked: held
    (m,) = t.feed(CLIENT, b"RETR 1\r\n")
    assert m.data == b"Subject: v\r\n\r\nvirus\r\n" and t.passable(SERVER) == 11 + len(evil)


def test_pop3_holds_a_message_until_its_end():
    t = Pop3Tracker()
    pop3(t, b"RETR 1\r\n", b"+OK ready\r\n+OK\r\nSubject: x\r\n")
    assert t.passable(SERVER) == 16 and t.in_message()
    (m,) = t.feed(SERVER, b"\r\nbody\r\n.\r\n")
    assert m.data == b"Subject: x\r\n\r\nbody\r\n" and not t.in_message()


# ---------------------------------------------------------------------------
# MIME
# ---------------------------------------------------------------------------

def test_mime_nested_base64_qp_and_names():
    inner = (b"Content-Type: multipart/alternative; boundary=in\r\n\r\n--in\r\nContent-Type: text/plain\r\n"
             b"Content-Transfer-Encoding: quoted-printable\r\n\r\nsoft=\r\nbreak =3D=41\r\n--in\r\n"
             b"Content-Type: text/html\r\n\r\n<p>x</p>\r\n--in--\r\n")
    msg = (b"Content-Type: multipart/mixed; boundary=\"out\"\r\n\r\n--out\r\n" + inner
           + b"--out\r\nContent-Type: application/x-thing;\r\n name*=utf-8''r%C3%A9sum%C3%A9.exe\r\n"
           b"Content-Transfer-Encoding: BASE64\r\n\r\n" + base64.b64encode(EICAR) + b"\r\n--out\r\n"
           b"Content-Type: message/rfc822\r\n\r\nSubject: fwd\r\nContent-Disposition: attachment; "
           b"filename=\"=?utf-8?b?Zm9vLnppcA==?=\"\r\n\r\nfwd body\r\n--out--\r\n")
    parts = parse_message(msg)
    assert [(p.path, p.content_type) for p in parts] == [
        ("1.1", "text/plain"), ("1.2", "text/html"), ("2", "application/x-thing"), ("3.1", "text/plain")]
    assert parts[0].data == b"softbreak =A" and parts[1].data == b"<p>x</p>"
    assert parts[2].data == EICAR and parts[2].filename == "résumé.exe"
    assert parts[3].filename == "foo.zip" and parts[3].data == b"fwd body"
    assert all(p.in_multipart for p in parts[:3])
    # byte ranges: headers start right after a delimiter line, bodies end before the CRLF of the next
    assert msg[parts[2].start:].startswith(b"Content-Type: application/x-thing")
    assert msg[parts[2].end:].startswith(b"\r\n--out\r\n")


def test_mime_malformed_but_lenient():
    # no empty line after the header fields: the body starts at the first line that is no
    # field, as mail clients (and Python's email) read it; the scanner sees those bytes
    assert parse_message(b"no headers at all")[0].data == b"no headers at all"
    p = parse_message(b"Subject: x\r\nContent-Type: text/plain\r\nX5O!P%@AP\r\nmore")[0]
    assert p.data == b"X5O!P%@AP\r\nmore" and p.content_type == "text/plain"
    assert parse_message(b"Subject: x\r\n folded\r\nno colon here")[0].data == b"no colon here"
    assert parse_message(b"Subject: only headers\r\n")[0].data == b""
    p = parse_message(b"Content-Transfer-Encoding: base64\r\n\r\nQUJD\r\nRA")[0]
    assert p.data == b"ABCD"
    p = parse_message(b"Content-Type: multipart/mixed; boundary=b\r\n\r\nno delimiters here")[0]
    assert p.data == b"no delimiters here"
    unclosed = parse_message(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nlast")
    assert unclosed[0].data == b"last"
    with pytest.raises(MailError):
        parse_message(b"Content-Type: multipart/mixed\r\n\r\n--\r\n")
    deep = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(30))
    with pytest.raises(MailError):
        parse_message(deep)
    many = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n\r\nx\r\n" * 50
    with pytest.raises(MailError):
        parse_message(many, max_parts=10)


_mime_bits = st.sampled_from([b"\r\n", b"--b\r\n", b"--b--\r\n", b"Content-Type: multipart/mixed; boundary=b\r\n",
                              b"Content-Type: message/rfc822\r\n", b"Content-Transfer-Encoding: base64\r\n",
                              b"Content-Transfer-Encoding: quoted-printable\r\n", b"=?x?q?=41?=", b"QUJD",
                              b"name*0*=utf-8''%41; name*1=b", b"=\r\n", b"\n", b"; filename=\"x\\"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_mime_bits, st.binary(max_size=20)), max_size=60))
def test_mime_fuzz_never_raises_anything_else(pieces):
    msg = b"".join(pieces)
    try:
        parts = parse_message(msg, max_depth=8, max_parts=50)
    except MailError:
        return
    for p in parts:
        assert 0 <= p.start <= p.body_start <= p.end <= len(msg) and isinstance(p.data, bytes)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 50))
def test_trackers_fuzz_never_raise(data, step):
    for t, side in ((SmtpTracker(1000), CLIENT), (Pop3Tracker(1000), SERVER)):
        t.feed(CLIENT, b"DATA\r\nRETR 1\r\n")
        for i in range(0, len(data), step):
            for ev in t.feed(side, data[i:i + step]):
                assert isinstance(ev, (Message, Violation))
        assert 0 <= t.passable(side) <= t.fed[side]


# ---------------------------------------------------------------------------
# Decisions and the replacement of infected parts
# ---------------------------------------------------------------------------

def example_replacement() -> bytes:
    """The stream injection examples/email.toml registers for the scanner."""
    from vhostni.policy import load_policy
    (spec,) = load_policy(str(REPO / "examples" / "email.toml")).scanners
    return dict(spec.stream_injections)["replacement"]


def edited(wire: bytes, acts: list, direction: int, injections: dict) -> bytes:
    """What the receiver of ``direction`` gets when the NI applies the inject and cut actions
    (in stream order, offsets of the original stream) to ``wire``."""
    out, pos = b"", 0
    for a in acts:
        if a[0] == "inject" and a[1] == direction:
            out += wire[pos:a[2]] + injections[a[3]]
            pos = a[2]
        elif a[0] == "cut" and a[1] == direction:
            assert a[2] >= pos and a[3] > 0
            out += wire[pos:a[2]]
            pos = a[2] + a[3]
    return out + wire[pos:]


def run_core(core: EmailScanner, client: bytes, server: bytes = b"", port: int = 25, step: int = 0):
    acts = core.open(1, port, True)
    def chunks(b):
        return [b] if not step else [b[i:i + step] for i in range(0, len(b), step)]
    off = {1: 0, 2: 0}
    for direction, data in ((2, server), (1, client)) if port == 110 else ((1, client), (2, server)):
        for c in chunks(data):
            if c:
                acts += core.data(1, direction, off[direction], c)
                off[direction] += len(c)
    return acts


def passed(acts, direction) -> int:
    return max([a[2] for a in acts if a[0] == "pass" and a[1] == direction] or [0])


@pytest.mark.parametrize("step", [0, 3, 64])
def test_clean_mail_passes_all_bytes_and_infected_mail_is_killed(step):
    core = EmailScanner({"bad_sha256": [f"{VIRUS_SHA} Test.Virus"]})
    clean = smtp_session(mail(b"clean"), mail(b"also clean"))
    acts = run_core(core, clean, b"220 hi\r\n250 ok\r\n", step=step)
    assert passed(acts, 1) == len(clean) and passed(acts, 2) == 16
    assert not [a for a in acts if a[0] in ("kill", "alert")]
    assert bool([a for a in acts if a[0] == "more"]) == (step > 0)   # asked for the rest of a message
    assert core.stats["clean"] == 2

    core = EmailScanner({"bad_sha256": [f"{VIRUS_SHA} Test.Virus"]})
    bad = smtp_session(mail(b"clean"), mail(VIRUS, name="evil.exe"))
    acts = run_core(core, bad, step=step)
    first_end = len(smtp_session(mail(b"clean"))) - len(b"QUIT\r\n")
    # the clean first message went on; nothing of the second one's body did
    assert passed(acts, 1) <= bad.index(b"DATA", first_end) + 6 and passed(acts, 1) >= first_end
    kills = [a for a in acts if a[0] == "kill"]
    (alert,) = [a for a in acts if a[0] == "alert"]
    assert kills == [("kill", "virus")] and "Test.Virus" in alert[1] and "evil.exe" in alert[1]
    # the policy registered no replacement: the attachment cannot be replaced, so: killed
    assert "connection killed (no replacement injection 'replacement' registered)" in alert[1]
    f = alert[2]
    assert f["filename"] == "evil.exe" and f["sha256"] == VIRUS_SHA and f["engine"] == "sha256"
    assert base64.b64decode(f["message_b64"]) == mail(VIRUS, name="evil.exe")
    assert f["action"] == "kill" and not [a for a in acts if a[0] in ("cut", "inject")]


@pytest.mark.parametrize("step", [0, 5, 64])
def test_infected_attachment_is_replaced_and_the_connection_goes_on(step):
    core = EmailScanner({"bad_sha256": [f"{VIRUS_SHA} Test.Virus"]}, stream_injections=["replacement"])
    m1, m3 = mail(b"clean"), mail(b"clean again", name="c.txt")
    bad = mail(VIRUS, name="evil.exe", body=".a\r\n..b\r\nc\r\n")     # dots: stuffing moves offsets
    wire = smtp_session(m1, bad, m3)
    acts = run_core(core, wire, step=step)
    assert not [a for a in acts if a[0] == "kill"] and core.stats["replaced"] == 1
    edits = [a for a in acts if a[0] in ("inject", "cut")]
    (inject, cut) = edits
    assert inject == ("inject", 1, cut[2], "replacement") and cut[0:2] == ("cut", 1) and cut[3] > 0
    # the order the NI kernel needs: the edits (injection first, then the cut at the same
    # offset), then the alert, then the pass of the rest of the message
    i = acts.index(inject)
    assert acts[i + 1] == cut and acts[i + 2][0] == "alert"
    alert = acts[i + 2]
    assert alert[1] == "e-mail virus Test.Virus in 'evil.exe' (smtp); attachment replaced"
    f = alert[2]
    assert f["action"] == "replace" and f["replaced"] == [list(cut[2:])] and f["filename"] == "evil.exe"
    assert base64.b64decode(f["message_b64"]) == bad
    bad_end = len(smtp_session(m1, bad)) - len(b"QUIT\r\n")
    assert ("pass", 1, bad_end) in acts[i + 3:] and acts.index(("pass", 1, bad_end)) > i
    assert passed(acts, 1) == len(wire)          # and the third message, clean, went on as well
    # what the server gets: the three messages, the second with its attachment replaced
    rep = example_replacement()
    got = [e for e in SmtpTracker().feed(CLIENT, edited(wire, acts, 1, {"replacement": rep}))
           if isinstance(e, Message)]
    assert [g.data for g in got][0::2] == [m1, m3]
    parts = parse_message(got[1].data)
    assert [p.data for p in parts] == [parse_message(bad)[0].data, b"An attachment of this message was "
                                       b"removed by the network interface: it contained a virus."]
    assert parts[1].content_type == "text/plain" and parts[1].filename is None


def test_every_infected_part_is_replaced():
    core = EmailScanner({"bad_sha256": [VIRUS_SHA]}, stream_injections=["x", "replacement"])
    m = mail(VIRUS, name="one.exe").replace(b"--XYZ--\r\n", b"--XYZ\r\nContent-Type: application/x-y"
                                            b"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                                            + base64.b64encode(VIRUS) + b"\r\n--XYZ--\r\n")
    wire = smtp_session(m)
    acts = run_core(core, wire)
    edits = [a for a in acts if a[0] in ("inject", "cut")]
    assert [a[0] for a in edits] == ["inject", "cut", "inject", "cut"]
    assert edits[2][2] >= edits[1][2] + edits[1][3]                    # in stream order
    (alert,) = [a for a in acts if a[0] == "alert"]
    assert alert[1].endswith("; 2 attachments replaced") and len(alert[2]["replaced"]) == 2
    got = [e for e in SmtpTracker().feed(CLIENT, edited(wire, acts, 1, {"replacement": b"X: y\r\n\r\nz"}))
           if isinstance(e, Message)]
    assert [p.data for p in parse_message(got[0].data)] == [parse_message(m)[0].data, b"z", b"z"]


def test_what_cannot_be_replaced_is_killed():
    inj = ["replacement"]
    table = {"bad_sha256": [VIRUS_SHA]}
    cases = {
        # an infected body of a single-part message: no multipart to put a part into
        "message's body": smtp_session(b"Subject: v\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                                       + base64.b64encode(VIRUS) + b"\r\n"),
        # BDAT: the chunk sizes would no longer match
        "BDAT": (b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\n" + b"BDAT %d LAST\r\n" % len(mail(VIRUS))
                 + mail(VIRUS)),
    }
    for why, wire in cases.items():
        acts = run_core(EmailScanner(table, stream_injections=inj), wire)
        (alert,) = [a for a in acts if a[0] == "alert"]
        assert ("kill", "virus") in acts and why in alert[1] and alert[2]["action"] == "kill", why
        assert not [a for a in acts if a[0] in ("cut", "inject")]
    # a hit on the whole message only (the engine's, no part matched)
    whole = mail(b"innocent-looking")
    core = EmailScanner({}, engine=lambda d: "Mail.Sig" if d == whole else None, stream_injections=inj)
    acts = run_core(core, smtp_session(whole))
    assert ("kill", "virus") in acts and "whole message" in [a for a in acts if a[0] == "alert"][0][1]
    # replacement switched off in the config
    acts = run_core(EmailScanner(dict(table, replacement_injection=""), stream_injections=inj),
                    smtp_session(mail(VIRUS)))
    assert ("kill", "virus") in acts and not [a for a in acts if a[0] == "cut"]


def test_the_rest_of_a_replaced_message_gets_the_whole_message_scan():
    """Parts that hit skip the engine's whole-message scan: before the rest goes on without
    them, it gets that scan, and a hit there (say, uuencoded in the text) kills."""
    m = mail(EICAR, name="eicar.com", body="begin 644 x\r\nUUENCODED-VIRUS\r\nend\r\n")
    seen = []

    def engine(data):
        seen.append(data)
        if data == EICAR:
            return "Eicar"
        return "Uu.Virus" if b"UUENCODED-VIRUS" in data and len(data) > 100 else None
    acts = run_core(EmailScanner({}, engine=engine, stream_injections=["replacement"]), smtp_session(m))
    (alert,) = [a for a in acts if a[0] == "alert"]
    assert ("kill", "virus") in acts and "the rest of the message is infected too (Uu.Virus)" in alert[1]
    assert base64.b64encode(EICAR) not in seen[-1] and b"UUENCODED-VIRUS" in seen[-1]
    clean = mail(EICAR, name="eicar.com")
    acts = run_core(EmailScanner({}, engine=engine, stream_injections=["replacement"]), smtp_session(clean))
    assert [a[0] for a in acts if a[0] in ("inject", "cut", "kill")] == ["inject", "cut"]


def test_a_refused_edit_kills_the_connection():
    core = EmailScanner({"bad_sha256": [f"{VIRUS_SHA} Test.Virus"]}, stream_injections=["replacement"])
    acts = run_core(core, smtp_session(mail(VIRUS, name="evil.exe"), mail(b"later")))
    cut = next(a for a in acts if a[0] == "cut")
    again = core.edit_refused(1, cut, "cut refused by the fast path: too many")
    (alert, kill) = again
    assert kill == ("kill", "virus") and alert[2]["action"] == "kill"
    assert alert[1] == ("e-mail virus Test.Virus in 'evil.exe' (smtp); connection killed (the NI refused "
                        "the replacement: cut refused by the fast path: too many)")
    assert alert[2]["filename"] == "evil.exe" and core.stats["replace_refused"] == 1
    assert core.data(1, 1, 10**6, b"MAIL FROM:<x>\r\n") == []         # the connection is done


def test_engine_verdicts_and_errors():
    seen = []

    def engine(data):
        seen.append(data)
        if data == EICAR:
            return "Eicar-Signature"
        if data == b"boom":
            raise EngineError("clamd went away")
        return None
    core = EmailScanner({}, engine=engine)
    acts = run_core(core, smtp_session(mail(EICAR, name="eicar.com")))
    (alert,) = [a for a in acts if a[0] == "alert"]
    assert alert[2]["engine"] == "clamd" and alert[2]["verdict"] == "Eicar-Signature"
    core = EmailScanner({}, engine=engine)
    acts = run_core(core, smtp_session(mail(b"boom")))
    assert ("kill", "unchecked") in acts
    core = EmailScanner({"engine_error": "pass"}, engine=engine)
    data = smtp_session(mail(b"boom"))
    assert passed(run_core(core, data), 1) == len(data)


def test_pop3_infected_retr_is_killed_and_violations():
    core = EmailScanner({"bad_sha256": [VIRUS_SHA]})
    server = b"+OK\r\n+OK\r\n" + stuff(mail(VIRUS)) + b".\r\n"
    acts = run_core(core, b"RETR 1\r\nQUIT\r\n", server, port=110)
    assert ("kill", "virus") in acts and passed(acts, 2) <= 10
    # with the replacement registered, the RETR reply goes on with the part replaced
    core = EmailScanner({"bad_sha256": [VIRUS_SHA]}, stream_injections=["replacement"])
    acts = run_core(core, b"RETR 1\r\nQUIT\r\n", server, port=110)
    assert [a[:2] for a in acts if a[0] in ("inject", "cut")] == [("inject", 2), ("cut", 2)]
    assert passed(acts, 2) == len(server) and "(pop3); attachment replaced" in \
        [a for a in acts if a[0] == "alert"][0][1]
    t = Pop3Tracker()
    t.feed(CLIENT, b"RETR 1\r\n")
    (got,) = t.feed(SERVER, edited(server, acts, 2, {"replacement": example_replacement()}))
    assert [p.content_type for p in parse_message(got.data)] == ["text/plain", "text/plain"]
    core = EmailScanner({})
    acts = run_core(core, b"DATA\r\na\n.\nb", b"")
    assert ("kill", "smuggling") in acts
    core = EmailScanner({"starttls": "pass"})
    acts = run_core(core, b"STARTTLS\r\n\x16\x03", b"")
    assert ("pass_all", 1) in acts and ("pass_all", 2) in acts


def test_config_is_checked():
    for bad in ({"nope": 1}, {"smtp_ports": [0]}, {"bad_sha256": ["xyz"]}, {"starttls": "maybe"},
                {"replacement": "the bytes are the policy's now"}, {"replacement_injection": 1},
                {"alert_message_bytes": 100000}, {"smtp_ports": [25], "pop3_ports": [25]}):
        with pytest.raises(ConfigError):
            load_config(bad)
    assert load_config({"bad_sha256": [VIRUS_SHA.upper() + " Name X"]})["_table"] == {VIRUS_SHA: "Name X"}


@pytest.mark.parametrize("attachment", [VIRUS, b".leading dot\r\n" * 40])
def test_replacement_plan_edits_the_stream_into_a_valid_message(attachment):
    """Applying the cut and the example policy's injection to the wire bytes gives a message
    whose infected part is the replacement and whose other parts are unchanged."""
    original = mail(attachment, name="evil.exe", body=".a\r\n..b\r\nc\r\n")
    # a text attachment with dot lines, so the stuffing moves offsets
    if attachment != VIRUS:
        original = original.replace(b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(
            attachment).replace(b"\n", b"\r\n"), b"\r\n" + attachment)
    wire = smtp_session(original)
    t = SmtpTracker()
    (msg,) = [e for e in t.feed(CLIENT, wire) if isinstance(e, Message)]
    assert msg.data == original
    parts = parse_message(msg.data)
    bad = next(p for p in parts if p.filename == "evil.exe")
    plan = replacement_plan(msg, bad)
    off, length = plan["cut"]
    assert plan["inject_at"] == off and plan["side"] == CLIENT
    new = wire[:off] + example_replacement() + wire[off + length:]
    (msg2,) = [e for e in SmtpTracker().feed(CLIENT, new) if isinstance(e, Message)]
    parts2 = parse_message(msg2.data)
    assert [p.data for p in parts2] == [parts[0].data, b"An attachment of this message was removed by the "
                                        b"network interface: it contained a virus."]
    assert parts2[1].content_type == "text/plain"
    assert replacement_plan(msg, None) is None


# ---------------------------------------------------------------------------
# clamd: a fake one speaking INSTREAM in an IDSESSION, and the real one
# ---------------------------------------------------------------------------

class FakeClamd(threading.Thread):
    def __init__(self, path: str, bad: bytes):
        super().__init__(daemon=True)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)
        self.bad = bad
        self.requests: list = []
        self.start()

    def run(self):
        conn, _ = self.srv.accept()
        f = conn.makefile("rb")
        assert f.read(11) == b"zIDSESSION\0"
        n = 0
        while True:
            cmd = b""
            while not cmd.endswith(b"\0"):
                c = f.read(1)
                if not c:
                    return
                cmd += c
            n += 1
            self.requests.append(cmd)
            if cmd == b"zPING\0":
                conn.sendall(b"%d: PONG\0" % n)
            elif cmd == b"zINSTREAM\0":
                data = b""
                while True:
                    (size,) = struct.unpack(">I", f.read(4))
                    if not size:
                        break
                    data += f.read(size)
                if len(data) > 100000:
                    conn.sendall(b"%d: INSTREAM size limit exceeded. ERROR\0" % n)
                elif self.bad in data:
                    conn.sendall(b"%d: stream: Test.Sig FOUND\0" % n)
                else:
                    conn.sendall(b"%d: stream: OK\0" % n)
            elif cmd == b"zEND\0":
                conn.close()
                return


def test_clamd_client_against_a_fake_clamd(tmp_path):
    fake = FakeClamd(str(tmp_path / "clamd.sock"), b"BADBYTES")
    c = Clamd.connect(str(tmp_path / "clamd.sock"), timeout=5)
    c.ping()
    assert c.scan(b"hello") is None
    assert c.scan(b"x" * 70000 + b"BADBYTES") == "Test.Sig"       # two chunks
    assert c.scan(b"") is None
    with pytest.raises(ClamdError):
        c.scan(b"y" * 100001)
    c.close()
    fake.join(5)
    assert fake.requests[:2] == [b"zPING\0", b"zINSTREAM\0"] and fake.requests[-1] == b"zEND\0"
    assert parse_reply(b"stream: OK\0") is None and parse_reply(b"3: stream: Eicar FOUND") == "Eicar"
    with pytest.raises(ClamdError):
        parse_reply(b"nonsense")
    with pytest.raises(ClamdError):
        Clamd.connect(str(tmp_path / "nobody.sock"))


CLAMD = shutil.which("clamd") or ("/usr/sbin/clamd" if os.path.exists("/usr/sbin/clamd") else None)


@pytest.fixture
def real_clamd(tmp_path):
    """clamd (Debian's clamav-daemon) in the foreground with a database of MD5 hash signatures
    for EICAR and the test payload: no freshclam, no network."""
    if CLAMD is None:
        pytest.skip("clamd is not installed (apt-get install clamav-daemon)")
    db = tmp_path / "db"
    db.mkdir()
    (db / "test.hdb").write_text(f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:Test.EICAR\n"
                                 f"{hashlib.md5(VIRUS).hexdigest()}:{len(VIRUS)}:Test.Payload\n")
    sock = tmp_path / "clamd.sock"
    conf = tmp_path / "clamd.conf"
    user = f"User {os.environ.get('USER', 'root')}\n" if os.geteuid() == 0 else ""
    conf.write_text(f"LocalSocket {sock}\nLocalSocketMode 666\nDatabaseDirectory {db}\nForeground true\n"
                    f"LogFile {tmp_path}/clamd.log\nPidFile {tmp_path}/clamd.pid\nTemporaryDirectory {tmp_path}\n"
                    f"{'User root' if os.geteuid() == 0 else ''}\nMaxThreads 2\nIdleTimeout 30\n"
                    f"Bytecode false\n")
    os.chmod(tmp_path, 0o755)
    proc = subprocess.Popen([CLAMD, "--config-file", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log = (tmp_path / "clamd.log").read_text() if (tmp_path / "clamd.log").exists() else ""
            pytest.fail(f"clamd did not start: {proc.stderr.read().decode()[-2000:]} {log[-2000:]}")
        time.sleep(0.1)
    del user
    yield str(sock)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_real_clamd_with_a_test_built_database(real_clamd):
    c = Clamd.connect(real_clamd, timeout=30)
    c.ping()
    assert c.scan(EICAR) == "Test.EICAR.UNOFFICIAL"
    assert c.scan(VIRUS) == "Test.Payload.UNOFFICIAL"
    assert c.scan(b"clean bytes") is None
    core = EmailScanner({}, engine=lambda d: c.scan(d))
    acts = run_core(core, smtp_session(mail(b"fine"), mail(EICAR, name="eicar.com")))
    (alert,) = [a for a in acts if a[0] == "alert"]
    assert alert[2]["filename"] == "eicar.com" and alert[2]["verdict"] == "Test.EICAR.UNOFFICIAL"
    c.close()


# ---------------------------------------------------------------------------
# End to end: the scanner process in the NI kernel, simulated guests a (client) and b
# ---------------------------------------------------------------------------

def _e2e_kit(kits_made, config: dict, hold_timeout_ms: int = 10000, inject: tuple = ()):
    sys.path.insert(0, str(REPO / "tests"))
    from nikit import Kit, policy, scanner_spec
    spec = scanner_spec("email", str(REPO / "scanners" / "email"),
                        allow=[{"stream": True, "port": p, "direction": "both", "contain": True}
                               for p in (25, 110)],
                        alerts_per_second=1000, inject=list(inject),
                        config=dict({"smtp_ports": [25], "pop3_ports": [110]}, **config))
    k = Kit({"a": policy(scanners=[spec], hold_timeout_ms=hold_timeout_ms)})
    kits_made.append(k)
    k.wait_alert("e-mail scanner ready", "a", "email", timeout=20)
    return k


@pytest.fixture
def kits_made():
    made: list = []
    yield made
    for k in made:
        k.close()


def _got(k, name: str, want: int, wait: float = 5.0) -> bytes:
    from tcpkit import segments
    out = b""
    end = time.monotonic() + wait
    while len(out) < want and time.monotonic() < end:
        out += b"".join(s.payload for s in segments(k.recv(name, 0.1)))
    return out


@pytest.mark.parametrize("pieces", [1, 9])
def test_e2e_clean_mail_arrives_byte_for_byte(kits_made, pieces):
    from tcpkit import Conn
    k = _e2e_kit(kits_made, {"bad_sha256": [VIRUS_SHA]})
    c = Conn(k)
    c.open()
    wire = smtp_session(mail(b"clean attachment" * 50), mail(b"second"))
    size = -(-len(wire) // pieces)
    c.send("b", c.data("b", b"220 hi\r\n"))
    assert _got(k, "a", 8) == b"220 hi\r\n"
    for i in range(0, len(wire), size):
        c.send("a", c.data("a", wire[i:i + size]))
    assert _got(k, "b", len(wire)) == wire
    assert not k.alerts_matching("virus", "a", "email") and k.nk("a").streams_killed == 0
    # the scanner read the conversation on its ring (issue 11), not over its socket
    assert k.sp("a", "email").ring_streams
    assert k.stats("a")["ring_stream_bytes"] >= len(wire) + 8


def test_e2e_infected_mail_is_killed_and_alerted(kits_made):
    from tcpkit import RST, Conn, segments
    k = _e2e_kit(kits_made, {"bad_sha256": [f"{VIRUS_SHA} Test.Payload"]})
    c = Conn(k)
    c.open()
    head = b"EHLO me\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"
    body = stuff(mail(VIRUS, name="evil.exe")) + b".\r\n"
    c.send("a", c.data("a", head))
    # (placed by sequence number: b does not acknowledge, and once the scanner asked for
    # more at DATA the NI owns those bytes and resends them itself)
    assert _stream_at(k, c, "b", len(head)) == head
    half = len(body) // 2
    c.send("a", c.data("a", body[:half]))
    assert _stream_at(k, c, "b", len(head) + 1, 0.5) == head      # the body waits for its end
    c.send("a", c.data("a", body[half:]))
    alert = k.wait_alert("e-mail virus", "a", "email")
    f = alert["fields"]
    assert f["filename"] == "evil.exe" and f["sha256"] == VIRUS_SHA and f["verdict"] == "Test.Payload"
    assert base64.b64decode(f["message_b64"]) == mail(VIRUS, name="evil.exe")
    to_b = segments(k.recv("b", 1.0, 2))
    assert to_b and all(s.has(RST) and not s.payload for s in to_b)       # nothing of the body
    k.until(lambda: k.nk("a").streams_killed == 1, what="the kill")


def _stream_at(k, c, name: str, want: int, wait: float = 5.0) -> bytes:
    """The contiguous bytes guest ``name`` received, placed by sequence number (the NI
    retransmits injected bytes until they are acknowledged)."""
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


def test_e2e_infected_attachment_is_replaced_and_alerted(kits_made):
    from tcpkit import Conn
    rep = example_replacement()
    k = _e2e_kit(kits_made, {"bad_sha256": [f"{VIRUS_SHA} Test.Payload"]},
                 inject=[{"name": "replacement", "stream": rep.decode()}])
    ready = k.wait_alert("e-mail scanner ready", "a", "email")
    assert ready["fields"]["replacement"] == "replacement"
    c = Conn(k)
    c.open()
    bad = mail(VIRUS, name="evil.exe")
    wire = smtp_session(bad, mail(b"after"))
    c.send("a", c.data("a", wire))
    alert = k.wait_alert("attachment replaced", "a", "email")
    f = alert["fields"]
    assert f["action"] == "replace" and f["filename"] == "evil.exe" and f["verdict"] == "Test.Payload"
    assert base64.b64decode(f["message_b64"]) == bad
    (cut,) = f["replaced"]
    want = wire[:cut[0]] + rep + wire[cut[0] + cut[1]:]
    assert _stream_at(k, c, "b", len(want)) == want
    sp = k.sp("a", "email")
    assert (sp.counters.stream_cuts, sp.counters.stream_cut_bytes) == (1, cut[1])
    assert (sp.counters.stream_injects, sp.counters.stream_inject_bytes) == (1, len(rep))
    assert k.nk("a").streams_killed == 0 and sp.counters.refused == 0


def test_e2e_pop3_infected_retr_is_killed(kits_made):
    from tcpkit import Conn, segments
    k = _e2e_kit(kits_made, {"bad_sha256": [VIRUS_SHA]})
    c = Conn(k, client="a", server="b", sport=110)
    c.open()
    c.send("b", c.data("b", b"+OK ready\r\n"))
    assert _got(k, "a", 11) == b"+OK ready\r\n"
    c.send("a", c.data("a", b"RETR 1\r\n"))
    assert _got(k, "b", 8) == b"RETR 1\r\n"
    c.send("b", c.data("b", b"+OK\r\n" + stuff(mail(VIRUS)) + b".\r\n"))
    k.wait_alert("e-mail virus", "a", "email")
    got = b"".join(s.payload for s in segments(k.recv("a", 1.0)))
    assert b"Content-Type" not in got


def test_example_policy_loads_and_its_config_is_valid():
    from vhostni.policy import load_policy
    pol = load_policy(str(REPO / "examples" / "email.toml"))
    (spec,) = pol.scanners
    assert spec.argv[-1] == str(REPO / "scanners" / "email")
    cfg = load_config(spec.config)
    assert cfg["_table"][hashlib.sha256(EICAR).hexdigest()] == "EICAR-Test-File"
    # the replacement it registers can stand in for a MIME part in a dot-stuffed stream
    rep = dict(spec.stream_injections)[cfg["replacement_injection"]]
    assert rep.isascii() and b"\r\n\r\n" in rep and not rep.endswith(b"\r\n")
    assert b"\n" not in rep.replace(b"\r\n", b"") and b"\r" not in rep.replace(b"\r\n", b"")
    assert not rep.startswith(b".") and b"\r\n." not in rep


def test_an_empty_part_between_back_to_back_delimiters_stays_in_bounds():
    """Found by the fuzz test: a part that ends before it starts (two delimiter lines with
    nothing between them) gave a body that began before the part."""
    msg = b"Content-Type: multipart/mixed; boundary=b\r\n--b\r\n--b\r\n"
    for p in parse_message(msg, max_depth=8, max_parts=50):
        assert 0 <= p.start <= p.body_start <= p.end <= len(msg)


def _cpu(f, *args):
    t0 = time.process_time()
    out = f(*args)
    return out, time.process_time() - t0


def test_folded_headers_and_many_parameters_cost_linear_time():
    """A header folded over many lines was unfolded by copying its value once per line, and
    every unquoted parameter of Content-Type/-Disposition was matched on a copy of the rest of
    the value: both quadratic in a header block of up to 1 MiB (~2-3 s of the scanner's CPU
    per part, a 10 MiB message of such parts half a minute)."""
    folded = b"Subject: x\r\nX-A: y\r\n" + b" x\r\n" * 200000 + b"\r\nbody\r\n"       # 800 KB
    (part,), cpu = _cpu(parse_message, folded)
    assert part.data == b"body\r\n" and cpu < 0.9          # was ~1.8 s
    params = b"Content-Type: text/plain" + b"; a=b" * 200000 + b"\r\n\r\nbody\r\n"   # 1 MB
    (part,), cpu = _cpu(parse_message, params)
    assert part.data == b"body\r\n" and part.content_type == "text/plain" and cpu < 1.2    # was ~2.8 s
    from scanners.email.mime import header_params, parse_headers
    assert parse_headers(b"A: 1\r\n 2\r\n\t3 \r\nB: x") == [("a", "1 2 3"), ("b", "x")]
    assert header_params('text/plain; a=b ; c="d;e"; a=z; f = g') == ("text/plain", {"a": "b", "c": "d;e", "f": "g"})


def test_many_infected_parts_of_a_dot_stuffed_message_are_mapped_in_log_time():
    """Each infected part's range is mapped through the dot-stuffing (one anchor per stuffed
    line) onto stream offsets: a linear scan of the anchors per lookup made 200 parts over
    100,000 stuffed lines take 2.3 s (1,000 parts over the 2 M lines a 10 MiB message holds:
    minutes)."""
    core = EmailScanner({"bad_sha256": [VIRUS_SHA]}, stream_injections=["replacement"])
    part = (b"--XYZ\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.b64encode(VIRUS) + b"\r\n")
    m = (b"Content-Type: multipart/mixed; boundary=XYZ\r\n\r\n" + b".\r\n" * 100000 + part * 200
         + b"--XYZ--\r\n")
    wire = smtp_session(m)
    acts, cpu = _cpu(run_core, core, wire)
    assert sum(a[0] == "inject" for a in acts) == 200 and cpu < 1.0      # was ~2.3 s
    got = [e for e in SmtpTracker().feed(CLIENT, edited(wire, acts, 1, {"replacement": b"X: y\r\n\r\nz"}))
           if isinstance(e, Message)]
    assert [p.data for p in parse_message(got[0].data)][-3:] == [b"z", b"z", b"z"]


@pytest.mark.parametrize("charset", ["idna", "undefined", "punycode", "utf\x00", "x-unknown", "rot13"])
def test_an_rfc2231_charset_whose_codec_fails_is_not_a_crash(charset):
    """``filename*=CHARSET''%xx``: the charset names a codec.  Unknown ones (LookupError) were read as
    UTF-8, but a codec that exists and fails (idna, punycode and undefined raise UnicodeError, a NUL
    in the name ValueError) escaped parse_message: one mail from the guest crashed the scanner (and
    with default_decision = "pass" its held message, virus and all, would go on)."""
    mail = (b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain; name*="
            + charset.encode("latin-1") + b"''%41%ff%00\r\nContent-Disposition: attachment; filename*0*="
            + charset.encode("latin-1") + b"''%41%ff;filename*1=.exe\r\n\r\n" + VIRUS + b"\r\n--B--\r\n")
    (part,) = parse_message(mail)
    assert part.filename.startswith("A") and part.filename.endswith(".exe") and part.data == VIRUS
    core = EmailScanner({"bad_sha256": [VIRUS_SHA]})
    acts = run_core(core, smtp_session(mail))
    assert ("kill", "virus") in acts
