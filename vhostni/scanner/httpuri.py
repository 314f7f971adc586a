"""HTTP request targets as a server reads them, sans-I/O: decoding and path normalisation.

    u = normalise(b"/scripts/..%255c../winnt/system32/cmd.exe?/c+dir")
    u.path        # "/winnt/system32/cmd.exe": decoded (twice here), dot segments resolved
    u.paths       # every reading a server might take (NUL-truncated, trailing dots stripped, ...)
    u.matches("*.ida")   # a glob against every reading, PATH_INFO prefixes (/default.ida/x) included
    u.query       # the query decoded once, its length counted in code units
    u.params      # [(name, value)] of the query, decoded ("+" is a space), names as sent
    u.anomalies   # [(kind, detail)], kinds from URI_ANOMALIES

Written for layer-7 checks that must see a target as the server behind them will, whatever
encoding the client chose: ``%xx`` and IIS's ``%uXXXX`` are decoded (one code unit each, so a
field's length is what lands in the server's buffer, not the length on the wire), overlong UTF-8
(``%c0%af``) is read as the character it encodes, as IIS 4/5 read it, a target decoded twice as
IIS did (``%255c``: CVE-2001-0333) is flagged and its second reading checked too, backslashes
count as slashes, and ``.``/``..``/empty segments are resolved.  A ``..`` above the root, a NUL,
a double encoding ... is an anomaly the caller may alert on or block; nothing is resolved silently.

The module imports nothing of vhostni's kernel: scanners use it in their sandbox.
"""
from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["URI_ANOMALIES", "NormalisedURI", "normalise", "percent_decode", "normalise_path"]

#: kind -> what it means.
URI_ANOMALIES = {
    "bad_percent": "a % not followed by two hex digits (or u and four)",
    "percent_u": "an IIS-style %uXXXX escape",
    "double_encoding": "an escape that decodes to another escape (%25xx): servers that decode twice differ",
    "overlong_utf8": "an overlong UTF-8 sequence (%c0%af for /)",
    "nul_in_uri": "a NUL byte in the decoded target",
    "ctl_in_uri": "a control byte in the decoded target",
    "non_ascii": "a raw byte above 0x7e in the target (not percent-encoded)",
    "backslash": "a backslash in the decoded path (a path separator on Windows servers)",
    "double_slash": "an empty path segment (//)",
    "dot_segment": "a . or .. segment in the decoded path",
    "traversal": "a .. segment that climbs above the root",
    "fragment": "a # fragment in a request target",
}

_ESCAPE = re.compile(r"%(?:[0-9A-Fa-f]{2}|[uU][0-9A-Fa-f]{4})")
_ANY_ESCAPE = re.compile(r"%(?:([0-9A-Fa-f]{2})|[uU]([0-9A-Fa-f]{4}))")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2}|[uU][0-9A-Fa-f]{4})")
_OVERLONG2 = re.compile("[\xc0\xc1][\x80-\xbf]")
_OVERLONG3 = re.compile("\xe0[\x80-\x9f][\x80-\xbf]")
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*")
_MAX_ANOMALY_DETAIL = 80


def percent_decode(s: str, plus: bool = False, anomalies: list | None = None) -> str:
    """``s`` (latin-1 text of raw bytes) with ``%xx`` and ``%uXXXX`` decoded, one character per
    escape (``%u`` gives its code unit, ``%xx`` its byte as latin-1); a malformed escape stays as
    it is.  ``plus``: ``+`` is a space (query strings).  Overlong UTF-8 sequences are read as the
    character they encode.  Anomalies are appended to ``anomalies``."""
    amb = anomalies if anomalies is not None else []
    if plus:
        s = s.replace("+", " ")           # before decoding: %2B stays a +
    if _BAD_ESCAPE.search(s):
        amb.append(("bad_percent", f"a malformed escape in {s[:_MAX_ANOMALY_DETAIL]!r}"))
    pct_u = False

    def one(m: re.Match) -> str:
        nonlocal pct_u
        if m.group(1) is not None:
            return chr(int(m.group(1), 16))
        pct_u = True
        return chr(int(m.group(2), 16))
    text = _ANY_ESCAPE.sub(one, s) if "%" in s else s
    if pct_u:
        amb.append(("percent_u", f"%u escapes in {s[:_MAX_ANOMALY_DETAIL]!r}"))
    if _OVERLONG2.search(text) or _OVERLONG3.search(text):
        amb.append(("overlong_utf8", f"overlong UTF-8 in {s[:_MAX_ANOMALY_DETAIL]!r}"))
        text = _OVERLONG3.sub(lambda m: chr(((ord(m.group()[1]) & 0x3F) << 6) | (ord(m.group()[2]) & 0x3F)), text)
        text = _OVERLONG2.sub(lambda m: chr(((ord(m.group()[0]) & 0x1F) << 6) | (ord(m.group()[1]) & 0x3F)), text)
    return text


def normalise_path(path: str, anomalies: list | None = None) -> str:
    """A decoded path with backslashes as slashes and ``.``, ``..`` and empty segments resolved;
    a ``..`` above the root stays at the root (``traversal``)."""
    amb = anomalies if anomalies is not None else []
    if "\\" in path:
        amb.append(("backslash", f"a backslash in {path[:_MAX_ANOMALY_DETAIL]!r}"))
        path = path.replace("\\", "/")
    segs = path.split("/")
    stack: list = []
    dots = climbed = empty = False
    for i, seg in enumerate(segs):
        if seg == "":
            if 0 < i < len(segs) - 1:
                empty = True
            continue
        if seg == ".":
            dots = True
        elif seg == "..":
            dots = True
            if stack:
                stack.pop()
            else:
                climbed = True
        else:
            stack.append(seg)
    if empty:
        amb.append(("double_slash", f"an empty segment in {path[:_MAX_ANOMALY_DETAIL]!r}"))
    if dots:
        amb.append(("dot_segment", f"dot segments in {path[:_MAX_ANOMALY_DETAIL]!r}"))
    if climbed:
        amb.append(("traversal", f"'..' above the root in {path[:_MAX_ANOMALY_DETAIL]!r}"))
    trail = "/" if len(segs) > 1 and segs[-1] in ("", ".", "..") and stack else ""
    return "/" + "/".join(stack) + trail


