"""Packet capture files, sans-I/O: bytes in, records out (and records in, bytes out).

Reads classic pcap (both byte orders, microsecond and nanosecond magic) and pcapng (both
byte orders, several sections and interfaces, Enhanced, Simple and obsolete Packet blocks,
per-interface ``if_tsresol`` and ``if_tsoffset``; other blocks are skipped).  Writes classic
pcap.  Only Ethernet captures (LINKTYPE_ETHERNET) are accepted by default: vhostni moves
Ethernet frames, and a capture of anything else (Linux "cooked" captures from ``tcpdump -i
any``, raw IP, 802.11) cannot be replayed through it.

Everything in a capture file is untrusted: every length is checked before it is used, a
record never holds more than the snapshot length (``caplen`` beyond it is skipped, as
libpcap does), a field that cannot be right is a :class:`PcapError` naming the record, and
nothing else is ever raised for any input.  A file that ends inside a record is an error
too ("record 7 truncated"): a replay must not silently lose the end of a capture.

    dec = PcapDecoder()
    for chunk in chunks:
        for rec in dec.feed(chunk):
            ...                      # rec.number, rec.ts_ns, rec.data, rec.orig_len
    dec.close()                      # raises PcapError if the input stopped mid-record

    out.write(encode_header(snaplen=65535, nanosecond=True))
    out.write(encode_record(rec.ts_ns, rec.data, nanosecond=True))
"""
from __future__ import annotations

import collections
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Optional

LINKTYPE_ETHERNET = 1
#: The largest snapshot length libpcap gives any link type; a larger ``caplen`` is corruption.
MAX_SNAPLEN = 262144
#: The largest pcapng block accepted (libpcap's limit): a longer length field is corruption.
MAX_BLOCK = 16 * 1024 * 1024

MAGIC_USEC = 0xA1B2C3D4
MAGIC_NSEC = 0xA1B23C4D
MAGIC_MODIFIED = 0xA1B2CD34      # Kuznetzov's "modified" pcap
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D
PCAPNG_IDB, PCAPNG_OPB, PCAPNG_SPB, PCAPNG_EPB = 1, 2, 3, 6

LINKTYPE_NAMES = {0: "NULL (BSD loopback)", 1: "ETHERNET", 101: "RAW (IP)", 105: "IEEE802_11",
                  113: "LINUX_SLL (cooked capture, e.g. tcpdump -i any)", 127: "IEEE802_11_RADIOTAP",
                  228: "IPV4", 229: "IPV6", 276: "LINUX_SLL2 (cooked capture, e.g. tcpdump -i any)"}


class PcapError(ValueError):
    """A capture that cannot be read: not a capture, unsupported, corrupt or truncated."""


class UnsupportedLinkType(PcapError):
    """A capture (or one of its interfaces) of something other than Ethernet."""

    def __init__(self, linktype: int, where: str = "the capture"):
        self.linktype = linktype
        name = LINKTYPE_NAMES.get(linktype, "")
        super().__init__(f"{where} has link type {linktype}{f' ({name})' if name else ''}; only "
                         f"Ethernet captures (LINKTYPE_ETHERNET, {LINKTYPE_ETHERNET}) can be read")


@dataclass(frozen=True)
class Header:
    """What a capture says about itself (for pcapng: its first interface)."""
    format: str                 # "pcap" or "pcapng"
    big_endian: bool
    nanosecond: bool            # classic pcap: the nanosecond magic; pcapng: resolution finer than 1 us
    snaplen: int                # effective: 0 or out-of-range values read as MAX_SNAPLEN
    linktype: int
    version: tuple[int, int]


@dataclass(frozen=True)
class Record:
    number: int                 # 1, 2, 3 ... in file order
    ts_ns: int                  # capture time, ns since the Unix epoch
    data: bytes                 # the captured bytes (at most the snapshot length)
    orig_len: int               # the frame's length on the wire
    interface: int = 0          # pcapng interface id (0 for classic pcap)

    @property
    def time(self) -> float:
        return self.ts_ns / 1e9


@dataclass
class _Interface:
    linktype: int
    snaplen: int
    tick_num: int               # one timestamp unit is tick_num / tick_den ns
    tick_den: int
    offset_ns: int


def _snaplen(value: int) -> int:
    return value if 0 < value <= MAX_SNAPLEN else MAX_SNAPLEN


