"""Text from untrusted sources (scanners, guests, admin clients) made safe for the daemon's log.

A log line is one line of plain text: a newline in a scanner's alert message would forge a
second line, an ANSI escape would rewrite the operator's terminal, a U+202E would reorder
what they read.  :func:`printable` escapes everything that is not printable (control
characters, line and paragraph separators, format characters such as bidi overrides) as
``\\xNN`` / ``\\uNNNN`` and the backslash itself as ``\\\\``, so the escaped text is
unambiguous, and bounds its length.
"""
from __future__ import annotations


def printable(text: object, limit: int = 500) -> str:
    """``text`` (str() of it) with non-printable characters escaped, cut to about ``limit``
    characters with a note of how much was left out."""
    s = text if isinstance(text, str) else str(text)
    cut = len(s) - limit if len(s) > limit else 0
    if cut:
        s = s[:limit]
    if not (s.isprintable() and "\\" not in s):
        out = []
        for ch in s:
            if ch == "\\":
                out.append("\\\\")
            elif ch.isprintable():
                out.append(ch)
            elif ord(ch) < 0x100:
                out.append(f"\\x{ord(ch):02x}")
            elif ord(ch) < 0x10000:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(f"\\U{ord(ch):08x}")
        s = "".join(out)
    return f"{s}...(+{cut} chars)" if cut else s
