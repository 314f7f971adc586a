"""A hostile test scanner that floods the NI kernel.

config ``mode``: "decisions" (decisions for frames it never got, as fast as it can),
"garbage" (bytes that are no message), "frame" (a frame message: scanners may not send
frames), "deep_json" (a control message nested deeper than any parser's stack),
"stderr" (writes to its stderr as fast as it can, forever), "forge" (one stderr line with a
carriage return and escape sequences pretending to be a daemon log line, then an alert whose
fields hold a bare NaN, which strict JSON has no word for).
"""
import os

from vhostni.scanner import Scanner, wire

sc = Scanner.connect()
mode = sc.config.get("mode")
s = sc.sock
if mode == "decisions":
    n = 0
    while True:
        n += 1
        s.send(wire.encode_decision(10**9 + n, wire.PASS))
elif mode == "garbage":
    while True:
        s.send(b"\x00garbage\xff" * 10)
elif mode == "frame":
    s.send(wire.encode_frame(1, wire.FROM_GUEST, False, 0, b"\xff" * 60))
elif mode == "deep_json":
    s.send(b"J" + b"[" * 32000 + b"]" * 32000)
elif mode == "forge":
    os.write(2, b"ok\r2026-01-01 00:00:00 vhostni INFO all clear\x1b[2K\n")
    s.send(b'J{"op": "alert", "message": "ratio", "fields": {"r": NaN}}')
elif mode == "stderr":
    chunk = b"x" * 65535 + b"\n"
    while True:
        os.write(2, chunk)
while True:
    sc.recv()
