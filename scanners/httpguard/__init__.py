"""The HTTP overflow stage: Prospector-style field-length signatures over HTTP/1.x requests.

``core`` decides (sans-I/O) over the SDK's HTTP/1.x codec (:mod:`vhostni.scanner.http1`) and URI
normaliser (:mod:`vhostni.scanner.httpuri`); ``__main__`` runs it as a vhostni scanner
(``python3 scanners/httpguard``, or ``program = "vhostni:httpguard"``).  See scanners/README.md.
"""
from .core import BUILTIN_SIGNATURES, DEFAULTS, FIELDS, ConfigError, HttpGuard, Signature, load_config

__all__ = ["HttpGuard", "ConfigError", "DEFAULTS", "BUILTIN_SIGNATURES", "FIELDS", "Signature", "load_config"]