@dataclass
class NormalisedURI:
    raw_path: bytes                     # as sent (absolute-form: scheme and authority removed)
    raw_query: bytes                    # after the first ?, as sent (b"" without one)
    decoded_path: str                   # decoded once, not normalised (what a naive server copies)
    path: str                           # decoded (twice if double-encoded) and normalised
    paths: list                         # every reading of the whole path (see matches() for its prefixes)
    query: str                          # decoded once
    params: list                        # [(name, value)] decoded, "+" as space
    anomalies: list = field(default_factory=list)   # [(kind, detail)]
    has_query: bool = False             # a ? was there (even with nothing after it)
    authority: Optional[bytes] = None   # absolute-form: the host[:port] it names (servers prefer it to Host)

    @property
    def decoded_length(self) -> int:
        """Code units of the decoded target (path, ?, query)."""
        return len(self.decoded_path) + (1 + len(self.query) if self.has_query else 0)

    def matches(self, pattern: str) -> bool:
        """Whether the glob ``pattern`` (fnmatch syntax, lower case) matches a reading of the
        path, in lower case: one of :attr:`paths`, or a prefix of one ending at a segment boundary
        (a script mapped by its extension runs with the rest of the path as PATH_INFO:
        ``/default.ida/x`` runs ``/default.ida``), with its trailing dots and spaces or without
        them (Windows drops them: ``/default.ida./x``).  The prefixes are never built: a target
        of many segments costs one regular-expression match per reading, not one string (and
        one match) per segment, which made a 16 KiB target cost a second and 80 MB."""
        rx = _prefix_glob(pattern)
        return any(rx.match(p.lower()) is not None for p in self.paths)

    def kinds(self) -> list:
        seen: list = []
        for k, _ in self.anomalies:
            if k not in seen:
                seen.append(k)
        return seen


@functools.lru_cache(maxsize=4096)
def _prefix_glob(pattern: str) -> "re.Pattern":
    """``pattern`` matching any prefix of a path that ends before a ``/`` (or at its end),
    trailing dots and spaces before that end optional (possessive: no backtracking over them)."""
    rx = re.sub(r"\\[Zz]$", "", fnmatch.translate(pattern))
    return re.compile(rx + r"[. ]*+(?:/|\Z)")


def normalise(target: bytes) -> NormalisedURI:
    """Reads a request target (origin-form or absolute-form) as servers do; see the module doc."""
    amb: list = []
    m = _SCHEME.match(target)
    rest = target[m.end():] if m else target
    authority = target[target.index(b"://") + 3:m.end()] if m else None
    if b"#" in rest:
        amb.append(("fragment", "a # in the request target"))
        rest = rest.split(b"#", 1)[0]
    if re.search(rb"[\x80-\xff]", rest):
        amb.append(("non_ascii", "raw bytes above 0x7e in the target"))
    raw_path, qmark, raw_query = rest.partition(b"?")
    ptext = raw_path.decode("latin-1")
    decoded = percent_decode(ptext, anomalies=amb)
    second = decoded
    if "%25" in ptext.lower() and _ESCAPE.search(decoded):
        amb.append(("double_encoding", f"an escape decodes to another in {ptext[:_MAX_ANOMALY_DETAIL]!r}"))
        second = percent_decode(decoded)
    if "\0" in second:
        amb.append(("nul_in_uri", "a NUL in the decoded path"))
    if re.search("[\x01-\x1f\x7f]", second):
        amb.append(("ctl_in_uri", "a control byte in the decoded path"))
    path = normalise_path(second, amb)
    paths = [path]
    if second != decoded:
        paths.append(normalise_path(decoded))       # the server that decodes once
    for p in list(paths):
        if "\0" in p:
            paths.append(normalise_path(p.split("\0", 1)[0]))
        if ";" in p:                                 # path parameters: /default.ida;x
            paths.append(re.sub(r";[^/]*", "", p))
    # a script mapped by its extension runs with the rest of the path as PATH_INFO (/default.ida/x
    # runs default.ida): every prefix at a segment boundary is a reading too, which matches() takes
    # without building them (one string per segment made a long target quadratic)
    for p in list(paths):
        # Windows drops trailing dots and spaces of a file name: /default.ida. is /default.ida
        stripped = p.rstrip(". ")
        if stripped != p and stripped:
            paths.append(stripped)
    qtext = raw_query.decode("latin-1")
    qamb: list = []
    query = percent_decode(qtext, anomalies=qamb)
    if "%25" in qtext.lower() and _ESCAPE.search(query):
        qamb.append(("double_encoding", f"an escape decodes to another in the query {qtext[:_MAX_ANOMALY_DETAIL]!r}"))
    if "\0" in query:
        qamb.append(("nul_in_uri", "a NUL in the decoded query"))
    params = []
    if qtext:
        for item in qtext.split("&"):
            name, _, value = item.partition("=")
            params.append((percent_decode(name, plus=True), percent_decode(value, plus=True)))
    amb += [a for a in qamb if a not in amb]
    return NormalisedURI(raw_path, raw_query, decoded, path, list(dict.fromkeys(paths)), query, params, amb,
                         bool(qmark), authority)
