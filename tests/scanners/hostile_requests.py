"""A hostile test scanner that asks for what it has no right to, and sends requests whose
fields have the wrong JSON types, then reports what happened (alert "report").

config ``subscribe``: the request to make (outside its rights); ``inject``: an index it
does not have; ``malformed``: send the type-confused requests too.
"""
from vhostni.scanner import Refused, Scanner, wire

sc = Scanner.connect()
out = {}
try:
    sc.subscribe(sc.config["subscribe"]["match"], contain=sc.config["subscribe"].get("contain", False))
    out["subscribe"] = "granted"
except Refused as exc:
    out["subscribe"] = f"refused: {exc}"
try:
    sc.inject(sc.config.get("inject", 7))
    out["inject"] = "done"
except Refused as exc:
    out["inject"] = f"refused: {exc}"
if sc.config.get("malformed"):
    bad = [
        {"op": "subscribe", "match": {"direction": ["from_guest"]}, "contain": False},
        {"op": "subscribe", "match": {"direction": {"x": 1}}},
        {"op": "subscribe", "match": {"proto": ["tcp"]}},
        {"op": "subscribe", "match": {"src": ["10.0.0.0/8"]}},
        {"op": "subscribe", "match": {"terms": [{"offset": 0, "value": ["aa"]}]}},
        {"op": "subscribe", "match": [1, 2]},
        {"op": "subscribe", "match": None, "contain": "yes"},
        {"op": "inject", "index": 0, "direction": ["to_guest"]},
        {"op": "inject", "index": 0, "direction": {"a": 1}},
        {"op": "inject", "index": [0], "direction": "to_guest"},
        {"op": "nonsense"},
    ]
    errors = []
    for body in bad:
        try:
            sc._request(body)
            errors.append("ok")
        except Refused as exc:
            errors.append(str(exc))
    out["malformed"] = errors
    # alerts get no reply: malformed ones are dropped (and counted as refused)
    sc.sock.send(wire.encode_control({"op": "alert", "message": ["x"]}))
    sc.sock.send(wire.encode_control({"op": "alert", "message": "x", "fields": [1]}))
    # alert fields that collide with the alert's own parameters
    sc.alert("collide", ni="forged", scanner="forged", message="forged", self=1)
sc.alert("report", **out)
while True:
    sc.recv()
