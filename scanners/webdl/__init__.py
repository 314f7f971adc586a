"""The web-download scanner: the e-mail scanner's protection for HTTP downloads.

``core`` decides (sans-I/O) over the SDK's HTTP/1.x codec (:mod:`vhostni.scanner.http1`) and the
shared engines (:mod:`vhostni.scanner.clamd`); ``__main__`` runs it as a vhostni scanner
(``python3 scanners/webdl``, or ``program = "vhostni:webdl"``).  See scanners/README.md.
"""
from .core import DEFAULTS, ConfigError, EngineError, WebDownloadScanner, load_config

__all__ = ["WebDownloadScanner", "ConfigError", "EngineError", "DEFAULTS", "load_config"]