class PcapDecoder:
    """Incremental reader: :meth:`feed` it bytes, get :class:`Record` s.

    ``ethernet_only`` (default): a capture of another link type is an
    :class:`UnsupportedLinkType` error, raised as soon as the header (pcap) or the first
    packet of such an interface (pcapng) is read."""

    def __init__(self, ethernet_only: bool = True):
        self.ethernet_only = ethernet_only
        self.header: Optional[Header] = None
        self.records = 0              # records returned so far
        self._buf = bytearray()
        self._pos = 0
        self._format: Optional[str] = None
        self._end = "<"               # struct byte order of the current file/section
        self._nano = False
        self._snap = MAX_SNAPLEN
        self._blocks = 0              # pcapng blocks read
        self._ifaces: list[_Interface] = []
        self._last_ts = 0
        self._failed: Optional[PcapError] = None

    # ---- input
    def feed(self, data: bytes) -> list[Record]:
        """Parses what ``data`` completes; returns the records it finished, in order."""
        if self._failed:
            raise self._failed
        self._buf += data
        out: list[Record] = []
        try:
            while True:
                rec = self._next()
                if rec is False:
                    break
                if rec is not None:
                    out.append(rec)
        except PcapError as exc:
            self._failed = exc
            raise
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[:self._pos]
            self._pos = 0
        return out

    def close(self) -> None:
        """The input ended: raises PcapError if that was inside the header or a record."""
        if self._failed:
            raise self._failed
        left = len(self._buf) - self._pos
        if self._format is None:
            raise PcapError("not a capture file: empty" if not left else
                            f"not a capture file: only {left} bytes")
        if left:
            what = f"record {self.records + 1}" if self._format == "pcap" else \
                f"record {self.records + 1} (pcapng block {self._blocks + 1})"
            raise PcapError(f"{what} truncated: the file ends {left} bytes into it")

    # ---- parsing
    def _have(self, n: int) -> bool:
        return len(self._buf) - self._pos >= n

    def _next(self):
        """A Record, None (consumed something that is not a record) or False (need more)."""
        if self._format is None:
            return self._start()
        if self._format == "pcap":
            return self._pcap_record()
        return self._pcapng_block()

    def _start(self):
        if not self._have(4):
            return False
        raw = bytes(self._buf[self._pos:self._pos + 4])
        le, be = struct.unpack("<I", raw)[0], struct.unpack(">I", raw)[0]
        if le == PCAPNG_SHB:
            self._format = "pcapng"
            return None
        for magic, end in ((le, "<"), (be, ">")):
            if magic in (MAGIC_USEC, MAGIC_NSEC):
                return self._pcap_header(end, magic == MAGIC_NSEC)
            if magic == MAGIC_MODIFIED:
                raise PcapError("a \"modified\" (Kuznetzov) pcap file: not supported, convert it "
                                "with editcap -F pcap")
        raise PcapError(f"not a pcap or pcapng file (starts with {raw.hex()})")

    def _pcap_header(self, end: str, nano: bool):
        if not self._have(24):
            return False
        _, vmaj, vmin, _, _, snaplen, network = struct.unpack_from(end + "IHHiIII", self._buf, self._pos)
        if vmaj != 2:
            raise PcapError(f"pcap version {vmaj}.{vmin}: only version 2 exists")
        if network & 0x03FF0000:
            raise PcapError(f"bad link type field {network:#010x} (reserved bits set)")
        if network & 0x04000000:
            raise PcapError("frames carry a frame check sequence (FCS): not supported")
        linktype = network & 0xFFFF
        if self.ethernet_only and linktype != LINKTYPE_ETHERNET:
            raise UnsupportedLinkType(linktype)
        self._pos += 24
        self._format = "pcap"
        self._end = end
        self._nano = nano
        self._snap = _snaplen(snaplen)
        self.header = Header("pcap", end == ">", nano, self._snap, linktype, (vmaj, vmin))
        return None

    def _pcap_record(self):
        if not self._have(16):
            return False
        sec, frac, caplen, orig = struct.unpack_from(self._end + "IIII", self._buf, self._pos)
        n = self.records + 1
        if caplen > MAX_SNAPLEN:
            raise PcapError(f"record {n}: captured length {caplen} is larger than any snapshot "
                            f"length ({MAX_SNAPLEN}): the file is corrupt")
        if not self._have(16 + caplen):
            return False
        start = self._pos + 16
        data = bytes(self._buf[start:start + min(caplen, self._snap)])
        self._pos = start + caplen
        self.records = n
        ts = sec * 1_000_000_000 + (frac if self._nano else frac * 1000)
        return Record(n, ts, data, max(orig, len(data)))

    # -- pcapng
    def _pcapng_block(self):
        if not self._have(12):
            return False
        p = self._pos
        btype_le = struct.unpack_from("<I", self._buf, p)[0]
        if btype_le == PCAPNG_SHB:      # the same in either byte order
            bom = self._buf[p + 8:p + 12]
            if bom == struct.pack("<I", PCAPNG_BOM):
                end = "<"
            elif bom == struct.pack(">I", PCAPNG_BOM):
                end = ">"
            else:
                raise PcapError(f"pcapng block {self._blocks + 1}: section header with a bad "
                                f"byte-order magic {bytes(bom).hex()}")
        else:
            end = self._end
        btype, blen = struct.unpack_from(end + "II", self._buf, p)
        where = f"pcapng block {self._blocks + 1}"
        if blen < 12 or blen % 4:
            raise PcapError(f"{where}: bad block length {blen}")
        if blen > MAX_BLOCK:
            raise PcapError(f"{where}: block length {blen} exceeds {MAX_BLOCK}: the file is corrupt")
        if not self._have(blen):
            return False
        if struct.unpack_from(end + "I", self._buf, p + blen - 4)[0] != blen:
            raise PcapError(f"{where}: the trailing block length does not match the leading one")
        rec = self._pcapng_body(btype, end, bytes(self._buf[p + 8:p + blen - 4]), where)
        self._pos = p + blen
        self._blocks += 1
        return rec

    def _pcapng_body(self, btype: int, end: str, body: bytes, where: str):
        if btype == PCAPNG_SHB:
            if len(body) < 16:
                raise PcapError(f"{where}: section header too short")
            vmaj, vmin = struct.unpack_from(end + "HH", body, 4)
            if vmaj != 1:
                raise PcapError(f"{where}: pcapng version {vmaj}.{vmin} is not supported (1.x is)")
            self._end = end
            self._ifaces = []
            return None
        if self._blocks == 0:
            raise PcapError("not a pcapng file: it does not start with a section header")
        if btype == PCAPNG_IDB:
            if len(body) < 8:
                raise PcapError(f"{where}: interface description too short")
            linktype, _, snaplen = struct.unpack_from(end + "HHI", body, 0)
            num, den, offset = 1000, 1, 0       # default resolution: microseconds
            for code, val in self._options(body[8:], end, where):
                if code == 9 and len(val) >= 1:            # if_tsresol
                    r = val[0]
                    if r & 0x80:
                        num, den = 1_000_000_000, 1 << (r & 0x7F)
                    else:
                        num, den = (10 ** (9 - r), 1) if r <= 9 else (1, 10 ** (r - 9))
                elif code == 14 and len(val) >= 8:         # if_tsoffset (seconds)
                    offset = struct.unpack_from(end + "q", val)[0] * 1_000_000_000
            self._ifaces.append(_Interface(linktype, _snaplen(snaplen), num, den, offset))
            if self.header is None:
                self.header = Header("pcapng", end == ">", den > 1 or num < 1000, _snaplen(snaplen),
                                     linktype, (1, 0))
            return None
        if btype == PCAPNG_EPB:
            if len(body) < 20:
                raise PcapError(f"{where}: enhanced packet block too short")
            iface, hi, lo, caplen, orig = struct.unpack_from(end + "IIIII", body, 0)
            return self._packet(iface, (hi << 32) | lo, caplen, orig, body, 20, where)
        if btype == PCAPNG_OPB:
            if len(body) < 20:
                raise PcapError(f"{where}: packet block too short")
            iface, _, hi, lo, caplen, orig = struct.unpack_from(end + "HHIIII", body, 0)
            return self._packet(iface, (hi << 32) | lo, caplen, orig, body, 20, where)
        if btype == PCAPNG_SPB:
            if len(body) < 4:
                raise PcapError(f"{where}: simple packet block too short")
            orig = struct.unpack_from(end + "I", body, 0)[0]
            if not self._ifaces:
                raise PcapError(f"{where}: a packet before any interface description")
            caplen = min(orig, len(body) - 4, self._ifaces[0].snaplen)
            return self._packet(0, None, caplen, orig, body, 4, where)
        return None                      # statistics, name resolution, custom...: not needed

    def _packet(self, iface: int, ticks: Optional[int], caplen: int, orig: int,
                body: bytes, off: int, where: str) -> Record:
        n = self.records + 1
        if iface >= len(self._ifaces):
            raise PcapError(f"record {n} ({where}): interface {iface} was never described")
        ifc = self._ifaces[iface]
        if self.ethernet_only and ifc.linktype != LINKTYPE_ETHERNET:
            raise UnsupportedLinkType(ifc.linktype, f"record {n}: interface {iface}")
        if caplen > len(body) - off:
            raise PcapError(f"record {n} ({where}): captured length {caplen} runs past its block")
        data = bytes(body[off:off + min(caplen, ifc.snaplen)])
        if ticks is None:
            ts = self._last_ts                      # simple packet blocks carry no time
        else:
            ts = ticks * ifc.tick_num // ifc.tick_den + ifc.offset_ns
        self._last_ts = ts
        self.records = n
        return Record(n, ts, data, max(orig, len(data)), iface)

    @staticmethod
    def _options(opts: bytes, end: str, where: str) -> Iterator[tuple[int, bytes]]:
        p = 0
        while p + 4 <= len(opts):
            code, length = struct.unpack_from(end + "HH", opts, p)
            if code == 0:
                return
            if p + 4 + length > len(opts):
                raise PcapError(f"{where}: option {code} runs past its block")
            yield code, opts[p + 4:p + 4 + length]
            p += 4 + ((length + 3) & ~3)


