"""The admin plane (QMP) against a client with bad intent or bad code: floods of malformed input,
compiles on the daemon's thread, a waiting client's socket, names and reasons that would forge files
and log lines, a state directory others can write, rule files that are FIFOs.  An in-process daemon
stepped by the test (tests/test_admin.py's ``inproc``)."""
from __future__ import annotations

import json
import logging
import os
import socket
import time

import pytest

from vhostni.admin import commands
from vhostni.admin.state import NAME_RE, StateDir


from test_admin import inproc  # noqa: E402,F401  (the in-process daemon the admin tests step)


def _connect(inproc, srv, negotiate=True) -> socket.socket:
    path = srv.addresses[0][len("unix:"):]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    inproc.step()
    if negotiate:
        s.sendall(b'{"execute":"qmp_capabilities"}')
        inproc.step()
    return s


def _rules(d: str, n: int = 10000) -> str:
    p = os.path.join(d, "many.rules")
    with open(p, "w") as f:
        f.write("".join(f'alert tcp any any -> any 80 (msg:"r{i}"; content:"needle-{i:05d}-q"; '
                        f'sid:{i + 1};)\n' for i in range(n)))
    return p


# ---------------------------------------------------------------------------
# 1. 1-byte bad messages: 80x reply amplification and a multi-second stall of the loop
# ---------------------------------------------------------------------------

def test_a_flood_of_one_byte_bad_messages_does_not_stall_the_daemon(inproc):
    """Before negotiation, each b'}' is answered with a ~75-byte GenericError.  One wakeup
    reads 4 x 64 KiB: 262,144 errors (20 MB) are queued and the events list is drained
    with list.pop(0) (quadratic), all on the daemon's thread: the data plane stops for
    seconds.  README: 'Admin clients never stall the data path ... input and output are
    bounded'."""
    srv = inproc.server([f"unix:{os.path.join(inproc.dir, 'qmp.sock')}"])
    s = _connect(inproc, srv, negotiate=False)
    s.setblocking(False)
    payload = b"}" * (256 << 10)
    sent = 0
    try:
        while sent < len(payload):
            sent += s.send(payload[sent:])
    except BlockingIOError:
        pass
    assert sent >= 128 << 10
    [client] = srv.clients.values()
    t = time.monotonic()
    inproc.step()                          # one turn of the daemon's loop
    took = time.monotonic() - t
    queued = client.proto.pending_output + len(client.raw_out)
    s.close()
    assert took < 0.25, f"one turn of the daemon's loop took {took:.2f} s on {sent} bytes of '}}'"
    assert queued <= (1 << 20), f"{queued} bytes of replies queued for {sent} bytes of input"


# ---------------------------------------------------------------------------
# 2. ni-validate-policy compiles signature rules on the daemon's thread
# ---------------------------------------------------------------------------

def test_validate_policy_does_not_compile_on_the_daemons_thread(inproc):
    """ni-set-policy and ni-add compile a policy on a worker thread (Deferred) because
    10,000 signature rules take seconds; ni-validate-policy runs the same _validate
    synchronously (commands.py ni_validate_policy): the whole data plane waits."""
    srv = inproc.server([f"unix:{os.path.join(inproc.dir, 'qmp.sock')}"])
    s = _connect(inproc, srv)
    rules = _rules(inproc.dir)
    s.sendall(json.dumps({"execute": "ni-validate-policy", "id": 1,
                          "arguments": {"policy": {"signatures": {"rules": [rules]}}}}).encode())
    time.sleep(0.05)
    t = time.monotonic()
    inproc.step()
    took = time.monotonic() - t
    s.close()
    assert took < 0.25, f"one turn of the daemon's loop took {took:.2f} s (compiling on its thread)"


# ---------------------------------------------------------------------------
# 3. a client waiting for a Deferred command keeps EPOLLIN on: the loop busy-spins
# ---------------------------------------------------------------------------

