"""The alert log: an append-only, fsynced JSON-lines file, written by a writer thread.

An alert is durable before anyone hears of it: AlertLog.append queues the record, the
writer thread writes and fsyncs it (group commit), and the daemon's thread then hands it
to listeners (QMP events, sinks).  The reader of the log (query-alerts) is
vhostni.admin.alerts; both read sequence numbers with :func:`last_seq`.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from typing import Callable, Optional

from .logtext import printable

log = logging.getLogger("vhostni.kernel")    # the kernel's logger, as before this module split


ALERT_PENDING_MAX = 10000      # alerts held in memory while the log cannot be written
ALERT_RETRY_S = 1.0            # how often a failing alert log is tried again
ALERT_LOG_FIELDS = 8           # fields the daemon's log line for an alert names at most


def line_seq(line: bytes) -> Optional[int]:
    """The ``seq`` of one log line; None if the line is not an alert record."""
    try:
        v = json.loads(line)["seq"]
    except (ValueError, KeyError, TypeError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def last_seq(path: str) -> Optional[int]:
    """The ``seq`` of the last record in one log file (read from its last 64 KiB); None if
    the file cannot be read or holds no record there."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        s = line_seq(line)
        if s is not None:
            return s
    return None


def _finite(v, depth: int = 0):
    """``v`` with non-finite floats as the strings "NaN", "Infinity", "-Infinity"."""
    if isinstance(v, float) and v != v:
        return "NaN"
    if isinstance(v, float) and v in (float("inf"), float("-inf")):
        return "Infinity" if v > 0 else "-Infinity"
    if depth < 64 and isinstance(v, dict):
        return {k: _finite(x, depth + 1) for k, x in v.items()}
    if depth < 64 and isinstance(v, (list, tuple)):
        return [_finite(x, depth + 1) for x in v]
    return v


def encode_alert(rec: dict) -> str:
    """One alert as one line of strict JSON (RFC 8259): a non-finite float (NaN, Infinity,
    which Python's json would write bare and strict parsers refuse) is written as a string;
    a value JSON has no type for, as its str()."""
    try:
        return json.dumps(rec, default=str, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_finite(rec), default=str, separators=(",", ":"), allow_nan=False)


def alert_summary(rec: dict) -> str:
    """The daemon's log line for an alert: bounded and escaped (the alert log has it all)."""
    text = (f"ALERT #{rec['seq']} ni={printable(rec.get('ni'), 64)} "
            f"scanner={printable(rec.get('scanner') or '-', 64)}: {printable(rec.get('message'), 300)}")
    fields = rec.get("fields") or {}
    parts = []
    for k, v in list(fields.items())[:ALERT_LOG_FIELDS]:
        if isinstance(v, (bool, int, float)) or v is None:
            shown = str(v)
        elif isinstance(v, str) and len(v) <= 64:
            shown = printable(v, 64)
        elif isinstance(v, (str, bytes, list, dict)):
            shown = f"<{type(v).__name__} of {len(v)}>"
        else:
            shown = f"<{type(v).__name__}>"
        parts.append(f"{printable(k, 32)}={shown}")
    if len(fields) > ALERT_LOG_FIELDS:
        parts.append(f"(+{len(fields) - ALERT_LOG_FIELDS} fields)")
    return text + (" [" + " ".join(parts) + "]" if parts else "")


