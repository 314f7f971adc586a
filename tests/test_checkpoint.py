"""Scanner checkpoints (vhostni/scanstate.py, ``Scanner.checkpoint``): the state a scanner
keeps with the NI kernel survives the scanner's death and, with a state directory, the
daemon's restart; it goes back only to the same scanner of the same NI; it is bounded,
refused when too large, written at most once a second, dropped with its scanner; and a
broken state directory costs a counter, not the daemon.

tests/scanners/checkpointer.py counts frames and checkpoints the count.
"""
from __future__ import annotations

import os
import signal
import socket
import struct

import pytest

from nikit import policy, scanner_spec, tcp_frame, time_limit
from vhostni import scannerproc as scannerproc_mod
from vhostni import scanstate
from vhostni.scanner import Scanner, wire
from vhostni.scanstate import CheckpointStore

HTTP = {"match": {"direction": "from_guest", "proto": "tcp", "dport": 80}, "contain": True}


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(scannerproc_mod, "RESTART_MIN", 0.05)
    with time_limit(60, "the test"):
        yield


def counter(name="cp", **config):
    extra = {k: config.pop(k) for k in ("checkpoint_max_bytes",) if k in config}
    return scanner_spec(name, "checkpointer.py", allow=[dict(HTTP["match"], contain=True)],
                        config=dict(config, subscribe=[HTTP]), **extra)


def restored(k, ni="a", scanner="cp", n=1) -> dict:
    """The fields of the n-th "restored" alert of that scanner (waiting for it)."""
    k.until(lambda: len(k.alerts_matching("restored", ni, scanner)) >= n, 10, f"restore #{n}")
    return k.alerts_matching("restored", ni, scanner)[n - 1]["fields"]


def count_frames(k, n: int, ni="a", scanner="cp") -> None:
    k.wait_subscribed(ni, scanner)
    before = k.sp(ni, scanner).counters.checkpoints
    k.send(ni, *[tcp_frame(payload=f"f{i}".encode()) for i in range(n)])
    k.until(lambda: k.sp(ni, scanner).counters.checkpoints >= before + n, 10, "the checkpoints")


def test_checkpoint_survives_a_scanner_kill(kits):
    k = kits({"a": policy(scanners=[counter()])})
    assert restored(k)["state"] is None
    count_frames(k, 3)
    pid = k.sp("a", "cp").proc.pid
    os.kill(pid, signal.SIGKILL)
    got = restored(k, n=2)
    assert got["pid"] != pid and got["state"] == {"frames": 3, "pad": ""}
    assert got["limit"] == wire.MAX_CHECKPOINT
    assert k.daemon.kernel.checkpoints.counters.restored == 1
    # and it goes on counting from there
    count_frames(k, 2)
    assert k.daemon.kernel.checkpoints.get("a", "cp") == (wire.CHECKPOINT_JSON, b'{"frames":5,"pad":""}')


def test_checkpoint_survives_a_daemon_restart_and_stays_with_its_ni(kits, tmp_path):
    state = str(tmp_path / "state")
    pols = {"a": policy(scanners=[counter()]), "b": policy(scanners=[counter()])}
    k = kits(pols, state_dir=state)
    count_frames(k, 4)
    restored(k, "b")
    k.daemon.close()           # flushes what the coalescing held back
    k.daemon = None
    path = os.path.join(state, "scanners", "a", "cp.ckpt")
    data = open(path, "rb").read()
    assert data[:4] == b"VNCK" and data.endswith(b'{"frames":4,"pad":""}')
    assert not os.path.exists(os.path.join(state, "scanners", "b", "cp.ckpt"))
    k2 = kits(pols, state_dir=state)
    assert restored(k2, "a")["state"] == {"frames": 4, "pad": ""}
    assert restored(k2, "b")["state"] is None          # same scanner name, other NI: nothing
    # a daemon without the state directory starts from nothing
    k3 = kits(pols)
    assert restored(k3, "a")["state"] is None


