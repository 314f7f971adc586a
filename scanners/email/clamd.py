"""clamd's client moved to the scanner SDK (vhostni/scanner/clamd.py), shared with the
web-download scanner; this name stays for code that imports it from here."""
from vhostni.scanner.clamd import CHUNK, Clamd, ClamdError, parse_reply  # noqa: F401

__all__ = ["Clamd", "ClamdError", "parse_reply"]