class AlertLog:
    """Alerts are never lost while the log can be written: each is appended to a JSON-lines
    file (strict JSON, one alert a line) and fsynced before anyone else hears of it (the
    ``listeners``: QMP events, syslog, containment); each carries a sequence number that
    survives restarts.

    With ``max_bytes`` the log rotates by size: PATH becomes PATH.1 (PATH.1 becomes PATH.2
    ...), ``keep`` rotated files are kept; :meth:`files` lists them oldest first.

    Writing: by default :meth:`append` writes and fsyncs at once, on the caller's thread.
    After :meth:`start_writer` (the daemon) a writer thread does it, so that an fsync never
    stalls the thread that moves frames: ``append`` queues the alert and returns; the writer
    writes everything queued, fsyncs once for the batch (group commit) and wakes the
    daemon's thread, which then hands the now durable alerts to the listeners, in order.
    The promise is the same both ways: durable before anyone hears of it.

    When the log cannot be written (a full file system, an I/O error) nothing stops: the
    NIs keep forwarding under their policies, and

    * the failure is loud: a log line, the status event ALERT_LOG_FAILED (``on_status``:
      the kernel's events, so QMP clients get it), and :meth:`info` (``error``,
      ``pending``, ``lost``, ``write_errors``) in ``query-alert-log`` and the stats;
    * the alerts not yet written, and those raised meanwhile, go to the listeners at once,
      marked ``"durable": false`` (containment and the administrator must not wait for a
      disk), and are held in memory, in order, up to ``max_pending``; beyond that they are
      counted as lost (still heard, never written);
    * the log is tried again every ALERT_RETRY_S; once it can be written, what was held is
      written (after cutting off any torn line the failure left), ALERT_LOG_RECOVERED is
      sent, then, if alerts were lost, a marker alert (``ni`` and ``scanner`` null,
      ``fields.lost`` = how many, ``first_seq``/``last_seq`` = which) with the next seq.
      Seqs in the file stay increasing; a gap is always explained by a marker.
    """

    def __init__(self, path: Optional[str], max_bytes: int = 0, keep: int = 5,
                 max_pending: int = ALERT_PENDING_MAX):
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.max_pending = max_pending
        self.seq = 0
        self.listeners: list[Callable[[dict], None]] = []
        self.on_status: list[Callable[[str, dict], None]] = []   # ALERT_LOG_FAILED/RECOVERED
        self.recent: list[dict] = []
        # shared with the writer thread, under _lock:
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self.pending: collections.deque = collections.deque()  # [rec, line, heard] not durable
        self._ready: collections.deque = collections.deque()   # for the daemon's thread, in order
        self.lost = 0                  # alerts never written (held queue full), since start
        self.write_errors = 0
        self.error: Optional[str] = None          # why the log cannot be written now
        self.failed_at: Optional[float] = None
        self._gap: Optional[list] = None          # [first seq, last seq, count] lost, unmarked
        self._next_retry = 0.0
        self._stop = False
        self._delivering = False
        self._thread: Optional[threading.Thread] = None
        self._wake_r = self._wake_w = None
        self._unregister: Optional[Callable[[int], None]] = None
        # the file: only the writer touches these (or the caller, without a writer)
        self._fd: Optional[int] = None
        self._size = 0                 # bytes of the current file known durable
        self._torn = False             # the file ends without a newline (an earlier crash)
        if path:
            for p in reversed(self.files()):
                self.seq = last_seq(p) or 0
                if self.seq:
                    break

    def files(self) -> list[str]:
        """The log's files that exist, oldest first (rotated ones, then the current)."""
        if not self.path:
            return []
        names = [f"{self.path}.{i}" for i in range(max(self.keep, 0), 0, -1)] + [self.path]
        return [p for p in names if os.path.exists(p)]

    def info(self) -> dict:
        with self._lock:
            return {"path": self.path, "seq": self.seq, "pending": len(self.pending),
                    "lost": self.lost, "write_errors": self.write_errors, "error": self.error,
                    "failing_for": round(time.monotonic() - self.failed_at, 3)
                    if self.failed_at else None,
                    "writer": self._thread is not None}

    # ---- the writer thread
    def start_writer(self, register: Callable[[int, Callable[[], None]], None],
                     unregister: Callable[[int], None]) -> None:
        """Moves writing to a thread of its own; ``register(fd, handler)`` puts the pipe it
        wakes the caller's thread with into that thread's epoll set."""
        if self._thread is not None or not self.path:
            return
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        register(self._wake_r, self._on_wake)
        self._unregister = unregister
        self._thread = threading.Thread(target=self._writer, name="vhostni-alert-log", daemon=True)
        self._thread.start()

    def _writer(self) -> None:
        while True:
            with self._cv:
                while not self._stop:
                    if self.pending and (self.error is None or time.monotonic() >= self._next_retry):
                        break
                    self._cv.wait(None if not self.pending else
                                  max(0.01, self._next_retry - time.monotonic()))
                if self._stop:
                    return
            try:
                self._write_step()
            except Exception:        # noqa: BLE001 - a bug here must not end alerting silently
                log.exception("alert log writer")
                with self._lock:
                    self._failed(OSError("internal error in the alert log writer"))
            if self._ready:
                try:
                    os.write(self._wake_w, b"\0")
                except OSError:
                    pass             # full: the daemon is already being woken

    def _on_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass
        self._deliver_ready()

    # ---- writing (the writer thread, or the caller's without one)
    def _write_step(self) -> None:
        """Writes what is held; marks the failure or the recovery."""
        with self._lock:
            lines = [e[1] for e in self.pending]
        if lines:
            try:
                self._write_lines(lines)
            except OSError as exc:
                with self._lock:
                    self._failed(exc)
                return
        with self._lock:
            # alerts queued during the write were heard already (the log was failing): they
            # are written next, and need not wait for the recovery to be declared
            if self.error is not None:
                gap, error = self._gap, self.error
                self._ready.append(("status", "ALERT_LOG_RECOVERED", {
                    "path": self.path, "lost": gap[2] if gap else 0, "lost_total": self.lost,
                    "failed_for": round(time.monotonic() - self.failed_at, 3)}))
                if gap is not None:
                    self._ready.append(("marker", gap, error))
                self.error = self.failed_at = self._gap = None

    def _write_lines(self, lines: list[str]) -> None:
        """Writes and fsyncs ``lines`` in order (rotating as needed; each fsync hands the
        lines it made durable to :meth:`_made_durable`); OSError leaves the file cut back
        to its last durable size."""
        try:
            if self._fd is None:
                self._open()
            elif os.fstat(self._fd).st_size != self._size:
                os.ftruncate(self._fd, self._size)   # a torn or unsynced tail of a failed write
            buf = bytearray(b"\n" if self._torn else b"")
            count = 0              # lines in buf
            for line in lines:
                data = line.encode() + b"\n"
                if (self.max_bytes and self._size + len(buf) + len(data) > self.max_bytes
                        and self._size + len(buf)):
                    self._write_all(buf)
                    self._made_durable(count, len(buf))
                    buf, count = bytearray(), 0
                    self._rotate()
                    self._open()
                buf += data
                count += 1
            self._write_all(buf)
            self._made_durable(count, len(buf))
        except OSError:
            if self._fd is not None:
                try:
                    os.ftruncate(self._fd, self._size)
                except OSError:
                    pass          # tried again before the next write
            raise

    def _open(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            size = os.fstat(fd).st_size
            # a last line without its newline (the daemon died writing it): end it, so the
            # next alert is a line of its own (readers skip the torn one)
            self._torn = size > 0 and self._last_byte(size) != b"\n"
        except OSError:
            os.close(fd)
            raise
        self._fd, self._size = fd, size

    def _last_byte(self, size: int) -> bytes:
        rfd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(rfd, 1, size - 1)
        finally:
            os.close(rfd)

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = None
        if self.keep <= 0:
            os.unlink(self.path)
        else:
            for i in range(self.keep - 1, 0, -1):
                if os.path.exists(f"{self.path}.{i}"):
                    os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        d = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(d)
        finally:
            os.close(d)

    def _write_all(self, buf: bytes) -> None:
        view = memoryview(buf)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def _made_durable(self, lines: int, nbytes: int) -> None:
        self._size += nbytes
        self._torn = False
        with self._lock:
            for _ in range(lines):
                rec, _, heard = self.pending.popleft()
                if not heard:
                    self._ready.append(("alert", rec, True))

    def _failed(self, exc: Exception) -> None:
        """(under _lock) The log cannot be written: what waits for it is heard now."""
        self.write_errors += 1
        self._next_retry = time.monotonic() + ALERT_RETRY_S
        first = self.error is None
        self.error = str(exc)
        if first:
            self.failed_at = time.monotonic()
            self._ready.append(("status", "ALERT_LOG_FAILED", {
                "path": self.path, "error": self.error, "pending": len(self.pending),
                "lost": self.lost}))
        for e in self.pending:
            if not e[2]:
                e[2] = True
                self._ready.append(("alert", e[0], False))

    # ---- hearing (the daemon's thread)
    def _deliver_ready(self) -> None:
        # one item at a time, never re-entered (a listener may append an alert): listeners
        # hear everything in the order it became ready
        if self._delivering:
            return
        self._delivering = True
        try:
            while True:
                with self._lock:
                    if not self._ready:
                        return
                    item = self._ready.popleft()
                self._deliver(item)
        finally:
            self._delivering = False

    def _deliver(self, item: tuple) -> None:
        if item[0] == "alert":
            self._hear(item[1], item[2])
        elif item[0] == "status":
            _, name, data = item
            if name == "ALERT_LOG_FAILED":
                log.error("alert log %s cannot be written (%s): alerts go on to their "
                          "listeners without being durable; up to %d are held and written "
                          "when it can be", self.path, data["error"], self.max_pending)
            else:
                log.warning("alert log %s written again after %.1f s; %d alerts lost meanwhile",
                            self.path, data["failed_for"], data["lost"])
            self._status(name, **data)
        else:
            _, gap, error = item
            self._append(None, None, f"alert log: {gap[2]} alerts lost while it could not "
                         f"be written ({error})", {"lost": gap[2], "first_seq": gap[0],
                                                   "last_seq": gap[1], "error": error})

    def _hear(self, rec: dict, durable: bool) -> None:
        heard = rec if durable else dict(rec, durable=False)
        for fn in self.listeners:
            try:
                fn(heard)
            except Exception:      # noqa: BLE001 - one listener's bug must not stop the others
                log.exception("alert #%d: a listener failed", rec["seq"])

    def _status(self, name: str, **data) -> None:
        for fn in self.on_status:
            try:
                fn(name, data)
            except Exception:      # noqa: BLE001 - a listener's bug must not stop alerts
                log.exception("alert log: %s not delivered", name)

    def retry(self) -> None:
        """Housekeeping: without a writer thread, tries a failing log again (at most every
        ALERT_RETRY_S); with one, delivers what it has made durable (should a wake-up have
        been missed)."""
        if self._thread is None and self.error is not None and time.monotonic() >= self._next_retry:
            self._write_step()
        if self._ready:
            self._deliver_ready()

    def flush(self, timeout: float = 5.0) -> bool:
        """Waits (up to ``timeout`` s) until every alert appended so far is durable or the
        log is failing, then delivers what is ready; on the daemon's thread (tests, tools
        that read the file right after an append).  True if nothing is pending."""
        end = time.monotonic() + timeout
        while self._thread is not None and time.monotonic() < end:
            with self._lock:
                if not self.pending or self.error is not None:
                    break
            time.sleep(0.001)
        self._deliver_ready()
        with self._lock:
            return not self.pending

    def append(self, ni: str, scanner: Optional[str], message: str, /, **fields) -> dict:
        return self._append(ni, scanner, message, fields)

    def _append(self, ni, scanner, message, fields: dict) -> dict:
        self.seq += 1
        rec = {"seq": self.seq, "time": time.time(), "ni": ni, "scanner": scanner,
               "message": message}
        if fields:
            rec["fields"] = fields
        try:
            line = json.dumps(rec, default=str, separators=(",", ":"), allow_nan=False)
        except ValueError:      # NaN/Infinity: as strings, in the file and for the listeners
            rec = _finite(rec)
            line = encode_alert(rec)
        log.warning("%s", alert_summary(rec))
        self.recent.append(rec)
        del self.recent[:-1000]
        if not self.path:
            self._hear(rec, True)
            return rec
        with self._lock:
            if self.error is not None and len(self.pending) >= self.max_pending:
                self.lost += 1
                if self._gap is None:
                    self._gap = [rec["seq"], rec["seq"], 0]
                self._gap[1] = rec["seq"]
                self._gap[2] += 1
                self._ready.append(("alert", rec, False))
            else:
                failing = self.error is not None
                self.pending.append([rec, line, failing])
                if failing:
                    self._ready.append(("alert", rec, False))
                self._cv.notify()
        if self._thread is None and (self.error is None or time.monotonic() >= self._next_retry):
            self._write_step()
        if self._thread is None or self.error is not None:
            self._deliver_ready()          # (with a writer: only what is heard at once)
        return rec

    def close(self) -> None:
        if self._thread is not None:
            with self._cv:
                self._stop = True
                self._cv.notify()
            self._thread.join(10)
            stuck = self._thread.is_alive()  # in an fsync that does not return (a dead disk)
            self._thread = None
            if self._unregister is not None:
                self._unregister(self._wake_r)
            os.close(self._wake_r)
            os.close(self._wake_w)
            if stuck:
                log.error("alert log %s: the writer is stuck in a write; %d alerts not known "
                          "durable", self.path, len(self.pending))
                return
        if self.pending and self.path:
            self._write_step()               # a last try, on this thread
        self._deliver_ready()
        if self.pending or self._gap:
            log.error("alert log %s: %d alerts held in memory and %d lost were never written",
                      self.path, len(self.pending), self._gap[2] if self._gap else 0)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
