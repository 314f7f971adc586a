"""A hostile test scanner that makes the kernel refuse it ``config.count`` times, as fast
as it can, without waiting for the replies: subscriptions outside its rights and
injections it does not have (each refusal is something the kernel alerts about)."""
from vhostni.scanner import Scanner, wire

sc = Scanner.connect()
for i in range(sc.config.get("count", 500)):
    sc.sock.send(wire.encode_control({"op": "subscribe", "id": i, "match": {"proto": "tcp"}}))
    sc.sock.send(wire.encode_control({"op": "inject", "id": i, "index": 99, "direction": "to_guest"}))
sc.alert("report", sent=True)
while True:
    sc.recv()
