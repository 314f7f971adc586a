"""A hostile test scanner: subscribes with contain rights, then spins forever and never
decides anything (config ``subscribe`` as in decider.py)."""
from vhostni.scanner import Scanner

sc = Scanner.connect()
for sub in sc.config.get("subscribe", []):
    sc.subscribe(sub["match"], contain=sub.get("contain", False))
sc.alert("ready")
while True:
    pass
