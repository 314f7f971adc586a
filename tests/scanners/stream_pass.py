"""The null stream scanner: holds every stream of its subscription and passes every byte
as soon as it has read it (what the pass-everything guest test and benchmarks run).

config: ``port`` (default: all), ``direction`` (default both), ``contain`` (default true).
Alerts "ready" once subscribed and "closed" (with the stream's byte counts) per stream.
"""
from vhostni.scanner import Scanner, StreamClosed, StreamData

sc = Scanner.connect()
cfg = sc.config
sc.subscribe_stream(port=cfg.get("port"), direction=cfg.get("direction", "both"),
                    contain=cfg.get("contain", True))
sc.ready()          # subscribed: the kernel stops holding back what its rights cover
sc.alert("ready")
for ev in sc.events():
    if isinstance(ev, StreamData):
        if ev.held:
            sc.pass_(ev)
    elif isinstance(ev, StreamClosed):
        s = ev.stream
        sc.alert("closed", stream=s.id, reason=ev.reason, from_guest=s.received[1],
                 to_guest=s.received[2], tuple=list(s.tuple))
