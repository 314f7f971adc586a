"""Virus engines for scanners: ClamAV's clamd over one socket opened before the lockdown
(INSTREAM inside an IDSESSION), and a table of known-bad SHA-256 digests.  Shared by the e-mail
and web-download scanners (``scanners/email``, ``scanners/webdl``).

The scanner may not create sockets once locked down (seccomp), so it connects to clamd's unix
socket at start-up and keeps that connection for its whole life.  A plain ``zINSTREAM`` ends
the connection after one reply; ``zIDSESSION`` keeps it open for any number of requests, each
reply prefixed with its request number (``1: stream: OK``).  clamd closes an idle session after
its ``IdleTimeout`` (default 30 s), so :meth:`Clamd.ping` must run more often than that.  When
the connection is lost anyway (clamd restarted), :class:`ClamdError` says so and the scanner
exits: the NI kernel restarts it, and the new process connects again before its lockdown.

Protocol (clamd(8)): ``zINSTREAM\\0``, then chunks each prefixed by its length as a 4-byte
big-endian integer, then a zero length; the reply is ``stream: OK``, ``stream: NAME FOUND`` or
``... ERROR`` (``INSTREAM size limit exceeded. ERROR`` beyond StreamMaxLength).
"""
from __future__ import annotations

import re
import select
import socket
import struct
import time
from typing import Optional

__all__ = ["Clamd", "ClamdError", "parse_reply", "EngineError", "ClamdEngine", "digest_table"]

CHUNK = 64 * 1024


class ClamdError(Exception):
    """clamd is unreachable, went away, or answered nonsense."""


class EngineError(Exception):
    """The virus engine could not scan (raised by the engine callable)."""


def digest_table(entries) -> dict:
    """``["HEX [NAME]", ...]`` (SHA-256 digests in hex, optionally named) as {hex: name}; raises
    ValueError naming the first entry that is not one."""
    if not isinstance(entries, list):
        raise ValueError("expected a list of \"HEX [NAME]\"")
    table = {}
    for entry in entries:
        words = entry.split(None, 1) if isinstance(entry, str) else []
        if not words or not re.fullmatch(r"[0-9a-fA-F]{64}", words[0]):
            raise ValueError(f"{entry!r} is not a SHA-256 digest in hex")
        table[words[0].lower()] = words[1].strip() if len(words) > 1 else "known-bad"
    return table


def parse_reply(line: bytes) -> Optional[str]:
    """None for a clean ``stream: OK``, the signature name for ``stream: NAME FOUND``; raises
    ClamdError for errors and anything else."""
    text = line.rstrip(b"\0\n").decode("utf-8", "replace")
    if ": " in text and text.split(": ", 1)[0].isdigit():
        text = text.split(": ", 1)[1]           # the request number of a session
    if text == "stream: OK":
        return None
    if text.startswith("stream: ") and text.endswith(" FOUND"):
        return text[len("stream: "):-len(" FOUND")] or "unnamed"
    raise ClamdError(f"clamd: {text[:200]}")


class Clamd:
    def __init__(self, sock: socket.socket, timeout: float = 30.0):
        self.sock = sock
        self.timeout = timeout
        self.buf = b""
        self.seq = 0
        self.last_used = time.monotonic()
        self.sock.setblocking(False)
        self._send(b"zIDSESSION\0")

    @classmethod
    def connect(cls, path: str, timeout: float = 30.0) -> "Clamd":
        """Connects to clamd's unix socket (before the lockdown)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as exc:
            s.close()
            raise ClamdError(f"cannot connect to clamd at {path}: {exc}") from None
        return cls(s, timeout)

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + self.timeout
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClamdError("clamd does not read")
            _, w, _ = select.select([], [self.sock], [], left)
            if not w:
                continue
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise ClamdError(f"clamd connection lost: {exc}") from None
            view = view[n:]

    def _reply(self) -> bytes:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClamdError("clamd did not answer in time")
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            try:
                got = self.sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise ClamdError(f"clamd connection lost: {exc}") from None
            if not got:
                raise ClamdError("clamd closed the connection")
            self.buf += got
            if len(self.buf) > 65536:
                raise ClamdError("clamd reply too long")
        line, _, self.buf = self.buf.partition(b"\0")
        self.last_used = time.monotonic()
        return line

    def scan(self, data: bytes) -> Optional[str]:
        """None if clean, else the signature name.  Raises ClamdError."""
        out = [b"zINSTREAM\0"]
        for i in range(0, len(data), CHUNK):
            piece = data[i:i + CHUNK]
            out += [struct.pack(">I", len(piece)), piece]
        out.append(struct.pack(">I", 0))
        self.seq += 1
        self._send(b"".join(out))
        return parse_reply(self._reply())

    def ping(self) -> None:
        self.seq += 1
        self._send(b"zPING\0")
        line = self._reply().decode("utf-8", "replace")
        if not line.endswith("PONG"):
            raise ClamdError(f"clamd: {line[:200]}")

    def close(self) -> None:
        try:
            self._send(b"zEND\0")
        except ClamdError:
            pass
        self.sock.close()


class ClamdEngine:
    """A scanner's engine callable over a :class:`Clamd` session: ``engine(data)`` is None (clean)
    or the signature name, and raises :class:`EngineError` when clamd cannot scan.  ``lost``
    says (once the session is gone) why: the scanner then alerts and exits, so that the NI
    kernel restarts it and the new process connects again before its lockdown."""

    def __init__(self, clamd: Clamd):
        self.clamd = clamd
        self.lost: str = ""

    def __call__(self, data: bytes):
        if self.lost:
            raise EngineError(self.lost)
        try:
            return self.clamd.scan(data)
        except ClamdError as exc:
            if "connection" in str(exc) or "closed" in str(exc) or "in time" in str(exc) \
                    or "does not read" in str(exc):
                self.lost = str(exc)
            raise EngineError(str(exc)) from None

    def keepalive(self, interval: float) -> None:
        """PINGs clamd if the session was idle for ``interval`` seconds (below its IdleTimeout);
        a failure sets ``lost``."""
        if not self.lost and time.monotonic() - self.clamd.last_used > interval:
            try:
                self.clamd.ping()
            except ClamdError as exc:
                self.lost = str(exc)
