"""The scanner SDK: write a vhostni scanner like a socket program.

    from vhostni.scanner import Scanner

    sc = Scanner.connect()                       # the NI kernel started us; seccomp from here on
    sc.subscribe({"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn,!ack"}, contain=True)
    for frame in sc.frames():
        if looks_bad(frame.data):
            sc.cut(frame)
            sc.alert("bad SYN", dst=...)
        else:
            sc.pass_(frame)

A scanner is an untrusted process: it gets only the traffic its subscriptions match and its
policy allows, decides held frames (pass or cut), sends alerts to the administrator and
injects frames the administrator pre-registered.  This package imports nothing of the NI
kernel; the wire format is documented in :mod:`vhostni.scanner.wire`.
"""
from __future__ import annotations

import collections
import os
import select
import socket
import time
from typing import Iterator, Optional, Union

from . import wire
from .wire import CUT, FROM_GUEST, PASS, TO_GUEST, Frame

__all__ = ["Scanner", "Frame", "ScannerError", "Refused", "FROM_GUEST", "TO_GUEST"]

ENV_FD = "VHOSTNI_SCANNER_FD"


class ScannerError(Exception):
    """The NI kernel went away or spoke nonsense."""


class Refused(ScannerError):
    """The NI kernel refused a request (outside this scanner's rights, or malformed)."""


class Scanner:
    def __init__(self, sock: socket.socket, lockdown: bool = True):
        self.sock = sock
        self._pending: collections.deque = collections.deque()
        self._next_id = 0
        hello = self._wait_control(lambda b: b.get("op") == "hello", timeout=30)
        self.name: str = hello.get("scanner", "")
        self.ni: str = hello.get("ni", "")
        self.config: dict = hello.get("config") or {}
        self.injections: list = hello.get("injections") or []
        if lockdown:
            from . import seccomp
            seccomp.lockdown()

    @classmethod
    def connect(cls, fd: Optional[int] = None, lockdown: bool = True) -> "Scanner":
        """Attaches to the socket the NI kernel gave this process (``$VHOSTNI_SCANNER_FD``)
        and, unless ``lockdown=False``, installs the seccomp allow-list: do any start-up that
        needs files before calling this."""
        if fd is None:
            try:
                fd = int(os.environ[ENV_FD])
            except (KeyError, ValueError):
                raise ScannerError(f"not started by a vhostni NI kernel (${ENV_FD} unset)") from None
        sock = socket.socket(fileno=fd)
        return cls(sock, lockdown=lockdown)

    # ---- receiving
    def _recv(self, timeout: Optional[float]) -> Optional[wire.Message]:
        if timeout is not None:
            r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            if not r:
                return None
        data = self.sock.recv(wire.MAX_MESSAGE)
        if not data:
            raise ScannerError("the NI kernel closed the connection")
        try:
            return wire.decode(data)
        except wire.WireError as exc:
            raise ScannerError(f"bad message from the NI kernel: {exc}") from None

    def _wait_control(self, want, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ScannerError("the NI kernel did not answer in time")
            msg = self._recv(left)
            if isinstance(msg, wire.Control) and want(msg.body):
                return msg.body
            if msg is not None:
                self._pending.append(msg)   # frames that arrived meanwhile

    def recv(self, timeout: Optional[float] = None) -> Optional[Frame]:
        """The next frame, or None if ``timeout`` seconds pass without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._pending:
                msg = self._pending.popleft()
                if isinstance(msg, Frame):
                    return msg
                self._control(msg)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            msg = self._recv(left)
            if msg is None:
                return None
            if isinstance(msg, Frame):
                return msg
            self._control(msg)

    def _control(self, msg: wire.Message) -> None:
        """A control message met between frames.  ``sync`` is answered here: the scanner
        asks for its next frame only once it has handled every earlier one, so the answer
        tells the kernel that everything sent before it has been seen, and every decision
        and alert it caused sent (offline replay waits for this)."""
        if isinstance(msg, wire.Control) and msg.body.get("op") == "sync":
            self.sock.send(wire.encode_control({"op": "synced", "id": msg.body.get("id")}))

    def frames(self, timeout: Optional[float] = None) -> Iterator[Optional[Frame]]:
        """Yields frames forever; with ``timeout``, yields None after each quiet interval
        so the scanner can do timed work."""
        while True:
            yield self.recv(timeout)

    # ---- requests
    def _request(self, body: dict) -> dict:
        self._next_id += 1
        body = dict(body, id=self._next_id)
        self.sock.send(wire.encode_control(body))
        rid = self._next_id
        reply = self._wait_control(lambda b: b.get("op") == "reply" and b.get("id") == rid,
                                   timeout=30)
        if not reply.get("ok"):
            raise Refused(reply.get("error", "refused"))
        return reply

    def subscribe(self, match: dict, contain: bool = False) -> None:
        """Asks for frames matching ``match``; ``contain`` asks to hold and decide them."""
        self._request({"op": "subscribe", "match": match, "contain": bool(contain)})

    def inject(self, index: int, direction: Union[int, str] = TO_GUEST) -> None:
        """Sends pre-registered frame ``index`` to the guest (or from it, into the network)."""
        if isinstance(direction, int):
            direction = wire.DIRECTION_NAMES[direction]
        self._request({"op": "inject", "index": int(index), "direction": direction})

    def alert(self, message: str, /, **fields) -> None:
        """Sends an alert to the administrator (the kernel rate-limits them)."""
        self.sock.send(wire.encode_control({"op": "alert", "message": str(message), "fields": fields}))

    # ---- decisions
    def decide(self, frame: Union[Frame, int], verdict: int) -> None:
        number = frame.number if isinstance(frame, Frame) else int(frame)
        self.sock.send(wire.encode_decision(number, verdict))

    def pass_(self, frame: Union[Frame, int]) -> None:
        self.decide(frame, PASS)

    def cut(self, frame: Union[Frame, int]) -> None:
        self.decide(frame, CUT)

    def close(self) -> None:
        self.sock.close()
