"""The worm scanner: shadows the guest's DNS answers and slows down new destinations (TCP, UDP, ICMP) the guest
never looked up and that never contacted it (section 5.3 of the self-securing NI paper, widened); and, by its
config's ``detector``, a Threshold Random Walk port-scan detector or a SYN-bomb detector.

``core`` is the worm detector, ``trw`` and ``synbomb`` the others (all pure, clock injected), ``dns`` the DNS
parser, ``packet`` the frame parser, ``sim`` the figures on a fake clock;
``__main__`` runs the detector as a vhostni scanner (``python3 scanners/codered`` or ``python3 -m
scanners.codered``).  See scanners/README.md.
"""
from .core import DEFAULTS, Alert, CodeRedDetector, ConfigError, DnsTable, Verdict, load_config
from .synbomb import SynBombDetector
from .trw import TrwDetector

__all__ = ["CodeRedDetector", "Alert", "Verdict", "ConfigError", "DEFAULTS", "DnsTable", "load_config",
           "TrwDetector", "SynBombDetector"]
