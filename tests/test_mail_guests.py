"""The e-mail virus scanner between real guests (issue 4, item 6).

Guest `bob` runs a mail server (guests/minimail.c: SMTP on 25 storing each message byte for
byte into a maildir-like directory, POP3 on 110 serving them).  Guest `alice` sends and fetches
mail with the same program's clients.  alice's NI runs the e-mail scanner from
examples/email.toml: the SHA-256 table with the EICAR test file (as shipped), and, when Debian's
clamd is installed, ClamAV's clamd with a database this module builds (MD5 signatures of EICAR
and of a second test payload that is *not* in the digest table, so a hit on it can only come
from clamd).  clamd's socket is in a world-searchable directory with mode 666: the scanner runs
as its own uid and connects before its lockdown.

What this checks:

* a clean message with an attachment arrives byte for byte in bob's maildir, and comes back
  intact when alice fetches it over POP3;
* an infected attachment is replaced in the stream (the NI cuts the part and injects the
  policy's pre-registered text/plain part, rewriting both stacks' sequence numbers): alice's
  SMTP client succeeds, bob's maildir holds the message with exactly that part replaced and
  every other byte as sent, and the alert names the attachment, its digest, and carries the
  original message.  The same for a POP3 RETR of an infected message (alice gets it replaced),
  and mail keeps flowing: a clean message fetched or sent afterwards arrives intact.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from vhostni.testing import VhostUserNic

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
LAN = "192.0.2"
ALICE_MAC = "52:54:00:78:00:01"
BOB_MAC = "52:54:00:78:00:02"
MAILDIR = "/srv/mail"

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SHA = hashlib.sha256(EICAR).hexdigest()
# known to clamd only (its MD5 is in the test-built database, its SHA-256 not in the table)
PAYLOAD = b"this attachment is a known-bad test payload for clamd only\x00\x01\x02" * 3
CLEAN = bytes((i * 7 + 3) % 256 for i in range(6000))       # binary: every byte value, ~8 KiB base64

CLAMD = shutil.which("clamd") or ("/usr/sbin/clamd" if os.path.exists("/usr/sbin/clamd") else None)


def message(attachment: bytes, name: str, subject: str) -> bytes:
    """A multipart/mixed message with CRLF line ends, a text part with lines that need
    dot-stuffing, and a base64 attachment."""
    b64 = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (f"From: alice@test\r\nTo: bob@test\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/mixed; boundary=\"=-b0undary\"\r\n\r\n"
            f"--=-b0undary\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            f"Hello Bob,\r\n.a line that starts with a dot\r\n..and two\r\n\r\n"
            f"--=-b0undary\r\nContent-Type: application/octet-stream; name=\"{name}\"\r\n"
            f"Content-Disposition: attachment; filename=\"{name}\"\r\n"
            f"Content-Transfer-Encoding: base64\r\n\r\n").encode() + b64 + b"--=-b0undary--\r\n"


def _start_clamd(work: Path):
    """clamd in the foreground, offline, with a database of MD5 hash signatures; its socket in
    ``work`` (mode 755, under /tmp) with mode 666.  Returns (process, socket) or (None, "")."""
    if CLAMD is None:
        return None, ""
    db = work / "db"
    db.mkdir()
    (db / "test.hdb").write_text(f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:Test.EICAR\n"
                                 f"{hashlib.md5(PAYLOAD).hexdigest()}:{len(PAYLOAD)}:Test.Payload\n")
    sock = work / "clamd.sock"
    (work / "clamd.conf").write_text(
        f"LocalSocket {sock}\nLocalSocketMode 666\nDatabaseDirectory {db}\nForeground true\n"
        f"LogFile {work}/clamd.log\nPidFile {work}/clamd.pid\nTemporaryDirectory {work}\n"
        f"{'User root' if os.geteuid() == 0 else ''}\nMaxThreads 2\nIdleTimeout 120\nBytecode false\n")
    proc = subprocess.Popen([CLAMD, "--config-file", str(work / "clamd.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            log = (work / "clamd.log").read_text() if (work / "clamd.log").exists() else ""
            pytest.fail(f"clamd did not start: {proc.stderr.read().decode()[-2000:]} {log[-2000:]}")
        time.sleep(0.1)
    return proc, str(sock)


def _alerts(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_alert(path: Path, pred, what: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        hits = [a for a in _alerts(path) if pred(a)]
        if hits:
            return hits[-1]
        assert time.monotonic() < deadline, f"no alert: {what}; log: {_alerts(path)}"
        time.sleep(0.2)


def _virus_alerts(path: Path) -> list[dict]:
    return [a for a in _alerts(path) if a["scanner"] == "email" and a.get("fields", {}).get("event") == "virus"]


@pytest.fixture(scope="module")
def mail_lab(vhostni_daemon_factory, vhostni_guest_factory, vhostni_sockdir, tmp_path_factory):
    work = tmp_path_factory.mktemp("mail")
    # clamd's socket: every directory on its path searchable by the scanner's uid (pytest's
    # own tmp directories are 0700), so a directory of its own under /tmp
    clamd_dir = Path(tempfile.mkdtemp(prefix="vhostni-clamd-", dir="/tmp"))
    os.chmod(clamd_dir, 0o755)
    clamd, clamd_sock = _start_clamd(clamd_dir)
    try:
        text = (REPO / "examples" / "email.toml").read_text()
        assert 'program = "../scanners/email"' in text and 'clamd_socket = ""' in text
        text = text.replace('program = "../scanners/email"', f'program = "{REPO / "scanners" / "email"}"')
        text = text.replace('clamd_socket = ""', f'clamd_socket = "{clamd_sock}"')
        if clamd_sock:           # bound into the scanner's sandbox: nothing else of the host is
            text = text.replace('# sockets = ["/var/run/clamav/clamd.ctl"]', f'sockets = ["{clamd_sock}"]')
        policy = work / "alice.toml"
        policy.write_text(text)
        alerts = work / "alerts.jsonl"
        socks = {n: str(vhostni_sockdir / f"mail-{n}.sock") for n in ("alice", "bob")}
        vhostni_daemon_factory(socks, name="mail", extra_args=[
            "--policy", f"alice={policy}", "--alert-log", str(alerts)])
        alice, bob = vhostni_guest_factory.many([
            ("alice", dict(nics=[VhostUserNic(socket=socks["alice"], mac=ALICE_MAC)], ip=f"{LAN}.1/24")),
            ("bob", dict(nics=[VhostUserNic(socket=socks["bob"], mac=BOB_MAC)], ip=f"{LAN}.2/24")),
        ])
        bob.check(f"mkdir -p /srv && (minimail serve {MAILDIR} > /tmp/mail.log 2>&1 &)")
        bob.check("for i in $(seq 50); do grep -q serving /tmp/mail.log && break; sleep 0.1; done; "
                  "grep serving /tmp/mail.log")
        ready = _wait_alert(alerts, lambda a: a["message"] == "e-mail scanner ready", "scanner ready", 30)
        assert ready["ni"] == "alice"
        assert ready["fields"]["engine"] == ("clamd" if clamd else "sha256 only"), ready
        yield dict(alice=alice, bob=bob, alerts=alerts, clamd=clamd is not None)
    finally:
        if clamd is not None:
            clamd.terminate()
            try:
                clamd.wait(10)
            except subprocess.TimeoutExpired:
                clamd.kill()
                clamd.wait()
        shutil.rmtree(clamd_dir, ignore_errors=True)


def _replacement() -> bytes:
    from vhostni.policy import load_policy
    pol = load_policy(str(REPO / "examples" / "email.toml"))
    (inj,) = [b for n, b in pol.scanners[0].stream_injections if n == "replacement"]
    return inj


def replaced(msg: bytes) -> bytes:
    """``msg`` (from message()) with its attachment part (headers and body, up to the CRLF
    before the closing delimiter) replaced by the policy's replacement part."""
    delim = b"--=-b0undary\r\n"
    start = msg.index(delim, msg.index(delim) + 1) + len(delim)
    end = msg.rindex(b"\r\n--=-b0undary--")
    return msg[:start] + _replacement() + msg[end:]


