"""TAP uplinks: a host network device as one more port of the NI switch.

Opened with a virtio-net header (IFF_VNET_HDR) and the kernel's offloads on, so TSO
frames and partial checksums cross between guests and the host stack without being cut
up or summed in userspace.
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
VNET_HDR_LEN = 12


def open_tap(ifname: str, offloads: bool = True) -> int:
    """Creates (or attaches to) TAP device ``ifname``, brings it up, returns its fd."""
    if not ifname or len(ifname.encode()) >= 16 or "/" in ifname:
        raise ValueError(f"bad interface name {ifname!r}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr.ljust(40, b"\0"))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        flags = (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN) if offloads else 0
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        set_link_up(ifname)
    except OSError:
        os.close(fd)
        raise
    return fd


def set_link_up(ifname: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH", ifname.encode(), 0).ljust(40, b"\0")
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, ifr)[:18])[1]
        ifr = struct.pack("16sH", ifname.encode(), flags | IFF_UP).ljust(40, b"\0")
        fcntl.ioctl(s, SIOCSIFFLAGS, ifr)
