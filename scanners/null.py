"""The null scanner: holds what its policy lets it subscribe to and passes every frame.

It measures what scanning costs (the NI kernel's hand-off, the ring or socket, the
decision) with no analysis at all, and is the simplest complete scanner to copy from.  It
takes frames in batches (``frames_batch``): one call per burst, decisions published in
batches too.
Configuration (the policy's `config` table): `match` (default: TCP SYNs from the guest),
`contain` (default true).
"""
from vhostni.scanner import Scanner

sc = Scanner.connect()
match = sc.config.get("match", {"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn,!ack"})
contain = sc.config.get("contain", True)
sc.subscribe(match, contain=contain)
while True:
    for frame in sc.frames_batch():
        if frame.held:
            sc.pass_(frame)