def _maildir(bob) -> list[str]:
    return bob.check(f"ls {MAILDIR}/new").split()


def _md5_in_guest(g, path: str) -> str:
    return g.check(f"md5sum {path}").split()[0]


def test_clean_message_arrives_byte_for_byte_and_comes_back_over_pop3(mail_lab):
    alice, bob, alerts = mail_lab["alice"], mail_lab["bob"], mail_lab["alerts"]
    msg = message(CLEAN, "report.bin", "clean")
    want = hashlib.md5(msg).hexdigest()
    alice.put_file("/tmp/clean.eml", msg)
    assert _md5_in_guest(alice, "/tmp/clean.eml") == want
    t0 = time.monotonic()
    out = alice.check(f"timeout 30 minimail send {LAN}.2 /tmp/clean.eml 2>&1", timeout=40)
    elapsed = time.monotonic() - t0
    assert out.strip().endswith("sent"), out
    (name,) = _maildir(bob)
    assert _md5_in_guest(bob, f"{MAILDIR}/new/{name}") == want
    assert bob.check(f"wc -c < {MAILDIR}/new/{name}").strip() == str(len(msg))
    out = alice.check(f"timeout 30 minimail fetch {LAN}.2 1 /tmp/fetched.eml 2>&1", timeout=40)
    assert f"fetched {len(msg)}" in out, out
    assert _md5_in_guest(alice, "/tmp/fetched.eml") == want
    assert not _virus_alerts(alerts)
    print(f"clean message ({len(msg)} bytes) sent through the scanner in {elapsed:.2f} s")


