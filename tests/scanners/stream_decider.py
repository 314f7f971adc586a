"""A cooperative stream scanner for the tests, driven by its config.

config: ``subscribe`` [{"port": P, "direction": d, "contain": bool}], ``mode``: "pass"
(pass each chunk as it arrives, the default), "hold" (never pass), "lag" (pass a chunk
only when the next one of its direction arrives); ``kill_on`` / ``cut_on`` / ``more_on`` /
``crash_on``: a marker that makes it kill the stream, cut the chunk, ask for more (once,
then go on), or exit without deciding; ``report``: send an alert for every event
("open" with the stream's tuple, "data" with direction, offset and hex bytes, "end",
"close" with the reason).  When subscribed it sends the alert "ready".
"""
import os

from vhostni.scanner import (Scanner, StreamClosed, StreamData, StreamEnd, StreamOpened)

sc = Scanner.connect()
cfg = sc.config
for sub in cfg.get("subscribe", []):
    sc.subscribe_stream(port=sub.get("port"), direction=sub.get("direction", "both"),
                        contain=sub.get("contain", False))
sc.ready()          # subscribed: the kernel stops holding back what its rights cover
sc.alert("ready", pid=os.getpid())
mode = cfg.get("mode", "pass")
marks = {k: cfg[k].encode() for k in ("kill_on", "cut_on", "more_on", "crash_on") if cfg.get(k)}
lagging = {}
asked_more = set()
for ev in sc.events():
    report = cfg.get("report")
    if isinstance(ev, StreamOpened):
        s = ev.stream
        if report:
            sc.alert("open", stream=s.id, tuple=list(s.tuple), client=s.client, port=s.port,
                     reads=sorted(s.reads), holds=sorted(s.holds), midstream=s.midstream)
    elif isinstance(ev, StreamData):
        s = ev.stream
        if report:
            sc.alert("data", stream=s.id, direction=ev.direction, offset=ev.offset,
                     data=ev.data.hex(), held=ev.held)
        if not ev.held:
            continue
        if "crash_on" in marks and marks["crash_on"] in ev.data:
            os._exit(3)
        if "kill_on" in marks and marks["kill_on"] in ev.data:
            s.kill()
            sc.alert("killed", stream=s.id)
            continue
        if "cut_on" in marks and marks["cut_on"] in ev.data:
            s.cut(ev.direction, ev.offset + ev.data.index(marks["cut_on"]), len(marks["cut_on"]))
            sc.alert("cut", stream=s.id)
            continue
        if "more_on" in marks and marks["more_on"] in ev.data and (s.id, ev.direction) not in asked_more:
            asked_more.add((s.id, ev.direction))
            s.more(ev.direction)
            sc.alert("more", stream=s.id)
        if mode == "pass":
            sc.pass_(ev)
        elif mode == "lag":
            prev = lagging.get((s.id, ev.direction))
            if prev is not None:
                sc.pass_(prev)
            lagging[(s.id, ev.direction)] = ev
    elif isinstance(ev, StreamEnd):
        if report:
            sc.alert("end", stream=ev.stream.id, direction=ev.direction, offset=ev.offset)
    elif isinstance(ev, StreamClosed):
        if report:
            sc.alert("close", stream=ev.stream.id, reason=ev.reason)
