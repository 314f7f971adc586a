"""A scanner that drives its ring by hand, from the ABI in csrc/vnring.h (not through the
SDK's ring code): the socket is the SDK's, the ring is mapped and written here.

config: ``subscribe`` [{"match": {...}, "contain": bool}], ``report`` (alert "frame" with
the seq, held flag and hex of every frame seen), and ``attack``:
  none        pass every held frame, consume as it goes (a well-behaved scanner)
  never_given decide a frame number it was never given
  verdict     decide with verdict 9
  cons_past   move its consumer index past what it was given
  dec_jump    jump its decision index by 2^40
  silent      never consume, never decide (its ring fills; it still answers syncs)
  remap       first try to map region A writable and to resize both regions (alert "remap"
              with what each attempt got), then behave
With ``streams`` (a port), it also subscribes to that port's streams (both directions, held)
on its ring, passes their bytes as they come, and alerts "stream" with each stream's bytes
(hex, per direction) when it closes; with ``cut`` (a marker), bytes from the marker on to the
end of the chunk are cut (the socket's cut request) instead of passed.
"""
import errno
import mmap
import os
import select
import struct

from vhostni.scanner import Scanner, seccomp

fds = [int(x) for x in os.environ.pop("VHOSTNI_RING_FDS").split(",")]   # the SDK must not take it
sc = Scanner.connect(lockdown=False)
cfg = sc.config
attack = cfg.get("attack", "none")
a = mmap.mmap(fds[0], 0, mmap.MAP_SHARED, mmap.PROT_READ)
(magic, version, desc_slots, dec_slots, desc_off, data_off, data_size, size, sc_size,
 _) = struct.unpack_from("<IIIIQQQQQQ", a, 0)
b = mmap.mmap(fds[1], sc_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
kick_me, kick_ni = fds[2], fds[3]

if attack == "remap":
    got = {}
    try:
        mmap.mmap(fds[0], 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        got["map_a_writable"] = "mapped"
    except OSError as exc:
        got["map_a_writable"] = errno.errorcode.get(exc.errno, str(exc.errno))
    for name, fd in (("a", fds[0]), ("b", fds[1])):
        for what, n in (("shrink", 0), ("grow", 1 << 30)):
            try:
                os.ftruncate(fd, n)
                got[f"{what}_{name}"] = "done"
            except OSError as exc:
                got[f"{what}_{name}"] = errno.errorcode.get(exc.errno, str(exc.errno))
    try:
        os.pwrite(fds[0], b"x", 64)
        got["write_a"] = "done"
    except OSError as exc:
        got["write_a"] = errno.errorcode.get(exc.errno, str(exc.errno))
    sc.alert("remap", **got)
    attack = "none"

seccomp.lockdown()
sc._request({"op": "ring", "version": 1, **({"streams": True} if cfg.get("streams") else {})})
for sub in cfg.get("subscribe", []):
    sc.subscribe(sub["match"], contain=sub.get("contain", False))
if cfg.get("streams"):
    sc.subscribe_stream(port=cfg["streams"], direction="both", contain=True)
streams = {}
sc.ready()
sc.alert("ready", pid=os.getpid())

seen = 0
dec_prod = 0


def q(off):
    return struct.unpack_from("<Q", a, off)[0]


def publish(pairs):
    global dec_prod
    for seq, verdict in pairs:
        struct.pack_into("<QII", b, 256 + 16 * (dec_prod & (dec_slots - 1)), seq, verdict, 0)
        dec_prod += 1
    struct.pack_into("<Q", b, 64, dec_prod)
    if struct.unpack_from("<I", a, 192)[0]:
        os.eventfd_write(kick_ni, 1)


done = False
while True:
    prod = q(64)
    if prod == seen:
        struct.pack_into("<I", b, 128, 1)             # about to sleep: kick me
        if q(64) == seen:
            r, _, _ = select.select([kick_me, sc.sock], [], [], 1.0)
            if kick_me in r:
                try:
                    os.eventfd_read(kick_me)
                except BlockingIOError:
                    pass
            if sc.sock in r:
                sc.ready()                            # syncs and replies on the socket
        struct.pack_into("<I", b, 128, 0)
        continue
    pairs = []
    spasses = []
    for s in range(seen, prod):
        off = desc_off + 32 * (s & (desc_slots - 1))
        seq, t, data, ln, kind, direction, flags = struct.unpack_from("<QQIIBBB5x", a, off)
        if kind != 1:                                 # a stream descriptor
            body = bytes(a[data_off + data:data_off + data + ln])
            sid, soff, handle, reason = struct.unpack_from("<QQII8x", body, 0)
            if kind == 2:
                streams[sid] = {1: b"", 2: b""}
            elif kind == 3 and sid in streams:
                chunk = body[32:]
                streams[sid][direction] += chunk
                marker = cfg.get("cut", "").encode()
                at = chunk.find(marker) if marker else -1
                if at >= 0:
                    sc._request({"op": "cut", "stream": sid, "direction": "from_guest" if direction == 1
                                 else "to_guest", "offset": soff + at, "length": len(chunk) - at})
                spasses.append((handle, direction, soff + len(chunk)))
            elif kind == 5 and sid in streams:
                got = streams.pop(sid)
                sc.alert("stream", stream=sid, reason=reason, from_guest=got[1].hex(), to_guest=got[2].hex())
            continue
        if cfg.get("report"):
            body = a[data_off + data:data_off + data + ln]
            sc.alert("frame", seq=seq, held=bool(flags & 1), data=bytes(body).hex())
        if flags & 1:
            pairs.append((seq, 0))
    if attack == "silent":
        seen = prod
        continue
    seen = prod
    if not done and attack == "never_given":
        pairs = [(prod + 5, 0)]
        done = True
    elif not done and attack == "verdict":
        pairs = [(p[0], 9) for p in pairs]
        done = True
    elif not done and attack == "cons_past":
        struct.pack_into("<Q", b, 0, prod + 3)
        os.eventfd_write(kick_ni, 1)
        done = True
        continue
    elif not done and attack == "dec_jump":
        dec_prod += 1 << 40
        done = True
    struct.pack_into("<Q", b, 0, seen)                # consumed
    for handle, direction, upto in spasses:           # stream passes: seq = offset, then handle
        struct.pack_into("<QII", b, 256 + 16 * (dec_prod & (dec_slots - 1)), upto, 0x10 | direction, handle)
        dec_prod += 1
    publish(pairs)
