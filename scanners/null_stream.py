"""The null stream scanner: holds every reconstructed TCP stream its policy lets it subscribe
to and passes each byte as soon as it has read it.

It measures what stream inspection costs (the fast path's reassembly, the kernel's hand-off of
stream data, the socket, the pass) with no analysis at all: the stream counterpart of
``null.py``, and the simplest complete stream scanner to copy from.
Configuration (the policy's ``config`` table): ``port`` (a port, "lo-hi" or a list; default:
all), ``direction`` (default "both"), ``contain`` (default true).  Its streams come on its
shared-memory ring and its passes go back there, applied in C: no Python runs in the NI per
chunk (``streams_on_ring``; a kernel without rings gives them over the socket instead).
"""
from vhostni.scanner import Scanner, StreamData

sc = Scanner.connect(streams_on_ring=True)
cfg = sc.config
sc.subscribe_stream(port=cfg.get("port"), direction=cfg.get("direction", "both"),
                    contain=cfg.get("contain", True))
for ev in sc.events():
    if isinstance(ev, StreamData) and ev.held:
        sc.pass_(ev)
