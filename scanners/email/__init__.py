"""The e-mail virus scanner (section 5.2 of the self-securing NI paper).

``proto`` follows SMTP and POP3 and cuts whole messages out of their streams, ``mime`` parses
them (strict, bounded), ``clamd`` talks to ClamAV, ``core`` decides (sans-I/O) and ``__main__``
runs it as a vhostni scanner (``python3 scanners/email``).  See scanners/README.md.
"""
from .core import DEFAULTS, ConfigError, EmailScanner, EngineError, load_config, replacement_plan

__all__ = ["EmailScanner", "ConfigError", "EngineError", "DEFAULTS", "load_config", "replacement_plan"]
