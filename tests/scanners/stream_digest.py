"""A stream scanner that checks what it holds: it reads every stream of its subscription in
both directions, holds each byte until it has read it, and keeps an MD5 of each direction.
Bytes must come in order, each offset where the last one ended; any other offset is counted
(``gaps``).  Alerts "ready" once subscribed and "closed" per stream with, per direction, the
byte count and MD5 of what it saw, so a test compares them with what the guests sent.

config: ``port`` (default: all).
"""
import hashlib

from vhostni.scanner import FROM_GUEST, TO_GUEST, Scanner, StreamClosed, StreamData

sc = Scanner.connect()
sc.subscribe_stream(port=sc.config.get("port"), direction="both", contain=True)
sc.ready()
sc.alert("ready")
seen = {}     # stream id -> {direction: [md5, next offset, gaps]}
for ev in sc.events():
    if isinstance(ev, StreamData):
        d = seen.setdefault(ev.stream.id, {FROM_GUEST: [hashlib.md5(), 0, 0],
                                           TO_GUEST: [hashlib.md5(), 0, 0]})[ev.direction]
        if ev.offset != d[1]:
            d[2] += 1
        d[0].update(ev.data)
        d[1] = ev.end
        if ev.held:
            sc.pass_(ev)
    elif isinstance(ev, StreamClosed):
        s = ev.stream
        d = seen.pop(s.id, None) or {FROM_GUEST: [hashlib.md5(), 0, 0], TO_GUEST: [hashlib.md5(), 0, 0]}
        sc.alert("closed", stream=s.id, reason=ev.reason, tuple=list(s.tuple), client=s.client,
                 from_guest=d[FROM_GUEST][1], from_guest_md5=d[FROM_GUEST][0].hexdigest(),
                 to_guest=d[TO_GUEST][1], to_guest_md5=d[TO_GUEST][0].hexdigest(),
                 gaps=d[FROM_GUEST][2] + d[TO_GUEST][2])
