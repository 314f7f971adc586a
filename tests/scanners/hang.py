"""A hostile test scanner: subscribes with contain rights, then never decides anything
(config ``subscribe`` as in decider.py).  It spins forever, or with ``keepalive`` it sends,
every 20 ms, a decision for a frame it was never given, as if that showed it alive."""
import time

from vhostni.scanner import Scanner

sc = Scanner.connect()
for sub in sc.config.get("subscribe", []):
    sc.subscribe(sub["match"], contain=sub.get("contain", False))
sc.ready()          # subscribed: the kernel stops holding back what its rights cover
sc.alert("ready")
if sc.config.get("keepalive"):
    n = 10**9
    while True:
        n += 1
        sc.pass_(n)
        time.sleep(0.02)
while True:
    pass