def test_binary_checkpoints_round_trip(kits):
    k = kits({"a": policy(scanners=[counter(binary=True)])})
    count_frames(k, 2)
    os.kill(k.sp("a", "cp").proc.pid, signal.SIGKILL)
    assert restored(k, n=2)["state"] == "00000002"


def test_oversize_checkpoint_is_refused_and_alerted(kits):
    k = kits({"a": policy(scanners=[counter(checkpoint_max_bytes=100, raw=200)])})
    assert restored(k)["limit"] == 100
    k.wait_alert("raw sent", "a", "cp")
    alert = k.wait_alert("checkpoint refused", "a", "cp")
    assert "200 bytes exceed its limit of 100" in alert["message"]
    assert k.sp("a", "cp").running and k.sp("a", "cp").counters.refused >= 1
    assert k.daemon.kernel.checkpoints.get("a", "cp") is None
    # within the limit it is kept
    count_frames(k, 1)
    assert k.daemon.kernel.checkpoints.get("a", "cp") is not None


def test_a_checkpoint_above_a_lowered_limit_is_not_handed_back(kits):
    k = kits({"a": policy(scanners=[counter(pad=300)])})
    count_frames(k, 1)
    k.reload("a", policy(scanners=[counter(pad=300, checkpoint_max_bytes=100)]))
    os.kill(k.sp("a", "cp").proc.pid, signal.SIGKILL)
    got = restored(k, n=2)
    assert got["state"] is None and got["limit"] == 100
    assert k.daemon.kernel.checkpoints.get("a", "cp") is None


def test_checkpoints_off_by_policy(kits):
    k = kits({"a": policy(scanners=[counter(checkpoint_max_bytes=0, raw=1)])})
    assert restored(k)["limit"] == 0
    k.wait_alert("checkpoints are off for this scanner", "a", "cp")
    assert k.daemon.kernel.checkpoints.get("a", "cp") is None


def test_the_sdk_refuses_an_oversize_checkpoint_with_a_clear_error():
    kernel, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        kernel.send(wire.encode_control({"op": "hello", "scanner": "s", "ni": "n",
                                         "checkpoint_max": 16, "checkpoint": 3}))
        kernel.send(wire.encode_checkpoint(wire.CHECKPOINT_JSON, b"[1]"))
        sc = Scanner(child, lockdown=False)
        assert sc.restore() == [1]
        with pytest.raises(ValueError, match="20 bytes exceeds this scanner's limit of 16"):
            sc.checkpoint(b"x" * 20)
        sc.checkpoint({"n": 2})
        assert wire.decode(kernel.recv(wire.MAX_MESSAGE)) == wire.Checkpoint(wire.CHECKPOINT_JSON, b'{"n":2}')
    finally:
        kernel.close()
        child.close()


def test_checkpoint_dropped_when_the_scanner_leaves_the_policy(kits, tmp_path):
    state = str(tmp_path / "state")
    k = kits({"a": policy(scanners=[counter()])}, state_dir=state)
    count_frames(k, 1)
    store = k.daemon.kernel.checkpoints
    store.flush(force=True)
    path = os.path.join(state, "scanners", "a", "cp.ckpt")
    assert os.path.exists(path)
    k.reload("a", policy(scanners=[counter("other")]))
    assert store.get("a", "cp") is None and not os.path.exists(path)
    # a file left by a scanner that is not in the policy at start is dropped too
    os.makedirs(os.path.dirname(path), exist_ok=True)
    store._write(path, wire.CHECKPOINT_BYTES, b"stale")
    k.daemon.close()
    k.daemon = None
    k2 = kits({"a": policy(scanners=[counter("other")])}, state_dir=state)
    restored(k2, "a", "other")
    assert not os.path.exists(path)


