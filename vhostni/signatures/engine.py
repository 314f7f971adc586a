"""Python face of the signature matcher (csrc/sig.c): build a database from compiled rules, scan
blocks and streams.  Configuration and tests cross this boundary; the data path will call the C
functions directly (no Python per packet)."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

from .._fastpath import ffi, lib
from .rules import Problem, Rule, encode

STAT_FIELDS = tuple(name for name, _ in ffi.typeof("struct vn_sig_stats").fields)
DEFAULT_LOOKBACK = 8192
DEFAULT_STREAM_MEMCAP = 256 << 20
MAX_BUILD_ERRORS = 1024

_ERRORS = {lib.VN_SIG_EINVAL: "invalid input", lib.VN_SIG_ENOMEM: "out of memory",
           lib.VN_SIG_EMEMCAP: "stream memcap reached", lib.VN_SIG_ECOMPILE: "Hyperscan compile failed",
           lib.VN_SIG_ESCAN: "Hyperscan scan failed"}


class SigError(Exception):
    def __init__(self, what: str, code: int):
        self.code = code
        super().__init__(f"{what}: {_ERRORS.get(code, code)}")


@dataclass(frozen=True)
class Match:
    rule: Rule
    index: int        # the rule's position in the database's rule list
    offset: int       # stream/packet offset just past the last byte the match needed
    limit: bool = False   # a confirmation hit a limit (PCRE2's, the step limit): not proven; the
    #                       caller's exception policy decides (fail closed by default)


class SignatureDB:
    """One matcher database: ``mode`` 'packet' (block mode) or 'stream' (Hyperscan stream mode).

    Rules Hyperscan or PCRE2 reject are left out and listed in ``problems`` (with file:line).
    Owned by one thread."""

    def __init__(self, rules: Sequence[Rule], mode: str, lookback: int = DEFAULT_LOOKBACK,
                 stream_memcap: int = DEFAULT_STREAM_MEMCAP, ids: Optional[Sequence[int]] = None):
        if mode not in ("packet", "stream"):
            raise ValueError("mode is 'packet' or 'stream'")
        self.rules = list(rules)
        self.mode = mode
        # the C database names a rule by its id: by default its index here
        self._byid = dict(zip(ids, self.rules)) if ids is not None else dict(enumerate(self.rules))
        blob = encode(self.rules, ids)
        errs = ffi.new("struct vn_sig_build_error[]", MAX_BUILD_ERRORS)
        nerrs = ffi.new("uint32_t *")
        rc = ffi.new("int *")
        cmode = lib.VN_SIG_MODE_STREAM if mode == "stream" else lib.VN_SIG_MODE_BLOCK
        self._db = lib.vn_sig_db_build(blob, len(blob), cmode, lookback, stream_memcap,
                                       errs, MAX_BUILD_ERRORS, nerrs, rc)
        if self._db == ffi.NULL:
            raise SigError("build", rc[0])
        self.problems: list[Problem] = []
        for i in range(min(nerrs[0], MAX_BUILD_ERRORS)):
            idx, msg = errs[i].rule, ffi.string(errs[i].message).decode(errors="replace")
            r = self._byid.get(idx)
            self.problems.append(Problem(r.file if r else "<rules>", r.line if r else 0,
                                         r.sid if r else None, msg))
        self._out = ffi.new("struct vn_sig_match[]", max(1, len(self.rules)))
        self._streams: "weakref.WeakSet[Stream]" = weakref.WeakSet()

    def close(self) -> None:
        if self._db != ffi.NULL:
            for s in list(self._streams):     # their state belongs to this database
                s.close()
            lib.vn_sig_db_free(self._db)
            self._db = ffi.NULL

    def _live(self):
        if self._db == ffi.NULL:
            raise ValueError("signature database closed")
        return self._db

    def __enter__(self) -> "SignatureDB":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _matches(self, n: int, what: str) -> list[Match]:
        if n < 0:
            raise SigError(what, n)
        return [Match(self._byid[self._out[i].rule], self._out[i].rule, self._out[i].offset,
                      bool(self._out[i].flags & lib.VN_SIG_F_LIMIT)) for i in range(n)]

    def scan(self, data: bytes) -> list[Match]:
        """Block mode: the rules that match this one payload."""
        return self._matches(lib.vn_sig_scan_block(self._live(), data, len(data), self._out,
                                                   len(self.rules)), "scan")

    def open_stream(self) -> "Stream":
        rc = ffi.new("int *")
        st = lib.vn_sig_stream_open(self._live(), rc)
        if st == ffi.NULL:
            raise SigError("open stream", rc[0])
        s = Stream(self, st)
        self._streams.add(s)
        return s

    def stats(self) -> dict:
        s = ffi.new("struct vn_sig_stats *")
        lib.vn_sig_db_stats(self._live(), s)
        return {k: getattr(s, k) for k in STAT_FIELDS}


class Stream:
    """One direction of one TCP connection: feed its bytes in order, close it at the end."""

    def __init__(self, db: SignatureDB, st) -> None:
        self.db = db
        self._st: Optional[object] = st

    def scan(self, data: bytes) -> list[Match]:
        if self._st is None:
            raise ValueError("stream closed")
        d = self.db
        return d._matches(lib.vn_sig_stream_scan(d._live(), self._st, data, len(data), d._out,
                                                 len(d.rules)), "stream scan")

    def close(self) -> list[Match]:
        if self._st is None:
            return []
        d, st, self._st = self.db, self._st, None
        d._streams.discard(self)
        return d._matches(lib.vn_sig_stream_close(d._live(), st, d._out, len(d.rules)), "stream close")

    def __del__(self) -> None:
        try:
            if self._st is not None and self.db._db != ffi.NULL:
                self.close()
        except Exception:
            pass
