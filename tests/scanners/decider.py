"""A cooperative test scanner: subscribes as its config says and decides by markers in
the frame's bytes.

config: ``subscribe`` [{"match": {...}, "contain": bool}], ``report`` (send an alert
"frame" with number, held, direction and the frame's hex for each frame), ``crash_after``
N (exit with status 3 on receiving frame N+1, without deciding it), ``verdict`` ("pass" or
"cut": decide every held frame so, markers aside), ``inject`` [index, direction] (ask for
that pre-registered injection once subscribed), ``delay`` (seconds to sleep, locked down,
before subscribing: a scanner slow to start), ``crash_before_subscribe`` (exit with status 3
instead), ``no_ready`` (answer nothing, never wait for an event: a scanner not written with
the SDK's loop).
Markers: ``CUT`` cut; ``HOLD`` never decide; ``LATER`` hold until the next frame arrives,
then pass it (and then decide the new one); anything else: pass.
When subscribed it sends the alert "ready".
"""
import os
import time

from vhostni.scanner import Scanner, wire

sc = Scanner.connect()
cfg = sc.config
time.sleep(cfg.get("delay", 0))
if cfg.get("crash_before_subscribe"):
    os._exit(3)
for sub in cfg.get("subscribe", []):
    sc.subscribe(sub["match"], contain=sub.get("contain", False))
if cfg.get("inject") is not None:
    sc.inject(*cfg["inject"])
if cfg.get("no_ready"):
    while True:
        time.sleep(1)
sc.ready()          # subscribed: the kernel stops holding back what its rights cover
sc.alert("ready", pid=os.getpid())
later = []
n = 0
for frame in sc.frames():
    data = bytes(frame.data)        # a view into the ring: ``in`` on a memoryview looks for ints
    n += 1
    if cfg.get("crash_after") is not None and n > cfg["crash_after"]:
        os._exit(3)
    if cfg.get("report"):
        sc.alert("frame", number=frame.number, held=frame.held, direction=frame.direction,
                 data=data.hex())
    if not frame.held:
        continue
    for f in later:
        sc.pass_(f)
    later = []
    if cfg.get("verdict") in ("pass", "cut"):
        sc.decide(frame, wire.CUT if cfg["verdict"] == "cut" else wire.PASS)
    elif b"CUT" in data:
        sc.cut(frame)
    elif b"HOLD" in data:
        pass
    elif b"LATER" in data:
        later.append(frame)
    else:
        sc.pass_(frame)
