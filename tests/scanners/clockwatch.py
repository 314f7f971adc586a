"""A test scanner that reports time as the SDK gives it: subscribes to UDP (no holding) and
alerts "frame" for each frame (with the frame's time and sc.clock()/sc.time()) and "quiet"
each time ``frames(timeout=config.timeout)`` yields None (with sc.clock())."""
from vhostni.scanner import Scanner

sc = Scanner.connect()
sc.alert("hello", mode=sc.clock_mode, clock=sc.clock(), time=sc.time())
sc.subscribe({"proto": "udp"})
for frame in sc.frames(timeout=sc.config.get("timeout", 1.0)):
    if frame is None:
        sc.alert("quiet", clock=sc.clock())
    else:
        sc.alert("frame", number=frame.number, frame_time=frame.time, clock=sc.clock(), time=sc.time())
