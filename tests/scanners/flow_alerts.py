"""A test scanner that subscribes to flow events (``config``: events, proto, direction) and
alerts each one it gets as ``flow <event>`` with the event's fields; if the kernel refuses
the subscription it alerts ``refused`` with the reason."""
from vhostni.scanner import Refused, Scanner

sc = Scanner.connect()
cfg = sc.config
try:
    sc.subscribe_flows(events=cfg.get("events"), proto=cfg.get("proto"),
                       direction=cfg.get("direction", "both"))
except Refused as exc:
    sc.alert("refused", error=str(exc))
for ev in sc.flows():
    sc.alert(f"flow {ev.event}", flow=ev.flow, change=ev.change, reason=ev.reason, proto=ev.proto,
             initiator=ev.initiator, guest=list(ev.guest), remote=list(ev.remote),
             state=sorted(ev.state), packets=list(ev.packets), bytes=list(ev.bytes),
             start=ev.start, time=ev.time, icmp=ev.icmp, clock=sc.clock())
