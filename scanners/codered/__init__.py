"""The Code-Red scanner: shadows the guest's DNS answers and slows down connections to addresses the guest
never looked up (section 5.3 of the self-securing NI paper).

``core`` is the detector (pure, clock injected), ``dns`` the DNS parser, ``packet`` the frame parser;
``__main__`` runs the detector as a vhostni scanner (``python3 scanners/codered`` or ``python3 -m
scanners.codered``).  See scanners/README.md.
"""
from .core import DEFAULTS, Alert, CodeRedDetector, ConfigError, DnsTable, Verdict, load_config

__all__ = ["CodeRedDetector", "Alert", "Verdict", "ConfigError", "DEFAULTS", "DnsTable", "load_config"]
