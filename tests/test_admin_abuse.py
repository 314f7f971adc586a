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


def _waiting_client(inproc, rules: int = 10000):
    """A client whose ni-add (a policy of ``rules`` signature rules) compiles on a worker, after one
    turn of the loop: (its socket, the server's Client)."""
    srv = inproc.server([f"unix:{os.path.join(inproc.dir, 'qmp.sock')}"])
    s = _connect(inproc, srv)
    doc = {"ni": {}, "signatures": {"rules": [_rules(inproc.dir, rules)]}}
    s.sendall(json.dumps({"execute": "ni-add", "id": 1,
                          "arguments": {"name": "c", "socket": os.path.join(inproc.dir, "c.sock"),
                                        "policy": doc}}).encode())
    inproc.step()
    [client] = srv.clients.values()
    return s, client


def _ready_reports(inproc, client, seconds: float = 0.5) -> int:
    """How often epoll reports a waiting client's fd ready while its command runs (at most
    ``seconds``), handled each time as the loop would (nothing to do, at once)."""
    spins = 0
    t = time.monotonic()
    while client.waiting is not None and time.monotonic() - t < seconds:
        if client.fd in [fd for fd, _ in inproc.dmn.ep.poll(0)]:
            spins += 1
            inproc.dmn._control_event(client.fd)
        time.sleep(0.001)
    return spins


def test_a_flood_of_one_byte_bad_messages_is_answered_a_bounded_number_of_times(inproc):
    """Each stray b'}' is a malformed message worth an error reply of ~75 bytes: 256 KiB of them
    would queue 20 MB of replies and hours of the loop's time.  A 33rd malformed message closes
    the connection instead: what it costs the daemon is bounded, whatever the client sends."""
    from vhostni.admin.protocol import MAX_INPUT_ERRORS
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
    inproc.step()                          # one turn of the daemon's loop
    queued = client.proto.pending_output + len(client.raw_out)
    assert client.proto.input_errors == MAX_INPUT_ERRORS + 1 and client.proto.must_close or client.closed
    assert queued <= 100 * (MAX_INPUT_ERRORS + 2), f"{queued} bytes of replies queued for {sent} bytes"
    inproc.step(3)
    assert client.closed and not srv.clients       # its answers flushed, then closed
    s.close()


def test_validate_policy_does_not_compile_on_the_daemons_thread(inproc):
    """Compiling 10,000 signature rules takes seconds: ni-validate-policy, like ni-set-policy and
    ni-add, runs it on a worker thread, and the daemon's loop goes on meanwhile."""
    srv = inproc.server([f"unix:{os.path.join(inproc.dir, 'qmp.sock')}"])
    s = _connect(inproc, srv)
    rules = _rules(inproc.dir)
    s.sendall(json.dumps({"execute": "ni-validate-policy", "id": 1,
                          "arguments": {"policy": {"signatures": {"rules": [rules]}}}}).encode())
    time.sleep(0.05)
    inproc.step()
    [client] = srv.clients.values()
    assert client.waiting is not None and client.waiting.command == "ni-validate-policy"
    deadline = time.monotonic() + 60
    while client.waiting is not None and time.monotonic() < deadline:
        inproc.step()
    s.settimeout(5)
    got = b""
    while b'"id": 1' not in got and b'"id":1' not in got:
        got += s.recv(1 << 16)
    s.close()
    assert b'"prevent": 0' in got or b'"prevent":0' in got, got[-300:]


def test_a_client_waiting_for_a_deferred_command_does_not_spin_the_loop(inproc):
    """While a client's ni-add/ni-set-policy compiles (Client.waiting) its socket is not read, so it
    must not be watched either: epoll is level-triggered, and a client that sent more would be
    reported ready on every turn, the loop spinning until the compile ends."""
    s, client = _waiting_client(inproc)
    assert client.waiting is not None, "the compile should be running on a worker thread"
    s.sendall(b'{"execute":"query-version","id":2}')     # pipelined behind it
    time.sleep(0.05)
    spins = _ready_reports(inproc, client)
    s.close()
    assert spins == 0, f"the waiting client's fd was reported ready {spins} times in 0.5 s"


