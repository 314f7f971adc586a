"""Settings shared by the three detectors: a policy's ``[scanner.config]`` laid over defaults."""
from __future__ import annotations

from typing import Any, Mapping, Optional


def overlay(defaults: Mapping[str, Any], config: Optional[Mapping[str, Any]], what: str,
            error: type) -> dict:
    """``defaults`` overlaid with ``config``; a key ``defaults`` lacks raises ``error`` naming it and
    the known ones (a typo must not silently leave a default in force).  Values are checked by the
    caller."""
    out = dict(defaults)
    for key, value in (config or {}).items():
        if key not in defaults:
            raise error(f"unknown {what} setting {key!r} (known: {', '.join(sorted(defaults))})")
        out[key] = value
    return out
