"""Hostile test scanner (attack tests): takes every free row of its NI's shared subscription
table with distinct subscriptions, each within its own rights (udp, read-only), then idles."""
from vhostni.scanner import Refused, Scanner

sc = Scanner.connect()
got = 0
for port in range(1, 200):
    try:
        sc.subscribe({"proto": "udp", "dport": port})
        got += 1
    except Refused:
        break
sc.ready()
sc.alert("report", subscriptions=got)
for _ in sc.frames():
    pass