def test_infected_smtp_attachment_arrives_replaced_and_is_alerted(mail_lab):
    alice, bob, alerts = mail_lab["alice"], mail_lab["bob"], mail_lab["alerts"]
    bob.check(f"rm -f {MAILDIR}/new/*")
    msg = message(EICAR, "eicar.com", "infected")
    want = replaced(msg)
    alice.put_file("/tmp/eicar.eml", msg)
    out = alice.check(f"timeout 30 minimail send {LAN}.2 /tmp/eicar.eml 2>&1", timeout=40)
    assert out.strip().endswith("sent"), f"the infected message was not delivered: {out}"
    a = _wait_alert(alerts, lambda a: a.get("fields", {}).get("filename") == "eicar.com", "EICAR alert")
    f = a["fields"]
    assert a["ni"] == "alice" and a["scanner"] == "email" and f["event"] == "virus", a
    assert f["action"] == "replace" and "replaced" in a["message"], a
    assert f["protocol"] == "smtp" and f["sha256"] == EICAR_SHA and f["engine"] == "sha256", f
    assert f["verdict"] == "EICAR-Test-File" and "eicar.com" in a["message"], a
    assert base64.b64decode(f["message_b64"]) == msg and not f["message_truncated"]
    assert f["tuple"][3:] == [f"{LAN}.2", 25], f
    # bob stored the message with exactly that part replaced, every other byte as sent
    (name,) = _maildir(bob)
    assert bob.check(f"wc -c < {MAILDIR}/new/{name}").strip() == str(len(want))
    assert _md5_in_guest(bob, f"{MAILDIR}/new/{name}") == hashlib.md5(want).hexdigest()
    assert b"EICAR" not in bob.check(f"cat {MAILDIR}/new/*").encode()
    # and the text part, its dot-stuffed lines included, is intact
    assert ".a line that starts with a dot" in bob.check(f"cat {MAILDIR}/new/{name}")


def test_infected_pop3_retr_arrives_replaced_and_the_session_goes_on(mail_lab):
    alice, bob, alerts = mail_lab["alice"], mail_lab["bob"], mail_lab["alerts"]
    msg = message(EICAR, "eicar-pop.com", "infected in the mailbox")
    clean = message(CLEAN, "after.bin", "clean after")
    bob.check(f"rm -f {MAILDIR}/new/*")
    bob.put_file(f"{MAILDIR}/new/1-infected", msg)
    out = alice.check(f"rm -f /tmp/pop.eml; timeout 30 minimail fetch {LAN}.2 1 /tmp/pop.eml 2>&1",
                      timeout=40)
    want = replaced(msg)
    assert f"fetched {len(want)}" in out, out
    assert _md5_in_guest(alice, "/tmp/pop.eml") == hashlib.md5(want).hexdigest()
    a = _wait_alert(alerts, lambda a: a.get("fields", {}).get("filename") == "eicar-pop.com", "POP3 alert")
    f = a["fields"]
    assert f["protocol"] == "pop3" and f["sha256"] == EICAR_SHA and f["event"] == "virus", f
    assert f["action"] == "replace" and base64.b64decode(f["message_b64"]) == msg
    # a clean message fetched afterwards arrives byte for byte
    bob.put_file(f"{MAILDIR}/new/2-clean", clean)
    out = alice.check(f"timeout 30 minimail fetch {LAN}.2 2 /tmp/pop2.eml 2>&1", timeout=40)
    assert f"fetched {len(clean)}" in out, out
    assert _md5_in_guest(alice, "/tmp/pop2.eml") == hashlib.md5(clean).hexdigest()