# ---- convenience over files and bytes

def decode(data: bytes, ethernet_only: bool = True) -> tuple[Header, list[Record]]:
    """A whole capture in memory: its header and records."""
    dec = PcapDecoder(ethernet_only)
    recs = dec.feed(data)
    dec.close()
    if dec.header is None:
        raise PcapError("a pcapng file without any interface description")
    return dec.header, recs


class PcapReader:
    """Reads a capture file incrementally: ``header`` once the start is read, iterate for
    records.  Raises PcapError (or OSError) as it goes."""

    def __init__(self, f: BinaryIO, ethernet_only: bool = True, chunk: int = 1 << 20):
        self._f = f
        self._chunk = chunk
        self._dec = PcapDecoder(ethernet_only)
        self._ready: collections.deque[Record] = collections.deque()
        self._eof = False
        while self._dec.header is None and not self._eof:
            self._fill()
        if self._dec.header is None:
            self._dec.close()     # raises for an empty or short file
            raise PcapError("a pcapng file without any interface description")
        self.header: Header = self._dec.header

    def _fill(self) -> None:
        data = self._f.read(self._chunk)
        if not data:
            self._eof = True
            self._dec.close()
            return
        self._ready.extend(self._dec.feed(data))

    def __iter__(self) -> Iterator[Record]:
        while True:
            while self._ready:
                yield self._ready.popleft()
            if self._eof:
                return
            self._fill()


