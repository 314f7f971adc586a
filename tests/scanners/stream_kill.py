"""A stream scanner written like a socket server: accept a connection, read it, and kill
it when a marker shows up (passing everything before).

config: ``port``, ``marker`` (default "KILL").
Alerts "ready" once subscribed, "killed" when it kills.
"""
from vhostni.scanner import Scanner

sc = Scanner.connect()
cfg = sc.config
marker = cfg.get("marker", "KILL").encode()
sc.subscribe_stream(port=cfg.get("port"), direction="both", contain=True)
sc.ready()          # subscribed: the kernel stops holding back what its rights cover
sc.alert("ready")
while True:
    stream = sc.accept()
    seen = {1: b"", 2: b""}
    while (data := stream.read()) is not None:
        # a marker may straddle two chunks: look at the tail of the last one too
        window = seen[data.direction][-len(marker):] + data.data
        seen[data.direction] = data.data
        if marker in window:
            stream.kill()
            sc.alert("killed", stream=stream.id, tuple=list(stream.tuple))
            while stream.read() is not None:      # until the kernel reports it closed
                pass
            break
        stream.pass_(data)
