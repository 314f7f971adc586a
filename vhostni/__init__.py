"""vhostni: self-securing network interfaces for virtual machines."""

__version__ = "0.1.0"
