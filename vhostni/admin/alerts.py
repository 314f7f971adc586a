"""Reading the alert log for ``query-alerts``, and the syslog sink.

The JSON-lines log (vhostni.alertlog.AlertLog) is the record: every alert is on disk,
fsynced, before anyone hears of it, numbered by ``seq`` (while the log cannot be written,
alerts are heard first, marked not durable, and written later or counted as lost, a
marker alert saying which seqs: see AlertLog).  ``query-alerts`` reads it back, so
an administrator who was not connected (or whose client was dropped) asks for everything
after the last ``seq`` it saw and misses nothing the log still holds, across rotations.

Reading runs on the daemon's only thread, between turns of the data plane, so its work is
bounded: files and offsets are found by ``seq`` (binary search: lines are in ``seq``
order), and one call reads at most ``budget`` bytes.  A call that stops early says
``more`` and where to go on (``next-seq``).
"""
from __future__ import annotations

import collections
import json
import os
import socket
import time
from typing import IO, Iterable, Optional

from ..alertlog import last_seq as _last_seq, line_seq as _seq
from ..logtext import printable

SCAN_BUDGET = 4 << 20           # bytes of log one query-alerts reads at most
REPLY_BUDGET = 1 << 20          # bytes of alerts one reply carries at most


def _first_seq(path: str) -> Optional[int]:
    try:
        with open(path, "rb") as f:
            for _ in range(16):
                line = f.readline(1 << 20)
                if not line:
                    return None
                s = _seq(line)
                if s is not None:
                    return s
    except OSError:
        return None
    return None


def _offset_after(f: IO[bytes], size: int, since: int) -> int:
    """A line start at or before the first line whose seq is greater than ``since``."""
    lo, hi = 0, size          # every line that starts before lo has seq <= since
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        f.seek(mid)
        f.readline()
        seq = None
        while seq is None and f.tell() < size:
            seq = _seq(f.readline())
        if seq is None or seq > since:
            hi = mid
        else:
            lo = f.tell()
    return lo


def read_alerts(files: Iterable[str], since: int = 0, ni: Optional[str] = None,
                scanner: Optional[str] = None, limit: int = 100,
                budget: int = SCAN_BUDGET) -> dict:
    """Alerts with seq > ``since`` matching the filters, oldest first, from ``files`` (oldest
    file first).  Returns {alerts, more, next-seq, oldest-seq}: ask again with
    since-seq=next-seq while ``more``."""
    files = list(files)
    out: list[dict] = []
    reply_bytes = 0
    scanned = 0
    cursor = since
    oldest = _first_seq(files[0]) if files else None
    # skip whole files that end at or before ``since``
    start = 0
    for i, path in enumerate(files[:-1]):
        last = _last_seq(path)
        if last is not None and last <= since:
            start = i + 1
    for path in files[start:]:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            continue
        with f:
            size = os.fstat(f.fileno()).st_size
            f.seek(_offset_after(f, size, since))
            while True:
                line = f.readline(1 << 20)
                if not line:
                    break
                if not line.endswith(b"\n"):
                    break                     # a torn (or still being written) last line
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                seq = rec.get("seq") if isinstance(rec, dict) else None
                if not isinstance(seq, int) or seq <= since:
                    continue                  # (at most a few KiB after the binary search)
                scanned += len(line)
                if ni is not None and rec.get("ni") != ni:
                    cursor = seq
                elif scanner is not None and rec.get("scanner") != scanner:
                    cursor = seq
                else:
                    if len(out) >= limit or reply_bytes + len(line) > REPLY_BUDGET:
                        return {"alerts": out, "more": True, "next-seq": cursor, "oldest-seq": oldest}
                    out.append(rec)
                    reply_bytes += len(line)
                    cursor = seq
                if scanned >= budget:
                    return {"alerts": out, "more": True, "next-seq": cursor, "oldest-seq": oldest}
    return {"alerts": out, "more": False, "next-seq": cursor, "oldest-seq": oldest}


def read_recent(recent: list[dict], since: int = 0, ni: Optional[str] = None,
                scanner: Optional[str] = None, limit: int = 100) -> dict:
    """The same answer from the in-memory tail (a daemon without an alert log)."""
    out = []
    cursor = since
    for rec in recent:
        if rec["seq"] <= since:
            continue
        if (ni is None or rec.get("ni") == ni) and (scanner is None or rec.get("scanner") == scanner):
            if len(out) >= limit:
                return {"alerts": out, "more": True, "next-seq": cursor,
                        "oldest-seq": recent[0]["seq"] if recent else None}
            out.append(rec)
        cursor = rec["seq"]
    return {"alerts": out, "more": False, "next-seq": cursor,
            "oldest-seq": recent[0]["seq"] if recent else None}


LOG_DAEMON = 3
LOG_WARNING = 4


class SyslogSink:
    """A copy of every alert to syslog, as an AlertLog listener.

    A non-blocking datagram to ``address`` (default /dev/log), RFC 3164 framing, facility
    daemon, severity warning.  The log file is the record, so this never blocks: when the
    syslog daemon's queue is full, copies wait in a bounded backlog (``backlog`` messages,
    in order) that :meth:`flush` (the daemon's housekeeping) retries; past that they are
    dropped and counted in ``dropped``."""

    def __init__(self, address: str = "/dev/log", ident: str = "vhostni", backlog: int = 10000):
        self.address = address
        self.ident = ident
        self.sent = 0
        self.dropped = 0
        self.backlog: collections.deque[bytes] = collections.deque()
        self.max_backlog = backlog
        self.sock = socket.socket(socket.AF_UNIX,
                                  socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)

    def format(self, rec: dict) -> bytes:
        pri = LOG_DAEMON * 8 + LOG_WARNING
        stamp = time.strftime("%b %d %H:%M:%S", time.localtime(rec.get("time", time.time())))
        fields = rec.get("fields")
        # one line of text: a scanner's newline or escape sequence must not forge another
        text = (f"<{pri}>{stamp} {self.ident}[{os.getpid()}]: ALERT seq={rec.get('seq')} "
                f"ni={printable(rec.get('ni'), 64)} scanner={printable(rec.get('scanner') or '-', 64)}: "
                f"{printable(rec.get('message'), 4096)}")
        if fields:
            text += " " + json.dumps(fields, default=str, separators=(",", ":"))
        return text.encode("utf-8", "replace")[:8000]

    def __call__(self, rec: dict) -> None:
        if len(self.backlog) >= self.max_backlog:
            self.dropped += 1
            return
        self.backlog.append(self.format(rec))
        self.flush()

    def flush(self) -> None:
        while self.backlog:
            try:
                self.sock.sendto(self.backlog[0], self.address)
            except (BlockingIOError, InterruptedError):
                return                       # its queue is full: retried at housekeeping
            except OSError:
                # no syslog daemon there (or it is restarting): this copy is lost
                self.dropped += 1
            else:
                self.sent += 1
            self.backlog.popleft()

    def close(self) -> None:
        self.flush()
        self.sock.close()