def encode_header(snaplen: int = 65535, linktype: int = LINKTYPE_ETHERNET, nanosecond: bool = False,
                  big_endian: bool = False) -> bytes:
    """The 24-byte header of a classic pcap file (version 2.4)."""
    if not 0 < snaplen <= 0xFFFFFFFF or not 0 <= linktype <= 0xFFFF:
        raise ValueError("snaplen or linktype out of range")
    end = ">" if big_endian else "<"
    return struct.pack(end + "IHHiIII", MAGIC_NSEC if nanosecond else MAGIC_USEC, 2, 4, 0, 0,
                       snaplen, linktype)


def encode_record(ts_ns: int, data: bytes, orig_len: Optional[int] = None, snaplen: int = MAX_SNAPLEN,
                  nanosecond: bool = False, big_endian: bool = False) -> bytes:
    """One record: at most ``snaplen`` bytes of ``data``; ``orig_len`` defaults to its length."""
    if ts_ns < 0 or ts_ns >= (1 << 32) * 1_000_000_000:
        raise ValueError(f"timestamp {ts_ns} ns does not fit a pcap record")
    sec, frac = divmod(ts_ns, 1_000_000_000)
    if not nanosecond:
        frac //= 1000
    cap = bytes(data[:snaplen])
    orig = len(data) if orig_len is None else max(orig_len, len(cap))
    end = ">" if big_endian else "<"
    return struct.pack(end + "IIII", sec, frac, len(cap), min(orig, 0xFFFFFFFF)) + cap


class PcapWriter:
    """Writes a classic pcap file: the header at once, then :meth:`write` per record."""

    def __init__(self, f: BinaryIO, snaplen: int = MAX_SNAPLEN, linktype: int = LINKTYPE_ETHERNET,
                 nanosecond: bool = False, big_endian: bool = False):
        self._f = f
        self.snaplen = snaplen
        self.nanosecond = nanosecond
        self.big_endian = big_endian
        self.records = 0
        f.write(encode_header(snaplen, linktype, nanosecond, big_endian))

    def write(self, ts_ns: int, data: bytes, orig_len: Optional[int] = None) -> None:
        self._f.write(encode_record(ts_ns, data, orig_len, self.snaplen, self.nanosecond,
                                    self.big_endian))
        self.records += 1
