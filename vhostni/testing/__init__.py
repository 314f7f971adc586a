"""Test helpers for vhostni and for projects that use it in their own CI.

* :class:`Guest` boots a real QEMU guest and drives its serial console: vhostni's own images
  (``vhostni images build``) or your own kernel, initrd or disk image (:meth:`GuestImages.user`, logged in
  through :class:`GuestLogin`); :func:`boot_guests` boots several at once.
* :class:`VhostniDaemon` runs ``vhostni run`` as a subprocess.
* :class:`NetNamespace` makes private network namespaces for test hosts.
* ``vhostni.testing.plugin`` (a pytest plugin, registered through the ``pytest11`` entry point) wraps them in
  fixtures: ``vhostni_images``, ``vhostni_guest_factory``, ``vhostni_daemon_factory``, ``vhostni_netns``,
  ``vhostni_sockdir``, ``vhostni_logdir``.
"""
from .daemon import DaemonError, VhostniDaemon, vhostni_command
from .guest import (READY_MARKER, Guest, GuestBootError, GuestCommandError, GuestError, GuestImages,
                    GuestLogin, GuestTimeout, ImagesMissing, Nic, TapNic, UserNic, VhostUserNic, boot_guests, mac_for)
from .netns import NetNamespace

__all__ = [
    "DaemonError", "VhostniDaemon", "vhostni_command",
    "READY_MARKER", "Guest", "GuestBootError", "GuestCommandError", "GuestError", "GuestImages", "GuestLogin",
    "GuestTimeout",
    "ImagesMissing", "Nic", "TapNic", "UserNic", "VhostUserNic", "boot_guests", "mac_for",
    "NetNamespace",
]
