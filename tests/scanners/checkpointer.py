"""A test scanner that keeps a frame counter with the NI kernel (Scanner.checkpoint).

On start it reports what it restored (alert "restored", field ``state``: the JSON value, or
the bytes as hex, or null) and its pid, subscribes (config ``subscribe`` as decider.py),
then for each frame adds one to the counter, checkpoints {"frames": n, "pad": "x" * pad}
(config ``pad``, default 0) and passes the frame if held.  Config ``raw`` N: once
subscribed, also sends a raw checkpoint of N bytes, bypassing the SDK's size check (a
hostile scanner), then alerts "raw sent".  Config ``binary``: checkpoint bytes instead.
"""
import os

from vhostni.scanner import Scanner, wire

sc = Scanner.connect()
cfg = sc.config
state = sc.restore()
sc.alert("restored", state=state.hex() if isinstance(state, bytes) else state, pid=os.getpid(),
         limit=sc.checkpoint_max)
n = state["frames"] if isinstance(state, dict) else int.from_bytes(state or b"", "big")
for sub in cfg.get("subscribe", []):
    sc.subscribe(sub["match"], contain=sub.get("contain", False))
if cfg.get("raw") is not None:
    sc.sock.send(wire.encode_checkpoint(wire.CHECKPOINT_BYTES, b"r" * cfg["raw"]))
    sc.alert("raw sent")
sc.alert("ready", pid=os.getpid())
for frame in sc.frames():
    n += 1
    if cfg.get("binary"):
        sc.checkpoint(n.to_bytes(4, "big"))
    else:
        sc.checkpoint({"frames": n, "pad": "x" * cfg.get("pad", 0)})
    if frame.held:
        sc.pass_(frame)
