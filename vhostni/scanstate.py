"""Scanner checkpoints: the small state a scanner asks the NI kernel to keep for it.

A scanner that restarts (it crashed, was killed, or the daemon restarted) would otherwise
forget what it knew: the Code-Red scanner, an attack in progress.  So a scanner may send
its state (``Scanner.checkpoint``, a ``K`` message, see :mod:`vhostni.scanner.wire`); the
kernel keeps the latest one per (NI, scanner name) and hands it back to that scanner, and
to no other, when it starts.  The bytes are the scanner's, untrusted: nothing here parses
them, they are only stored and returned.

Without a state directory checkpoints live in memory (they survive a scanner restart);
with one (``vhostni run --state-dir DIR``) they are also written to

    DIR/scanners/NI/SCANNER.ckpt     'VNCK' | version u8 | kind u8 | pad 2 | length u32 | data

and read back after a daemon restart.  Writes are coalesced: a scanner may checkpoint per
frame, but each (NI, scanner) is written at most once per ``flush_interval`` (and when the
daemon closes), atomically (temporary file, fsync, rename, directory fsync).  A file that
is torn, too long or of another version is ignored.  I/O errors are logged and counted,
never raised: the daemon goes on, the checkpoint stays in memory and is written again
later.  Memory is bounded by the number of scanners in the policies times their
``checkpoint_max_bytes`` (64 KiB at most: ``wire.MAX_CHECKPOINT``); a checkpoint is
dropped (memory and file) when its scanner leaves the policy or its NI is removed.
"""
from __future__ import annotations

import logging
import os
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

from .scanner import wire

log = logging.getLogger("vhostni.kernel")

FILE_HEADER = struct.Struct("<4sBB2xI")
FILE_MAGIC = b"VNCK"
FILE_VERSION = 1
FLUSH_INTERVAL = 1.0            # seconds between two writes of one scanner's checkpoint
ERROR_LOG_INTERVAL = 60.0       # an I/O error is logged at most this often (all are counted)
_NAME = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")


def _safe(name: str) -> bool:
    """Whether ``name`` can be a file or directory name under the state directory."""
    return bool(_NAME.match(name)) and name not in (".", "..")


@dataclass
class _Entry:
    kind: int
    data: bytes
    dirty: bool = False
    written_at: float = -1e18        # monotonic time of the last write (or attempt)


@dataclass
class CheckpointCounters:
    saved: int = 0                   # checkpoints scanners sent (and the kernel accepted)
    restored: int = 0                # checkpoints handed back to a starting scanner
    writes: int = 0                  # files written
    write_errors: int = 0
    read_errors: int = 0             # unreadable or malformed files (ignored)
    dropped: int = 0                 # forgotten with their scanner or NI
    errors: list = field(default_factory=list)   # the last few error messages