def test_a_client_waiting_for_a_deferred_command_does_not_spin_the_loop(inproc):
    """While a client's ni-add/ni-set-policy compiles (Client.waiting), _read returns at once
    without reading, but the fd stays registered for EPOLLIN (level-triggered): if the client
    sent anything more, epoll reports it ready on every turn and the daemon's loop spins at
    100% CPU (competing for the GIL with the compile) until the compile ends."""
    srv = inproc.server([f"unix:{os.path.join(inproc.dir, 'qmp.sock')}"])
    s = _connect(inproc, srv)
    rules = _rules(inproc.dir)
    doc = {"ni": {}, "signatures": {"rules": [rules]}}
    s.sendall(json.dumps({"execute": "ni-add", "id": 1,
                          "arguments": {"name": "c", "socket": os.path.join(inproc.dir, "c.sock"),
                                        "policy": doc}}).encode())
    inproc.step()
    [client] = srv.clients.values()
    assert client.waiting is not None, "the compile should be running on a worker thread"
    s.sendall(b'{"execute":"query-version","id":2}')     # pipelined behind it
    time.sleep(0.05)
    spins = 0
    t = time.monotonic()
    while client.waiting is not None and time.monotonic() - t < 0.5:
        ready = [fd for fd, _ in inproc.dmn.ep.poll(0)]
        if client.fd in ready:
            spins += 1
            inproc.dmn._control_event(client.fd)       # what the loop does: nothing, at once
        time.sleep(0.001)
    s.close()
    assert spins == 0, f"the waiting client's fd was reported ready {spins} times in 0.5 s"


# ---------------------------------------------------------------------------
# 4. NI names: '$' lets a trailing newline through
# ---------------------------------------------------------------------------

def test_ni_names_with_a_newline_are_refused(inproc):
    """NAME_RE = ^[A-Za-z0-9_.-]{1,32}$ used with .match(): '$' also matches before a final
    newline, so ni-add accepts 'a\\n'; it lands in nis.json, policies/'a\\n.json', the log and
    events."""
    srv = inproc.server([f"unix:{os.path.join(inproc.dir, 'qmp.sock')}"])
    try:
        commands.dispatch(srv, "ni-add", {"name": "a\n", "socket": os.path.join(inproc.dir, "a.sock")})
    except commands.QMPError as exc:
        assert "names" in exc.desc
        return
    assert "a\n" not in inproc.dmn.nis, "ni-add accepted the NI name 'a\\n'"


# ---------------------------------------------------------------------------
# 5. log forging through ni-quarantine / ni-set-link 'reason'
# ---------------------------------------------------------------------------

def test_quarantine_reason_cannot_forge_log_lines(inproc, caplog):
    """ni-quarantine's and ni-set-link's ``reason`` goes into the daemon's log unescaped
    (daemon.py quarantine/set_link) although the admin plane escapes every other
    peer-supplied string with logtext.printable."""
    srv = inproc.server([f"unix:{os.path.join(inproc.dir, 'qmp.sock')}"])
    inproc.dmn.add_ni("a", os.path.join(inproc.dir, "a.sock"))
    forged = "x)\nvhostni WARNING NI a: released from quarantine (admin"
    with caplog.at_level(logging.WARNING):
        commands.dispatch(srv, "ni-quarantine", {"name": "a", "reason": forged})
        commands.dispatch(srv, "ni-set-link", {"name": "a", "up": False, "reason": forged})
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs and not any("\n" in m for m in msgs), msgs


# ---------------------------------------------------------------------------
# 6. state files: the temporary file follows a planted symlink
# ---------------------------------------------------------------------------

def test_state_dir_write_does_not_follow_a_planted_symlink(tmp_path):
    """Whoever can write the state directory decides which NIs exist and their policies, and
    could plant a link the (root) daemon writes through: a state directory others may write is
    refused, and its files are written through new files of random names (O_EXCL|O_NOFOLLOW)."""
    st_dir = tmp_path / "state"
    st_dir.mkdir()
    os.chmod(st_dir, 0o777)                           # e.g. made by someone else
    with pytest.raises(PermissionError, match="writable by no one else"):
        StateDir(str(st_dir))
    os.chmod(st_dir, 0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    st = StateDir(str(st_dir))
    for name in (f".nis.json.{os.getpid()}.tmp", "nis.json.tmp", ".nis.json.tmp"):
        os.symlink(victim, st_dir / name)
    st.save_nis([("x", "/run/x.sock")])
    assert victim.read_text() == "precious\n", "the daemon wrote through the planted symlink"
    assert st.load_nis() == [("x", "/run/x.sock")]
    (st_dir / "policies").chmod(0o777)
    with pytest.raises(PermissionError):
        StateDir(str(st_dir))


def test_a_rule_file_that_is_a_fifo_is_refused_not_waited_for(tmp_path):
    """A policy's rule file that is a FIFO (or a device) would block the worker compiling it forever,
    one thread per request: only regular files are read."""
    from vhostni.signatures.rules import Vars, load_rule_files
    fifo = tmp_path / "rules.fifo"
    os.mkfifo(fifo)
    rs = load_rule_files([str(fifo), "/dev/zero"], Vars())
    assert [p.reason for p in rs.problems] == ["cannot read: [Errno 22] not a regular file"] * 2