def test_removing_an_ni_drops_its_checkpoints(kits, tmp_path):
    state = str(tmp_path / "state")
    k = kits({"a": policy(scanners=[counter()])}, state_dir=state)
    count_frames(k, 1)
    k.daemon.kernel.checkpoints.flush(force=True)
    assert os.path.exists(os.path.join(state, "scanners", "a", "cp.ckpt"))
    k.drivers.pop("a").close(graceful=False)
    k.daemon.remove_ni("a")
    assert k.daemon.kernel.checkpoints.get("a", "cp") is None
    assert not os.path.exists(os.path.join(state, "scanners", "a"))


def test_writes_are_coalesced(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path), flush_interval=1.0)
    fsyncs = []
    real = os.fsync
    monkeypatch.setattr(scanstate.os, "fsync", lambda fd: (fsyncs.append(fd), real(fd)))
    for i in range(1000):                 # a scanner checkpointing every frame
        store.put("a", "s", wire.CHECKPOINT_BYTES, str(i).encode())
        store.flush()
    assert store.counters.writes == 1 and store.counters.saved == 1000
    assert len(fsyncs) == 2                # the file and its directory, once
    assert store.flush(force=True) == 1    # the latest one, when the daemon closes
    assert CheckpointStore(str(tmp_path)).get("a", "s") == (wire.CHECKPOINT_BYTES, b"999")


def test_io_errors_and_bad_files_are_counted_not_raised(tmp_path, caplog):
    state = tmp_path / "state"
    store = CheckpointStore(str(state))
    os.makedirs(state / "scanners")
    (state / "scanners" / "a").write_text("a file where the NI's directory should be")
    store.put("a", "s", wire.CHECKPOINT_BYTES, b"x")
    assert store.flush() == 0
    assert store.counters.write_errors == 1 and store.info()["unwritten"] == 1
    assert "cannot write" in caplog.text
    assert store.get("a", "s") == (wire.CHECKPOINT_BYTES, b"x")        # kept in memory
    # torn, foreign, oversized files are ignored
    d = state / "scanners" / "b"
    os.makedirs(d)
    hdr = struct.Struct("<4sBB2xI")
    (d / "torn.ckpt").write_bytes(hdr.pack(b"VNCK", 1, 0, 10) + b"short")
    (d / "foreign.ckpt").write_bytes(hdr.pack(b"XXXX", 1, 0, 1) + b"x")
    (d / "big.ckpt").write_bytes(hdr.pack(b"VNCK", 1, 0, 1 << 20) + b"x" * (1 << 20))
    (d / "badkind.ckpt").write_bytes(hdr.pack(b"VNCK", 1, 7, 1) + b"x")
    for name in ("torn", "foreign", "big", "badkind"):
        assert store.get("b", name) is None
    assert store.counters.read_errors == 4
    # names that cannot be file names stay in memory only
    store.put("..", "s", wire.CHECKPOINT_BYTES, b"y")
    store.flush(force=True)
    assert not os.path.exists(state / "s.ckpt") and store.get("..", "s") == (0, b"y")


def test_an_unwritable_state_dir_does_not_stop_the_daemon(kits, tmp_path):
    state = tmp_path / "state"
    os.makedirs(state / "scanners")
    (state / "scanners" / "a").write_text("not a directory")
    k = kits({"a": policy(scanners=[counter()])}, state_dir=str(state))
    count_frames(k, 2)
    k.until(lambda: k.daemon.kernel.checkpoints.counters.write_errors >= 1, 5, "a write error")
    count_frames(k, 1)                     # still deciding frames
    assert k.daemon.stats()["checkpoints"]["write_errors"] >= 1


@pytest.mark.parametrize("msg, why", [
    (b"K\x00\x00\x00", "truncated"),
    (struct.pack("<cB2xI", b"K", 2, 1) + b"x", "kind"),
    (struct.pack("<cB2xI", b"K", 0, 5) + b"x", "length"),
    (struct.pack("<cB2xI", b"K", 0, wire.MAX_CHECKPOINT + 1) + b"x" * (wire.MAX_CHECKPOINT + 1), "length"),
])
def test_wire_rejects_malformed_checkpoints(msg, why):
    with pytest.raises(wire.WireError, match=why):
        wire.decode(msg)
