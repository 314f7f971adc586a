"""A stream-editing scanner: replaces every ``marker`` in the streams it holds with the
policy's pre-registered stream injection ``injection`` (inject before the marker, then cut
the marker), or only cuts it when no injection is configured, passing everything else as
soon as no marker can start in it.

config: ``port``, ``marker`` (bytes as text), ``injection`` (a stream injection's name, or
none).
Alerts "ready" once subscribed, "edited" per stream at its close (how many replacements per
direction), "refused" if the kernel refused an edit.
"""
from vhostni.scanner import Refused, Scanner, StreamClosed, StreamData, StreamEnd

sc = Scanner.connect()
cfg = sc.config
marker = cfg["marker"].encode()
injection = cfg.get("injection")
sc.subscribe_stream(port=cfg.get("port"), direction="both", contain=True)
sc.ready()          # subscribed: the kernel stops holding back what its rights cover
sc.alert("ready")

pending: dict = {}       # (stream id, direction) -> (offset of buf[0], bytearray not yet passed)
edits: dict = {}


def scan(stream, d: int, final: bool) -> None:
    base, buf = pending.get((stream.id, d), (0, bytearray()))
    start = 0
    while True:
        i = buf.find(marker, start)
        if i < 0:
            break
        at = base + i
        try:
            if injection is not None:
                stream.inject(d, at, injection)
            stream.cut(d, at, len(marker))         # counts as our pass of the marker
        except Refused as exc:
            sc.alert("refused", stream=stream.id, offset=at, error=str(exc))
            stream.kill()
            return
        edits[(stream.id, d)] = edits.get((stream.id, d), 0) + 1
        start = i + len(marker)
    # pass what no marker can start in any more
    keep = 0 if final else min(len(marker) - 1, len(buf) - start)
    upto = len(buf) - keep
    if upto > 0:                                   # (below what a cut passed: no-op)
        stream.pass_(d, base + upto)
    if keep:
        # the segment with those bytes waits, and so may the sender: with nothing of it
        # acknowledged, Nagle holds back its next small write, and no byte comes that
        # would decide these.  more: the NI acknowledges them for the receiver.
        stream.more(d)
    pending[(stream.id, d)] = (base + upto, buf[upto:])


for ev in sc.events():
    if isinstance(ev, StreamData):
        if not ev.held:
            continue
        base, buf = pending.get((ev.stream.id, ev.direction), (ev.offset, bytearray()))
        assert base + len(buf) == ev.offset, (base, len(buf), ev.offset)
        buf += ev.data
        pending[(ev.stream.id, ev.direction)] = (base, buf)
        scan(ev.stream, ev.direction, False)
    elif isinstance(ev, StreamEnd):
        if ev.direction in ev.stream.holds:
            scan(ev.stream, ev.direction, True)
    elif isinstance(ev, StreamClosed):
        s = ev.stream
        sc.alert("edited", stream=s.id, reason=ev.reason, from_guest=edits.get((s.id, 1), 0),
                 to_guest=edits.get((s.id, 2), 0), tuple=list(s.tuple))
        for d in (1, 2):
            pending.pop((s.id, d), None)
            edits.pop((s.id, d), None)