def test_messages_larger_than_the_receivers_window_go_through_whole(mail_lab):
    """The scanner holds a message until it has all of it: past the receiver's TCP window
    (64 KiB for a fresh Linux connection) the NI acknowledges on the receiver's behalf
    (`more`), then delivers as the receiver's window allows.  A large clean message arrives
    byte for byte, and a large infected one with its attachment replaced, both over SMTP and
    POP3, in well under the hold timeout."""
    alice, bob, alerts = mail_lab["alice"], mail_lab["bob"], mail_lab["alerts"]
    bob.check(f"rm -f {MAILDIR}/new/*")
    big = bytes((i * 31 + (i >> 8)) % 256 for i in range(300_000))       # ~400 KiB in base64
    msg = message(big, "big.bin", "large and clean")
    alice.put_file("/tmp/big.eml", msg)
    t0 = time.monotonic()
    out = alice.check(f"timeout 60 minimail send {LAN}.2 /tmp/big.eml 2>&1", timeout=70)
    sent = time.monotonic() - t0
    assert out.strip().endswith("sent"), out
    (name,) = _maildir(bob)
    assert _md5_in_guest(bob, f"{MAILDIR}/new/{name}") == hashlib.md5(msg).hexdigest()
    out = alice.check(f"timeout 60 minimail fetch {LAN}.2 1 /tmp/bigpop.eml 2>&1", timeout=70)
    assert f"fetched {len(msg)}" in out, out
    assert _md5_in_guest(alice, "/tmp/bigpop.eml") == hashlib.md5(msg).hexdigest()
    # infected, with a large clean part before the attachment
    bad = message(EICAR, "eicar-big.com", "large and infected")
    bad = bad.replace(b"Hello Bob,\r\n", b"Hello Bob,\r\n" + b"filler line of text\r\n" * 8000)
    alice.put_file("/tmp/bigbad.eml", bad)
    out = alice.check(f"timeout 60 minimail send {LAN}.2 /tmp/bigbad.eml 2>&1", timeout=70)
    assert out.strip().endswith("sent"), out
    _wait_alert(alerts, lambda a: a.get("fields", {}).get("filename") == "eicar-big.com", "big EICAR")
    names = set(_maildir(bob)) - {name}
    (name2,) = names
    assert _md5_in_guest(bob, f"{MAILDIR}/new/{name2}") == hashlib.md5(replaced(bad)).hexdigest()
    print(f"{len(msg)}-byte clean message sent through the scanner in {sent:.2f} s")


def test_clamd_finds_what_the_digest_table_does_not(mail_lab):
    if not mail_lab["clamd"]:
        pytest.skip("clamd is not installed (apt-get install clamav-daemon): digest table only")
    alice, bob, alerts = mail_lab["alice"], mail_lab["bob"], mail_lab["alerts"]
    bob.check(f"rm -f {MAILDIR}/new/*")
    msg = message(PAYLOAD, "payload.bin", "for clamd")
    alice.put_file("/tmp/payload.eml", msg)
    out = alice.check(f"timeout 30 minimail send {LAN}.2 /tmp/payload.eml 2>&1", timeout=40)
    assert out.strip().endswith("sent"), out
    a = _wait_alert(alerts, lambda a: a.get("fields", {}).get("filename") == "payload.bin", "clamd alert")
    f = a["fields"]
    assert f["engine"] == "clamd" and f["verdict"] == "Test.Payload.UNOFFICIAL", f
    assert f["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
    (name,) = _maildir(bob)
    assert _md5_in_guest(bob, f"{MAILDIR}/new/{name}") == hashlib.md5(replaced(msg)).hexdigest()


def test_mail_flows_on_after_the_replacements(mail_lab):
    """Edited connections leave nothing behind: a clean message still goes through intact."""
    alice, bob = mail_lab["alice"], mail_lab["bob"]
    bob.check(f"rm -f {MAILDIR}/new/*")
    msg = message(b"second clean attachment\r\n" * 40, "notes.txt", "clean again")
    alice.put_file("/tmp/clean2.eml", msg)
    out = alice.check(f"timeout 30 minimail send {LAN}.2 /tmp/clean2.eml 2>&1", timeout=40)
    assert out.strip().endswith("sent"), out
    (name,) = _maildir(bob)
    assert _md5_in_guest(bob, f"{MAILDIR}/new/{name}") == hashlib.md5(msg).hexdigest()