class CheckpointStore:
    def __init__(self, state_dir: Optional[str] = None, flush_interval: float = FLUSH_INTERVAL):
        self.dir = os.path.join(os.path.abspath(state_dir), "scanners") if state_dir else None
        self.flush_interval = flush_interval
        self._mem: dict[tuple[str, str], _Entry] = {}
        self._looked: set[tuple[str, str]] = set()       # keys whose file was read (or absent)
        self.counters = CheckpointCounters()
        self._last_error_log = -1e18

    # ---- paths
    def _path(self, ni: str, scanner: str) -> Optional[str]:
        if self.dir is None or not _safe(ni) or not _safe(scanner):
            return None
        return os.path.join(self.dir, ni, f"{scanner}.ckpt")

    def _error(self, what: str, exc: BaseException, write: bool) -> None:
        if write:
            self.counters.write_errors += 1
        else:
            self.counters.read_errors += 1
        msg = f"scanner checkpoints: {what}: {exc}"
        self.counters.errors = (self.counters.errors + [msg])[-5:]
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.error("%s (further errors counted, logged at most once a minute)", msg)

    # ---- what the kernel asks
    def get(self, ni: str, scanner: str) -> Optional[tuple[int, bytes]]:
        """The latest checkpoint of ``scanner`` of ``ni`` as (kind, data), or None."""
        key = (ni, scanner)
        if key not in self._mem and key not in self._looked:
            self._looked.add(key)
            loaded = self._load(ni, scanner)
            if loaded is not None:
                self._mem[key] = _Entry(*loaded)
        e = self._mem.get(key)
        return (e.kind, e.data) if e is not None and e.data else None

    def put(self, ni: str, scanner: str, kind: int, data: bytes) -> None:
        """Keeps ``data`` as the latest checkpoint (written to disk by :meth:`flush`)."""
        key = (ni, scanner)
        self._looked.add(key)         # what the scanner says now wins over any old file
        e = self._mem.get(key)
        if e is None:
            e = self._mem[key] = _Entry(kind, data)
        else:
            e.kind, e.data = kind, data
        e.dirty = self.dir is not None
        self.counters.saved += 1

    def drop(self, ni: str, scanner: str) -> None:
        """Forgets a scanner's checkpoint, in memory and on disk."""
        key = (ni, scanner)
        self._looked.discard(key)
        if self._mem.pop(key, None) is not None:
            self.counters.dropped += 1
        path = self._path(ni, scanner)
        if path is not None:
            self._unlink(path)

    def keep_only(self, ni: str, scanners: Iterable[str]) -> None:
        """Drops the checkpoints of ``ni``'s scanners not in ``scanners`` (they left its
        policy, perhaps while the daemon was down)."""
        keep = set(scanners)
        for key in [k for k in self._mem if k[0] == ni and k[1] not in keep]:
            self.drop(*key)
        self._looked = {k for k in self._looked if k[0] != ni or k[1] in keep}
        d = os.path.join(self.dir, ni) if self.dir is not None and _safe(ni) else None
        try:
            names = os.listdir(d) if d is not None else []
        except FileNotFoundError:
            return
        except OSError as exc:
            self._error(f"cannot list {d}", exc, write=False)
            return
        for fn in names:
            name, ext = os.path.splitext(fn)
            if ext == ".ckpt" and name not in keep:
                self.counters.dropped += 1
                self._unlink(os.path.join(d, fn))

    def drop_ni(self, ni: str) -> None:
        """Forgets every checkpoint of an NI that was removed."""
        self.keep_only(ni, ())
        d = os.path.join(self.dir, ni) if self.dir is not None and _safe(ni) else None
        if d is not None:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._error(f"cannot remove {d}", exc, write=True)

    def flush(self, force: bool = False) -> int:
        """Writes the checkpoints that changed, each at most once per ``flush_interval``
        (``force``: all of them now, as the daemon closes).  Returns how many it wrote."""
        if self.dir is None:
            return 0
        now = time.monotonic()
        n = 0
        for (ni, scanner), e in self._mem.items():
            if not e.dirty or (not force and now - e.written_at < self.flush_interval):
                continue
            e.written_at = now
            path = self._path(ni, scanner)
            if path is None:
                e.dirty = False      # a name that cannot be a file: kept in memory only
                continue
            try:
                if e.data:
                    self._write(path, e.kind, e.data)
                else:
                    self._unlink(path, raise_=True)
            except OSError as exc:
                self._error(f"cannot write {path}", exc, write=True)
                continue
            e.dirty = False
            n += 1
        self.counters.writes += n
        return n

    def info(self) -> dict:
        c = self.counters
        return {"dir": self.dir, "scanners": len(self._mem),
                "bytes": sum(len(e.data) for e in self._mem.values()),
                "unwritten": sum(1 for e in self._mem.values() if e.dirty),
                **{k: v for k, v in c.__dict__.items()}}

    # ---- files
    def _load(self, ni: str, scanner: str) -> Optional[tuple[int, bytes]]:
        path = self._path(ni, scanner)
        if path is None:
            return None
        limit = FILE_HEADER.size + wire.MAX_CHECKPOINT
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._error(f"cannot read {path}", exc, write=False)
            return None
        try:
            buf = b""
            while len(buf) <= limit:
                chunk = os.read(fd, limit + 1 - len(buf))
                if not chunk:
                    break
                buf += chunk
        except OSError as exc:
            self._error(f"cannot read {path}", exc, write=False)
            return None
        finally:
            os.close(fd)
        why = None
        if len(buf) > limit:
            why = "longer than any checkpoint"
        elif len(buf) < FILE_HEADER.size:
            why = "truncated header"
        else:
            magic, version, kind, length = FILE_HEADER.unpack_from(buf)
            if magic != FILE_MAGIC or version != FILE_VERSION:
                why = "not a version-1 checkpoint file"
            elif kind not in (wire.CHECKPOINT_BYTES, wire.CHECKPOINT_JSON):
                why = f"bad kind {kind}"
            elif length != len(buf) - FILE_HEADER.size:
                why = "length does not match (torn?)"
        if why is not None:
            self._error(f"ignoring {path}", ValueError(why), write=False)
            return None
        return kind, buf[FILE_HEADER.size:]

    def _write(self, path: str, kind: int, data: bytes) -> None:
        d = os.path.dirname(path)
        os.makedirs(d, mode=0o700, exist_ok=True)
        tmp = os.path.join(d, f".{os.path.basename(path)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, kind, len(data)) + data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(d)

    def _unlink(self, path: str, raise_: bool = False) -> None:
        try:
            os.unlink(path)
            _fsync_dir(os.path.dirname(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if raise_:
                raise
            self._error(f"cannot remove {path}", exc, write=True)


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
