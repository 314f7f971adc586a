"""The null scanner: holds what its policy lets it subscribe to and passes every frame.

It measures what scanning costs (the NI kernel's hand-off, the socket, the decision) with
no analysis at all, and is the simplest complete scanner to copy from.
Configuration (the policy's `config` table): `match` (default: TCP SYNs from the guest),
`contain` (default true).
"""
from vhostni.scanner import Scanner

sc = Scanner.connect()
match = sc.config.get("match", {"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn,!ack"})
contain = sc.config.get("contain", True)
sc.subscribe(match, contain=contain)
for frame in sc.frames():
    if frame.held:
        sc.pass_(frame)