def test_ni_names_with_a_newline_are_refused(inproc):
    """'$' also matches before a final newline: a name pattern ending in it let 'a\\n' into
    nis.json, a policy file's name, the log and events."""
    srv = inproc.server([f"unix:{os.path.join(inproc.dir, 'qmp.sock')}"])
    with pytest.raises(commands.QMPError, match="names"):
        commands.dispatch(srv, "ni-add", {"name": "a\n", "socket": os.path.join(inproc.dir, "a.sock")})
    assert "a\n" not in inproc.dmn.nis, "ni-add accepted the NI name 'a\\n'"
    assert not NAME_RE.match("a\n") and NAME_RE.match("a")


def test_quarantine_reason_cannot_forge_log_lines(inproc, caplog):
    """ni-quarantine's and ni-set-link's ``reason`` is an admin client's text: escaped into one log
    line, like every other string a peer supplies."""
    srv = inproc.server([f"unix:{os.path.join(inproc.dir, 'qmp.sock')}"])
    inproc.dmn.add_ni("a", os.path.join(inproc.dir, "a.sock"))
    forged = "x)\nvhostni WARNING NI a: released from quarantine (admin"
    with caplog.at_level(logging.WARNING):
        commands.dispatch(srv, "ni-quarantine", {"name": "a", "reason": forged})
        commands.dispatch(srv, "ni-set-link", {"name": "a", "up": False, "reason": forged})
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs and not any("\n" in m for m in msgs), msgs


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


def test_a_client_gets_a_batch_of_commands_handled_per_turn_of_the_loop(inproc):
    """A client that pipelines thousands of commands gets EVENTS_PER_WAKEUP handled per turn of the
    loop, the rest on later turns (a continuation that schedules the next runs on the next turn)."""
    from vhostni.admin import server as server_mod
    srv = inproc.server([f"unix:{os.path.join(inproc.dir, 'qmp.sock')}"])
    s = _connect(inproc, srv)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    [client] = srv.clients.values()
    before = client.commands
    s.sendall(b'{"execute":"query-version"}' * 3000)      # 84 KB
    time.sleep(0.05)
    inproc.step()                  # the client's fd: 256 handled, a continuation scheduled
    first = client.commands - before
    inproc.step()                  # the inbox: should be one more batch
    second = client.commands - before - first
    s.close()
    assert first <= server_mod.EVENTS_PER_WAKEUP
    assert second <= server_mod.EVENTS_PER_WAKEUP, \
        f"one turn of the loop handled {second} commands (budget {server_mod.EVENTS_PER_WAKEUP})"


def test_the_batch_is_per_turn_not_per_read(inproc, monkeypatch):
    """One turn reads the socket up to READS_PER_WAKEUP times; each read used to start a fresh
    budget, so commands arriving in small pieces got a batch per read handled in one turn."""
    from vhostni.admin import server as server_mod
    cmd = b'{"execute":"query-version"}'
    monkeypatch.setattr(server_mod, "READ_CHUNK", len(cmd) * 100)     # 100 commands a read
    assert server_mod.READS_PER_WAKEUP * 100 > server_mod.EVENTS_PER_WAKEUP
    srv = inproc.server([f"unix:{os.path.join(inproc.dir, 'qmp.sock')}"])
    s = _connect(inproc, srv)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    [client] = srv.clients.values()
    before = client.commands
    s.sendall(cmd * 3000)          # a unix socket: all of it is in the daemon's buffer now
    first = 0
    for _ in range(100):           # the first turn that handles any of it (a loaded machine)
        inproc.step()
        first = client.commands - before
        if first:
            break
        time.sleep(0.02)
    s.close()
    assert 0 < first <= server_mod.EVENTS_PER_WAKEUP, \
        f"one turn handled {first} commands (budget {server_mod.EVENTS_PER_WAKEUP})"


def test_a_waiting_client_that_hangs_up_does_not_spin_the_loop(inproc):
    """epoll reports a hang-up whatever the mask: a client waiting for its ni-add is out of the
    epoll set until the answer, so one that closes meanwhile is not reported on every turn."""
    s, client = _waiting_client(inproc, 20000)
    assert client.waiting is not None and client.mask == 0 and client.fd in inproc.dmn._parked
    s.close()                                              # hangs up while it waits
    spins = _ready_reports(inproc, client)
    assert spins <= 1, f"the waiting client's fd was reported ready {spins} times in 0.5 s (EPOLLHUP)"
